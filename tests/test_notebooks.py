"""Static checks of the committed notebooks (nbval runs them: see the README's test command).

No stray outputs: only cells tagged `nbval-check-output` may carry outputs, as plain text with an
execution count, so that `pytest --nbval-lax` compares exactly those. Every notebook has the
course header, a Colab install cell that never reinstalls torch, one `parameters` cell that
reads ACCUMLAB_CI, what the learner will be able to do, and self-check questions.
"""

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
REQUIRED = ("00_start_here", "01_memory_wall", "02_the_math", "03_equivalence_lab")
# every lesson notebook (NN_name.ipynb) in notebooks/, the required four and any later ones
COURSE = tuple(sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb")))
ORG_REPO = "accumlab/accumlab"
CHECK_TAG = "nbval-check-output"


def _load(name):
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _tags(cell):
    return cell.metadata.get("tags", [])


def test_the_course_notebooks_exist():
    assert set(REQUIRED) <= set(COURSE)


def test_start_here_maps_every_lesson():
    first_cells = "".join(c.source for c in _load("00_start_here").cells[:8]
                          if c.cell_type == "markdown")
    for name in COURSE:
        assert f"]({name}.ipynb)" in first_cells, f"00_start_here does not list {name}"


@pytest.mark.parametrize("name", COURSE)
def test_notebook_is_valid_and_has_no_stray_outputs(name):
    nb = _load(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert "widgets" not in nb.metadata, "saved widget state: clear it before committing"
    for i, cell in enumerate(_code(nb)):
        where = f"{name} code cell {i}: {cell.source.splitlines()[0] if cell.source else ''!r}"
        if CHECK_TAG not in _tags(cell):
            assert not cell.outputs, f"{where} carries outputs but is not tagged {CHECK_TAG}"
            assert cell.execution_count is None, f"{where} has an execution count"
            continue
        assert cell.outputs, f"{where} is tagged {CHECK_TAG} but stores no expected output"
        assert cell.execution_count is not None, f"{where}: nbval needs an execution count"
        for out in cell.outputs:
            assert out.output_type in ("stream", "execute_result"), f"{where}: {out.output_type}"
            if out.output_type == "stream":
                assert out.name == "stdout", f"{where}: stored stderr"
            else:
                assert set(out.data) == {"text/plain"}, f"{where}: rich output {set(out.data)}"


@pytest.mark.parametrize("name", COURSE)
def test_checked_outputs_are_short_robust_facts(name):
    """Checked cells print verdicts or short strings, never raw floats, timings or addresses."""
    for cell in _code(_load(name)):
        if CHECK_TAG not in _tags(cell):
            continue
        text = "".join(o.get("text", "") or o.get("data", {}).get("text/plain", "")
                       for o in cell.outputs)
        for line in text.strip().splitlines():
            assert len(line) <= 160, f"{name}: long checked line {line!r}"
            assert not re.search(r"\d\.\d{4,}|0x[0-9a-f]{6,}", line), \
                f"{name}: raw float or address in checked line {line!r}"


@pytest.mark.parametrize("name", COURSE)
def test_one_parameters_cell_reads_the_ci_variable(name):
    cells = [c for c in _code(_load(name)) if "parameters" in _tags(c)]
    assert len(cells) == 1, f"{name}: {len(cells)} cells tagged 'parameters'"
    assert 'os.environ.get("ACCUMLAB_CI"' in cells[0].source


@pytest.mark.parametrize("name", COURSE)
def test_header_badges_and_course_structure(name):
    nb = _load(name)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    colab = f"https://colab.research.google.com/github/{ORG_REPO}/blob/main/notebooks/{name}.ipynb"
    binder = (f"https://mybinder.org/v2/gh/{ORG_REPO}/HEAD?urlpath=lab/tree/notebooks/"
              f"{name}.ipynb")
    assert colab in first.source and binder in first.source
    assert "colab-badge.svg" in first.source and "mybinder.org/badge_logo.svg" in first.source
    assert "## What you will be able to do" in first.source
    markdown = [c.source for c in nb.cells if c.cell_type == "markdown"]
    assert any(s.startswith("## Self-check questions") for s in markdown[-2:]), \
        f"{name} should end with self-check questions"
    for other in COURSE:  # the course navigation links every other notebook
        if other != name:
            assert f"({other}.ipynb)" in first.source


@pytest.mark.parametrize("name", COURSE)
def test_colab_cell_installs_accumlab_only_when_missing_and_pins_torch(name):
    setup = _code(_load(name))[0]
    src = setup.source
    assert '"google.colab" in sys.modules' in src
    assert re.search(r"try:\s+import accumlab", src)
    assert "except ImportError" in src
    assert "torch-pin.txt" in src and '"-c"' in src and 'f"torch=={torch.__version__}' in src
    assert "git" in src and '"-e"' in src
    for cell in _code(_load(name)):  # no cell installs or upgrades torch itself
        assert not re.search(r"pip[^\n]*install[^\n]*\btorch\b", cell.source), name


@pytest.mark.parametrize("name", COURSE)
def test_no_plotly_or_widget_output_can_be_compared(name):
    """nbval compares text/plain of widget reprs; checked cells must not display widgets."""
    for cell in _code(_load(name)):
        if CHECK_TAG in _tags(cell):
            last = cell.source.strip().splitlines()[-1]
            assert not re.match(r"^(panel|live|widgets\.|viz\.)", last), (name, last)


@pytest.mark.parametrize("name", COURSE)
def test_links_to_other_notebooks_resolve(name):
    text = "".join(c.source for c in _load(name).cells if c.cell_type == "markdown")
    for target in re.findall(r"\]\(([\w./-]+\.ipynb)\)", text):
        assert (NOTEBOOK_DIR / target).exists(), f"{name} links to missing {target}"
