"""A real browser: JupyterLab + headless Chromium run notebook 03, then move its widgets.

Skips (with the reason) where Debian's chromium, Playwright or JupyterLab is missing; `.ci/run`
installs chromium. The server runs on a free localhost port with its own config, runtime,
workspace and settings folders, so nothing of the user's Jupyter setup is read or written.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "03_equivalence_lab.ipynb"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

KERNEL_IDLE = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.status === 'idle';
}"""
CELL_ERRORS = """() => window.jupyterapp.shell.currentWidget.content.widgets
  .flatMap(c => c.model.type === 'code' ? c.model.outputs.toJSON() : [])
  .filter(o => o.output_type === 'error')
  .map(o => o.ename + ': ' + o.evalue)"""
PLOT_READY = """() => {
  const g = document.querySelector('.accumlab-panel .js-plotly-plot');
  return !!g && !!g.data && g.data.length > 0;
}"""
READOUT = "() => document.querySelector('.accumlab-readout').textContent"
PLOT_Y = """() => {
  const g = document.querySelector('.accumlab-panel .js-plotly-plot');
  return g && g.data ? g.data.map(t => Array.from(t.y || [])) : null;
}"""


def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"no chromium at {CHROMIUM} (apt-get install chromium; .ci/run does it)"
    try:
        import jupyterlab  # noqa: F401
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install -e '.[lab,dev]')"
    return None


MISSING = _missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(settings: Path) -> None:
    """No news toast; keep every cell in the DOM (no virtual scrolling)."""
    files = {
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
            {"fetchNews": "false", "checkForUpdates": False},
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings":
            {"windowingMode": "none"},
    }
    for name, value in files.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server serving a copy of the notebook; yields its URL."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, work / NOTEBOOK)
    _write_settings(tmp_path / "settings")
    port = _free_port()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
               TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
         "--ip=127.0.0.1", f"--port={port}", "--ServerApp.token=", "--ServerApp.password=",
         "--ServerApp.disable_check_xsrf=True", "--LabApp.expose_app_in_browser=True",
         f"--ServerApp.root_dir={work}"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.flush()
                    pytest.fail("JupyterLab did not start:\n"
                                + (tmp_path / "server.log").read_text()[-3000:])
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def test_equivalence_lab_widgets_respond_in_a_real_browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{lab}/lab/tree/{NOTEBOOK}?reset")
            page.wait_for_function(KERNEL_IDLE, timeout=60_000)
            ran = page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            errors = page.evaluate(CELL_ERRORS)
            assert ran is True and not errors, f"run all cells failed: {errors}"
            page.wait_for_function(KERNEL_IDLE, timeout=30_000)
            page.wait_for_selector(".accumlab-readout", timeout=30_000)
            page.wait_for_function(PLOT_READY, timeout=30_000)

            # The notebook's last cells moved k to its largest value (32) and picked fp16.
            before = page.evaluate(READOUT)
            plot_before = page.evaluate(PLOT_Y)
            assert "k = 32, fp16" in before, before

            # Move the k slider one notch left with the keyboard: k 32 -> 16.
            page.locator(".accumlab-panel .widget-slider", has_text="accumulation steps").locator(
                ".noUi-handle").first.focus()
            page.keyboard.press("ArrowLeft")
            page.wait_for_function(
                "() => document.querySelector('.accumlab-readout').textContent"
                ".includes('k = 16, fp16')", timeout=30_000)
            page.wait_for_function(KERNEL_IDLE, timeout=30_000)
            plot_after_k = page.evaluate(PLOT_Y)
            assert plot_after_k != plot_before

            # Pick another precision in the dropdown: fp16 -> fp32.
            page.locator(".accumlab-panel select").first.select_option("fp32")
            page.wait_for_function(
                "() => document.querySelector('.accumlab-readout').textContent"
                ".includes('k = 16, fp32')", timeout=60_000)
            page.wait_for_function(KERNEL_IDLE, timeout=30_000)
            after = page.evaluate(READOUT)
            plot_after = page.evaluate(PLOT_Y)
            status = page.evaluate(
                "() => document.querySelector('.accumlab-panel .accumlab-status').textContent")
        finally:
            browser.close()

    assert after != before
    assert plot_after != plot_after_k
    # fp16 rounding is far coarser than fp32's: the plotted differences shrank.
    assert (max(v for v in plot_before[0] if v is not None)
            > 100 * max(v for v in plot_after[0] if v is not None))
    assert status.startswith("done in"), status
