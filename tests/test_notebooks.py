"""The teaching notebooks in notebooks/ run top to bottom, and notebook 3's exercise checker
tells a right answer from a wrong one.

The notebooks are committed with their outputs stripped (see the README's Workshop section), so
these tests are what proves them: each one is executed here in a fresh Jupyter kernel (nbclient,
kernel "python3", working directory notebooks/), and any cell that raises fails the test.

Kernel environment: MPLBACKEND=Agg (no display needed; every figure is drawn at the end, so a
label matplotlib cannot render still fails), and one BLAS/OpenMP thread: the notebooks' arrays
are tiny, and a multi-threaded BLAS on a busy machine is several times slower on them.
"""
import copy
from pathlib import Path

import pytest

from tests.oracles import oracle

# Jupyter and matplotlib are dev requirements only: where one is missing, this module is skipped.
nbformat = oracle("nbformat")
NotebookClient = oracle("nbclient").NotebookClient
oracle("ipykernel")   # the "python3" kernel the notebooks run in
oracle("matplotlib")  # every notebook draws

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
# The learner's path, in order (the README's Workshop section lists the same files).
LEARNER_PATH = ["01_tokenizer.ipynb", "02_forward_pass.ipynb", "03_backward_pass.ipynb",
                "04_attention_kernels.ipynb", "05_training.ipynb"]
CELL_TIMEOUT = 600  # seconds; a whole notebook takes well under a minute on an idle laptop
KERNEL_ENV = {"MPLBACKEND": "Agg", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1"}
DRAW_ALL_FIGURES = """
import matplotlib.pyplot as plt
for number in plt.get_fignums():   # with Agg, plt.show() draws nothing: draw every figure now
    plt.figure(number).canvas.draw()
"""

_executed = {}  # notebook name -> the executed notebook (each runs once per session)


@pytest.fixture(autouse=True)
def kernel_environment(monkeypatch):
    for name, value in KERNEL_ENV.items():
        monkeypatch.setenv(name, value)


def run(nb):
    """Execute nb in a fresh kernel with cwd notebooks/; raises CellExecutionError on any error."""
    NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def executed(name):
    if name not in _executed:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nb.cells.append(nbformat.v4.new_code_cell(DRAW_ALL_FIGURES))
        _executed[name] = run(nb)
    return _executed[name]


def cells_tagged(nb, tag):
    return [cell for cell in nb.cells if tag in cell.get("metadata", {}).get("tags", [])]


def printed(cell):
    return "".join(output.get("text", "") for output in cell.get("outputs", [])
                   if output.get("output_type") == "stream")


def test_the_learners_path_is_these_five_notebooks():
    assert sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")) == LEARNER_PATH


@pytest.mark.parametrize("name", LEARNER_PATH)
def test_committed_notebook_has_no_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{name} cell {i} has outputs: commit notebooks stripped (the README's "
                "Workshop section has the command)")


@pytest.mark.parametrize("name", LEARNER_PATH)
def test_notebook_runs_top_to_bottom(name):
    nb = executed(name)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code_cells)
    errors = [output for cell in code_cells for output in cell.outputs if output.output_type == "error"]
    assert not errors


def test_exercise_checker_says_right_for_the_solution_and_wrong_for_a_wrong_answer():
    nb = executed("03_backward_pass.ipynb")
    [check] = cells_tagged(nb, "check")
    [wrong] = cells_tagged(nb, "wrong-answer")
    assert "SOLUTION = True" in check.source
    assert printed(check).rstrip().endswith("right ✓"), printed(check)
    assert printed(wrong).rstrip().endswith("wrong ✗"), printed(wrong)


LEARNER_ANSWER = '''
def my_rmsnorm_backward(dout, x, weight, rstd):
    C = x.shape[-1]
    g = dout * weight
    # d out_i / d x_j = weight_i * (rstd * delta_ij - rstd**3 * x_i * x_j / C)
    dx = rstd * g - rstd ** 3 * x * (g * x).sum(axis=-1, keepdims=True) / C
    return dx, (dout * x * rstd).sum(axis=0)
'''
LEARNER_MISTAKE = '''
def my_rmsnorm_backward(dout, x, weight, rstd):
    return dout * weight * rstd, (dout * x * rstd).sum(axis=0)
'''


def test_exercise_as_a_learner_meets_it():
    """With SOLUTION = False the checker runs the learner's my_rmsnorm_backward: the untouched
    stub is "not written yet" (no error: the notebook still runs on), an answer of the learner's
    own is right, a mistaken one wrong."""
    nb = nbformat.read(NOTEBOOKS / "03_backward_pass.ipynb", as_version=4)
    cells = [copy.deepcopy(cell) for cell in cells_tagged(nb, "exercise")]
    [check] = [cell for cell in cells if "check" in cell.metadata.tags]
    assert "SOLUTION = True" in check.source
    check.source = check.source.replace("SOLUTION = True", "SOLUTION = False")
    new = nbformat.v4.new_code_cell
    nb.cells = cells + [new(LEARNER_ANSWER), new(check.source), new(LEARNER_MISTAKE), new(check.source)]
    run(nb)
    untouched_stub = printed(nb.cells[len(cells) - 2])   # the check cell, then "wrong-answer"
    assert nb.cells[len(cells) - 2] is check
    assert "not written yet" in untouched_stub, untouched_stub
    assert printed(nb.cells[-3]).rstrip().endswith("right ✓"), printed(nb.cells[-3])
    assert printed(nb.cells[-1]).rstrip().endswith("wrong ✗"), printed(nb.cells[-1])


def test_readme_workshop_section_lists_the_notebooks_in_order():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "\n## Workshop\n" in readme
    section = readme.split("\n## Workshop\n", 1)[1].split("\n## ", 1)[0]
    positions = [section.find(name) for name in LEARNER_PATH]
    assert -1 not in positions and positions == sorted(positions), positions
    assert "requirements-dev.txt" in section
