"""The store-level suite, once per engine: SQLite (a folder) and PostgreSQL (a URL and a results
folder). Every test runs real processes -- scripts, the ``nbpipe`` command -- that share nothing
but the store's name, as users on one host or several do.

The PostgreSQL half needs a server: ``NBPIPE_TEST_POSTGRES`` (``.ci/run`` exports the URL
``.ci/postgres-up`` prints). Without one it is skipped here and fails in CI (``ci_required``).
Each test gets a schema of its own, so tests never see each other's pipelines or locks.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import helpers
import pytest
from conftest import ROOT, wait_for
from helpers import LONG, fresh_schema, postgres_url, reap, write

from nbpipe.store import Store


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
    """Start ``script`` on the store in its own session (so its tree can be reaped)."""
    return helpers.start(script, *args, env=env(where, **extra))


def nbpipe(where: Where, *args: str) -> subprocess.CompletedProcess[str]:
    """The command line, told the store by ``--store`` (results by the variable)."""
    return helpers.nbpipe("--store", where.store, *args, env=env(where))


def states(where: Where, pipeline: str) -> dict[str, str]:
    """Task states by label, as ``nbpipe tasks --json`` in another process shows them."""
    out = nbpipe(where, "tasks", pipeline, "--json")
    if out.returncode:
        return {}
    return {r["label"]: r["state"] for r in json.loads(out.stdout)}


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


@contextlib.contextmanager
def spinning(engine: Where, tmp_path: Path, cluster) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """LONG's driver on the store, its first task running until the gate file (yielded with the
    driver) exists; the driver's tree is reaped afterwards."""
    gate = tmp_path / "gate"
    driver = start(write(tmp_path / "long.py", LONG), engine, str(gate),
                   DASK_NBPIPE__CLUSTER=cluster.scheduler_address)
    try:
        assert driver.stdout.readline().strip() == "STARTED", driver.stderr.read()[-3000:]
        wait_for(lambda: states(engine, "long").get("spin(n=1)") == "RUNNING", timeout=300)
        yield driver, gate
    finally:
        reap(driver)


def test_pause_kill_and_retry_through_the_store_reach_a_running_pipeline(
        engine: Where, tmp_path: Path, cluster) -> None:
    with spinning(engine, tmp_path, cluster) as (driver, gate):
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
    store = engine.open()
    done = {c["verb"]: c["status"] for c in store.connect().execute("SELECT * FROM commands")}
    assert done == {"pause": "done", "kill": "done", "resume": "done", "retry": "done"}


def test_doctor_finds_what_a_killed_runner_left_and_repair_makes_the_next_run_whole(
        engine: Where, tmp_path: Path, cluster) -> None:
    with spinning(engine, tmp_path, cluster) as (driver, gate):
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
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


# -- the store's own mechanics, the same on each engine ------------------------------------------


def task_row(key: str) -> dict[str, object]:
    """A task row as :meth:`Store.register` takes it."""
    return {"key": key, "name": "step", "label": f"step({key})", "kind": "function",
            "state": "WAITING", "components": {}}


def test_each_thread_has_a_connection_of_its_own_and_close_closes_only_the_callers(
        engine: Where) -> None:
    from nbpipe.store.connections import open_count

    store = engine.open()
    where = store._connections.where
    store.close_all()  # (opening the store used this thread's connection)
    mine = store.connect()
    assert store.connect() is mine and open_count(where) == 1
    seen: dict[str, object] = {}

    def other_thread() -> None:
        theirs = store.connect()
        seen["theirs"], seen["count"] = theirs, open_count(where)
        store.close()  # only this thread's
        seen["after"] = open_count(where)
        with contextlib.suppress(Exception):
            theirs.execute("SELECT 1")
            seen["usable"] = True

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join(timeout=120)
    assert seen["theirs"] is not mine and seen["count"] == 2 and seen["after"] == 1
    assert "usable" not in seen  # closed for good
    assert mine.execute("SELECT COUNT(*) FROM pipelines").fetchone()[0] == 0  # mine still works
    store.close()
    assert open_count(where) == 0
    again = store.connect()  # the next use opens a new one
    assert again is not mine and again.execute("SELECT 1").fetchone()[0] == 1
    store.close()
    # a thread that ends without closing (a status display's) leaves no connection open
    for _ in range(5):
        thread = threading.Thread(target=lambda: store.connect().execute("SELECT 1").fetchone())
        thread.start()
        thread.join(timeout=120)
    gc.collect()
    assert open_count(where) == 0


@pytest.mark.ci_required
def test_a_postgresql_connection_the_server_closed_is_opened_again(tmp_path: Path) -> None:
    with fresh_schema(postgres_url()) as url:
        store = Store(url, results=tmp_path / "results")
        first = store.connect()
        first.raw.close()  # as a server restart or a network cut leaves it
        assert store.connect() is not first
        assert store.connect().execute("SELECT COUNT(*) FROM pipelines").fetchone()[0] == 0
        done: list[object] = []
        thread = threading.Thread(target=lambda: done.append(store.connect()))
        thread.start()
        thread.join(timeout=120)
        store.close_all()  # a store dropped for good: every thread's connection closes
        assert done[0].raw.closed and store.connect().execute("SELECT 1").fetchone()[0] == 1
        store.close_all()


def test_a_batch_of_every_kind_of_row_is_written_as_given_and_its_attempts_once(
        engine: Where) -> None:
    from nbpipe.store import Batch

    store = engine.open()
    pid = store.pipeline_id("writes")
    store.register(pid, [task_row("k1"), task_row("k2")], [])
    batch = Batch()
    batch.envs.append(("env-1", '{"packages": {}}'))
    batch.results.append(("k1", "", "c0ffee", 3, 1700000000.5, b"abc"))
    attempts = [  # every column, with NULLs, and a start of None (a task that never started)
        (pid, "k1", 1, "FAILED", 1700000000.25, 1700000001.75, "tcp://w:1", "host-a", 4242,
         "991", 1, "ValueError: bad", "Traceback ...", "out", "err", "env-1"),
        (pid, "k1", 2, "SUCCEEDED", 1700000002.0, 1700000003.0, "tcp://w:1", "host-a", 4243,
         None, 0, None, None, "", "", "env-1"),
        (pid, "k2", 1, "KILLED", None, None, None, None, None, None, None, None, None, None,
         None, None),
    ]
    batch.attempts.extend(attempts)
    batch.state(pid, "k1", "SUCCEEDED", attempts=2, message="done")
    batch.state(pid, "k2", "KILLED", attempts=1, error="killed", message="by hand")
    store.write(batch)
    store.write(batch)  # written again (a commit that raised although it was kept): no new rows
    columns = ("pipeline_id", "key", "number", "state", "start", "end", "worker", "hostname",
               "pid", "job_id", "exit_code", "error", "traceback", "stdout", "stderr", "env_id")
    got = [tuple(r[c] for c in columns) for k in ("k1", "k2") for r in store.attempts(pid, k)]
    assert got == attempts
    rows = store.task_rows(pid)
    assert (rows["k1"]["state"], rows["k1"]["attempts"]) == ("SUCCEEDED", 2)
    assert (rows["k2"]["state"], rows["k2"]["error"]) == ("KILLED", "killed")
    assert store.environment("env-1") == {"packages": {}}
    assert bytes(store.result_data("k1")) == b"abc"
    assert [(e["key"], e["state"]) for e in store.events(pid)] == [
        ("k1", "SUCCEEDED"), ("k2", "KILLED")] * 2


@pytest.mark.ci_required
def test_every_statement_of_a_postgresql_batch_is_prepared_once(tmp_path: Path) -> None:
    from nbpipe.store import Batch

    with fresh_schema(postgres_url()) as url:
        store = Store(url, results=tmp_path / "results")
        pid = store.pipeline_id("writes")
        keys = [f"k{i}" for i in range(50)]
        store.register(pid, [task_row(k) for k in keys], [])
        for number in (1, 2):  # two batches: the second reuses what the first prepared
            batch = Batch()
            batch.envs.append((f"env-{number}", "{}"))
            for k in keys:
                batch.results.append((k, "", "c", 1, 1.0, b"x"))
                batch.attempts.append((pid, k, number, "SUCCEEDED", 1.0, 2.0, "w", "h", 1, None,
                                       0, None, None, "", "", f"env-{number}"))
                batch.state(pid, k, "SUCCEEDED", attempts=number)
            store.write(batch)
        prepared = [r[0] for r in store.connect().execute(
            "SELECT statement FROM pg_prepared_statements")]
        for table in ("INSERT INTO environments", "INSERT INTO results", "INSERT INTO attempts",
                      "UPDATE tasks SET state", "INSERT INTO events"):
            assert sum(s.lstrip().startswith(table) for s in prepared) == 1, (table, prepared)
        assert len(store.attempts(pid, "k7")) == 2


def test_provisional_keys_that_turn_out_one_task_merge_their_edges_and_events(
        engine: Where) -> None:
    from nbpipe.store import Batch

    store = engine.open()
    pid = store.pipeline_id("merge")
    store.register(pid, [task_row(k) for k in ("p", "a1", "a2", "c", "f", "x")], [
        ("p", "a1", "data"), ("p", "a2", "data"),  # both become p -> f, which exists already
        ("a1", "c", "data"), ("a2", "c", "after"),  # both become f -> c: the first one stays
        ("p", "f", "data"), ("a2", "x", "file"),
        ("a1", "a2", "after"),  # becomes f -> f
    ])
    batch = Batch()
    batch.state(pid, "a1", "PENDING", attempts=0, message="queued")
    batch.state(pid, "a2", "FAILED", attempts=1, message="broke")
    store.write(batch)
    store.retire_keys(pid, {"a1": "f", "a2": "f"})
    assert store.edges(pid) == [("f", "c", "data"), ("p", "f", "data"), ("f", "x", "file"),
                                ("f", "f", "after")]
    assert sorted(store.task_rows(pid, active_only=False)) == ["c", "f", "p", "x"]
    assert [(e["key"], e["state"]) for e in store.events(pid)] == [("f", "PENDING"),
                                                                   ("f", "FAILED")]
    store.retire_keys(pid, {"c": "x"})  # a child whose final key has the edge already
    assert store.edges(pid) == [("p", "f", "data"), ("f", "x", "file"), ("f", "f", "after")]


# -- SQLite's busy timeout, a setting -------------------------------------------------------------

BUSY = """
from nbpipe.store import Store

print("BUSY", Store(".nbpipe").connect().execute("PRAGMA busy_timeout").fetchone()[0])
"""


def busy_timeout(project: Path, **variables: str) -> str:
    """The busy timeout (ms) of a store opened by a fresh process in ``project``."""
    out = subprocess.run([sys.executable, "-c", BUSY], cwd=project, capture_output=True,
                         text=True, timeout=180,
                         env={**{k: v for k, v in os.environ.items() if not k.startswith(
                             ("NBPIPE_", "DASK_NBPIPE"))}, "PYTHONPATH": str(ROOT), **variables})
    assert out.returncode == 0 or not out.stdout, out.stderr[-3000:]
    return out.stdout.split("BUSY")[1].strip() if "BUSY" in out.stdout else out.stderr


def test_the_sqlite_busy_timeout_comes_from_the_store_busy_timeout_setting(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    assert busy_timeout(project) == "60000"  # the default
    (project / "nbpipe.yaml").write_text("store-busy-timeout: 1.5\n")
    assert busy_timeout(project) == "1500"
    assert busy_timeout(project, DASK_NBPIPE__STORE_BUSY_TIMEOUT="7") == "7000"  # wins
    # a mistake elsewhere in the file does not stop opening the store, nor hide the setting
    (project / "nbpipe.yaml").write_text("store-busy-timeout: 2\nclsuter: local\n")
    assert busy_timeout(project) == "2000"
    (project / "nbpipe.yaml").write_text("store-busy-timeout: 2\ncluster: [\n")
    assert busy_timeout(project) == "60000"  # not YAML: nothing of it can be read
    for bad in ("soon", "0", "-1", ".inf", "true"):
        (project / "nbpipe.yaml").write_text(f"store-busy-timeout: {bad}\n")
        said = busy_timeout(project)
        assert "ConfigError" in said and "store-busy-timeout=" in said, said
        assert "a finite number of seconds > 0" in said


def test_a_command_waits_for_a_held_write_only_as_long_as_the_setting_says(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    store = Store(project / ".nbpipe")
    store.pipeline_id("flow")
    store.close()
    (project / "nbpipe.yaml").write_text("store-busy-timeout: 1\n")
    holder = sqlite3.connect(project / ".nbpipe" / "nbpipe.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's write, in progress
    try:
        # (60 s, the default, would outlast the subprocess's timeout of 45 s)
        out = helpers.nbpipe("pause", "flow", cwd=project, timeout=45,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert out.returncode != 0 and "locked" in out.stderr, out.stderr[-3000:]
    again = helpers.nbpipe("pause", "flow", cwd=project, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert again.returncode == 0, again.stderr[-3000:]
