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


def _notebook(path: Path, sources: list[str] = CELLS) -> None:
    cells = [{"cell_type": "code", "id": f"cell-{i}", "metadata": {}, "execution_count": None,
              "outputs": [], "source": source.replace("{root}", str(path.parent))}
             for i, source in enumerate(sources)]
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
             "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
             "--LabApp.expose_app_in_browser=True"],
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
        pg.console_messages = []  # what the page logged: a NaN transform shows up here
        pg.on("console", lambda m: pg.console_messages.append(f"{m.type}: {m.text}"))
        # an uncaught exception is no console message: keep it too for the failure dump
        pg.on("pageerror", lambda e: pg.console_messages.append(f"pageerror: {e}"))
        yield pg
        if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
            pg.screenshot(path=str(tmp_path / "failure.png"))
            print(f"screenshot: {tmp_path / 'failure.png'}")
            # the page's own log (first: the dumps below can time out on a stuck page): a failed
            # request or an exception in the sidebar's model shows here
            print("console:", *pg.console_messages[-60:], sep="\n  ")
            print(pg.locator("#nbpipe-sidebar").inner_text(timeout=2000)[:3000])
            outputs = pg.locator(".jp-OutputArea-output")
            if outputs.count():
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
    _run_all(page)
    node(page, "data", "SUCCEEDED").wait_for()
    node(page, "total", "SUCCEEDED").wait_for()
    node(page, "checked", "FAILED").wait_for()
    node(page, "slow", "RUNNING").wait_for()
    assert "demo" in sidebar.locator(".nbpipe-picker").input_value()

    # the 20 mapped calls are one group node with counts by state; a click shows its items
    group = sidebar.locator('g.nbpipe-node[data-group="true"][data-task="fraction"]')
    sidebar.locator('g.nbpipe-node[data-task="fraction"][data-counts="20 done"]').wait_for()
    group.click()
    cells = sidebar.locator('[data-group-grid="fraction"] .nbpipe-cell')
    cells.nth(19).wait_for()
    assert cells.count() == 20
    sidebar.locator('[data-group-grid="fraction"] button.nbpipe-close').click()
    cells.first.wait_for(state="detached")

    # the inline graph (%pipeline graph, an anywidget sharing the sidebar's layout) is live too
    inline = page.locator(".jp-OutputArea .nbpipe-inline")
    inline.locator('g.nbpipe-node[data-group="true"][data-task="fraction"][data-state="SUCCEEDED"]').wait_for()
    assert inline.locator("marker#nbpipe-inline-arrow").count() == 1  # edges have arrowheads
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


# -- the sidebar shows the truth, for the notebook in focus, readably at its default width ------------


def _start(page, url: str, notebook: str) -> None:
    """Open JupyterLab on a notebook and wait for its kernel (accepting the kernel dialog)."""
    page.goto(f"{url}lab/tree/{notebook}?token={TOKEN}")
    _kernel_ready(page)


def _kernel_ready(page) -> None:
    page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell").first.wait_for()
    choose = page.locator(".jp-Dialog:has-text('Select Kernel') .jp-Dialog-button.jp-mod-accept")
    try:  # JupyterLab may ask which kernel to start
        choose.wait_for(timeout=5_000)
        choose.click()
    except Exception:  # noqa: BLE001 - no dialog: the kernel started by itself
        pass
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle'] >> visible=true").first.wait_for()
    news = page.locator(".jp-Notification-Toast-Close, .Toastify__close-button")
    if news.count():
        news.first.click()


def _command(page, command: str, args: dict | None = None) -> None:
    """Start a JupyterLab command, as a menu or the palette would (not waiting for its dialogs)."""
    page.evaluate("([c, a]) => { void window.jupyterapp.commands.execute(c, a); }", [command, args or {}])


def _run_all(page) -> None:
    _command(page, "notebook:run-all-cells")


def _open_sidebar(page):
    tab = page.locator('li[data-id="nbpipe-sidebar"]')
    if tab.get_attribute("aria-selected") != "true":
        tab.click()
    sidebar = page.locator("#nbpipe-sidebar")
    sidebar.wait_for()
    return sidebar


def _label_sizes(page) -> list[float]:
    """Rendered font size (px on screen) of every label of the sidebar's graph."""
    return page.evaluate("""() => [...document.querySelectorAll('#nbpipe-sidebar .nbpipe-graph-svg text')]
        .map(t => parseFloat(getComputedStyle(t).fontSize) * t.getScreenCTM().a)""")


def _picker(sidebar) -> str:
    return sidebar.locator(".nbpipe-picker").input_value()


def test_the_sidebar_follows_the_notebook_in_focus_and_restores_after_reload(lab, page) -> None:
    url, root = lab
    _notebook(root / "alpha.ipynb", ["%load_ext nbpipe", "%%task first\nfirst = 1",
                                     "%%task second\nsecond = first + 1"])
    _notebook(root / "beta.ipynb", ["%load_ext nbpipe", "%%task other\nother = 2"])
    _start(page, url, "alpha.ipynb")
    sidebar = _open_sidebar(page)
    sidebar.locator(".nbpipe-empty:has-text('alpha.ipynb has no pipeline yet')").wait_for()
    _run_all(page)
    node(page, "second", "SUCCEEDED").wait_for()
    assert _picker(sidebar).endswith("\x00alpha")

    # open beta: it has no pipeline yet, and the sidebar does not keep showing alpha's
    _command(page, "docmanager:open", {"path": "beta.ipynb"})
    _kernel_ready(page)
    sidebar.locator(".nbpipe-empty:has-text('beta.ipynb has no pipeline yet')").wait_for()
    assert node(page, "second").count() == 0
    _run_all(page)
    node(page, "other", "SUCCEEDED").wait_for()  # beta's own pipeline, once it ran
    assert _picker(sidebar).endswith("\x00beta")

    # switching tabs switches the pipeline, and commands go to the one shown
    page.locator('.lm-DockPanel-tabBar li[data-type="document-title"]:has-text("alpha.ipynb")').click()
    node(page, "second").wait_for()
    assert node(page, "other").count() == 0 and _picker(sidebar).endswith("\x00alpha")
    sidebar.locator("button.nbpipe-pause").click()
    sidebar.locator(".nbpipe-paused").wait_for()
    page.locator('.lm-DockPanel-tabBar li[data-type="document-title"]:has-text("beta.ipynb")').click()
    node(page, "other").wait_for()
    assert sidebar.locator(".nbpipe-paused").count() == 0  # only alpha was paused
    sidebar.locator(".nbpipe-pin").wait_for(state="detached")

    # a choice in the picker is pinned, visibly, and stays when the tab changes
    picker = sidebar.locator(".nbpipe-picker")
    picker.select_option(value=next(v for v in picker.evaluate("s => [...s.options].map(o => o.value)")
                                    if v.endswith("\x00alpha")))
    node(page, "second").wait_for()
    sidebar.locator(".nbpipe-pin:has-text('pinned')").wait_for()
    assert "nbpipe-pinned" in picker.get_attribute("class")
    assert "pinned" in picker.get_attribute("title")
    page.locator('.lm-DockPanel-tabBar li[data-type="document-title"]:has-text("alpha.ipynb")').click()
    page.locator('.lm-DockPanel-tabBar li[data-type="document-title"]:has-text("beta.ipynb")').click()
    page.wait_for_timeout(1500)
    assert node(page, "second").count() == 1, "a pinned pipeline stays"
    sidebar.locator("button.nbpipe-unpin").click()
    node(page, "other").wait_for()  # following beta, the notebook in focus, again
    sidebar.locator("button.nbpipe-resume").wait_for(state="detached")

    # reload: the sidebar is open again, on the notebook in focus, and the graph fits its space
    page.locator('.lm-DockPanel-tabBar li[data-type="document-title"]:has-text("alpha.ipynb")').click()
    node(page, "second").wait_for()
    width = sidebar.evaluate("e => e.getBoundingClientRect().width")
    page.wait_for_timeout(1500)  # the layout restorer saves the shell's state
    page.console_messages.clear()
    page.reload()
    page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for()
    sidebar = page.locator("#nbpipe-sidebar")
    sidebar.wait_for()  # restored open: no click on its tab
    node(page, "second", "SUCCEEDED").wait_for()
    assert _picker(sidebar).endswith("\x00alpha")
    assert abs(sidebar.evaluate("e => e.getBoundingClientRect().width") - width) <= 2
    assert not [m for m in page.console_messages if "NaN" in m], page.console_messages
    box = sidebar.locator(".nbpipe-graph-box")
    svg = sidebar.locator(".nbpipe-graph-svg")
    assert svg.evaluate("e => e.getBoundingClientRect().width") <= box.evaluate("e => e.clientWidth") + 1
    assert min(_label_sizes(page)) >= 11
    # widening the panel lays the graph out again for the space it has
    assert sidebar.locator(".nbpipe-graph").get_attribute("data-direction") == "TB"
    handle = page.locator("#jp-main-split-panel > .lm-SplitPanel-handle >> visible=true").first
    start = handle.bounding_box()
    page.mouse.move(start["x"] + 2, start["y"] + 200)
    page.mouse.down()
    page.mouse.move(start["x"] + 500, start["y"] + 200, steps=10)
    page.mouse.up()
    page.wait_for_function("() => document.querySelector('#nbpipe-sidebar .nbpipe-graph')"
                           ".dataset.direction === 'LR'")


def test_the_sidebar_is_readable_at_its_default_width(lab, page) -> None:
    """The pi pipeline of the guide: labels at least 11 px high on screen, nothing cut off."""
    url, root = lab
    _notebook(root / "pi.ipynb", [
        "%load_ext nbpipe",
        "%%task load\ndata = list(range(1000))",
        "%%task stats\nmean = sum(data) / len(data)",
        "from nbpipe import task\n\n@task\ndef fraction(seed: int) -> float:\n    return seed / 20\n\n"
        "fractions = [fraction(seed=i) for i in range(20)]",
        "%%task pi\npi = 4 * sum(fractions) / len(fractions)",
    ])
    _start(page, url, "pi.ipynb")
    sidebar = _open_sidebar(page)
    _run_all(page)
    node(page, "pi", "SUCCEEDED").wait_for()
    sidebar.locator('g.nbpipe-node[data-task="fraction"][data-counts="20 done"]').wait_for()
    width = sidebar.evaluate("e => e.getBoundingClientRect().width")
    assert 200 <= width <= 320, f"the sidebar's default width is {width} px"
    sizes = _label_sizes(page)
    assert len(sizes) >= 5 and min(sizes) >= 11, sizes
    # every node inside the visible box: the graph is laid out top to bottom, not scaled down
    assert sidebar.locator(".nbpipe-graph").get_attribute("data-direction") == "TB"
    right = sidebar.locator(".nbpipe-graph-box").evaluate("e => e.getBoundingClientRect().right")
    nodes = sidebar.locator("g.nbpipe-node")
    for i in range(nodes.count()):
        assert nodes.nth(i).evaluate("e => e.getBoundingClientRect().right") <= right + 1
    # words are never broken in the middle, and badges stay on one line
    for badge in sidebar.locator(".nbpipe-badge").all():
        assert badge.evaluate("e => e.getClientRects().length") == 1
    page.screenshot(path=str(lab[1].parent / "pi.png"))
    keep(lab[1].parent / "pi.png", "sidebar-pi.png")

    # Open in main area: the same pipeline in a full-size tab
    sidebar.locator("button.nbpipe-open-main").click()
    main = page.locator("#nbpipe-main")
    main.locator('g.nbpipe-node[data-label="pi"]').wait_for()
    assert main.evaluate("e => e.getBoundingClientRect().width") > 500


def test_a_300_item_map_is_readable_and_the_sidebar_misses_no_event(lab, page) -> None:
    url, root = lab
    _notebook(root / "big.ipynb", [
        "%load_ext nbpipe",
        "from nbpipe import task\n\n@task\ndef item(i: int) -> int:\n"
        "    if i in (7, 150):\n        raise ValueError(f'bad item {i}')\n"
        "    return i\n\nitems = [item(i=i) for i in range(300)]",
        "%%task total\ntotal = sum(items)",
    ])
    _start(page, url, "big.ipynb")
    sidebar = _open_sidebar(page)
    _run_all(page)
    group = sidebar.locator('g.nbpipe-node[data-group="true"][data-task="item"]')
    # every event arrives: the group converges to the store's truth without a reload
    sidebar.locator('g.nbpipe-node[data-task="item"][data-counts="2 failed · 298 done"]').wait_for(
        timeout=240_000)
    assert group.get_attribute("data-state") == "FAILED"
    counts = sidebar.locator(".nbpipe-counts").inner_text()
    assert "298 succeeded" in counts and "2 failed" in counts, counts
    assert min(_label_sizes(page)) >= 11
    # its items, in order, as a grid of state colours; hover names one, a click opens its panel
    group.click()
    grid = sidebar.locator('[data-group-grid="item"]')
    cells = grid.locator(".nbpipe-cell")
    cells.nth(299).wait_for()
    labels = cells.evaluate_all("cs => cs.map(c => c.dataset.label)")
    assert labels == [f"item(i={i})" for i in range(300)]
    assert [cells.nth(i).get_attribute("data-state") for i in (6, 7, 8, 150)] == \
        ["SUCCEEDED", "FAILED", "SUCCEEDED", "FAILED"]
    assert cells.nth(7).get_attribute("title") == "item(i=7): FAILED"
    assert grid.evaluate("e => e.scrollWidth <= e.clientWidth + 1")  # no sideways overflow
    assert cells.first.evaluate("e => e.getBoundingClientRect().width") >= 10
    cells.nth(150).click()
    panel = sidebar.locator(".nbpipe-panel[data-panel-label='item(i=150)']")
    panel.locator(".nbpipe-traceback:has-text('bad item 150')").wait_for()
    # the task panel closes; an error message can be dismissed
    panel.locator("button.nbpipe-close").click()
    panel.wait_for(state="detached")
    page.screenshot(path=str(lab[1].parent / "map.png"))
    keep(lab[1].parent / "map.png", "sidebar-map.png")


def test_the_task_panel_follows_a_fixed_cell_and_the_inline_graph_keeps_following(lab, page) -> None:
    url, root = lab
    _notebook(root / "fix.ipynb", [
        "%load_ext nbpipe",
        "%%task data\ndata = [1, 2, 3]",
        "%%task checked\nassert len(data) > 5, 'too few items'\nchecked = sum(data)",
        "%pipeline graph",
    ])
    _start(page, url, "fix.ipynb")
    sidebar = _open_sidebar(page)
    _run_all(page)
    node(page, "checked", "FAILED").wait_for()
    inline = page.locator(".jp-OutputArea .nbpipe-inline")
    inline.locator('g.nbpipe-node[data-label="checked"][data-state="FAILED"]').wait_for()
    node(page, "checked").click()
    panel = sidebar.locator(".nbpipe-panel")
    panel.locator(".nbpipe-traceback:has-text('too few items')").wait_for()
    old_key = panel.get_attribute("data-panel-task")
    assert panel.locator(".nbpipe-cell-changed").count() == 0
    # polish: the long key stays inside the panel (its tooltip has it whole); so does the picker's name
    assert panel.evaluate("e => e.scrollWidth <= e.clientWidth + 1")
    assert panel.locator(".nbpipe-key").get_attribute("title") == old_key
    assert sidebar.locator(".nbpipe-picker").get_attribute("title").startswith("fix (.nbpipe)")
    # the cell the task came from is marked in its own way, not as JupyterLab's selection
    marked = page.locator(".jp-Cell.nbpipe-highlight", has_text="%%task checked")
    marked.wait_for()
    assert "dashed" in marked.evaluate("e => getComputedStyle(e).outlineStyle")

    # edit the cell without running it: the panel says Retry would run the old code
    editor = page.locator(".jp-Cell", has_text="%%task checked").locator(".cm-content")
    editor.click()
    page.keyboard.press("Control+a")
    page.keyboard.insert_text("%%task checked\nassert len(data) > 2, 'too few items'\nchecked = sum(data)")
    panel.locator(".nbpipe-cell-changed:has-text('the cell has changed')").wait_for(timeout=10_000)
    assert "old code" in panel.locator("button.nbpipe-retry").get_attribute("title")

    # run the fixed cell: the panel follows the task to its new key, green, no old traceback
    page.keyboard.press("Shift+Enter")
    node(page, "checked", "SUCCEEDED").wait_for()
    panel.locator(".nbpipe-panel-state:text-is('SUCCEEDED')").wait_for()
    assert panel.get_attribute("data-panel-task") != old_key
    assert panel.locator(".nbpipe-traceback").count() == 0
    assert panel.locator(".nbpipe-cell-changed").count() == 0
    # the inline graph, drawn when every task was final, shows the re-run too
    inline.locator('g.nbpipe-node[data-label="checked"][data-state="SUCCEEDED"]').wait_for()
    # Retry acts on the task as it is now (no 404 for the old key)
    panel.locator("button.nbpipe-retry").click()
    page.wait_for_timeout(1500)
    assert sidebar.locator(".nbpipe-message").count() == 0, sidebar.locator(".nbpipe-message").inner_text()
    node(page, "checked", "SUCCEEDED").wait_for()


def test_runner_facts_follow_the_runner_across_a_kernel_restart(lab, page) -> None:
    url, root = lab
    _notebook(root / "restart.ipynb", ["%load_ext nbpipe", "%%task one --no-cache\none = 1"])
    _start(page, url, "restart.ipynb")
    sidebar = _open_sidebar(page)
    _run_all(page)
    node(page, "one", "SUCCEEDED").wait_for()
    runner = sidebar.locator(".nbpipe-runner")
    runner.locator("text=runner pid").wait_for()
    pid = runner.get_attribute("data-runner-pid")
    uptime = runner.locator(".nbpipe-uptime").inner_text()
    page.wait_for_timeout(2500)
    assert runner.locator(".nbpipe-uptime").inner_text() != uptime, "uptime ticks while idle"
    _command(page, "kernelmenu:restart")
    page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept").click()
    # the dead runner's pid, uptime and dashboard go
    runner.locator("text=no runner attached").wait_for()
    assert runner.locator("a").count() == 0
    _kernel_ready(page)
    _run_all(page)
    page.wait_for_function("p => { const r = document.querySelector('#nbpipe-sidebar .nbpipe-runner');"
                           " return r && r.dataset.runnerPid && r.dataset.runnerPid !== p; }", arg=pid)


def _big_pipeline(store: Path, chains: int = 40, length: int = 50) -> list[str]:
    """A pipeline of chains x length different functions (nothing run); its keys in order."""
    from nbpipe import Pipeline

    pipe = Pipeline("big", store=store)
    previous: dict[int, object] = {}
    for i in range(chains * length):
        def step(x: int | None, i: int) -> int:
            return i

        fn = pipe.task(name=f"step{i:04d}")(step)
        previous[i % chains] = fn(previous.get(i % chains), i)
    pipe.resolve()  # registered, not run (as benchmarks/sidebar.py does)
    keys = [r.key for r in pipe._refs.values()]
    pipe.close()
    return keys


# Every node the graph box can show, found by scrolling it view by view over the whole graph.
SCROLL_ALL = """async box => {
  const frame = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const seen = new Set();
  let most = 0;
  for (let top = 0; top < box.scrollHeight; top += box.clientHeight) {
    for (let left = 0; left < box.scrollWidth; left += box.clientWidth) {
      box.scrollTo(left, top);
      await frame();
      const drawn = box.querySelectorAll('g.nbpipe-node');
      most = Math.max(most, drawn.length);
      drawn.forEach(n => seen.add(n.dataset.task));
    }
  }
  box.scrollTo(0, 0);
  return { seen: [...seen], most };
}"""


# Scroll the box view by view until the node of task `key` is drawn; where it was found.
FIND = """async (box, key) => {
  const frame = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  for (let top = 0; top < box.scrollHeight; top += box.clientHeight) {
    for (let left = 0; left < box.scrollWidth; left += box.clientWidth) {
      box.scrollTo(left, top);
      await frame();
      if (box.querySelector(`g.nbpipe-node[data-task='${key}']`)) { return [left, top]; }
    }
  }
  return null;
}"""


def test_a_2000_node_graph_draws_what_is_in_view_and_every_node_when_scrolled_to(lab, page) -> None:
    """Only the part of a big graph in and around the view is in the DOM, but scrolling reaches
    every node, and a state change of a node off screen shows when it is scrolled to."""
    from nbpipe.store import Batch, Store

    url, root = lab
    keys = _big_pipeline(root / ".nbpipe")
    page.goto(f"{url}lab?token={TOKEN}")
    sidebar = _open_sidebar(page)
    svg = sidebar.locator("svg.nbpipe-graph-svg[data-nodes='2000']")
    svg.wait_for(timeout=120_000)
    box = sidebar.locator(".nbpipe-graph-box")
    drawn = sidebar.locator("g.nbpipe-node")
    assert 0 < drawn.count() < 500, drawn.count()  # culled: not 2,000 nodes in the DOM
    assert str(drawn.count()) == svg.get_attribute("data-drawn")
    # the scroll area is the whole graph's, not the drawn part's
    assert box.evaluate("e => e.scrollHeight > 3 * e.clientHeight")
    shown = set(drawn.evaluate_all("ns => ns.map(n => n.dataset.task)"))
    far = next(k for k in reversed(keys) if k not in shown)  # the last chain's end: off screen

    # a state change of the off-screen node, written as a runner writes it
    store = Store(root / ".nbpipe")
    batch = Batch()
    batch.state(store.pipeline_id("big", create=False), far, "FAILED", attempts=1)
    store.write(batch)
    sidebar.locator(".nbpipe-counts [data-count-state='FAILED']").wait_for()  # the poll saw it
    assert sidebar.locator(f"g.nbpipe-node[data-task='{far}']").count() == 0

    found = box.evaluate(SCROLL_ALL)
    assert set(found["seen"]) == set(keys), f"{len(set(keys) - set(found['seen']))} nodes never drawn"
    assert found["most"] < 500

    # scrolled to it, the node shows its new state, on screen inside the box
    at = box.evaluate(FIND, far)
    assert at is not None, "the changed node was never drawn"
    node_far = sidebar.locator(f"g.nbpipe-node[data-task='{far}']")
    assert node_far.get_attribute("data-state") == "FAILED"
    node_far.scroll_into_view_if_needed()
    inner, outer = node_far.bounding_box(), box.bounding_box()
    assert outer["x"] - 1 <= inner["x"] and inner["x"] + inner["width"] <= outer["x"] + outer["width"] + 1
    assert outer["y"] - 1 <= inner["y"] and inner["y"] + inner["height"] <= outer["y"] + outer["height"] + 1
    # and the nodes of the far top-left corner have left the DOM
    assert sidebar.locator(f"g.nbpipe-node[data-task='{keys[0]}']").count() == 0


def test_a_graph_that_fails_to_load_still_shows(lab, page) -> None:
    """The graph request is the sidebar's one big read. When it fails (a server busy or
    restarting), the sidebar must still end up showing the graph: never the pipeline's name
    over an empty panel for good."""
    url, root = lab
    keys = _big_pipeline(root / ".nbpipe", chains=3, length=4)
    calls = {"graph": 0}

    def answer(route) -> None:
        calls["graph"] += 1
        if calls["graph"] <= 3:  # the first ones fail, as a server under load can
            route.fulfill(status=503, body='{"message": "busy"}', content_type="application/json")
        else:
            route.continue_()

    page.route("**/nbpipe/api/graph?**", answer)
    page.goto(f"{url}lab?token={TOKEN}")
    sidebar = _open_sidebar(page)
    # nobody presses anything: the sidebar asks again by itself
    sidebar.locator(f"svg.nbpipe-graph-svg[data-nodes='{len(keys)}']").wait_for(timeout=60_000)
    assert calls["graph"] >= 4, calls


def test_the_task_list_and_panel_show_how_a_task_ended_timed_out_accepted_adopted(lab, page) -> None:
    url, root = lab
    (root / "made.txt").write_text("by hand")
    _notebook(root / "outcomes.ipynb", [
        "%load_ext nbpipe",
        "%%task slowpoke --timeout 2\nimport time\ntime.sleep(120)\nslowpoke = 1",
        "from pathlib import Path\nfrom typing import Annotated\n"
        "from nbpipe import Out, current_pipeline, task\n\n"
        "@task(trust_existing=True)\ndef make(out: Annotated[Path, Out]) -> None:\n"
        "    Path(out).write_text('made')\n\nmade = make(Path('{root}/made.txt'))\n"
        "@task\ndef scale(x: int) -> int:\n    return x * 10\n\n"
        "first = scale(4)\n_ = current_pipeline().run([made, first])",
        # an edit called cosmetic: the new definition adopts the last result by hand
        "@task\ndef scale(x: int) -> int:\n    return 10 * x\n\n"
        "second = scale(4)\nprint(current_pipeline().accept(second))",
        "%%task plain\nplain = 2",
    ])
    _start(page, url, "outcomes.ipynb")
    sidebar = _open_sidebar(page)
    _run_all(page)

    def row(label: str):
        return sidebar.locator(f".nbpipe-task-row:has(.nbpipe-task-label:text-is('{label}'))")

    expected = {"slowpoke": ("FAILED", "timed out"), "scale(x=4)": ("SUCCEEDED", "accepted"),
                "make(out=made.txt)": ("SUCCEEDED", "adopted")}
    sidebar.locator(".nbpipe-task-row[data-outcome='timed out']").wait_for(timeout=120_000)
    sidebar.locator(".nbpipe-task-row[data-outcome='accepted']").wait_for(timeout=120_000)
    sidebar.locator(".nbpipe-task-row[data-outcome='adopted']").wait_for(timeout=120_000)
    sidebar.locator(".nbpipe-task-row[data-state='SUCCEEDED']:has-text('plain')").wait_for(timeout=120_000)
    for outcome in ("timed out", "accepted", "adopted"):
        shown = sidebar.locator(f".nbpipe-task-row[data-outcome='{outcome}']")
        label = shown.locator(".nbpipe-task-label").inner_text()
        state, _ = next(v for k, v in expected.items() if label.startswith(k.split("(")[0]))
        assert shown.get_attribute("data-state") == state
        assert shown.locator(".nbpipe-task-state").inner_text() == f"{state} ({outcome})"
        assert shown.locator(".nbpipe-task-state").get_attribute("title")
        # the task panel says it too, with what it means
        shown.click()
        panel = sidebar.locator(f".nbpipe-panel[data-panel-label='{label}']")
        panel.locator(f".nbpipe-panel-state:text-is('{state} ({outcome})')").wait_for()
        assert panel.locator(".nbpipe-panel-state").get_attribute("data-outcome") == outcome
    # a plain ending shows the state alone
    assert row("plain").locator(".nbpipe-task-state").inner_text() == "SUCCEEDED"
    assert row("plain").get_attribute("data-outcome") is None
