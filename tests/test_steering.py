"""Steering needs only the store: one retry, one kill, one pause, whichever door asks.

The doors are the Python API (``Pipeline.retry``...), the ``nbpipe`` command (a subprocess) and
the sidebar's REST API (a real Jupyter server); each test runs once per door, with no runner
attached and with a runner in another process, and expects the same store afterwards.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import helpers
import pytest
from conftest import wait_for

from nbpipe import ConfigError, Pipeline
from nbpipe.control import Controller

NBPIPE = [sys.executable, "-m", "nbpipe.cli"]

FLOW = '''
import sys
import time
from pathlib import Path

from nbpipe import Pipeline

HERE = Path(__file__).resolve().parent
pipe = Pipeline("flow", store=HERE / ".nbpipe")


@pipe.task
def count() -> int:
    counter = HERE / "count"
    n = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(n))
    return n


@pipe.task
def flaky() -> int:
    if not (HERE / "fixed").exists():
        raise RuntimeError("not fixed yet")
    return 1


@pipe.task
def plus_one(x: int) -> int:
    return x + 1


@pipe.task
def gate() -> str:
    while not (HERE / "open").exists():  # holds the runner while a door steers it
        time.sleep(0.05)
    return "open"


@pipe.task
def first(x: str) -> str:
    return x


@pipe.task
def second(x: str) -> str:
    return x


if __name__ == "__main__":
    count()
    plus_one(flaky())
    if "--gate" in sys.argv:
        second(first(gate()))
    if "--paused" in sys.argv:
        pipe.pause()
        second(first("closed"))
    print(pipe.run(wait_for_runner=True))
'''


def nbpipe(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return helpers.nbpipe(*args, cwd=cwd)


@pytest.fixture
def project(jp_root_dir: Path, cluster, monkeypatch: pytest.MonkeyPatch) -> Path:
    """flow.py in the Jupyter root, run once: count SUCCEEDED, flaky FAILED, plus_one
    UPSTREAM_FAILED."""
    monkeypatch.setenv("DASK_NBPIPE__CLUSTER", cluster.scheduler_address)
    monkeypatch.delenv("NBPIPE_STORE", raising=False)
    folder = jp_root_dir / "proj"
    folder.mkdir()
    (folder / "flow.py").write_text(FLOW)
    subprocess.run([sys.executable, "flow.py"], cwd=folder, timeout=180, capture_output=True)
    return folder


def states(folder: Path) -> dict[str, tuple[str, str | None]]:
    rows = Controller(folder / ".nbpipe", "flow").rows().values()
    return {r["name"]: (r["state"], r["error"]) for r in rows}


async def steer(door: str, folder: Path, verb: str, tasks: list[str], jp_fetch: Any,
                **flags: bool) -> None:
    """Ask ``verb`` of pipeline ``flow`` through ``door``; a detached runner is never started
    here (the tests run the pipeline themselves)."""
    if door == "python":
        pipe = Pipeline("flow", store=folder / ".nbpipe")
        try:
            await asyncio.to_thread(getattr(pipe, verb), tasks or None, **flags)
        finally:
            pipe.close()
    elif door == "cli":
        options = [f"--{f}" for f, on in flags.items() if on]
        if verb == "retry":
            options.append("--no-spawn")
        done = await asyncio.to_thread(nbpipe, folder, "--store", str(folder / ".nbpipe"),
                                       verb, "flow", *tasks, *options)
        assert done.returncode == 0, done.stderr
    else:
        body = {"store": "proj/.nbpipe", "pipeline": "flow", "verb": verb, "tasks": tasks, **flags}
        await jp_fetch("nbpipe", "api", "command", method="POST", body=json.dumps(body))


DOORS = ["python", "cli", "rest"]


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"nbpipe.server": True}}}


@pytest.mark.parametrize("door", DOORS)
async def test_retry_without_a_runner_reruns_a_succeeded_task_and_what_failed(
        door: str, project: Path, jp_fetch) -> None:
    assert states(project)["flaky"][0] == "FAILED"
    assert (project / "count").read_text() == "1"
    (project / "fixed").write_text("yes")
    await steer(door, project, "retry", ["count", "flaky"], jp_fetch)
    if door != "rest":  # (the sidebar starts a detached runner: it may have run them already)
        assert {n: s for n, (s, _) in states(project).items()} == {
            "count": "WAITING", "flaky": "WAITING", "plus_one": "WAITING"}
    # whoever runs the pipeline next runs them: the old result of count is not taken again
    await asyncio.to_thread(subprocess.run, [sys.executable, "flow.py"], cwd=project, timeout=180,
                            capture_output=True)
    await asyncio.to_thread(wait_for, lambda: {s for s, _ in states(project).values()}
                            == {"SUCCEEDED"}, 60)
    assert (project / "count").read_text() == "2"


@pytest.mark.parametrize("door", DOORS)
async def test_retry_with_a_runner_attached_reruns_a_succeeded_task_and_what_failed(
        door: str, project: Path, jp_fetch) -> None:
    driver = subprocess.Popen([sys.executable, "flow.py", "--gate"], cwd=project,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        await asyncio.to_thread(wait_for, lambda: states(project).get("gate", ("",))[0] == "RUNNING"
                                and states(project)["flaky"][0] == "FAILED", 90)
        (project / "fixed").write_text("yes")
        await steer(door, project, "retry", ["count", "flaky"], jp_fetch)
        # the runner reruns count (its stored result is not taken) and what failed
        await asyncio.to_thread(wait_for, lambda: (project / "count").read_text() == "2"
                                and states(project)["count"][0] == "SUCCEEDED"
                                and states(project)["plus_one"][0] == "SUCCEEDED", 60)
        assert states(project)["gate"][0] == "RUNNING"  # it was that runner, not a new one
    finally:
        (project / "open").write_text("now")
        driver.wait(timeout=120)


@pytest.mark.parametrize("door", DOORS)
async def test_kill_without_a_runner_marks_what_waits_on_it_and_leaves_finished_tasks(
        door: str, project: Path, jp_fetch) -> None:
    await asyncio.to_thread(subprocess.run, [sys.executable, "flow.py", "--paused"], cwd=project,
                            timeout=180, capture_output=True)
    assert states(project)["first"][0] == "WAITING"
    await steer(door, project, "kill", ["first", "count"], jp_fetch)
    after = states(project)
    assert after["first"] == ("KILLED", "task \"first(x='closed')\" was killed before it started")
    assert after["second"][0] == "UPSTREAM_FAILED"
    assert "first(x='closed')" in after["second"][1] and "KILLED" in after["second"][1]
    assert after["count"][0] == "SUCCEEDED"  # a finished task is left as it is


@pytest.mark.parametrize("door", DOORS)
async def test_kill_with_a_runner_attached_marks_what_waits_on_it_and_leaves_finished_tasks(
        door: str, project: Path, jp_fetch) -> None:
    driver = subprocess.Popen([sys.executable, "flow.py", "--gate"], cwd=project,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        await asyncio.to_thread(wait_for, lambda: states(project).get("gate", ("",))[0] == "RUNNING",
                                90)
        await steer(door, project, "kill", ["first", "count"], jp_fetch)
        await asyncio.to_thread(wait_for, lambda: states(project)["second"][0] == "UPSTREAM_FAILED",
                                60)
        after = states(project)
        assert after["first"] == ("KILLED", "task 'first(x=<gate>)' was killed before it started")
        assert "first(x=<gate>)" in after["second"][1] and "KILLED" in after["second"][1]
        assert after["count"][0] == "SUCCEEDED"
        await steer(door, project, "kill", ["gate"], jp_fetch)  # a running task stops
        driver.wait(timeout=60)
        assert states(project)["gate"][0] == "KILLED"
    finally:
        (project / "open").write_text("now")
        if driver.poll() is None:
            driver.kill()
            driver.wait()


BAD_CONFIGS = {
    "unknown setting": "clusters: local\n",
    "not YAML": "cluster: [local\n",
    "unknown cluster kind": "cluster: kubernetes-maybe\n",
    "bad pool option": "cluster:\n  kind: slurm\n  cores: -4\n",
    "bad value": "batch-seconds: soon\n",
}


@pytest.mark.parametrize("config", list(BAD_CONFIGS), ids=list(BAD_CONFIGS))
def test_a_broken_nbpipe_yaml_does_not_stop_pause_kill_or_retry(config: str, tmp_path: Path) -> None:
    store = tmp_path / ".nbpipe"
    Pipeline("flow", store=store).close()
    (tmp_path / "nbpipe.yaml").write_text(BAD_CONFIGS[config])
    opened = subprocess.run([sys.executable, "-c", "from nbpipe import Pipeline; Pipeline('flow')"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert opened.returncode != 0, config  # running it needs the configuration...
    paused = nbpipe(tmp_path, "pause", "flow")  # ...steering it does not
    assert paused.returncode == 0, paused.stderr
    assert Controller(store, "flow").paused
    assert nbpipe(tmp_path, "resume", "flow", "--no-spawn").returncode == 0
    assert not Controller(store, "flow").paused
    assert nbpipe(tmp_path, "kill", "flow", "--all").returncode == 0
    assert nbpipe(tmp_path, "retry", "flow", "--failed", "--no-spawn").returncode == 0


async def test_the_sidebars_buttons_work_with_a_broken_configuration(
        jp_fetch, jp_root_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dask

    Pipeline("flow", store=jp_root_dir / "proj" / ".nbpipe").close()
    with dask.config.set({"nbpipe.cluster": "kubernetes-maybe"}):
        with pytest.raises(Exception) as refused:
            Pipeline("flow", store=jp_root_dir / "proj" / ".nbpipe")
        assert "kubernetes-maybe" in str(refused.value)
        for verb in ("pause", "resume", "pause"):
            body = {"store": "proj/.nbpipe", "pipeline": "flow", "verb": verb}
            response = await jp_fetch("nbpipe", "api", "command", method="POST", body=json.dumps(body))
            assert json.loads(response.body)["verb"] == verb
    assert Controller(jp_root_dir / "proj" / ".nbpipe", "flow").paused


def test_steering_an_unknown_pipeline_names_it(tmp_path: Path) -> None:
    Pipeline("flow", store=tmp_path / ".nbpipe").close()
    refused = nbpipe(tmp_path, "pause", "flwo")
    assert refused.returncode != 0 and "flwo" in refused.stderr


def test_config_error_is_still_raised_where_a_cluster_is_needed(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nbpipe.yaml").write_text("clusters: local\n")
    with pytest.raises(ConfigError, match="clusters"):
        Pipeline("flow", store=tmp_path / ".nbpipe")
