"""The nbpipe command, driven as a subprocess against real stores."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_for
from helpers import LONG, write

NBPIPE = [sys.executable, "-m", "nbpipe.cli"]

SCRIPT = '''
import sys
from nbpipe import Pipeline

pipe = Pipeline("cli")


@pipe.task
def square(x: int) -> int:
    print(f"squaring {x}")
    return x * x


@pipe.task
def total(values: list) -> int:
    return sum(values)


@pipe.task
def broken(x: int) -> int:
    raise ValueError(f"bad {x}")


if __name__ == "__main__":
    parts = [square(i) for i in range(3)]
    total(parts)
    if "--fail" in sys.argv:
        broken(1)
    summary = pipe.run()
    sys.exit(0 if summary.ok else 1)
'''


def nbpipe(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NBPIPE, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.fixture
def project(tmp_path: Path, cluster, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DASK_NBPIPE__CLUSTER", cluster.scheduler_address)
    monkeypatch.delenv("NBPIPE_STORE", raising=False)
    (tmp_path / "pipeline.py").write_text(SCRIPT)
    done = nbpipe(tmp_path, "run", "pipeline.py")
    assert done.returncode == 0, done.stderr
    return tmp_path


def test_run_exits_0_when_all_succeed_and_1_when_a_task_fails(project: Path) -> None:
    failed = nbpipe(project, "run", "pipeline.py", "--fail")
    assert failed.returncode == 1
    assert "broken" in failed.stderr


def test_usage_errors_exit_2_with_a_message(project: Path, tmp_path_factory) -> None:
    unknown = nbpipe(project, "tasks", "no-such-pipeline")
    assert unknown.returncode == 2
    assert "no pipeline named 'no-such-pipeline'" in unknown.stderr
    assert nbpipe(project, "retry", "cli").returncode == 2  # neither tasks nor --failed
    assert nbpipe(project, "show", "cli", "nothing-like-this").returncode == 2
    elsewhere = tmp_path_factory.mktemp("no-store")
    lost = nbpipe(elsewhere, "pipelines")
    assert lost.returncode == 2 and "--store DIR" in lost.stderr


def test_pipelines_and_tasks_list_with_json(project: Path) -> None:
    pipes = json.loads(nbpipe(project, "pipelines", "--json").stdout)
    assert [(p["name"], p["states"]) for p in pipes] == [("cli", {"SUCCEEDED": 4})]
    rows = json.loads(nbpipe(project, "tasks", "cli", "--json").stdout)
    assert {r["label"] for r in rows} == {"square(x=0)", "square(x=1)", "square(x=2)",
                                           "total(values=[3 tasks])"}
    assert set(rows[0]) >= {"name", "key", "label", "state", "attempts"}
    squares = json.loads(nbpipe(project, "tasks", "cli", "--name", "square*", "--json").stdout)
    assert len(squares) == 3
    text = nbpipe(project, "tasks", "cli", "--state", "SUCCEEDED").stdout
    assert "square(x=1)" in text


def test_show_logs_and_why(project: Path) -> None:
    detail = json.loads(nbpipe(project, "show", "cli", "square(x=2)", "--json").stdout)
    assert detail["state"] == "SUCCEEDED" and detail["attempts"][0]["python"]
    assert detail["reason"] == "new task"
    logs = nbpipe(project, "logs", "cli", "square(x=2)")
    assert "squaring 2" in logs.stdout
    assert "new task" in nbpipe(project, "why", "cli", "total").stdout


def test_graph_writes_dot_and_svg(project: Path) -> None:
    dot = nbpipe(project, "graph", "cli").stdout
    # the three mapped square() calls are one group node with counts by state, as in the sidebar
    assert "square ×3" in dot and "3 done" in dot and "square(x=0)" not in dot and "->" in dot
    assert nbpipe(project, "graph", "cli", "-o", "g.svg").returncode == 0
    assert (project / "g.svg").read_text().lstrip().startswith("<?xml")


def test_doctor_finds_and_repairs_a_damaged_result(project: Path) -> None:
    assert nbpipe(project, "doctor").returncode == 0
    db = sqlite3.connect(project / ".nbpipe" / "nbpipe.sqlite")
    (key,) = db.execute("SELECT key FROM results WHERE path = '' LIMIT 1").fetchone()
    db.execute("UPDATE results SET data = ? WHERE key = ?", (b"damaged", key))  # an inline result
    db.commit()
    db.close()
    report = nbpipe(project, "doctor", "--json")
    assert report.returncode == 1
    assert len(json.loads(report.stdout)["bad_results"]) == 1
    assert nbpipe(project, "doctor", "--repair").returncode == 0
    assert nbpipe(project, "doctor").returncode == 0
    rerun = nbpipe(project, "run", "pipeline.py")
    assert rerun.returncode == 0


def test_delete_shows_first_and_deletes_with_force_then_gc(project: Path) -> None:
    dry = nbpipe(project, "delete", "cli")
    assert "would delete pipeline 'cli': 4 tasks" in dry.stdout
    assert json.loads(nbpipe(project, "pipelines", "--json").stdout)
    assert nbpipe(project, "delete", "cli", "--force").returncode == 0
    assert json.loads(nbpipe(project, "pipelines", "--json").stdout) == []
    assert "removed 4 result(s)" in nbpipe(project, "gc").stdout


def test_pause_kill_and_retry_from_another_process_reach_a_running_pipeline(
    tmp_path: Path, cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DASK_NBPIPE__CLUSTER", cluster.scheduler_address)
    gate = tmp_path / "gate"
    driver = subprocess.Popen([sys.executable, str(write(tmp_path / "long.py", LONG)), str(gate)],
                              cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout.readline().strip() == "STARTED"

        def state(label: str) -> str:
            rows = json.loads(nbpipe(tmp_path, "tasks", "long", "--json").stdout)
            return {r["label"]: r["state"] for r in rows}.get(label, "")

        wait_for(lambda: state("spin(n=1)") == "RUNNING")
        assert nbpipe(tmp_path, "pause", "long").returncode == 0
        assert json.loads(nbpipe(tmp_path, "pipelines", "--json").stdout)[0]["paused"]
        assert nbpipe(tmp_path, "kill", "long", "spin(n=1)").returncode == 0
        wait_for(lambda: state("spin(n=1)") == "KILLED", timeout=120)  # it never ends by itself
        assert state("later(x=<spin>)") == "UPSTREAM_FAILED"
        gate.write_text("open")
        assert nbpipe(tmp_path, "resume", "long").returncode == 0
        assert nbpipe(tmp_path, "retry", "long", "--failed").returncode == 0
        out, _ = driver.communicate(timeout=300)
        assert "DONE" in out
    finally:
        driver.kill()
    shutil.rmtree(tmp_path / ".nbpipe", ignore_errors=True)


def test_command_reference_in_docs_matches_the_command() -> None:
    from nbpipe.cli import main, reference

    doc = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    assert doc == reference(), "docs/cli.md is stale: regenerate it with `make docs-cli`"
    assert all(f"## nbpipe {name}" in doc for name in main.commands)


def test_detached_runner_finishes_after_the_process_that_started_it_is_killed(
    tmp_path: Path, cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DASK_NBPIPE__CLUSTER", cluster.scheduler_address)
    (tmp_path / "handover.py").write_text('''
import time
from nbpipe import Pipeline

pipe = Pipeline("handover")

def slow_square(x: int) -> int:
    time.sleep(0.5)
    return x * x

def add_up(values: list) -> int:
    return sum(values)

if __name__ == "__main__":
    square, total = pipe.task(slow_square), pipe.task(add_up)
    total([square(i) for i in range(4)])
    print("PID", pipe.detach(), flush=True)
    time.sleep(600)  # killed by the test long before
''')
    starter = subprocess.Popen([sys.executable, "handover.py"], cwd=tmp_path,
                               stdout=subprocess.PIPE, text=True)
    try:
        line = starter.stdout.readline()
        assert line.startswith("PID")
        starter.kill()  # the process that handed the pipeline over dies
        starter.wait()

        def states() -> dict[str, str]:
            rows = json.loads(nbpipe(tmp_path, "tasks", "handover", "--json").stdout or "[]")
            return {r["label"]: r["state"] for r in rows}

        wait_for(lambda: states().get("add_up(values=[4 tasks])") == "SUCCEEDED", timeout=60)
        assert set(states().values()) == {"SUCCEEDED"}
    finally:
        starter.kill()
    log = (tmp_path / ".nbpipe" / "logs" / "spawn-handover.log").read_text()
    assert "5 executed" in log


def test_retry_without_a_runner_starts_a_detached_one(
    tmp_path: Path, cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DASK_NBPIPE__CLUSTER", cluster.scheduler_address)
    flag = tmp_path / "fixed"
    (tmp_path / "flaky.py").write_text(f"""
import os
from nbpipe import Pipeline

pipe = Pipeline("flaky")


def needs_flag(x: int) -> int:
    if not os.path.exists({str(flag)!r}):
        raise RuntimeError("not fixed yet")
    return x


def double(x: int) -> int:
    return 2 * x


if __name__ == "__main__":
    pipe.task(double)(pipe.task(needs_flag)(21))
    pipe.run()
""")
    assert nbpipe(tmp_path, "run", "flaky.py").returncode == 1
    flag.write_text("yes")
    retried = nbpipe(tmp_path, "retry", "flaky", "--failed")
    assert retried.returncode == 0 and "started a detached runner" in retried.stdout

    def states() -> set[str]:
        return {r["state"] for r in json.loads(nbpipe(tmp_path, "tasks", "flaky", "--json").stdout)}

    wait_for(lambda: states() == {"SUCCEEDED"}, timeout=60)
    assert nbpipe(tmp_path, "retry", "flaky", "--failed", "--no-spawn").returncode == 0


def test_pipelines_all_lists_every_store_this_user_used(tmp_path: Path, monkeypatch) -> None:
    from nbpipe import Pipeline

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    Pipeline("first", store=tmp_path / "a" / ".nbpipe")
    Pipeline("second", store=tmp_path / "b" / ".nbpipe")
    listed = json.loads(nbpipe(tmp_path, "pipelines", "--all", "--json").stdout)
    assert {(p["name"], Path(p["store"]).parent.name) for p in listed} == {("first", "a"), ("second", "b")}


def test_logs_follow_waits_for_the_attempt_to_end(project: Path) -> None:
    followed = nbpipe(project, "logs", "cli", "square(x=1)", "--follow")
    assert "squaring 1" in followed.stdout


def test_kill_all_stops_every_unfinished_task(tmp_path: Path, cluster, monkeypatch) -> None:
    monkeypatch.setenv("DASK_NBPIPE__CLUSTER", cluster.scheduler_address)
    (tmp_path / "spin.py").write_text("""
from nbpipe import Pipeline
pipe = Pipeline("spin")

def spin(n: int) -> int:
    while True:
        n += 1

if __name__ == "__main__":
    refs = [pipe.task(spin)(i) for i in range(2)]
    pipe.run()
""")
    driver = subprocess.Popen([*NBPIPE, "run", "spin.py"], cwd=tmp_path, stderr=subprocess.PIPE,
                              text=True)
    try:
        def states() -> list[str]:
            out = nbpipe(tmp_path, "tasks", "spin", "--json").stdout
            return [r["state"] for r in json.loads(out)] if out.strip() else []

        wait_for(lambda: states() == ["RUNNING", "RUNNING"], timeout=60)
        assert nbpipe(tmp_path, "kill", "spin", "--all").returncode == 0
        wait_for(lambda: states() == ["KILLED", "KILLED"], timeout=120)
        assert driver.wait(timeout=60) == 1
    finally:
        driver.kill()


def test_labels_and_errors_with_brackets_are_printed_as_text(tmp_path: Path, cluster,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASK_NBPIPE__CLUSTER", cluster.scheduler_address)
    monkeypatch.delenv("NBPIPE_STORE", raising=False)
    (tmp_path / "items.py").write_text('''
from nbpipe import Pipeline, TaskItem

pipe = Pipeline("items")


@pipe.task
def process(item: TaskItem) -> int:
    return item.data["x"]


if __name__ == "__main__":
    process.map([TaskItem("frame-001", {"x": 1}), TaskItem("frame-bad", {"y": [1, 2]})])
    pipe.run()
''')
    assert nbpipe(tmp_path, "run", "items.py").returncode == 1
    listing = nbpipe(tmp_path, "tasks", "items").stdout
    assert "process[frame-001]" in listing and "process[frame-bad]" in listing
    shown = nbpipe(tmp_path, "show", "items", "process[frame-bad]")
    assert shown.returncode == 0, shown.stderr
    assert "process[frame-bad]" in shown.stdout and "KeyError: 'x'" in shown.stdout
