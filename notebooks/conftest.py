"""nbval settings for the notebooks, and the lesson audit.

- Offline settings also when only notebooks are collected (`python -m pytest
  notebooks/04_bug_hunt.ipynb` does not load tests/conftest.py). The notebooks run at their
  default sizes: what students run is what CI runs.
- The graded assignments are checked by tests/test_assignments.py instead: the otter masters
  hold hidden tests and the student versions hold `...` placeholders that do not run, so nbval
  must not collect notebooks/assignments/.
- After each lesson's last cell, a "lesson audit" item checks that every number its prose
  states is printed by it (or labelled as measured elsewhere) and that it would be saved
  under 2 MB after Run All (see tests/notebook_audit.py and tests/test_notebooks.py).
"""

import os
import re
from collections import defaultdict

import nbformat
import pytest
from nbval.plugin import IPyNbCell
from notebook_audit import (  # tests/ is on pytest's pythonpath (pyproject.toml)
    MAX_SAVED_BYTES,
    WIDGET_STATE_PROBE,
    saved_bytes,
    unbacked_numbers,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

collect_ignore_glob = ["assignments/*"]


# ---- the lesson audit: one item after each lesson's last cell (tests/notebook_audit.py) ----
#
# nbval runs a notebook's cells in one kernel, one pytest item per cell. The hook below keeps
# each cell's outputs; `LessonAudit` then runs in the same kernel, after the last cell, and
# checks the notebook's prose numbers against what it printed and the size it would be saved
# at. So the audit costs no second execution.

LESSON = re.compile(r"^\d\d_\w+\.ipynb$")


class LessonAudit(IPyNbCell):
    """Runs after a lesson's last cell: every prose number is printed, the file stays small."""

    def runtest(self):
        n_code = sum(c.cell_type == "code" for c in self.parent.nb.cells)
        outputs = getattr(self.parent, "accumlab_outputs", {})
        if len(outputs) < n_code:
            pytest.skip(f"only {len(outputs)} of {n_code} code cells ran; the audit needs all")
        super().runtest()  # the probe: widget state bytes in the kernel
        widget_bytes = int("".join(o.get("text", "") for o in self.test_outputs).split()[-1])
        missing = unbacked_numbers(self.parent.nb, outputs)
        size = saved_bytes(self.parent.nb, outputs, widget_bytes)
        problems = []
        if missing:
            problems.append("numbers in the prose that no cell prints (print them, or label "
                            "the paragraph 'measured elsewhere: <source>'; see "
                            "tests/test_notebooks.py): "
                            + ", ".join(f"markdown cell {i}: {n}" for i, n in missing))
        if size > MAX_SAVED_BYTES:
            problems.append(f"saved after Run All it would be {size / 2**20:.1f} MiB "
                            f"(widget state {widget_bytes / 2**20:.1f} MiB), over "
                            f"{MAX_SAVED_BYTES / 2**20:.0f} MiB")
        assert not problems, "; ".join(problems)

    def reportinfo(self):
        return self.fspath, 0, f"{self.fspath.basename}::lesson audit"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield
    if isinstance(item, IPyNbCell) and not isinstance(item, LessonAudit):
        if not hasattr(item.parent, "accumlab_outputs"):
            item.parent.accumlab_outputs = {}
        item.parent.accumlab_outputs[item.cell_num] = item.test_outputs


def pytest_collection_modifyitems(session, config, items):
    """Put a `LessonAudit` after the last cell of each lesson notebook, and give checked cells
    an execution count: nbstripout (the git filter, see the README) keeps their outputs but
    removes every count, and nbval compares only cells that have one."""
    last = {}
    for index, item in enumerate(items):
        if not isinstance(item, IPyNbCell):
            continue
        tags = item.cell.metadata.get("tags", [])
        if "nbval-check-output" in tags and item.cell.outputs and item.cell.execution_count is None:
            item.cell.execution_count = 1
        if LESSON.match(item.parent.fspath.basename):
            last[item.parent] = index
    for parent, index in sorted(last.items(), key=lambda kv: -kv[1]):
        probe = nbformat.v4.new_code_cell(WIDGET_STATE_PROBE)
        audit = LessonAudit.from_parent(parent, name="lesson audit", cell_num=-1, cell=probe,
                                        options=defaultdict(bool, check=False))
        items.insert(index + 1, audit)
