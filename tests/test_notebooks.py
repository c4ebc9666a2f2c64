"""The workshop's notebooks run as shipped and with their answers, fast, and their rendered
copies in docs/notebooks/ are current.

Each notebook is executed twice, each time in a fresh Jupyter kernel (nbclient, kernel
"python3", working directory notebooks/, one BLAS thread, figures as PNG outputs), by the
same code as `python notebooks/workshop.py`:
  * as shipped, on the CPU (ALBOR_DEVICE=cpu): no cell raises and every checker says "not
    written yet" (the stubs are untouched); this run is rendered and compared with
    docs/notebooks/ (text equal up to number noise, figures the same picture);
  * with notebooks/answers/ filled into the cells tagged `exercise` (workshop.with_answers),
    on the device albor picks: every checker says "right ✓".
tests/test_workshop_checks.py feeds every checker typical wrong answers.

The committed notebooks carry no outputs (small, readable diffs); docs/notebooks/ carries
them for readers of the repository (README's Workshop section says why).
"""
import platform
import sys
from pathlib import Path

import pytest

from tests.oracles import oracle

# Jupyter and matplotlib are dev requirements only: where one is missing, this module is skipped.
nbformat = oracle("nbformat")
oracle("nbclient")    # executes the notebooks
oracle("ipykernel")   # the "python3" kernel the notebooks run in
oracle("matplotlib")  # every notebook draws

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))

import checks  # noqa: E402
import setup_check  # noqa: E402
import workshop  # noqa: E402

LEARNER_PATH = workshop.LEARNER_PATH
_runs = {}        # (notebook, "shipped" or "solved") -> (executed notebook, seconds)


def run(name, kind):
    """Execute notebook `name` as shipped or with the answers (each once per session)."""
    if (name, kind) not in _runs:
        nb = workshop.read(name)
        if kind == "shipped":
            _runs[name, kind] = workshop.execute(nb, workshop.SHIPPED_ENV)
        else:
            _runs[name, kind] = workshop.execute(workshop.with_answers(nb, name), workshop.KERNEL_ENV)
    return _runs[name, kind]


def code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def test_the_learners_path_is_these_five_notebooks():
    assert sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")) == LEARNER_PATH


@pytest.mark.parametrize("name", LEARNER_PATH)
def test_committed_notebook_has_no_outputs_and_no_answers(name):
    nb = workshop.read(name)
    nbformat.validate(nb)
    for i, cell in enumerate(code_cells(nb)):
        assert cell.outputs == [] and cell.execution_count is None, (
            f"{name} code cell {i} has outputs: commit notebooks stripped (WORKSHOP.md has the command)")
    assert "SOLUTION" not in "\n".join(cell.source for cell in nb.cells)   # no answer switch
    for cell in workshop.exercise_cells(nb).values():   # every exercise cell is its stub
        body_is_empty = "raise NotImplementedError" in cell.source or "// your code here\n}" in cell.source
        assert "your code here" in cell.source and body_is_empty, cell.source

@pytest.mark.parametrize("name", LEARNER_PATH)
def test_notebook_opens_with_the_setup_check(name):
    first = code_cells(workshop.read(name))[0]
    assert "check_setup(" in first.source and workshop.VARIES_TAG in workshop.tags(first)


@pytest.mark.parametrize("name", LEARNER_PATH)
def test_as_shipped_it_runs_and_every_checker_says_not_written_yet(name):
    nb, _ = run(name, "shipped")
    assert all(cell.execution_count is not None for cell in code_cells(nb))
    assert not [output for cell in code_cells(nb) for output in cell.outputs
                if output.output_type == "error"]
    said = workshop.verdicts(nb)
    assert len(said) >= 2 and all(line.startswith(checks.NOT_WRITTEN) for line in said), said


@pytest.mark.parametrize("name", LEARNER_PATH)
def test_with_the_answers_every_checker_says_right(name):
    nb, _ = run(name, "solved")
    said = workshop.verdicts(nb)
    assert len(said) >= 2 and all(line == checks.RIGHT for line in said), said


@pytest.mark.parametrize("name", LEARNER_PATH)
def test_rendered_copy_in_docs_is_current(name):
    rendered_with = workshop.rendered_with(name)
    if rendered_with not in (None, platform.python_version()):
        pytest.skip(f"docs/notebooks was rendered with Python {rendered_with}: its standard "
                    "library, the notebooks' data, differs from this one's")
    nb, _ = run(name, "shipped")
    text, images = workshop.render(nb, name)
    found = workshop.differences(name, text, images)
    assert not found, "docs/notebooks is stale (python notebooks/workshop.py render):\n" + "\n".join(found)


def test_currency_check_tolerates_number_noise_and_catches_changed_text():
    assert workshop._lines_match("loss 4.5861 after 20 steps", "loss 4.5902 after 20 steps")
    assert workshop._lines_match("error 3.1e-08", "error 9.9e-09")
    assert not workshop._lines_match("loss 4.5861 after 20 steps", "loss 5.1 after 20 steps")
    assert not workshop._lines_match("right ✓", "wrong ✗")


def test_solve_writes_each_notebook_with_its_answers(tmp_path):
    workshop.command_solve(tmp_path)
    for name in LEARNER_PATH:
        solved = nbformat.read(tmp_path / name, as_version=4)
        keys = workshop.answers(name)
        cells = workshop.exercise_cells(solved)
        assert set(cells) == set(keys)
        assert all(cells[exercise].source.strip() == keys[exercise].strip() for exercise in keys)


def test_requirements_for_the_notebooks_are_what_the_setup_check_checks():
    lines = (ROOT / "requirements-notebooks.txt").read_text().splitlines()
    names = {line.split(">")[0].split("=")[0].strip() for line in lines
             if line.strip() and not line.startswith("#")}
    assert names == set(setup_check.PACKAGES.values())


def test_readme_workshop_section_lists_the_notebooks_and_points_to_the_guide():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "\n## Workshop\n" in readme
    section = readme.split("\n## Workshop\n", 1)[1].split("\n## ", 1)[0]
    positions = [section.find(name) for name in LEARNER_PATH]
    assert -1 not in positions and positions == sorted(positions), positions
    for needed in ("WORKSHOP.md", "requirements-notebooks.txt", "docs/notebooks"):
        assert needed in section


def test_workshop_guide_covers_the_day():
    guide = (ROOT / "WORKSHOP.md").read_text(encoding="utf-8")
    for name in LEARNER_PATH:
        assert name in guide
    for needed in ("requirements-notebooks.txt", "workshop.py solve", "notebooks/answers/",
                   "docs/notebooks/", "Schedule", "Prerequisites", "WSL2", "issue 15"):
        assert needed in guide, needed
