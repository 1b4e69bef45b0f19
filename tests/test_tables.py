"""accumlab.ui.tables: records become an HTML table for JupyterLab and a text table elsewhere."""

from accumlab.ui.tables import Table, show_table


def test_show_table_renders_html_with_formats_and_keeps_a_text_form():
    rows = [{"k": 1, "x": 1.5e-7, "name": "fp32", "n": 12345}, {"k": 16, "x": None}]
    table = show_table(rows, formats={"x": ".1e", "n": ",", "unused": ".2f"})
    assert isinstance(table, Table)
    html = table._repr_html_()
    assert html.count("<tr>") == 3 and "<table" in html  # header and two rows
    assert ">1.5e-07<" in html and ">12,345<" in html and ">-<" in html
    assert ">0<" not in html  # the index is hidden
    assert repr(table).splitlines()[2].split() == ["1", "1.5e-07", "fp32", "12,345"]
    assert list(table.frame.columns) == ["k", "x", "name", "n"]


def test_show_table_picks_columns_and_formats_floats_by_default():
    table = show_table([{"a": 1 / 3, "b": "x", "c": 2}], columns=["c", "a"],
                       formats={"c": lambda v: v * 10})
    html = table._repr_html_()
    assert ">20<" in html and ">0.333<" in html and ">x<" not in html
    assert list(table.frame.columns) == ["c", "a"]
    assert repr(show_table([])) == "(no rows)"
