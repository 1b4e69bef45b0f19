"""Static checks of the committed notebooks (nbval runs them: see the README's test command).

No stray outputs: only cells tagged `nbval-check-output` may carry outputs, as plain text, and
they carry the metadata `keep_output: true`, so that nbstripout (the git filter) keeps them;
`pytest --nbval-lax` compares exactly those (notebooks/conftest.py gives them back the execution
count that nbstripout removes). Every committed notebook is what nbstripout writes. Every notebook has the
course header, one short Colab install cell (a no-op elsewhere, safe to re-run, pins Colab's torch
and pyproject.toml's transformers range), one `parameters` cell, what the learner will be able
to do, and self-check questions.

What students run is what CI runs: no size in a notebook depends on ACCUMLAB_CI (only a GPU
switch may read it; `test_students_run_what_ci_runs`).

Numbers in the prose are computed (the "lesson audit", run by notebooks/conftest.py after each
lesson's last cell, in the same nbval run: tests/notebook_audit.py). Every number a markdown
cell states must appear in what the notebook's code cells print or display (stdout, text,
HTML tables), rounded as the prose rounds it ("2.6e-7" is backed by a printed 2.63e-07, "25%"
by 25 or 0.25), or in a code cell's source (parameters, constants). Not checked:
- single-digit integers, years (1950-2035), and numbers right after a naming word
  ("section 4.3", "notebook 02", "issue 12", "PR #35808", "Python 3.10");
- math ($...$), inline code and code blocks, link targets and URLs, HTML tags, the course
  navigation line and links to lessons, heading and list numbering;
- the self-check questions (hypotheticals; their answers are checked, and may reuse the
  questions' numbers);
- **references**: a paragraph that quotes numbers measured elsewhere says so, with its source,
  in the words "measured elsewhere: <source>", e.g.
  `*Reference, measured elsewhere: accumlab/lab/memory/shapes.py (REFERENCE_H100_GPT2_SMALL).*`
  Every number in that paragraph (the text between blank lines) is then exempt.
A sentence that states a measured outcome also gets an `nbval-check-output` cell printing a
boolean verdict at the default sizes, next to a cell that prints the numbers themselves.
The same audit fails when the notebook would be saved at over 2 MB after Run All (its
outputs plus the widget state JupyterLab stores with it).
"""

import ast
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import notebook_audit
import pytest
import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

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
        assert cell.metadata.get("keep_output") is True, \
            f"{where}: set its metadata keep_output: true, or nbstripout removes its output"
        assert cell.execution_count is None, f"{where}: nbstripout removes execution counts"
        for out in cell.outputs:
            assert out.output_type in ("stream", "execute_result"), f"{where}: {out.output_type}"
            if out.output_type == "stream":
                assert out.name == "stdout", f"{where}: stored stderr"
            else:
                assert set(out.data) == {"text/plain"}, f"{where}: rich output {set(out.data)}"


def test_committed_notebooks_are_what_the_nbstripout_filter_writes():
    """With the git filter installed (README: `nbstripout --install --attributes
    .gitattributes`) a notebook run in JupyterLab commits as it is here: no diff, no merge
    conflict over outputs, counts or widget state."""
    attributes = (NOTEBOOK_DIR.parent / ".gitattributes").read_text()
    assert "*.ipynb filter=nbstripout" in attributes and "*.ipynb diff=ipynb" in attributes
    paths = [str(NOTEBOOK_DIR / f"{name}.ipynb") for name in COURSE]
    run = subprocess.run([sys.executable, "-m", "nbstripout", "--verify", *paths],
                         capture_output=True, text=True)
    assert run.returncode == 0, f"run nbstripout on these notebooks: {run.stdout}"


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
def test_one_parameters_cell(name):
    cells = [c for c in _code(_load(name)) if "parameters" in _tags(c)]
    assert len(cells) == 1, f"{name}: {len(cells)} cells tagged 'parameters'"


def _python(source):
    """A cell's source as Python: IPython magics and shell lines become blank lines."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line
                     for line in source.splitlines())


def _is_gpu_switch(targets, value):
    return any("GPU" in t for t in targets) or re.search(r"cuda|DEVICE", ast.unparse(value))


def _ci_dependent_statements(nb):
    """Statements whose result depends on ACCUMLAB_CI, other than GPU switches.

    A name assigned from an expression that reads "ACCUMLAB_CI" is a CI flag, and so is
    any name assigned from a CI flag; an assignment from a CI flag is allowed only when it
    is a GPU switch (its target names contain "GPU", or its value also tests for CUDA).
    """
    flags, found = set(), []
    for cell in _code(nb):
        for node in ast.walk(ast.parse(_python(cell.source))):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            reads_ci = any(isinstance(n, ast.Constant) and n.value == "ACCUMLAB_CI"
                           for n in ast.walk(node))
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = [n.id for t in (node.targets if isinstance(node, ast.Assign)
                                          else [node.target])
                           for n in ast.walk(t) if isinstance(n, ast.Name)]
                if reads_ci and not (names & flags):
                    flags.update(targets)  # CI = os.environ.get("ACCUMLAB_CI", ...) == "1"
                elif names & flags and not _is_gpu_switch(targets, node.value):
                    found.append(ast.unparse(node))
                    flags.update(targets)
            elif isinstance(node, (ast.If, ast.IfExp, ast.While)) and (
                    {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)} & flags):
                found.append(ast.unparse(node.test))
            elif isinstance(node, ast.Expr) and reads_ci:
                found.append(ast.unparse(node))
    return found


@pytest.mark.parametrize("name", COURSE)
def test_students_run_what_ci_runs(name):
    """CI executes every notebook at its default sizes: no size may shrink for CI (issue 12).
    A GPU switch may read ACCUMLAB_CI; nothing else may."""
    found = _ci_dependent_statements(_load(name))
    assert not found, f"{name}: sizes or branches depend on ACCUMLAB_CI: {found}"


def test_the_ci_dependency_check_finds_what_it_should():
    def nb(*sources):
        return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])

    flag = 'import os\nCI = os.environ.get("ACCUMLAB_CI", "0") == "1"\n'
    assert _ci_dependent_statements(nb(flag + "STEPS = 3 if CI else 8"))
    assert _ci_dependent_statements(nb(flag, "%time x = 1\nif CI:\n    N = 2"))
    assert _ci_dependent_statements(nb(flag + "SMALL = CI\n", "N = 2 if SMALL else 8"))
    assert not _ci_dependent_statements(nb(flag + "GPU_MEASURE = not CI\nSTEPS = 8"))
    assert not _ci_dependent_statements(nb(flag + 'BIG = DEVICE == "cuda" and not CI'))
    assert not _ci_dependent_statements(nb("STEPS = 8"))


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


def _colab_cell(name):
    return _code(_load(name))[0].source


def _transformers_range():
    deps = tomllib.loads((NOTEBOOK_DIR.parent / "pyproject.toml").read_text())["project"]
    (spec,) = [d for d in deps["dependencies"] if d.startswith("transformers")]
    return spec


@pytest.mark.parametrize("name", COURSE)
def test_colab_cell_is_short_pins_torch_and_transformers(name):
    src = _colab_cell(name)
    assert len(src.splitlines()) <= 20, f"{name}: the Colab cell should stay one short cell"
    assert '"google.colab" in sys.modules' in src
    assert '"-c"' in src and 'f"torch=={torch.__version__}' in src, "keep Colab's torch"
    assert _transformers_range() in src, "pin transformers to pyproject.toml's range"
    assert "git clone" in src and '"-e"' in src
    assert "output.enable_custom_widget_manager()" in src
    for cell in _code(_load(name)):  # no cell installs or upgrades torch itself
        assert not re.search(r"pip[^\n]*install[^\n]*\btorch\b", cell.source), name
    assert src == _colab_cell(COURSE[0]), f"{name}: the Colab cell differs from {COURSE[0]}'s"


def _run_colab_cell(src, root, monkeypatch, colab=True, pip_fails=False):
    """Execute the Colab cell with /content moved to `root` and git/pip faked; return the
    commands it ran and whether it enabled Colab's widget manager."""
    calls, enabled = [], []
    repo = root / "accumlab"

    def fake_run(cmd, shell=False, check=False):
        line = cmd if shell else " ".join(cmd)
        calls.append(line)
        if "git clone" in line:
            shutil.rmtree(repo, ignore_errors=True)
            repo.mkdir()
        if "pip" in line and pip_fails:
            raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    if colab:
        google, colab_module = types.ModuleType("google"), types.ModuleType("google.colab")
        google.__path__ = []
        colab_module.output = types.SimpleNamespace(
            enable_custom_widget_manager=lambda: enabled.append(True))
        google.colab = colab_module
        monkeypatch.setitem(sys.modules, "google", google)
        monkeypatch.setitem(sys.modules, "google.colab", colab_module)
    namespace = {}
    exec(src.replace("/content", str(root)), namespace)
    return calls, bool(enabled), namespace


def test_colab_cell_does_nothing_elsewhere_and_survives_a_rerun(tmp_path, monkeypatch):
    src = _colab_cell(COURSE[0])
    calls, enabled, namespace = _run_colab_cell(src, tmp_path, monkeypatch, colab=False)
    assert calls == [] and not enabled and set(namespace) == {"__builtins__", "sys"}
    with pytest.raises(subprocess.CalledProcessError):  # pip fails half-way
        _run_colab_cell(src, tmp_path, monkeypatch, pip_fails=True)
    calls, enabled, _ = _run_colab_cell(src, tmp_path, monkeypatch)  # the re-run starts over
    assert [c.split()[0] for c in calls] == ["rm", sys.executable] and enabled
    assert "git clone" in calls[0]
    pins = (tmp_path / "pins.txt").read_text().splitlines()
    assert pins == [f"torch=={torch.__version__}", _transformers_range()]
    assert str(tmp_path / "accumlab") in sys.path
    calls, enabled, _ = _run_colab_cell(src, tmp_path, monkeypatch)  # installed: nothing to do
    assert calls == [] and enabled


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


def _notebook(*cells):
    return nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(c[5:]) if c.startswith("code:") else
        nbformat.v4.new_markdown_cell(c) for c in cells])


def test_the_audit_finds_unprinted_numbers_and_respects_the_conventions():
    nb = _notebook("The error is 2.63e-7 and the ratio 1.60 (25% off); see section 4.3,\n"
                   "notebook 02 and PR #35808, in 2024, with $12h^2$ and `lr=0.37`; lessons 11, 12\n"
                   "and 13.",
                   "code:K = 16",
                   "Reference: 3.5 GiB, measured elsewhere: accumlab/lab/memory/shapes.py.\n\n"
                   "But 77.7 is ours.",
                   "## Self-check questions\n\n1. Two batches hold 30 and 10 tokens.\n"
                   "<details>1/(2·30) and 31 each</details>")
    outputs = {0: [nbformat.v4.new_output("stream", text="error 2.634e-07, ratio 1.6012\n")]}
    claimed = [n for _, n in notebook_audit.claimed_numbers(nb)]
    assert claimed == ["2.63e-7", "1.60", "25%", "77.7", "30", "31"]
    assert notebook_audit.unbacked_numbers(nb, outputs) == [(0, "25%"), (2, "77.7"), (3, "31")]
    outputs[0].append(nbformat.v4.new_output("display_data", data={
        "text/html": "<td>0.25</td><td>77.7</td>", "text/plain": "31"}))
    assert notebook_audit.unbacked_numbers(nb, outputs) == []
    assert notebook_audit.unbacked_numbers(_notebook("about 2.7e-7"), outputs) == [(0, "2.7e-7")]


def test_the_audit_sizes_the_saved_notebook():
    nb = _notebook("code:print(1)")
    small = notebook_audit.saved_bytes(nb, {0: []})
    big = notebook_audit.saved_bytes(
        nb, {0: [nbformat.v4.new_output("stream", text="x" * 10_000)]}, 5_000)
    assert big - small >= 15_000
