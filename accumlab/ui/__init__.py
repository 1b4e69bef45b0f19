"""The notebook UI: plotly figure builders (`viz`), ipywidgets panels (`widgets`) and HTML
tables (`tables`).

Thin: widgets hold no math, they call the lab. Only notebooks import this package, and it is
the only place that imports plotly, ipywidgets and pandas.
"""
