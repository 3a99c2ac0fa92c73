"""nb/quickstart.ipynb (the DESIGN scenario) on real kernels with nbclient."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from nbpipe.store import Store

NOTEBOOK = Path(__file__).resolve().parent.parent / "nb" / "quickstart.ipynb"


def _execute(path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, path)
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.output_type != "error", f"{out.get('ename')}: {out.get('evalue')}"
            parts.append(out.get("text") or out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def _attempts(store: Path) -> dict[str, tuple[str, int]]:
    s = Store(store)
    rows = s.task_rows(s.pipeline_id("quickstart"))
    return {r["label"]: (r["key"], r["attempts"]) for r in rows.values()}


@pytest.fixture
def notebook(tmp_path: Path, cluster, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "quickstart.ipynb"
    shutil.copy(NOTEBOOK, path)
    monkeypatch.setenv("JPY_SESSION_NAME", str(path))
    monkeypatch.setenv("NBPIPE_WIDGETS", "0")
    monkeypatch.setenv("DASK_NBPIPE__CLUSTER", cluster.scheduler_address)
    monkeypatch.delenv("NBPIPE_STORE", raising=False)
    monkeypatch.delenv("NBPIPE_PIPELINE", raising=False)
    return path


def test_quickstart_runs_top_to_bottom_and_resumes_after_a_restart(notebook: Path) -> None:
    text = _text(_execute(notebook))
    assert "pipeline 'quickstart'" in text
    mean, pi = map(float, re.search(r"^(-?[\d.e-]+) ([\d.]+)$", text, re.M).groups())
    assert abs(pi - 3.14) < 0.01 and abs(mean) < 0.01
    store = notebook.parent / ".nbpipe"
    first = _attempts(store)
    assert len(first) == 23 and {a for _, a in first.values()} == {1}

    text = _text(_execute(notebook))  # a new kernel: the restart
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
