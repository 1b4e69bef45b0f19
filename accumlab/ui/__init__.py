"""The notebook UI: plotly figure builders (`viz`) and ipywidgets panels (`widgets`).

Thin: widgets hold no math, they call the lab. Only notebooks import this package, and it is
the only place that imports plotly and ipywidgets.
"""
