"""Checks of an executed lesson: its prose states only numbers it prints, and it saves small.

nbval executes each notebook once; notebooks/conftest.py records every cell's outputs while it
does and, after a notebook's last cell, runs `unbacked_numbers` and `saved_bytes` on them (the
conventions are in tests/test_notebooks.py's docstring). Pure functions, unit-tested there.
"""

from __future__ import annotations

import json
import math
import re

import nbformat

# A number as prose writes it: 1,234  0.25  2.6e-7  1.5 x 10^-6 is not matched (write 1.5e-6).
NUMBER = re.compile(r"(?<![\w.#/-])[-−]?(\d[\d,]*(?:\.\d+)?(?:[eE][-−+]?\d+)?)(%?)(?![\w/])")
# Numbers right after these words are names, not outcomes: "notebook 03", "issue 12", "PR #3".
NAMING_WORDS = re.compile(
    r"(?:section|sections|lesson|lessons|notebook|notebooks|issue|issues|PR|pull request|Table|"
    r"Figure|Fig\.|chapter|Eq\.|equation|version|Python|torch|transformers|plotly|ipywidgets|"
    r"JupyterLab|Colab|answer|question|item|items|step|line|lines|l\.)"
    r"\s*(?:[\d.]+(?:\s*,\s*|\s+and\s+|\s+or\s+))*$",  # also "lessons 01, 03 and 10"
    re.IGNORECASE)
REFERENCE = "measured elsewhere"  # followed by its source: "measured elsewhere: <file>"
MAX_SAVED_BYTES = 2 * 1024 * 1024


def _prose(markdown: str) -> list[str]:
    """The paragraphs of a markdown cell that state things, with everything that is not a
    claim removed: the course navigation and links to lessons, math, inline code, link
    targets and URLs, HTML tags, heading and list numbers.
    Paragraphs labelled as references (containing "measured elsewhere:") are left out."""
    text = re.sub(r"(?m)^\*accumlab course:\*.*$", " ", markdown)  # the course navigation
    text = re.sub(r"\[[^\]]*\]\([^)]*\.ipynb\)", " ", text)  # links to lessons, "[03 ...]"
    text = re.sub(r"\$\$.*?\$\$|\$[^$\n]*\$", " ", text, flags=re.S)  # math
    text = re.sub(r"```.*?```|`[^`\n]*`", " ", text, flags=re.S)  # code
    text = re.sub(r"\]\([^)]*\)|https?://\S+|<[^>]+>", " ", text)  # link targets, URLs, tags
    text = re.sub(r"(?m)^\s*#+\s*[\d.]+", " ", text)  # "## 3. ..." section numbers
    text = re.sub(r"(?m)^\s*(?:\d+\.|[-*])\s", " ", text)  # list numbers
    return [p for p in re.split(r"\n\s*\n", text) if REFERENCE not in p]


def _value(token: str) -> float:
    return float(token.replace(",", "").replace("−", "-"))


def _significant(token: str) -> int:
    """Significant digits a prose number states: "2.63e-7" -> 3, "0.25" -> 2, "1,024" -> 4."""
    mantissa = re.split(r"[eE]", token.replace(",", ""))[0].lstrip("-−")
    digits = mantissa.replace(".", "").lstrip("0")
    return max(1, len(digits))


def _rounds_to(value: float, target: float, digits: int) -> bool:
    if target == 0 or value == 0:
        return value == target
    if value == target:
        return True
    scale = 10 ** (digits - 1 - math.floor(math.log10(abs(target))))
    return round(value * scale) == round(target * scale)


def claimed_numbers(nb) -> list[tuple[int, str]]:
    """(markdown cell index, number) for every number the prose states that needs backing.

    Exempt: single-digit integers, years (1950-2035), numbers after naming words (section,
    notebook, issue, PR, version ...), numbers inside math, code spans, links, headings' and
    lists' numbering, and whole paragraphs labelled "measured elsewhere: <source>".
    The self-check questions (before their <details> answers) are hypotheticals: exempt.
    """
    found = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        source = cell.source
        if source.lstrip().startswith("## Self-check questions"):
            source = source[source.find("<details>"):] if "<details>" in source else ""
        for paragraph in _prose(source):
            for match in NUMBER.finditer(paragraph):
                token, percent = match.group(1), match.group(2)
                if "." not in token and "e" not in token.lower() and not percent:
                    n = int(token.replace(",", ""))
                    if n < 10 or 1950 <= n <= 2035:
                        continue
                if NAMING_WORDS.search(paragraph[:match.start()]):
                    continue
                found.append((index, token + percent))
    return found


def printed_numbers(nb, outputs) -> list[float]:
    """Every number in the code (sources) and in what the code printed or displayed (text,
    stream, HTML tables with tags removed); `outputs` maps code-cell index to output list."""
    texts = [c.source for c in nb.cells if c.cell_type == "code"]
    self_check = [c.source for c in nb.cells if c.cell_type == "markdown"
                  and c.source.lstrip().startswith("## Self-check questions")]
    texts += [s.split("<details>")[0] for s in self_check]  # the questions' own numbers
    for outs in outputs.values():
        for out in outs or ():
            if out.get("output_type") == "stream":
                texts.append(out.get("text", ""))
            for mime, data in (out.get("data") or {}).items():
                if mime in ("text/plain", "text/html", "text/markdown"):
                    texts.append(re.sub(r"<[^>]+>", " ", data if isinstance(data, str)
                                        else "".join(data)))
    numbers = []
    for text in texts:
        for match in NUMBER.finditer(text.replace("−", "-")):
            try:
                numbers.append(_value(match.group(1)))
            except ValueError:
                continue
    return numbers


def unbacked_numbers(nb, outputs) -> list[tuple[int, str]]:
    """Prose numbers that no code cell prints or contains (a printed number may be rounded to
    the digits the prose gives; "25%" is backed by 25 or by 0.25)."""
    printed = printed_numbers(nb, outputs)
    missing = []
    for index, token in claimed_numbers(nb):
        percent = token.endswith("%")
        text = token.rstrip("%")
        target, digits = _value(text), _significant(text)
        candidates = [target] + ([target / 100] if percent else [])
        if not any(_rounds_to(v, t, digits) or _rounds_to(abs(v), t, digits)
                   for t in candidates for v in printed):
            missing.append((index, token))
    return missing


def saved_bytes(nb, outputs, widget_state_bytes: int = 0) -> int:
    """Size of the notebook saved after Run All: its cells with these outputs, plus the
    widget state JupyterLab (or nbconvert) stores beside them."""
    saved = nbformat.from_dict(json.loads(json.dumps(nb)))
    code = [c for c in saved.cells if c.cell_type == "code"]
    for index, outs in outputs.items():
        if index < len(code):
            code[index].outputs = [nbformat.from_dict(dict(o)) for o in outs or ()]
    return len(json.dumps(saved, indent=1, ensure_ascii=False)) + widget_state_bytes


# Run in the lesson's kernel after its last cell: the bytes of every live widget's state.
WIDGET_STATE_PROBE = """
def _accumlab_widget_state_bytes():
    import json
    from ipywidgets.widgets.widget import _instances
    return sum(len(json.dumps(w.get_state(), default=lambda b: "x" * len(bytes(b))))
               for w in list(_instances.values()))
print(_accumlab_widget_state_bytes())
"""
