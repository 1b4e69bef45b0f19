"""What the doctor reports: one `Diagnosis` per finding, gathered in a `CheckResult`."""

from __future__ import annotations

import html
from dataclasses import dataclass, field


@dataclass
class Diagnosis:
    """One named finding: `code` is stable (tests use it), `title` states it with numbers."""

    code: str
    title: str
    evidence: str
    fix: str = ""
    severity: str = "bug"  # "bug" (the update or its cadence is wrong), "warning" or "note"
    probe: str = ""

    def __str__(self) -> str:
        mark = {"bug": "✗", "warning": "!", "note": "i"}[self.severity]
        text = f"{mark} [{self.code}] {self.title}\n    evidence: {self.evidence}"
        return text + (f"\n    fix: {self.fix}" if self.fix else "")


@dataclass
class CheckResult:
    """What `check_loop` found. `ok` is True when no finding is a bug."""

    name: str
    accum_steps: int
    diagnoses: list[Diagnosis]
    probes: dict[str, dict] = field(default_factory=dict)
    not_checked: list[str] = field(default_factory=list)
    precision: str = "float64"  # of the probe model every verdict here came from

    @property
    def ok(self) -> bool:
        return not any(d.severity == "bug" for d in self.diagnoses)

    @property
    def codes(self) -> list[str]:
        """The codes of the bugs found (warnings and notes left out)."""
        return [d.code for d in self.diagnoses if d.severity == "bug"]

    def summary(self) -> str:
        """One line: 'correct' or the bug titles."""
        if self.ok:
            return "correct"
        return "; ".join(d.title for d in self.diagnoses if d.severity == "bug")

    def __str__(self) -> str:
        head = (f"check_loop({self.name}): k={self.accum_steps}, tiny GPT-2 in {self.precision}, "
                f"SGD lr=1, probes: {', '.join(self.probes) or 'none finished'}")
        if self.ok:
            lines = [head, "correct: every probe matches the exact window update."]
        else:
            n = len(self.codes)
            lines = [head, f"{n} problem{'s' if n > 1 else ''} found:"]
        lines += [str(d) for d in self.diagnoses]
        if self.not_checked:
            lines.append("not checked: " + "; ".join(self.not_checked))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"CheckResult(ok={self.ok}, codes={self.codes})"

    def _repr_html_(self) -> str:
        colour = "#1a7f37" if self.ok else "#cf222e"
        verdict = "correct" if self.ok else f"{len(self.codes)} problem(s) found"
        rows = "".join(
            f"<li><b>{html.escape(d.code)}</b> — {html.escape(d.title)}<br>"
            f"<small>evidence: {html.escape(d.evidence)}"
            + (f"<br>fix: {html.escape(d.fix)}" if d.fix else "") + "</small></li>"
            for d in self.diagnoses)
        extra = ("<p><small>not checked: " + html.escape("; ".join(self.not_checked))
                 + "</small></p>") if self.not_checked else ""
        return (f"<div><p><code>check_loop({html.escape(self.name)})</code>, "
                f"k={self.accum_steps}, {self.precision}: <b style='color:{colour}'>{verdict}</b></p>"
                f"<ul>{rows}</ul>{extra}</div>")
