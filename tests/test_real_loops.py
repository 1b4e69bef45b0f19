"""Accumulation loops ported from public training code (tests/real_loops/): each one's update
is measured against the exact one without the doctor, and the doctor must name what was read
from the code. `python tests/test_real_loops.py` prints the table."""

import importlib
import re

import pytest
import torch
from real_loops import LOOPS
from real_loops.measure import K, measure

from accumlab.doctor import check_loop

MODULES = {name: importlib.import_module(f"real_loops.{name}") for name in LOOPS}


def precision(mod) -> str:
    return getattr(mod, "PRECISION", "float64")


def tolerance(mod) -> float:
    return 1e-3 if precision(mod) == "float32" else 1e-4


def close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol * max(abs(a), abs(b))


def disagreements(mod, m: dict) -> list[str]:
    """Where the measured update differs from the module's MEASURE (read from the code)."""
    tol, want, bad = tolerance(mod), mod.MEASURE, []
    equal = want["equal"]
    if isinstance(equal, tuple):  # c times the first or last micro-batch's own gradient
        c, resid = m[equal[0]]
        target = equal[1]
    else:
        c, resid = m["equal"]
        target = {"k": K, "unshifted": m["unshifted"]}.get(equal, equal)
    if not (resid < tol and close(c, target, tol)):
        bad.append(f"equal: measured {c:.4f} (residual {resid:.1e}), read {equal}")
    unequal = want["unequal"]
    if unequal == "exact" and not m["unequal_exact"][1] < tol:
        bad.append(f"unequal: residual {m['unequal_exact'][1]:.1e} from the exact direction")
    if unequal == "mean_of_means" and not (m["unequal_mom"][1] < tol
                                           and m["unequal_exact"][1] > 100 * tol):
        bad.append(f"unequal: residuals {m['unequal_mom'][1]:.1e} from mean of means, "
                   f"{m['unequal_exact'][1]:.1e} from exact")
    partial = want["partial"]
    if partial in ("not_stepped", "dropped"):
        if m["partial"] is not None:
            bad.append(f"partial: stepped ({m['partial'][0]:.4f}×), read {partial}")
        elif partial == "not_stepped" and not (m["partial_left"] > 0
                                               and m["next_with_tail"][1] < tol):
            bad.append("partial: the tail's gradient does not carry into the next window")
        elif partial == "dropped" and not (m["partial_left"] == 0 or m["next_plain"][1] < tol):
            bad.append("partial: the tail's gradient is not dropped")
    elif partial is not None:
        target = {"m/k": (K - 1) / K, "unshifted": m["partial_unshifted"]}.get(partial, partial)
        if m["partial"] is None or not (m["partial"][1] < tol
                                        and close(m["partial"][0], target, tol)):
            bad.append(f"partial: measured {m['partial']}, read {partial}")
    return bad


def measured(mod) -> dict:
    dtype = torch.float32 if precision(mod) == "float32" else torch.float64
    return measure(mod.window, dtype=dtype)


@pytest.mark.parametrize("name", LOOPS)
def test_measured_update_is_what_the_code_says(name):
    mod = MODULES[name]
    assert disagreements(mod, measured(mod)) == []


@pytest.mark.parametrize("name", LOOPS)
def test_doctor_names_what_the_code_says(name):
    mod = MODULES[name]
    result = check_loop(mod.window)
    assert sorted(result.codes) == sorted(mod.EXPECTED), str(result)
    others = [d.code for d in result.diagnoses if d.severity != "bug"]
    assert sorted(others) == sorted(mod.OTHER), str(result)
    assert result.precision == precision(mod)


def test_each_port_names_its_source():
    assert len(LOOPS) >= 12
    for name, mod in MODULES.items():
        doc = mod.__doc__
        assert re.search(r"Repository \S+/\S+, (file|commit)", doc), name
        assert re.search(r"commit\s+[0-9a-f]{40}|release v\d", doc), name
        assert "Expected" in doc, name


def table() -> str:
    """One row per loop: source, expected verdict, measured ratios, the doctor's verdict."""
    rows = []
    for name, mod in MODULES.items():
        m = measured(mod)
        doc = " ".join(mod.__doc__.split())
        repo = re.search(r"Repository (\S+?),", doc).group(1)
        commit = re.search(r"commit\s+([0-9a-f]{40})|release (v[\d.]+)", doc)
        equal = mod.MEASURE["equal"]
        eq = m[equal[0]] if isinstance(equal, tuple) else m["equal"]
        part = f"{m['partial'][0]:.3f}" if m["partial"] is not None else (
            "kept" if m["partial_left"] > 0 and "next_with_tail" in m
            and m["next_with_tail"][1] < tolerance(mod) else "dropped")
        result = check_loop(mod.window)
        verdict = ", ".join(d.code for d in result.diagnoses) or "correct"
        rows.append(f"| {name} | {repo} | {(commit.group(1) or commit.group(2))[:10]} | "
                    f"{', '.join(mod.EXPECTED) or 'correct'} | "
                    f"{eq[0]:.3f}{' of ' + equal[0] if isinstance(equal, tuple) else ''} | "
                    f"{m['unequal_exact'][1]:.2f} | {part} | {verdict} ({result.precision}) |")
    head = ("| loop | repository | commit | expected bugs | equal: update / exact | "
            "unequal: residual from exact | partial (3 of 4): update / exact | doctor |\n"
            "|---|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


if __name__ == "__main__":
    print(table())
