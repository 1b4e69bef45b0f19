"""The graded assignments: otter assign works, solutions get full marks, wrong answers do not.

Runs without Docker: `otter assign` in-process, then `otter.api.grade_submission` (which
executes a notebook in this environment) in parallel worker processes.
"""

import concurrent.futures
import glob
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest

otter = pytest.importorskip("otter", reason="otter-grader is in the dev extra")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1] / "notebooks" / "assignments"
ASSIGNMENTS = ("a1_window", "a2_token_loss", "a3_plan")

# Every solution is graded; one wrong submission by default (ACCUMLAB_FULL_GRADING=1 grades a
# wrong answer for every assignment). Each grading starts a kernel that imports torch and otter,
# about 12-20 s of CPU, so the default keeps this file near a minute on 2 cores.
WRONG_GRADED = ASSIGNMENTS if os.environ.get("ACCUMLAB_FULL_GRADING") == "1" else ("a1_window",)

# A typical wrong answer per assignment: (text in the solution, its replacement, question hit).
WRONG = {
    "a1_window": ("share = mean * num_items(batch) / n_total",
                  "share = mean / len(micro_batches)", "q1"),  # mean of means
    "a2_token_loss": ("return int((labels[:, 1:] != IGNORE).sum())",
                      "return int((labels != IGNORE).sum())", "q1"),  # forgets the shift
    "a3_plan": ("lr = base_lr * math.sqrt(ratio)", "lr = base_lr * ratio", "q2"),  # Adam rule
}


def _grade(notebook: str, zip_path: str) -> dict:
    """Worker: grade one notebook; returns total, possible and per-question scores."""
    import otter.api

    os.chdir(os.path.dirname(notebook))
    result = otter.api.grade_submission(notebook, zip_path, quiet=True)
    return {"total": result.total, "possible": result.possible,
            "scores": {q: result.get_score(q) for q in result.results}}


@pytest.fixture(scope="module")
def assigned(tmp_path_factory):
    """otter assign for each master (tests are run below, not by assign)."""
    from otter.assign import main as assign

    out = {}
    cwd = os.getcwd()
    try:
        for name in ASSIGNMENTS:
            dist = tmp_path_factory.mktemp(name)
            os.chdir(dist)
            assign(str(ROOT / name / f"{name}.ipynb"), str(dist / "dist"), no_run_tests=True)
            out[name] = dist / "dist"
    finally:
        os.chdir(cwd)
    return out


def _answers(nb) -> list[str]:
    return [c.source for c in nb.cells if "otter_answer_cell" in c.metadata.get("tags", [])]


def test_student_versions_are_current_and_hide_solutions(assigned):
    for name, dist in assigned.items():
        fresh = nbformat.read(dist / "student" / f"{name}.ipynb", 4)
        shipped = nbformat.read(ROOT / name / "student" / f"{name}.ipynb", 4)
        assert [c.source for c in fresh.cells] == [c.source for c in shipped.cells], (
            f"{name}: rerun `otter assign {name}.ipynb dist` and copy dist/student over student/")
        assert all(a.rstrip().endswith("...") for a in _answers(shipped)), name
        assert not any(c.get("outputs") for c in shipped.cells if c.cell_type == "code")
        public = sorted(p.name for p in (ROOT / name / "student" / "tests").glob("*.py"))
        assert public == sorted(p.name for p in (dist / "student" / "tests").glob("*.py"))
        for test_file in (ROOT / name / "student" / "tests").glob("*.py"):
            assert "'hidden': True" not in test_file.read_text(), test_file
        meta = json.loads((dist / "autograder" / "otter_config.json").read_text())
        assert meta.get("runs_on", "colab") in ("colab", "default")


def test_solutions_full_marks_wrong_answers_not(assigned, tmp_path):
    jobs = {}
    for name, dist in assigned.items():
        zip_path = glob.glob(str(dist / "autograder" / "*.zip"))[0]
        jobs[(name, "solution")] = (str(dist / "autograder" / f"{name}.ipynb"), zip_path)
        if name not in WRONG_GRADED:
            continue
        old, new, _ = WRONG[name]
        nb = nbformat.read(dist / "autograder" / f"{name}.ipynb", 4)
        hits = [c for c in nb.cells if c.cell_type == "code" and old in c.source]
        assert len(hits) == 1, f"{name}: the wrong-answer edit no longer applies"
        hits[0].source = hits[0].source.replace(old, new)
        wrong_dir = tmp_path / f"{name}-wrong"
        wrong_dir.mkdir()
        nbformat.write(nb, wrong_dir / f"{name}.ipynb")
        shutil.copytree(dist / "autograder" / "tests", wrong_dir / "tests")
        jobs[(name, "wrong")] = (str(wrong_dir / f"{name}.ipynb"), zip_path)

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        futures = {key: pool.submit(_grade, *args) for key, args in jobs.items()}
        results = {key: f.result(timeout=300) for key, f in futures.items()}

    for name in ASSIGNMENTS:
        good = results[(name, "solution")]
        assert good["possible"] > 0 and good["total"] == good["possible"], (name, good)
    for name in WRONG_GRADED:
        good, bad = results[(name, "solution")], results[(name, "wrong")]
        assert bad["total"] < bad["possible"], (name, bad)
        question = WRONG[name][2]
        assert bad["scores"][question] < good["scores"][question], (name, bad)
