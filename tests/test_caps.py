"""Concurrency caps: ``max_concurrent`` counts the tasks of one function (its copies made with
``with_options`` included) and ``Pipeline(max_concurrent=N)`` (or ``nbpipe.max-concurrent``)
all tasks of a pipeline, in scripts and in detached runners (``nbpipe spawn``, ``retry``).

Every task writes when it started and ended; the test counts the largest overlap. The shared
cluster has two worker threads, so an uncapped pair of tasks overlaps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_for
from helpers import nbpipe

SCRIPT = '''
import os, sys, time
from pathlib import Path
from nbpipe import Pipeline, task

LOG = Path(sys.argv[1])
MODE = sys.argv[2]
cap = int(os.environ.get("PIPELINE_CAP", "0")) or None
pipe = Pipeline("caps", max_concurrent=cap)


def step(i: int, flag: str = "") -> int:
    start = time.time()
    time.sleep(0.6)
    (LOG / f"{i}-{os.getpid()}-{start}").write_text(f"{start} {time.time()}")
    if flag and not os.path.exists(flag):
        raise RuntimeError("not yet")
    return i


def other(i: int) -> int:
    return step(100 + i)


if __name__ == "__main__":
    flag = sys.argv[3] if len(sys.argv) > 3 else ""
    if MODE == "copies":  # one function, copies with other options: one cap
        capped = pipe.task(step, max_concurrent=1)
        [capped.with_options(retries=i % 2)(i, flag) for i in range(4)]
    else:  # "functions": two functions under the pipeline's cap
        [pipe.task(step)(i, flag) for i in range(3)]
        [pipe.task(other)(i) for i in range(3)]
    if os.environ.get("DETACH"):
        pipe.detach()
    else:
        print(pipe.run())
'''


def _overlap(log: Path) -> int:
    spans = [tuple(map(float, p.read_text().split())) for p in log.iterdir()]
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    most = now = 0
    for _, delta in edges:
        now += delta
        most = max(most, now)
    return most


def _nbpipe(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return nbpipe(*args, cwd=cwd, timeout=300)


def _states(cwd: Path) -> set[str]:
    return {t["state"] for t in json.loads(_nbpipe(cwd, "tasks", "caps", "--json").stdout or "[]")}


@pytest.fixture
def script(tmp_path: Path, cluster, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DASK_NBPIPE__CLUSTER", cluster.scheduler_address)  # also for spawned runners
    (tmp_path / "log").mkdir()
    path = tmp_path / "caps.py"
    path.write_text(SCRIPT)
    return path


def _run(script: Path, mode: str, *extra: str, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, str(script), str(script.parent / "log"), mode, *extra],
                          cwd=script.parent, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_copies_made_with_with_options_share_their_functions_cap(script: Path) -> None:
    out = _run(script, "copies")
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(list((script.parent / "log").iterdir())) == 4
    assert _overlap(script.parent / "log") == 1


def test_the_uncapped_control_does_overlap(script: Path) -> None:
    """(What the other tests would see without the caps.)"""
    out = _run(script, "functions")
    assert out.returncode == 0, out.stderr[-3000:]
    assert _overlap(script.parent / "log") == 2


def test_a_pipeline_wide_cap_counts_every_function(script: Path) -> None:
    out = _run(script, "functions", PIPELINE_CAP="1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(list((script.parent / "log").iterdir())) == 6
    assert _overlap(script.parent / "log") == 1


def test_the_pipeline_wide_cap_from_nbpipe_yaml(script: Path) -> None:
    (script.parent / "nbpipe.yaml").write_text("max-concurrent: 1\n")
    out = _run(script, "functions")
    assert out.returncode == 0, out.stderr[-3000:]
    assert _overlap(script.parent / "log") == 1


@pytest.mark.parametrize("pipeline_cap", ["", "1"])
def test_a_detached_runner_keeps_both_caps(script: Path, pipeline_cap: str) -> None:
    mode = "functions" if pipeline_cap else "copies"
    out = _run(script, mode, DETACH="1", PIPELINE_CAP=pipeline_cap or "0")
    assert out.returncode == 0, out.stderr[-3000:]
    wait_for(lambda: _states(script.parent) == {"SUCCEEDED"}, timeout=240)
    assert _overlap(script.parent / "log") == 1


@pytest.mark.parametrize("pipeline_cap", ["", "1"])
def test_nbpipe_retry_runs_revived_tasks_under_both_caps(script: Path, pipeline_cap: str) -> None:
    mode = "functions" if pipeline_cap else "copies"
    flag = script.parent / "fixed"
    out = _run(script, mode, str(flag), PIPELINE_CAP=pipeline_cap or "0")
    assert out.returncode != 0 or "failed" in out.stdout, out.stderr[-3000:]
    for entry in (script.parent / "log").iterdir():
        entry.unlink()
    flag.write_text("yes")
    retried = _nbpipe(script.parent, "retry", "caps", "--failed")
    assert retried.returncode == 0 and "started a detached runner" in retried.stdout, retried
    wait_for(lambda: _states(script.parent) == {"SUCCEEDED"}, timeout=240)
    assert len(list((script.parent / "log").iterdir())) == (3 if pipeline_cap else 4)
    assert _overlap(script.parent / "log") == 1
