"""The workshop's tooling: solved notebooks for instructors, rendered copies for the repository.

    python notebooks/workshop.py solve [--out DIR]   # the notebooks with the answers filled in
    python notebooks/workshop.py render [--force]    # docs/notebooks/: every output and figure
    python notebooks/workshop.py check               # is docs/notebooks/ current?

How the answers get in. An exercise is a code cell tagged `exercise` that defines one name
(`my_merge`, `MY_ROW_MAX`, ...) as a stub; the cell after it, tagged `check`, calls its
checker. notebooks/answers/NN_name.py holds, for each exercise, a cell `# %% my_merge` with the
answer. `solve` writes copies of the notebooks whose exercise cells hold those answers
(default notebooks/solved/, which git ignores); the notebooks themselves never contain an
answer, and no switch in them turns one on.

Rendered copies. `render` executes each notebook as shipped (stubs unwritten, on the CPU, one
BLAS thread) and writes docs/notebooks/NN_name.md with every cell, its text output and its
figures (docs/notebooks/NN_name/figure-K.png), for reading on the repository's web page.
`check` (and tests/test_notebooks.py) executes again and compares: the text must be the
same (numbers to 2%), each figure the same picture (the share of pixels that differ
clearly must stay small), except the outputs of cells tagged `varies` (the set-up check's
versions, timings, temporary paths), which are not compared. The notebooks' data is the
standard library of the Python running them, so a copy is compared only by the Python
version that rendered it (recorded in the copy). `render` rewrites only stale copies.
"""
import argparse
import ast
import contextlib
import copy
import io
import os
import platform
import re
import sys
import time
from pathlib import Path

import nbformat

NOTEBOOKS = Path(__file__).resolve().parent
ROOT = NOTEBOOKS.parent
ANSWERS = NOTEBOOKS / "answers"
DOCS = ROOT / "docs" / "notebooks"
# The learner's path, in order (README's Workshop section and WORKSHOP.md list the same).
LEARNER_PATH = ["01_tokenizer.ipynb", "02_forward_pass.ipynb", "03_backward_pass.ipynb",
                "04_attention_kernels.ipynb", "05_training.ipynb"]
# The kernel's environment: figures as PNG outputs, one BLAS thread (the notebooks' arrays are
# small; a multi-threaded BLAS on a busy machine is several times slower on them).
KERNEL_ENV = {"MPLBACKEND": "module://matplotlib_inline.backend_inline",
              "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SHIPPED_ENV = {**KERNEL_ENV, "ALBOR_DEVICE": "cpu"}   # the rendered copies come from the CPU
CELL_TIMEOUT = 600
NUMBER_TOLERANCE = 0.02          # numbers in text outputs may differ by 2% between machines
PIXEL_DIFFERENCE = 0.25          # a pixel differs clearly when a channel moves by more than this
PIXELS_ALLOWED = 0.01            # ... and at most 1% of a figure's pixels may
VARIES_TAG = "varies"
# The notebooks' data is the standard library of the Python that runs them, so a render is
# comparable only with one made by the same Python version.
PYTHON_LINE = "Python (its standard library is the data): "


# ---------------------------------------------------------------------------------- answers

def tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def defined_name(source):
    """The one name an exercise cell defines (a def or an assignment; imports aside)."""
    names = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [target.id for target in node.targets if isinstance(target, ast.Name)]
    if len(names) != 1:
        raise ValueError(f"an exercise cell defines exactly one name, this one {names}:\n{source}")
    return names[0]


def exercise_cells(nb):
    """{defined name: cell} of the cells tagged `exercise`, in order."""
    return {defined_name(cell.source): cell for cell in nb.cells if "exercise" in tags(cell)}


def answers(name):
    """{exercise name: answer source} from notebooks/answers/<notebook stem>.py."""
    text = (ANSWERS / (Path(name).stem + ".py")).read_text(encoding="utf-8")
    parts = re.split(r"^# %% (\w+)\n", text, flags=re.M)   # [preamble, name, body, name, ...]
    return {parts[i]: parts[i + 1].strip() + "\n" for i in range(1, len(parts), 2)}


def with_answers(nb, name):
    """A copy of notebook `name` whose exercise cells hold the answers."""
    solved = copy.deepcopy(nb)
    keys = answers(name)
    cells = exercise_cells(solved)
    if set(cells) != set(keys):
        raise ValueError(f"{name}: exercises {sorted(cells)} but answers {sorted(keys)}")
    for exercise, cell in cells.items():
        cell.source = keys[exercise].rstrip("\n")
    return solved


def read(name):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


# ---------------------------------------------------------------------------------- execution

@contextlib.contextmanager
def environment(settings):
    """os.environ with settings (the kernel inherits it), restored afterwards."""
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def execute(nb, env):
    """Run nb in a fresh python3 kernel (cwd notebooks/) with env; returns (nb, seconds).
    An error in a cell raises nbclient's CellExecutionError."""
    from nbclient import NotebookClient
    start = time.perf_counter()
    with environment(env):
        NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb, time.perf_counter() - start


def printed(cell):
    """What a cell printed (stdout and stderr)."""
    return "".join(output.get("text", "") for output in cell.get("outputs", [])
                   if output.get("output_type") == "stream")


def verdicts(nb):
    """The last printed line of each cell tagged `check`: a checker's verdict."""
    return [(printed(cell).strip().splitlines() or [""])[-1]
            for cell in nb.cells if "check" in tags(cell)]


# ---------------------------------------------------------------------------------- rendering

FENCE = "```"


def _outputs_markdown(cell, stem, images):
    """Markdown for a code cell's outputs; PNGs are added to images {file name: bytes}."""
    import base64
    parts, text = [], ""
    for output in cell.outputs:
        if output.output_type == "stream":
            text += output.text
            continue
        if text:
            parts.append(f"{FENCE}text\n{text.rstrip()}\n{FENCE}")
            text = ""
        data = output.get("data", {})
        if "image/png" in data:
            file = f"figure-{len(images) + 1}.png"
            images[file] = base64.b64decode(data["image/png"])
            parts.append(f"![figure {len(images)}]({stem}/{file})")
        elif "text/plain" in data:
            parts.append(f"{FENCE}text\n{data['text/plain'].rstrip()}\n{FENCE}")
    if text:
        parts.append(f"{FENCE}text\n{text.rstrip()}\n{FENCE}")
    return parts


def render(nb, name):
    """(Markdown text, {figure file: PNG bytes}) of an executed notebook."""
    stem = Path(name).stem
    images = {}
    blocks = [f"<!-- Rendered from notebooks/{name} as shipped (exercises not written yet) by "
              "`python notebooks/workshop.py render`; tests/test_notebooks.py checks it is "
              "current. Do not edit: edit the notebook and render again. -->",
              f"<!-- {PYTHON_LINE}{platform.python_version()} -->"]
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            blocks.append(cell.source)
            continue
        blocks.append(f"{FENCE}python\n{cell.source}\n{FENCE}")
        outputs = _outputs_markdown(cell, stem, images)
        if outputs and VARIES_TAG in tags(cell):
            outputs = ["<!-- output varies: -->"] + outputs + ["<!-- end varies -->"]
        blocks += outputs
    return "\n\n".join(blocks) + "\n", images


def write_render(name, text, images):
    stem = Path(name).stem
    folder = DOCS / stem
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("figure-*.png"):
        old.unlink()
    for file, data in images.items():
        (folder / file).write_bytes(data)
    (DOCS / f"{stem}.md").write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------- currency

NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _steady(text):
    """text without the parts between the `output varies` markers."""
    return re.sub(r"<!-- output varies: -->.*?<!-- end varies -->", "<!-- output varies -->",
                  text, flags=re.S)


def _numbers_close(a, b):
    x, y = float(a.replace(",", "")), float(b.replace(",", ""))
    return x == y or abs(x - y) <= NUMBER_TOLERANCE * max(abs(x), abs(y)) or max(abs(x), abs(y)) < 1e-5


def _lines_match(fresh, committed):
    """Same words and punctuation; numbers within NUMBER_TOLERANCE."""
    if NUMBER.sub("#", fresh) != NUMBER.sub("#", committed):
        return False
    return all(_numbers_close(a, b) for a, b in zip(NUMBER.findall(fresh), NUMBER.findall(committed)))


def _figures_match(fresh_png, committed_png):
    """Same size, and few pixels differ clearly (fonts and numeric noise move a few)."""
    import matplotlib.image
    import numpy as np
    a = matplotlib.image.imread(io.BytesIO(fresh_png), format="png")
    b = matplotlib.image.imread(io.BytesIO(committed_png), format="png")
    if a.shape != b.shape:
        return False
    differing = (np.abs(a.astype(np.float64) - b.astype(np.float64)) > PIXEL_DIFFERENCE).any(axis=-1)
    return differing.mean() <= PIXELS_ALLOWED


def rendered_with(name):
    """The Python version docs/notebooks' copy of `name` was rendered with (None: no copy)."""
    path = DOCS / f"{Path(name).stem}.md"
    found = re.search(re.escape(PYTHON_LINE) + r"(\S+) -->", path.read_text(encoding="utf-8")) \
        if path.is_file() else None
    return found and found.group(1)


def differences(name, text, images):
    """What differs between a fresh render of `name` and docs/notebooks (empty: current).
    Only meaningful with the Python version the copy was rendered with (rendered_with)."""
    stem = Path(name).stem
    committed_md = DOCS / f"{stem}.md"
    if not committed_md.is_file():
        return [f"{committed_md.relative_to(ROOT)} is missing"]
    committed = committed_md.read_text(encoding="utf-8")
    found = []
    fresh_lines, old_lines = _steady(text).splitlines(), _steady(committed).splitlines()
    if len(fresh_lines) != len(old_lines):
        found.append(f"{stem}.md: {len(old_lines)} lines, a fresh render has {len(fresh_lines)}")
    for number, (new, old) in enumerate(zip(fresh_lines, old_lines), start=1):
        if not _lines_match(new, old):
            found.append(f"{stem}.md line {number}: {old!r} is now {new!r}")
            break
    steady_figures = re.findall(r"\(" + re.escape(stem) + r"/(figure-\d+\.png)\)", _steady(text))
    on_disk = sorted(path.name for path in (DOCS / stem).glob("figure-*.png"))
    if sorted(images) != on_disk:
        found.append(f"{stem}/: figures {on_disk}, a fresh render has {sorted(images)}")
    for file in steady_figures:
        path = DOCS / stem / file
        if path.is_file() and not _figures_match(images[file], path.read_bytes()):
            found.append(f"{stem}/{file} shows something else now")
    return found


# ---------------------------------------------------------------------------------- commands

def command_solve(out):
    out.mkdir(parents=True, exist_ok=True)
    for name in LEARNER_PATH:
        nbformat.write(with_answers(read(name), name), out / name)
        print(f"wrote {out / name}")


def command_render(check_only, force=False):
    """Execute each notebook as shipped; check its copy in docs/notebooks, or write it (only
    when it is stale, unless force: the outputs that vary would churn the diffs)."""
    stale = []
    for name in LEARNER_PATH:
        if check_only and rendered_with(name) not in (None, platform.python_version()):
            print(f"{name}: rendered with Python {rendered_with(name)}, this is "
                  f"{platform.python_version()}: its data differs, nothing to compare")
            continue
        nb, seconds = execute(read(name), SHIPPED_ENV)
        text, images = render(nb, name)
        found = differences(name, text, images)
        if check_only:
            stale += found
            print(f"{name}: {'current' if not found else 'STALE'} ({seconds:.1f} s)")
        elif not found and not force:
            print(f"{name}: current, left as it is ({seconds:.1f} s)")
        else:
            write_render(name, text, images)
            size = sum(len(data) for data in images.values())
            print(f"{name}: {len(images)} figures, {size / 1024:.0f} KB ({seconds:.1f} s)")
    for line in stale:
        print("  " + line)
    if stale:
        sys.exit("docs/notebooks is stale: python notebooks/workshop.py render")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    solve = sub.add_parser("solve", help="write the notebooks with the answers filled in")
    solve.add_argument("--out", type=Path, default=NOTEBOOKS / "solved")
    render_parser = sub.add_parser("render", help="execute the notebooks as shipped and write "
                                   "docs/notebooks/ (where stale)")
    render_parser.add_argument("--force", action="store_true", help="write every copy anew")
    sub.add_parser("check", help="execute the notebooks and compare with docs/notebooks/")
    args = parser.parse_args(argv)
    if args.command == "solve":
        command_solve(args.out)
    else:
        command_render(check_only=args.command == "check", force=getattr(args, "force", False))


if __name__ == "__main__":
    main()
