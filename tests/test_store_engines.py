"""The store-level suite, once per engine: SQLite (a folder) and PostgreSQL (a URL and a results
folder). Every test runs real processes -- scripts, the ``nbpipe`` command -- that share nothing
but the store's name, as users on one host or several do.

The PostgreSQL half needs a server: ``NBPIPE_TEST_POSTGRES`` (``.ci/run`` exports the URL
``.ci/postgres-up`` prints). Without one it is skipped here and fails in CI (``ci_required``).
Each test gets a schema of its own, so tests never see each other's pipelines or locks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, wait_for

from nbpipe.store import Store

NBPIPE = [sys.executable, "-m", "nbpipe.cli"]


def postgres_url() -> str:
    """The test server's URL, or a skip saying why there is none (a failure in CI)."""
    url = os.environ.get("NBPIPE_TEST_POSTGRES")
    if not url:
        pytest.skip("NBPIPE_TEST_POSTGRES is not set: start a server with `bash .ci/postgres-up` "
                    "and export the URL it prints")
    import psycopg

    try:
        psycopg.connect(url, connect_timeout=10).close()
    except psycopg.Error as exc:
        pytest.skip(f"the PostgreSQL server of NBPIPE_TEST_POSTGRES is unreachable: {exc}")
    return url


def with_schema(url: str, schema: str) -> str:
    """``url`` whose connections use ``schema`` (libpq's ``options``)."""
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


@contextlib.contextmanager
def fresh_schema(url: str) -> Iterator[str]:
    """A schema of the test's own in the test database, dropped afterwards."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_schema(url, schema)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@dataclass
class Where:
    """A store as the processes of a test name it: ``NBPIPE_STORE`` (and ``NBPIPE_RESULTS``)."""

    engine: str
    store: str
    results: Path
    env: dict[str, str] = field(default_factory=dict)

    def open(self) -> Store:
        """The store, opened in the test's process by the same name."""
        return Store(self.store, results=self.results if self.engine == "postgres" else None)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.ci_required)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Where]:
    """The store of a test on each engine: a folder, or a schema of its own and a results
    folder."""
    if request.param == "sqlite":
        store = tmp_path / ".nbpipe"
        yield Where("sqlite", str(store), store, {"NBPIPE_STORE": str(store)})
        return
    with fresh_schema(postgres_url()) as url:
        results = tmp_path / "results"
        yield Where("postgres", url, results, {"NBPIPE_STORE": url, "NBPIPE_RESULTS": str(results)})


def env(where: Where, **extra: str) -> dict[str, str]:
    """A child process's environment: this worktree first on the path, the store named."""
    out = {**os.environ, "PYTHONPATH": str(ROOT), **where.env, **extra}
    return out


def start(script: Path, where: Where, *args: str, **extra: str) -> subprocess.Popen[str]:
    """Start ``script`` in its own session (so its whole process tree can be cleaned up)."""
    return subprocess.Popen([sys.executable, str(script), *args], cwd=script.parent,
                            env=env(where, **extra), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def reap(proc: subprocess.Popen[str]) -> None:
    """Kill what is left of a process tree the test started."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def nbpipe(where: Where, *args: str) -> subprocess.CompletedProcess[str]:
    """The command line, told the store by ``--store`` (results by the variable)."""
    return subprocess.run([*NBPIPE, "--store", where.store, *args], capture_output=True,
                          text=True, timeout=180, env=env(where))


def states(where: Where, pipeline: str) -> dict[str, str]:
    """Task states by label, as ``nbpipe tasks --json`` in another process shows them."""
    out = nbpipe(where, "tasks", pipeline, "--json")
    if out.returncode:
        return {}
    return {r["label"]: r["state"] for r in json.loads(out.stdout)}


def write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


MANY = """
import sys, time
from nbpipe import Pipeline

pipe = Pipeline("many", cluster={"kind": "local", "workers": 2})
count, PAUSE = int(sys.argv[1]), float(sys.argv[2])


@pipe.task
def step(i: int) -> int:
    time.sleep(PAUSE)
    return i * i


if __name__ == "__main__":  # worker processes import this file too
    refs = [step(i) for i in range(count)]
    summary = pipe.run()
    wrong = [i for i, r in enumerate(refs) if r.result() != i * i]
    print("SUMMARY", summary.executed, summary.ok, len(wrong), flush=True)
"""


def summary(proc: subprocess.Popen[str], timeout: float = 600) -> tuple[int, bool, int]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        reap(proc)
    assert proc.returncode == 0, err[-3000:]
    executed, ok, wrong = out.split("SUMMARY")[1].split()
    return int(executed), ok == "True", int(wrong)


def test_a_second_run_resumes_and_computes_nothing(engine: Where, tmp_path: Path) -> None:
    script = write(tmp_path / "many.py", MANY)
    assert summary(start(script, engine, "30", "0")) == (30, True, 0)
    assert summary(start(script, engine, "30", "0")) == (0, True, 0)
    store = engine.open()
    rows = store.task_rows(store.pipeline_id("many"))
    assert sorted(r["state"] for r in rows.values()) == ["SUCCEEDED"] * 30
    assert all(len(store.attempts(store.pipeline_id("many"), k)) == 1 for k in rows)


def test_a_driver_killed_mid_run_loses_nothing_and_the_rerun_computes_only_the_rest(
        engine: Where, tmp_path: Path) -> None:
    count = 300
    script = write(tmp_path / "many.py", MANY)
    victim = start(script, engine, str(count), "0.02")
    try:
        def done() -> int:
            with contextlib.suppress(Exception):
                store = engine.open()
                n = sum(r["state"] == "SUCCEEDED"
                        for r in store.task_rows(store.pipeline_id("many", create=False)).values())
                store.close()
                return n
            return 0

        wait_for(lambda: done() >= 40, timeout=300, step=0.1)
        os.kill(victim.pid, signal.SIGKILL)  # mid-run: tasks pending, running and committing
        victim.wait(timeout=60)
    finally:
        reap(victim)
    store = engine.open()
    pid = store.pipeline_id("many")
    before = {k: r["attempts"] for k, r in store.task_rows(pid).items() if r["state"] == "SUCCEEDED"}
    assert 40 <= len(before) < count
    executed, ok, wrong = summary(start(script, engine, str(count), "0.02"))
    assert ok and wrong == 0
    assert executed <= count - len(before)  # what finished before the kill did not run again
    after = store.task_rows(pid)
    assert all(r["state"] == "SUCCEEDED" for r in after.values()) and len(after) == count
    assert {k: after[k]["attempts"] for k in before} == before


HOLDER = """
import sys, time
from nbpipe import Pipeline

pipe = Pipeline("shared")
GATE = sys.argv[1]


@pipe.task
def slow() -> int:
    import os, time
    while not os.path.exists(GATE):
        time.sleep(0.05)
    return 6


if __name__ == "__main__":
    ref = slow()
    pipe.run(wait=False)
    print("RUNNING", flush=True)
    print("RESULT", ref.result(), flush=True)
"""

SECOND = """
from nbpipe import Pipeline, PipelineBusy

pipe = Pipeline("shared")


@pipe.task
def other() -> int:
    return 1


if __name__ == "__main__":
    other()
    try:
        pipe.run()
    except PipelineBusy as exc:
        print("BUSY", exc, flush=True)
"""


def test_a_second_runner_is_refused_with_the_holders_host_and_pid(
        engine: Where, tmp_path: Path, cluster) -> None:
    gate = tmp_path / "gate"
    holder = start(write(tmp_path / "holder.py", HOLDER), engine, str(gate),
                   DASK_NBPIPE__CLUSTER=cluster.scheduler_address)
    try:
        assert holder.stdout.readline().strip() == "RUNNING", holder.stderr.read()[-3000:]
        second = start(write(tmp_path / "second.py", SECOND), engine,
                       DASK_NBPIPE__CLUSTER=cluster.scheduler_address)
        out, err = second.communicate(timeout=300)
        reap(second)
        assert f"is already being run by pid {holder.pid} on {socket.gethostname()}" in out, err
        gate.write_text("open")
        out, err = holder.communicate(timeout=300)
    finally:
        reap(holder)
    assert "RESULT 6" in out, err[-3000:]


LONG = """
import os, sys, time
from nbpipe import Pipeline

pipe = Pipeline("long")
GATE = sys.argv[1]  # (a global: the task takes its value along to the worker)


@pipe.task
def spin(n: int) -> int:
    while not os.path.exists(GATE):
        time.sleep(0.02)
    return n


@pipe.task
def later(x: int) -> int:
    return x + 1


if __name__ == "__main__":
    later(spin(1))
    pipe.run(wait=False)
    print("STARTED", flush=True)
    while True:
        time.sleep(0.1)
        if all(t.state == "SUCCEEDED" for t in pipe.tasks()):
            print("DONE", flush=True)
            break
"""


def test_pause_kill_and_retry_through_the_store_reach_a_running_pipeline(
        engine: Where, tmp_path: Path, cluster) -> None:
    gate = tmp_path / "gate"
    driver = start(write(tmp_path / "long.py", LONG), engine, str(gate),
                   DASK_NBPIPE__CLUSTER=cluster.scheduler_address)
    try:
        assert driver.stdout.readline().strip() == "STARTED", driver.stderr.read()[-3000:]
        wait_for(lambda: states(engine, "long").get("spin(n=1)") == "RUNNING", timeout=300)
        assert nbpipe(engine, "pause", "long").returncode == 0
        assert json.loads(nbpipe(engine, "pipelines", "--json").stdout)[0]["paused"]
        assert nbpipe(engine, "kill", "long", "spin(n=1)").returncode == 0
        wait_for(lambda: states(engine, "long").get("spin(n=1)") == "KILLED", timeout=300)
        assert states(engine, "long")["later(x=<spin>)"] == "UPSTREAM_FAILED"
        gate.write_text("open")
        assert nbpipe(engine, "resume", "long").returncode == 0
        assert nbpipe(engine, "retry", "long", "--failed").returncode == 0
        out, err = driver.communicate(timeout=300)
        assert "DONE" in out, err[-3000:]
    finally:
        reap(driver)
    store = engine.open()
    done = {c["verb"]: c["status"] for c in store.connect().execute("SELECT * FROM commands")}
    assert done == {"pause": "done", "kill": "done", "resume": "done", "retry": "done"}


def test_doctor_finds_what_a_killed_runner_left_and_repair_makes_the_next_run_whole(
        engine: Where, tmp_path: Path, cluster) -> None:
    gate = tmp_path / "gate"
    driver = start(write(tmp_path / "long.py", LONG), engine, str(gate),
                   DASK_NBPIPE__CLUSTER=cluster.scheduler_address)
    try:
        assert driver.stdout.readline().strip() == "STARTED", driver.stderr.read()[-3000:]
        wait_for(lambda: states(engine, "long").get("spin(n=1)") == "RUNNING", timeout=300)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        reap(driver)
    found = nbpipe(engine, "doctor", "--json")
    report = json.loads(found.stdout)
    assert not report["ok"]
    assert [t["label"] for t in report["stale_tasks"]] == ["spin(n=1)"]
    assert [r["pipeline"] for r in report["stale_runners"]] == ["long"]
    fixed = nbpipe(engine, "doctor", "--repair", "--json")
    assert json.loads(fixed.stdout)["repaired"], fixed.stderr
    assert json.loads(nbpipe(engine, "doctor", "--json").stdout)["ok"]
    assert states(engine, "long")["spin(n=1)"] == "WAITING"
    gate.write_text("open")
    again = start(write(tmp_path / "long.py", LONG), engine, str(gate),
                  DASK_NBPIPE__CLUSTER=cluster.scheduler_address)
    try:
        out, err = again.communicate(timeout=300)
    finally:
        reap(again)
    assert "DONE" in out, err[-3000:]


def test_gc_removes_only_results_no_task_wants_and_refuses_while_a_runner_is_live(
        engine: Where, tmp_path: Path, cluster) -> None:
    script = write(tmp_path / "many.py", MANY.replace('{"kind": "local", "workers": 2}', "None"))
    extra = {"DASK_NBPIPE__CLUSTER": cluster.scheduler_address, "DASK_NBPIPE__INLINE_BYTES": "0"}
    assert summary(start(script, engine, "4", "0", **extra)) == (4, True, 0)
    kept = set(engine.results.glob("results/*/*.pkl"))
    assert len(kept) == 4
    other = write(tmp_path / "other.py", MANY.replace('"many"', '"other"').replace(
        '{"kind": "local", "workers": 2}', "None").replace("i * i", "i + 1"))
    assert summary(start(other, engine, "3", "0", **extra)) == (3, True, 0)
    files = sorted(engine.results.glob("results/*/*.pkl"))
    assert len(files) == 7
    assert nbpipe(engine, "delete", "other", "--force").returncode == 0
    gate = tmp_path / "gate"
    driver = start(write(tmp_path / "long.py", LONG), engine, str(gate), **extra)
    try:
        assert driver.stdout.readline().strip() == "STARTED"
        refused = nbpipe(engine, "gc")
        assert refused.returncode != 0 and "while a runner is live" in refused.stderr
        gate.write_text("open")
        assert "DONE" in driver.communicate(timeout=300)[0]
    finally:
        reap(driver)
    removed = nbpipe(engine, "gc")
    assert removed.returncode == 0, removed.stderr
    assert "removed 3 result(s)" in removed.stdout
    left = set(engine.results.glob("results/*/*.pkl"))
    assert kept <= left and len(left - kept) == 2  # `many`'s kept, and the two `long` wrote
    assert summary(start(script, engine, "4", "0", **extra)) == (0, True, 0)


@pytest.mark.ci_required
def test_a_postgresql_store_opened_first_without_a_results_folder_is_refused_saying_how(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbpipe import Pipeline, StoreError

    monkeypatch.delenv("NBPIPE_RESULTS", raising=False)
    with fresh_schema(postgres_url()) as url:
        with pytest.raises(StoreError) as refused:
            Pipeline("survey", store=url)
        message = str(refused.value)
        assert "has no results folder" in message
        assert all(way in message for way in ("results=DIR", "NBPIPE_RESULTS", "results-dir:"))
        assert ":nbpipe@" not in message and "postgresql://nbpipe@" in message  # no password
        Pipeline("survey", store=url, results=tmp_path / "results").close()
        assert Store(url).path == tmp_path / "results"  # recorded: later openers need not say
        sqlite_store = Store(tmp_path / ".nbpipe")
        with pytest.raises(StoreError, match="holds an SQLite store"):
            Store(url, results=sqlite_store.path)
        assert Store(tmp_path / ".nbpipe").engine == "sqlite"  # and it stays one
