"""The JupyterLab sidebar end to end: a real `jupyter lab`, a real kernel, headless Chromium.

Playwright drives Debian's Chromium (/usr/bin/chromium); it never downloads a browser. Skipped
where Chromium is missing; CI (CI=true) turns the skip into a failure.
"""

from __future__ import annotations

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

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# `make screenshots` (NBPIPE_UPDATE_SCREENSHOTS=1) refreshes the guide's pictures from this test.
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "images"
UPDATE = os.environ.get("NBPIPE_UPDATE_SCREENSHOTS") == "1"

pytestmark = [
    pytest.mark.ci_required,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no Chromium here (apt-get install chromium)"),
]

TOKEN = "nbpipe-test-token"

CELLS = [
    "%load_ext nbpipe",
    "%%task data\ndata = list(range(10))",
    "%%task total\ntotal = sum(data)",
    "%%task checked\nimport os\n"
    "assert os.path.exists('{root}/fixed.flag'), 'create fixed.flag, then press Retry'\nchecked = total",
    "%%task slow\nimport time\ntime.sleep(300)\nslow = 1",
    "from nbpipe import current_pipeline, task\n\n@task\ndef fraction(seed: int) -> float:\n"
    "    return seed / 20\n\nfractions = [fraction(i) for i in range(20)]\n"
    "_ = current_pipeline().run(fractions, wait=False)",
    "%pipeline graph",
]


def _notebook(path: Path) -> None:
    cells = [{"cell_type": "code", "id": f"cell-{i}", "metadata": {}, "execution_count": None,
              "outputs": [], "source": source.replace("{root}", str(path.parent))}
             for i, source in enumerate(CELLS)]
    path.write_text(json.dumps({
        "cells": cells, "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    }))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path: Path):
    """A `jupyter lab` server over tmp_path; its kernels start LocalClusters of their own."""
    root = tmp_path / "root"
    root.mkdir()
    _notebook(root / "demo.ipynb")
    port = _free_port()
    # the kernel starts a LocalCluster of its own (it ends with the kernel: a task left running
    # by a failed test cannot hold a worker of the shared test cluster)
    env = {**os.environ, "DASK_NBPIPE__CLUSTER": "local",
           "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")}
    env.pop("NBPIPE_STORE", None)
    # every cell in the DOM (no virtual scrolling), so the test sees outputs below the fold
    settings = tmp_path / "config" / "lab" / "user-settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    with open(tmp_path / "lab.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
             f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}", "--allow-root",
             "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}api/status?token={TOKEN}", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    proc.kill()
                    raise AssertionError((tmp_path / "lab.log").read_text()[-3000:]) from None
                time.sleep(0.3)
        yield url, root
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def page(tmp_path: Path, request: pytest.FixtureRequest):
    """A Chromium page; on a failure its screenshot and the sidebar's text go to the test's output."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        pg = context.new_page()
        pg.set_default_timeout(60_000)
        yield pg
        if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
            pg.screenshot(path=str(tmp_path / "failure.png"))
            print(f"screenshot: {tmp_path / 'failure.png'}")
            print(pg.locator("#nbpipe-sidebar").inner_text(timeout=2000)[:3000])
            outputs = pg.locator(".jp-OutputArea-output")
            print("last output:", outputs.nth(outputs.count() - 1).inner_html(timeout=2000)[:2000])
            print((tmp_path / "lab.log").read_text()[-4000:])
        browser.close()


def node(page, label: str, state: str | None = None):
    selector = f'#nbpipe-sidebar g.nbpipe-node[data-label="{label}"]'
    if state:
        selector += f'[data-state="{state}"]'
    return page.locator(selector)


def _not_blank(path: Path) -> None:
    from PIL import Image

    image = Image.open(path).convert("RGB").resize((200, 130))
    colours = image.getcolors(maxcolors=200 * 130)
    assert colours is not None and len(colours) > 20, "the screenshot is blank"


def keep(picture: Path, name: str) -> None:
    """Copy a screenshot into docs/images when refreshing the guide's pictures."""
    if UPDATE:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(picture, SCREENSHOTS / name)


def test_sidebar_shows_the_live_graph_and_retries_and_kills(lab, page, tmp_path: Path) -> None:
    url, root = lab
    page.goto(f"{url}lab/tree/demo.ipynb?token={TOKEN}")
    page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for()
    choose = page.locator(".jp-Dialog:has-text('Select Kernel') .jp-Dialog-button.jp-mod-accept")
    try:  # JupyterLab may ask which kernel to start
        choose.wait_for(timeout=5_000)
        choose.click()
    except Exception:  # noqa: BLE001 - no dialog: the kernel started by itself
        pass
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for()
    news = page.locator(".jp-Notification-Toast-Close, .Toastify__close-button")
    if news.count():  # "get notified about Jupyter news?" would cover the screenshot
        news.first.click()
    page.locator('li[data-id="nbpipe-sidebar"]').click()  # the sidebar's tab
    sidebar = page.locator("#nbpipe-sidebar")
    sidebar.wait_for()

    # run every cell: the %%task cells become tasks; the sidebar picks the pipeline up
    page.locator('.lm-MenuBar-itemLabel:text-is("Run")').click()
    page.locator('.lm-Menu-itemLabel:text-is("Run All Cells")').click()
    node(page, "data", "SUCCEEDED").wait_for()
    node(page, "total", "SUCCEEDED").wait_for()
    node(page, "checked", "FAILED").wait_for()
    node(page, "slow", "RUNNING").wait_for()
    assert "demo" in sidebar.locator(".nbpipe-picker").input_value()

    # the 20 mapped calls are one group node; a click expands it
    group = sidebar.locator('g.nbpipe-node[data-group="true"][data-task="fraction"]')
    group.locator("text=(20/20)").wait_for()
    group.click()
    page.wait_for_function("() => document.querySelectorAll("
                           "'#nbpipe-sidebar g.nbpipe-node[data-label^=\"fraction(\"]').length === 20")
    sidebar.locator("button:text-is('Collapse groups')").click()
    group.wait_for()

    # the inline graph (%pipeline graph, an anywidget sharing the sidebar's layout) is live too
    inline = page.locator(".jp-OutputArea .nbpipe-inline")
    inline.locator('g.nbpipe-node[data-group="true"][data-task="fraction"][data-state="SUCCEEDED"]').wait_for()
    inline.locator('g.nbpipe-node[data-label="checked"][data-state="FAILED"]').wait_for()

    # keyboard: a node takes focus and Enter opens its panel
    node(page, "total").focus()
    page.keyboard.press("Enter")
    sidebar.locator(".nbpipe-panel .nbpipe-panel-head:has-text('total')").wait_for()

    # clicking a task opens its panel and points at its cell
    node(page, "checked").click()
    panel = sidebar.locator(".nbpipe-panel")
    panel.locator(".nbpipe-traceback").wait_for()
    assert "create fixed.flag" in panel.inner_text()
    page.locator(".jp-Cell.nbpipe-highlight", has_text="%%task checked").wait_for()
    page.screenshot(path=str(tmp_path / "failed.png"))
    _not_blank(tmp_path / "failed.png")
    keep(tmp_path / "failed.png", "sidebar-failed.png")

    # fix the cause, press Retry: the task runs again and succeeds
    (root / "fixed.flag").write_text("ok")
    panel.locator("button.nbpipe-retry").click()
    node(page, "checked", "SUCCEEDED").wait_for()

    # kill the running task, with confirmation
    node(page, "slow").click()
    sidebar.locator('.nbpipe-panel[data-panel-task] button.nbpipe-kill').click()
    page.locator(".jp-Dialog-button.jp-mod-warn").click()
    node(page, "slow", "KILLED").wait_for()
    counts = sidebar.locator(".nbpipe-counts").inner_text()
    assert "23 succeeded" in counts and "1 killed" in counts, counts


    # "Export notebook to nbpipe script": the script is written beside the notebook and opened
    sidebar.locator("button.nbpipe-export").click()
    page.locator(".jp-Dialog:has-text('Exported') .jp-Dialog-button.jp-mod-accept").click()
    wait = time.monotonic() + 30
    while not (root / "demo.py").exists() and time.monotonic() < wait:
        time.sleep(0.2)
    assert "@nbpipe.task(outputs=['data']" in (root / "demo.py").read_text()

    page.screenshot(path=str(tmp_path / "sidebar.png"))
    _not_blank(tmp_path / "sidebar.png")
    keep(tmp_path / "sidebar.png", "sidebar.png")

    # the dark theme: the sidebar follows JupyterLab's colours
    light = sidebar.evaluate("e => getComputedStyle(e).backgroundColor")
    page.locator('.lm-MenuBar-itemLabel:text-is("Settings")').click()
    page.locator('.lm-Menu-itemLabel:text-is("Theme")').click()
    page.locator('.lm-Menu-itemLabel:text-is("JupyterLab Dark")').click()
    page.wait_for_function("l => getComputedStyle(document.querySelector('#nbpipe-sidebar'))"
                           ".backgroundColor !== l", arg=light)
    page.locator("#jupyterlab-splash").wait_for(state="detached")  # the theme has loaded
    page.wait_for_timeout(500)  # let the last transition finish before the picture
    page.screenshot(path=str(tmp_path / "sidebar-dark.png"))
    _not_blank(tmp_path / "sidebar-dark.png")
    keep(tmp_path / "sidebar-dark.png", "sidebar-dark.png")
