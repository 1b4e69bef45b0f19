"""Tables of plain records that JupyterLab renders as HTML tables (pandas' Styler).

    from accumlab.ui.tables import show_table
    show_table(rows, formats={"loss": ".3f", "tokens": ","})   # last line of a cell

`show_table` returns a `Table`: JupyterLab draws its HTML (a pandas Styler, `table.styler`;
the values are `table.frame`, a DataFrame); its text form (`repr`, what a terminal or a text
output sees) is the fixed-width table of `viz.format_table`. Put it last in a cell, or pass it
to `display()`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pandas as pd
from pandas.io.formats.style import Styler

from accumlab.ui.viz import format_table

_CSS = [
    {"selector": "th", "props": "text-align: right; padding: 2px 10px;"},
    {"selector": "td", "props": "text-align: right; padding: 2px 10px; "
                                "font-variant-numeric: tabular-nums;"},
]


def _formatter(spec: str | Callable | None) -> Callable:
    """A cell formatter from a format spec (".2e", ","), a function, or None (floats: .3g)."""
    if callable(spec):
        return lambda v: str(spec(v))
    if spec:
        return lambda v: format(v, spec)
    return lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)


class Table:
    """An HTML table for JupyterLab (`styler`, a pandas Styler, over `frame`, a DataFrame of
    the values) whose text form is the fixed-width table (terminals, text outputs)."""

    def __init__(self, records: Sequence[Mapping], columns: Sequence[str],
                 formats: Mapping[str, str | Callable]):
        self._text = format_table(records, columns, formats)
        self.frame = pd.DataFrame([[r.get(c) for c in columns] for r in records],
                                  columns=list(columns), dtype=object)
        self.styler: Styler = (self.frame.style
                               .format({c: _formatter(formats.get(c)) for c in columns},
                                       na_rep="-")
                               .hide(axis="index").set_table_styles(_CSS))

    def _repr_html_(self) -> str:
        return self.styler.to_html()

    def __repr__(self) -> str:
        return self._text


def show_table(records: Sequence[Mapping], columns: Sequence[str] | None = None,
               formats: Mapping[str, str | Callable] | None = None) -> Table:
    """Records (dicts) as a table; `columns` picks and orders them (default: the first
    record's keys) and `formats` maps a column to a format spec such as ``".2e"`` or to a
    function of the value (formats of columns not shown are ignored). Missing values show
    as "-"."""
    records = list(records)
    if columns is None:
        columns = list(records[0].keys()) if records else []
    return Table(records, list(columns), dict(formats or {}))


__all__ = ["Table", "show_table"]
