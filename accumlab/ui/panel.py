"""The building blocks of every notebook panel: `Panel` (controls, a "running…" state, a
readout and a figure), `FigureView` (a plain figure redrawn in an `Output`; a FigureWidget
with ``ACCUMLAB_FIGURES=widget``, see `figure_mode`) and `LiveLossPlot`.

Tests drive a panel without a browser by setting ``panel.controls["k"].value = 4`` and reading
``panel.result``, ``panel.readout.value`` or ``panel.view.figure``.
"""

from __future__ import annotations

import html
import os
import sys
import time
from collections.abc import Callable, Sequence

import ipywidgets as W
import plotly.graph_objects as go
import plotly.io as pio

from accumlab.ui import viz

READOUT_CLASS = "accumlab-readout"


STATUS_CLASS = "accumlab-status"


FIGURE_MODES = ("widget", "output")


def figure_mode(mode: str = "auto") -> str:
    """"output" (a plain `go.Figure` redrawn in an `Output` widget) or "widget" (FigureWidget).

    "auto" reads ``ACCUMLAB_FIGURES`` and otherwise gives "output": a FigureWidget stores
    plotly's whole JavaScript bundle (about 5 MB) in the widget state that JupyterLab saves
    with the notebook, so a lesson with one would be saved at over 5 MB; an `Output` keeps only
    the figure's data. "widget" (redraws in place, keeps the zoom) needs anywidget and does not
    render on Colab.
    """
    if mode == "auto":
        mode = os.environ.get("ACCUMLAB_FIGURES", "auto")
    if mode == "auto":
        return "output"
    if mode not in FIGURE_MODES:
        raise ValueError(f"figure mode must be 'auto' or one of {FIGURE_MODES}, got {mode!r}")
    return mode


class FigureView:
    """A plotly figure that can be redrawn from a new `go.Figure`.

    `widget` is what to display; `figure` is the last figure drawn (plain data, for tests).
    """

    def __init__(self, figure: go.Figure | None = None, mode: str = "auto"):
        self.mode = figure_mode(mode)
        self.figure = figure if figure is not None else go.Figure()
        if self.mode == "widget":
            self.widget = go.FigureWidget(self.figure)
        else:
            self.widget = W.Output()
            self._draw_output()
        self.widget.add_class("accumlab-figure")

    def update(self, figure: go.Figure) -> None:
        """Show `figure` instead of the current one (in place for a FigureWidget)."""
        self.figure = figure
        if self.mode == "output":
            self._draw_output()
            return
        fw = self.widget
        same = len(fw.data) == len(figure.data) and all(
            a.type == b.type for a, b in zip(fw.data, figure.data, strict=True))
        if same:
            with fw.batch_update():
                for old, new in zip(fw.data, figure.data, strict=True):
                    old.update(new.to_plotly_json(), overwrite=True)
                fw.layout = figure.layout
        else:
            fw.data = ()
            fw.add_traces(list(figure.data))
            fw.layout = figure.layout

    def _draw_output(self) -> None:
        """Set the Output's contents directly (not by printing inside it), so that the figure
        never lands in the output of the cell that moved a control, e.g. under nbval."""
        renderer = pio.renderers["colab" if "google.colab" in sys.modules else "plotly_mimetype"]
        bundle = renderer.to_mimebundle(self.figure.to_dict()) if self.figure.data else None
        self.widget.outputs = (
            ({"output_type": "display_data", "data": bundle, "metadata": {}},) if bundle else ())


class Panel:
    """Controls, a compute function, a readout and an optional figure.

    `compute(**values)` gets the controls' values by name and returns a result (plain data);
    `describe(result)` makes the readout's HTML and `render(result)` the figure. While compute
    runs the status line reads "running…". Display the panel itself (or `panel.widget`).
    """

    def __init__(self, controls: dict[str, W.ValueWidget], compute: Callable[..., object],
                 describe: Callable[[object], str],
                 render: Callable[[object], go.Figure] | None = None, title: str | None = None,
                 figure_mode: str = "auto", run: bool = True):
        self.controls = controls
        self.compute = compute
        self.describe = describe
        self.render = render
        self.result = None
        self.error: Exception | None = None
        self.runs = 0
        self.status = W.HTML(value="")
        self.status.add_class(STATUS_CLASS)
        self.readout = W.HTML(value="")
        self.readout.add_class(READOUT_CLASS)
        self.view = FigureView(mode=figure_mode) if render is not None else None
        for control in controls.values():
            control.observe(self._on_change, names="value")
        children = []
        if title:
            children.append(W.HTML(f"<b>{html.escape(title)}</b>"))
        children.append(W.HBox(list(controls.values()),
                               layout=W.Layout(flex_flow="row wrap")))
        children += [self.status, self.readout]
        if self.view is not None:
            children.append(self.view.widget)
        self.widget = W.VBox(children)
        self.widget.add_class("accumlab-panel")
        if run:
            self.refresh()

    @property
    def values(self) -> dict:
        """The controls' current values by name."""
        return {name: control.value for name, control in self.controls.items()}

    def refresh(self) -> None:
        """Recompute from the current values and redraw (what a control change does)."""
        self.status.value = "<i>running…</i>"
        self.widget.add_class("accumlab-running")
        start = time.perf_counter()
        try:
            self.result = self.compute(**self.values)
            self.error = None
        except Exception as e:  # show the problem in the panel instead of a lost traceback
            self.result, self.error = None, e
            self.status.value = (f"<span style='color:#b00'>error: "
                                 f"{html.escape(type(e).__name__)}: {html.escape(str(e))}</span>")
        else:
            self.readout.value = self.describe(self.result)
            if self.view is not None:
                self.view.update(self.render(self.result))
            self.status.value = f"<i>done in {time.perf_counter() - start:.2f} s</i>"
        finally:
            self.runs += 1
            self.widget.remove_class("accumlab-running")

    def _on_change(self, change) -> None:
        self.refresh()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def _slider_layout(description: str) -> W.Layout:
    """Room for the whole description and a track of about 250 px (ipywidgets' default 300 px
    includes the description, which left a long one's track a few pixels wide)."""
    return W.Layout(width=f"{max(340, 7 * len(description) + 270)}px")


def slider(description: str, options: Sequence, value) -> W.SelectionSlider:
    return W.SelectionSlider(options=list(options), value=value, description=description,
                             continuous_update=False, style={"description_width": "initial"},
                             layout=_slider_layout(description))


def int_slider(description: str, value: int, min: int, max: int) -> W.IntSlider:
    return W.IntSlider(value=value, min=min, max=max, description=description,
                       continuous_update=False, style={"description_width": "initial"},
                       layout=_slider_layout(description))


def dropdown(description: str, options: Sequence, value) -> W.Dropdown:
    return W.Dropdown(options=list(options), value=value, description=description,
                      style={"description_width": "initial"},
                      layout=W.Layout(width="max-content"))


def sci(x: float) -> str:
    return "0" if x == 0 else f"{x:.2e}"


class LiveLossPlot:
    """A callback for `accumlab.train` that draws the loss of each run while it trains.

        live = LiveLossPlot(); display(live)
        accumlab.train(model, data, cfg, callbacks=[live.named("64 x 1")])

    Several runs share one plot (one line each); `runs` keeps their records as plain data.
    """

    def __init__(self, title: str = "training loss", every: int = 1, y: str = "loss",
                 figure_mode: str = "auto"):
        self.title = title
        self.every = max(1, int(every))
        self.y = y
        self.runs: dict[str, list[dict]] = {}
        self._next_name: str | None = None
        self._current: str | None = None
        self._total: int | None = None
        self.status = W.HTML(value="")
        self.status.add_class(STATUS_CLASS)
        self.view = FigureView(viz.loss_curves_figure({}, y=y, title=title), mode=figure_mode)
        self.widget = W.VBox([self.status, self.view.widget])

    def named(self, name: str) -> LiveLossPlot:
        """Name the next run's line (default: "micro x steps")."""
        self._next_name = name
        return self

    def on_train_begin(self, info: dict) -> None:
        cfg = info.get("config")
        name = self._next_name or (f"{cfg.micro_batch_size} x {cfg.accum_steps}" if cfg
                                   else f"run {len(self.runs) + 1}")
        self._next_name = None
        self._current, self._total = name, info.get("total_steps")
        self.runs[name] = []
        self.status.value = f"<i>running {html.escape(name)}…</i>"
        self._redraw()

    def on_step_end(self, record: dict) -> None:
        if self._current is None:
            self.on_train_begin({})
        self.runs[self._current].append({"step": record["step"], self.y: record[self.y]})
        self.status.value = (f"<i>running {html.escape(self._current)}: step {record['step']}"
                             + (f" of {self._total}" if self._total else "") + "…</i>")
        if record["step"] % self.every == 0:
            self._redraw()

    def on_train_end(self, result) -> None:
        self._redraw()
        self.status.value = f"<i>done: {len(self.runs)} run(s)</i>"
        self._current = None

    def _redraw(self) -> None:
        self.view.update(viz.loss_curves_figure(self.runs, y=self.y, title=self.title))

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
