"""Grade a folder of submitted notebooks with otter, without Docker, and write a CSV of scores.

    python notebooks/assignments/grade.py AUTOGRADER_ZIP SUBMISSIONS [-o scores.csv] [-j 2]

AUTOGRADER_ZIP is the `dist/autograder/<name>-autograder_*.zip` that `otter assign` wrote;
SUBMISSIONS a folder searched (recursively) for `*.ipynb`, one notebook per student, or a
single notebook. Each submission is graded by `otter.api.grade_submission`: a fresh kernel in
this Python environment (which needs accumlab and otter-grader; otter's setup.sh is not run)
executes the notebook with every test, hidden ones included. The CSV has one row per
submission: its path, the score of each question, the total, the possible points, the grading
time, and the error if grading itself failed. A submission that raises, or leaves answers
blank, scores 0 on those questions; it does not stop the others.

Grading runs the students' code: do it on a machine or account that holds nothing else.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import glob
import os
import time
from pathlib import Path


def grade_one(notebook: str, autograder_zip: str) -> dict:
    """Grade one notebook with otter; returns a row {submission, q1.., total, possible, ...}."""
    import otter.api

    # One thread per kernel: the assignments' models are tiny, several kernels may share the
    # cores (-j), and torch's thread pool spinning on a busy machine costs several times the work.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    row: dict = {"submission": notebook}
    try:
        result = otter.api.grade_submission(os.path.abspath(notebook),
                                            os.path.abspath(autograder_zip), quiet=True)
        row.update({q: result.get_score(q) for q in sorted(result.results)})
        row.update(total=result.total, possible=result.possible, error="")
    except Exception as error:  # one broken submission must not stop the class's grading
        row.update(total="", possible="", error=f"{type(error).__name__}: {error}")
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def write_csv(rows: list[dict], path: str) -> None:
    """One row per submission; question columns in order, then total, possible, time, error."""
    questions = sorted({k for r in rows for k in r} - {"submission", "total", "possible",
                                                       "seconds", "error"})
    fields = ["submission", *questions, "total", "possible", "seconds", "error"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["submission"]))


def find_submissions(path: str) -> list[str]:
    """The notebooks to grade: `path` itself, or every .ipynb under it (not checkpoints)."""
    if path.endswith(".ipynb"):
        return [path]
    found = sorted(glob.glob(os.path.join(path, "**", "*.ipynb"), recursive=True))
    return [p for p in found if ".ipynb_checkpoints" not in Path(p).parts]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("autograder_zip")
    parser.add_argument("submissions", help="a folder of .ipynb files, or one notebook")
    parser.add_argument("-o", "--output", default="scores.csv")
    parser.add_argument("-j", "--jobs", type=int, default=1,
                        help="submissions graded at once (each uses about one CPU core)")
    args = parser.parse_args(argv)
    notebooks = find_submissions(args.submissions)
    if not notebooks:
        raise SystemExit(f"no .ipynb found in {args.submissions}")
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = []
        for row in pool.map(grade_one, notebooks, [args.autograder_zip] * len(notebooks)):
            rows.append(row)
            print(f"{row['submission']}: {row['total']}/{row['possible']} in {row['seconds']} s"
                  + (f"  ERROR {row['error']}" if row["error"] else ""), flush=True)
    write_csv(rows, args.output)
    print(f"wrote {args.output} ({len(rows)} submissions)")


if __name__ == "__main__":
    main()
