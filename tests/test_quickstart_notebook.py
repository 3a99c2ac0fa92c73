"""nb/quickstart.ipynb (the DESIGN scenario) on real kernels with nbclient."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pytest
from helpers import execute_notebook, notebook_text

from nbpipe.store import Store

NOTEBOOK = Path(__file__).resolve().parent.parent / "nb" / "quickstart.ipynb"


def _attempts(store: Path) -> dict[str, tuple[str, int]]:
    s = Store(store)
    rows = s.task_rows(s.pipeline_id("quickstart"))
    return {r["label"]: (r["key"], r["attempts"]) for r in rows.values()}


@pytest.fixture
def notebook(tmp_path: Path, kernel_env: dict[str, str]) -> Path:
    path = tmp_path / "quickstart.ipynb"
    shutil.copy(NOTEBOOK, path)
    return path


def _execute(path: Path) -> nbformat.NotebookNode:
    return execute_notebook(path, save=True)  # saved, as JupyterLab saves it after a run


def test_quickstart_runs_top_to_bottom_and_resumes_after_a_restart(notebook: Path) -> None:
    text = notebook_text(_execute(notebook))
    assert "pipeline 'quickstart'" in text
    mean, pi = map(float, re.search(r"^(-?[\d.e-]+) ([\d.]+)$", text, re.M).groups())
    assert abs(pi - 3.14) < 0.01 and abs(mean) < 0.01
    store = notebook.parent / ".nbpipe"
    first = _attempts(store)
    assert len(first) == 23 and {a for _, a in first.values()} == {1}

    text = notebook_text(_execute(notebook))  # a new kernel: the restart
    assert _attempts(store) == first  # nothing executed again
    assert "found done" in text


def test_editing_only_stats_reruns_only_stats(notebook: Path) -> None:
    _execute(notebook)
    store = notebook.parent / ".nbpipe"
    before = _attempts(store)
    nb = nbformat.read(notebook, as_version=4)
    cell = next(c for c in nb.cells if c.source.startswith("%%task stats"))
    cell.source = "%%task stats\nmean, std = data.mean(), data.std(ddof=1)"
    nbformat.write(nb, notebook)
    _execute(notebook)
    after = _attempts(store)
    changed = {label for label in after if after[label] != before.get(label)}
    assert changed == {"stats"}
