"""The graded assignments: otter assign works, the student versions are current, and grading
can be trusted: solutions get full marks, every classic wrong answer (tests/assignment_answers.py)
gets exactly the points it should, a blank notebook gets 0, and answers that call accumlab's
own implementation get nothing for that question.

Runs without Docker. The solutions (and one blank notebook) are graded by otter itself, through
the instructor's command notebooks/assignments/grade.py (`otter.api.grade_submission`: a
fresh kernel per notebook, 5-13 s of CPU each). The wrong answers and the blank notebooks are graded in-process by
`grade_in_process`, which runs otter's own grading (grading mode, `Checker`, `GradingResults`)
on cells executed in a fresh namespace: the imports are paid once, and each submission
costs seconds. The in-process grader must agree with otter on the solutions and the blank
notebook, question by question, or the test fails.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import glob
import importlib.util
import io
import json
import linecache
import multiprocessing
import os
import textwrap
import types
from pathlib import Path

import pytest

otter = pytest.importorskip("otter", reason="otter-grader is in the dev extra")
nbformat = pytest.importorskip("nbformat")

from assignment_answers import WRONG  # noqa: E402 (tests/ is on the path)

ROOT = Path(__file__).resolve().parents[1] / "notebooks" / "assignments"
ASSIGNMENTS = ("a1_window", "a2_token_loss", "a3_plan", "a4_data_parallel")
REAL_BLANK = ("a2_token_loss",)  # blank notebooks otter grades in a kernel (all are graded in-process)


def with_answers(nb, answers: dict[str, str]):
    """`nb` with the solution of each named function replaced by the given body."""
    for function, body in answers.items():
        cells = [c for c in nb.cells if c.cell_type == "code" and f"def {function}(" in c.source
                 and "# BEGIN SOLUTION" in c.source]
        assert len(cells) == 1, f"no single solution cell defines {function}"
        head, rest = cells[0].source.split("# BEGIN SOLUTION", 1)
        indent = head.rsplit("\n", 1)[1]
        tail = rest.split("# END SOLUTION", 1)[1]
        cells[0].source = (head.rstrip(" ")
                           + textwrap.indent(textwrap.dedent(body).strip("\n"), indent) + tail)
    return nb


def grade_in_process(notebook: str, tests_dir: str) -> dict:
    """Grade like `otter run`, without a kernel: otter's grading mode (`grader.check` runs every
    test, hidden ones included, where the notebook calls it), the code cells executed in a fresh
    namespace, errors ignored, cells tagged `otter_ignore` skipped, then the tests not run yet."""
    from otter.execute import Checker
    from otter.test_files import GradingResults

    nb = nbformat.read(notebook, 4)
    namespace = {"__name__": "__main__"}
    cwd = os.getcwd()
    otter.Notebook.init_grading_mode(tests_dir)
    try:
        os.chdir(os.path.dirname(notebook))
        cells = [c for c in nb.cells if c.cell_type == "code"
                 and "otter_ignore" not in c.metadata.get("tags", [])]
        for i, cell in enumerate(cells):
            name = f"<{Path(notebook).name} cell {i}>"  # a source for inspect, as IPython keeps
            linecache.cache[name] = (len(cell.source), None, cell.source.splitlines(True), name)
            with contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                try:
                    exec(compile(cell.source, name, "exec"), namespace)
                except Exception:
                    pass  # otter executes with allow_errors
        for path in sorted(glob.glob(os.path.join(tests_dir, "*.py"))):
            Checker.check_if_not_already_checked(path, global_env=namespace)
        results = GradingResults(Checker.get_results())
    finally:
        os.chdir(cwd)
        otter.Notebook._grading_mode = False
        otter.Notebook._tests_dir_override = None
        Checker.disable_tracking()
        Checker.clear_results()
    return _scores(results)


def _scores(results) -> dict:
    return {"total": results.total, "possible": results.possible,
            "scores": {q: results.get_score(q) for q in sorted(results.results)}}


def _grade_script():
    """notebooks/assignments/grade.py, the instructor's grading command, as a module."""
    spec = importlib.util.spec_from_file_location("grade", ROOT / "grade.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _grade_with_otter(notebook: str, zip_path: str) -> dict:
    """Worker: otter grades one notebook in a fresh kernel, through grade.py's `grade_one`."""
    row = _grade_script().grade_one(notebook, zip_path)
    assert not row["error"], row
    scores = {k: v for k, v in row.items()
              if k not in ("submission", "total", "possible", "seconds", "error")}
    return {"total": row["total"], "possible": row["possible"], "scores": scores, "row": row}


def _one_thread() -> None:
    """Worker start: torch on one thread here and in the kernels started from here (tiny models;
    two workers and their kernels share two cores, and idle threads spinning cost more)."""
    os.environ["OMP_NUM_THREADS"] = "1"


def _grade_all_in_process(jobs: list[tuple[str, str, str]]) -> dict:
    """Worker: grade (key, notebook, tests_dir) jobs in this process, one after another."""
    return {key: grade_in_process(notebook, tests_dir) for key, notebook, tests_dir in jobs}


@pytest.fixture(scope="module")
def assigned(tmp_path_factory):
    """otter assign for each master (its tests are run below, not by assign)."""
    from otter.assign import main as assign

    out = {}
    cwd = os.getcwd()
    try:
        for name in ASSIGNMENTS:
            dist = tmp_path_factory.mktemp(name)
            os.chdir(dist)
            with contextlib.redirect_stdout(io.StringIO()):
                assign(str(ROOT / name / f"{name}.ipynb"), str(dist / "dist"),
                       no_run_tests=True)
            out[name] = dist / "dist"
    finally:
        os.chdir(cwd)
    return out


@pytest.fixture(scope="module")
def graded(assigned, tmp_path_factory):
    """Every submission graded: {(assignment, variant): scores}, variants being "solution",
    "blank", each wrong answer, and "solution (otter)" / "blank (otter)" from otter's kernel."""
    real, in_process = {}, {}
    for name, dist in assigned.items():
        zip_path = glob.glob(str(dist / "autograder" / "*.zip"))[0]
        solution = str(dist / "autograder" / f"{name}.ipynb")
        blank = str(dist / "student" / f"{name}.ipynb")
        real[(name, "solution (otter)")] = (solution, zip_path)
        if name in REAL_BLANK:
            real[(name, "blank (otter)")] = (blank, zip_path)
        tests = str(dist / "autograder" / "tests")
        jobs = [((name, "solution"), solution, tests), ((name, "blank"), blank, tests)]
        for wrong, (answers, _) in WRONG[name].items():
            folder = tmp_path_factory.mktemp(f"{name}-wrong")
            path = folder / f"{name}.ipynb"
            nbformat.write(with_answers(nbformat.read(solution, 4), answers), path)
            jobs.append(((name, wrong), str(path), tests))
        in_process[name] = jobs

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=ctx,
                                                initializer=_one_thread) as pool:
        # in-process grading in two batches of about equal cost (each pays the imports once),
        # first, so that the kernels' shorter jobs fill in after them
        halves = [in_process["a1_window"] + in_process["a3_plan"],
                  in_process["a2_token_loss"] + in_process["a4_data_parallel"]]
        batches = [pool.submit(_grade_all_in_process, jobs) for jobs in halves]
        futures = [pool.submit(_grade_with_otter, *args) for args in real.values()]
        results = dict(zip(real, (f.result(timeout=900) for f in futures)))
        for batch in batches:
            results.update(batch.result(timeout=900))
    return results


def test_student_versions_are_current_and_hide_solutions(assigned):
    for name, dist in assigned.items():
        fresh = nbformat.read(dist / "student" / f"{name}.ipynb", 4)
        shipped = nbformat.read(ROOT / name / "student" / f"{name}.ipynb", 4)
        assert [c.source for c in fresh.cells] == [c.source for c in shipped.cells], (
            f"{name}: rerun `otter assign {name}.ipynb dist` and copy dist/student over student/")
        answers = [c.source for c in shipped.cells
                   if "otter_answer_cell" in c.metadata.get("tags", [])]
        assert answers and all(a.rstrip().endswith("...") for a in answers), name
        assert not any(c.get("outputs") for c in shipped.cells if c.cell_type == "code")
        public = sorted(p.name for p in (ROOT / name / "student" / "tests").glob("*.py"))
        assert public == sorted(p.name for p in (dist / "student" / "tests").glob("*.py"))
        for test_file in (ROOT / name / "student" / "tests").glob("*.py"):
            assert "'hidden': True" not in test_file.read_text(), test_file
            assert test_file.read_text() == (dist / "student" / "tests" / test_file.name
                                             ).read_text(), f"{name}: {test_file.name} is stale"
        meta = json.loads((dist / "autograder" / "otter_config.json").read_text())
        assert meta.get("runs_on", "colab") in ("colab", "default")


def test_every_question_has_hidden_checks(assigned):
    """Each question has public checks the student sees and hidden ones only grading runs."""
    for name, dist in assigned.items():
        for test_file in sorted((dist / "autograder" / "tests").glob("*.py")):
            spec: dict = {}
            exec(test_file.read_text(), spec)
            cases = spec["test"]["suites"][0]["cases"]
            hidden = [c["hidden"] for c in cases]
            assert any(hidden) and not all(hidden), (name, test_file.name, hidden)
            assert all("_own(" in c["code"] for c in cases), (
                f"{name} {test_file.name}: every case must start with the own-work check")


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_solution_full_marks_with_otter(graded, name):
    result = graded[(name, "solution (otter)")]
    assert result["possible"] > 0 and result["total"] == result["possible"], result


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_in_process_grading_agrees_with_otter(graded, name):
    def scores(r):
        return {k: r[k] for k in ("total", "possible", "scores")}

    assert scores(graded[(name, "solution")]) == scores(graded[(name, "solution (otter)")])
    if name in REAL_BLANK:
        assert scores(graded[(name, "blank")]) == scores(graded[(name, "blank (otter)")])


def test_grade_script_writes_a_csv_of_scores(graded, tmp_path):
    grade = _grade_script()
    rows = [r["row"] for key, r in graded.items() if key[0] == REAL_BLANK[0] and "row" in r]
    grade.write_csv(rows, tmp_path / "scores.csv")
    with open(tmp_path / "scores.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["submission", "q1", "q2", "q3", "total", "possible", "seconds",
                              "error"]
    by_kind = {Path(r["submission"]).parent.name: r for r in table}  # autograder/ or student/
    assert by_kind["autograder"]["total"] == by_kind["autograder"]["possible"] == "7"
    assert by_kind["student"]["total"] == "0" and by_kind["student"]["q3"] == "0"
    assert grade.find_submissions(str(ROOT / "a1_window" / "student")) == [
        str(ROOT / "a1_window" / "student" / "a1_window.ipynb")]


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_blank_notebook_scores_zero(graded, name):
    result = graded[(name, "blank")]
    assert result["total"] == 0 and result["possible"] == graded[(name, "solution")]["possible"]
    assert set(result["scores"]) == set(graded[(name, "solution")]["scores"]), result


@pytest.mark.parametrize("name,wrong", [(n, w) for n in ASSIGNMENTS for w in WRONG[n]])
def test_wrong_answer_loses_its_points(graded, name, wrong):
    result = graded[(name, wrong)]
    expected = WRONG[name][wrong][1]
    assert result["scores"] == expected, (name, wrong, result["scores"], expected)
    assert result["total"] < result["possible"], result


def test_at_least_three_wrong_answers_and_a_library_import_each():
    for name in ASSIGNMENTS:
        assert len(WRONG[name]) >= 3 and "library import" in WRONG[name], name


# The own-work check itself, on functions defined the way a notebook cell defines them.

def _cell(source: str, **names) -> dict:
    """Execute `source` as a notebook cell (with a source inspect can read); its namespace."""
    filename = f"<cell {abs(hash(source))}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": "__main__", **names}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


OWN = "def answer(model, batches):\n    total = 0.0\n    for b in batches:\n        total += helper(b)\n    return total\n\ndef helper(b):\n    return float(len(b))\n"
CHEATS = {
    "direct": "from accumlab.engine.window import accumulate_gradients\n"
              "def answer(model, batches):\n"
              "    return accumulate_gradients(model, batches, task='causal_lm')\n",
    "alias in another cell": "import accumlab.engine.window as w\nf = w.accumulate_gradients\n"
                             "def answer(model, batches):\n    return f(model, batches)\n",
    "import inside": "def answer(model, batches):\n    from accumlab.engine import window\n"
                     "    return window.accumulate_gradients(model, batches, task='causal_lm')\n",
    "helper": "import accumlab.engine.losses as L\ndef _h(x):\n    return L.summed_loss(x, x, 'causal_lm')\n"
              "def answer(model, batches):\n    return _h(batches)\n",
    "default argument": "from accumlab.engine.window import accumulate_gradients\n"
                        "def answer(model, batches, f=accumulate_gradients):\n    return f(model, batches)\n",
    "closure": "from accumlab.engine.window import accumulate_gradients\n"
               "def make(f=accumulate_gradients):\n    def answer(model, batches):\n"
               "        return f(model, batches)\n    return answer\nanswer = make()\n",
    "container": "from accumlab.engine.window import accumulate_gradients\nTOOLS = [accumulate_gradients]\n"
                 "def answer(model, batches):\n    return TOOLS[0](model, batches)\n",
    "the library function itself": "from accumlab.engine.window import accumulate_gradients as answer\n",
    "rebinds an allowed name": "from accumlab.engine.window import accumulate_gradients as num_items\n"
                               "def answer(model, batches):\n    return num_items(model, batches)\n",
    "a module of the student's": "import types\nfrom accumlab.engine.window import accumulate_gradients\n"
                                 "mine = types.ModuleType('mine')\nmine.f = accumulate_gradients\n"
                                 "def answer(model, batches):\n    return mine.f(model, batches)\n",
    "frame of the test": "def answer(model, batches):\n    try:\n        raise ValueError\n"
                         "    except ValueError as e:\n"
                         "        return e.__traceback__.tb_frame.f_back.f_globals['_reference']\n",
    "getattr": "import accumlab\ndef answer(model, batches):\n    return getattr(accumlab, 'train')\n",
}


def test_own_work_check_passes_own_code_and_allowed_helpers():
    from accumlab.doctor import num_items
    from accumlab.doctor.grading import own_work_problems

    namespace = _cell(OWN.replace("float(len(b))", "float(num_items(b))"), num_items=num_items)
    assert own_work_problems(namespace["answer"], allowed=[num_items]) == []
    # a library helper the notebook does not hand out is refused, also inside a helper
    assert own_work_problems(namespace["answer"]), "num_items is not allowed unless listed"
    # answers of other questions are checked by their own questions
    assert own_work_problems(namespace["answer"], skip=["helper"]) == []


@pytest.mark.parametrize("cheat", sorted(CHEATS))
def test_own_work_check_catches(cheat):
    from accumlab.doctor import num_items
    from accumlab.doctor.grading import assert_own_work

    namespace = _cell(CHEATS[cheat])
    with pytest.raises(AssertionError, match="must be your own code") as info:
        assert_own_work(namespace["answer"], allowed=[num_items])
    assert "accumlab" in str(info.value) or "introspection" in str(info.value)


def test_substitute_restores_the_notebook_namespace():
    from accumlab.doctor.grading import substitute

    namespace = _cell("def helper():\n    return 'yours'\ndef answer():\n    return helper()\n")
    with substitute(namespace["answer"], helper=lambda: "correct", extra=1):
        assert namespace["answer"]() == "correct"
    assert namespace["answer"]() == "yours" and "extra" not in namespace
    assert isinstance(namespace["answer"], types.FunctionType)
