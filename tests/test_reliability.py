"""Reliability: what happens to a pipeline and its store when things break for real.

Each test breaks something with real processes (``kill -9`` of the driver or of a worker,
damaged result files, a store cut off mid-write, several processes on one store, a file-size
limit, a long run with random failures) and checks that nothing finished is lost or computed
twice. ``docs/reliability.md`` describes each guarantee and the figures of the full soak.

Worker jobs cancelled on a real Slurm (``scancel``) are covered in ``tests/test_slurm.py``
(``test_scancel_of_a_worker_job_mid_run_and_the_pipeline_completes``) and
``test_a_new_runner_cancels_the_jobs_a_killed_kernel_left``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, wait_for
from helpers import reap, start, write

from nbpipe.results import locate, read_result

NBPIPE = [sys.executable, "-m", "nbpipe.cli"]


def _env(**extra: str) -> dict[str, str]:
    """The environment of a child process: this worktree first on the path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    env.pop("NBPIPE_STORE", None)
    return env


def _start(script: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    """Start ``script`` in its own session (so that its whole process tree can be cleaned up)."""
    return start(script, *args, env=_env(**env))


def _query(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of a read-only query on a store that other processes are writing."""
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []
    finally:
        conn.close()


def _count(db: Path, state: str) -> int:
    rows = _query(db, "SELECT COUNT(*) FROM tasks WHERE active AND state = ?", state)
    return rows[0][0] if rows else 0


def _nbpipe(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NBPIPE, "--store", str(store), *args], capture_output=True, text=True,
                          timeout=120, env=_env())


def _attempt_rows(db: Path, keys: Any) -> dict[str, int]:
    """How many attempts the store recorded for each of ``keys``."""
    counts = dict(_query(db, "SELECT key, COUNT(*) FROM attempts GROUP BY key"))
    return {k: counts.get(k, 0) for k in keys}


def _verify_results(db: Path) -> int:
    """Read every recorded result with its checksum (raises when one is damaged); how many."""
    rows = _query(db, "SELECT path, checksum, data FROM results")  # data: an inline result
    for path, checksum, data in rows:
        read_result(locate(db.parent, path), checksum, data)
    return len(rows)


# -- 1. driver crash ---------------------------------------------------------------------------

MANY = """
import sys, time
from nbpipe import Pipeline

pipe = Pipeline("crash", store=sys.argv[1], cluster={"kind": "local", "workers": 2})
count = int(sys.argv[2])


@pipe.task
def step(i: int) -> int:
    time.sleep(0.005 + (i % 4) * 0.005)
    return i * i


if __name__ == "__main__":  # worker processes import this file too
    refs = [step(i) for i in range(count)]
    if sys.argv[3:] == ["detach"]:  # hand the pipeline to a detached runner (`nbpipe spawn`)
        print("DETACHED", pipe.detach(), flush=True)
        sys.exit(0)
    summary = pipe.run()
    wrong = [i for i, r in enumerate(refs) if r.result() != i * i]
    print("SUMMARY", summary.executed, summary.ok, len(wrong), flush=True)
"""


@pytest.mark.parametrize("driver", ["script", "detached runner"])
def test_a_driver_killed_mid_run_loses_nothing_and_a_rerun_completes_without_recomputing(
    tmp_path: Path, driver: str,
) -> None:
    count = 1000
    script = write(tmp_path / "many.py", MANY)
    store = tmp_path / ".nbpipe"
    db = store / "nbpipe.sqlite"
    starter = _start(script, str(store), str(count), *(["detach"] if driver != "script" else []))
    victim = starter.pid
    try:
        if driver != "script":
            out, err = starter.communicate(timeout=120)
            assert starter.returncode == 0, err[-3000:]
            victim = int(out.split("DETACHED")[1])
        wait_for(lambda: _count(db, "SUCCEEDED") >= 150, timeout=120, step=0.02)
        os.kill(victim, signal.SIGKILL)  # mid-run: tasks pending, running and committing
        if driver == "script":
            starter.wait(timeout=30)
    finally:
        reap(starter)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(victim, signal.SIGKILL)  # a detached runner's session: its workers
    # The store was cut off mid-write: SQLite's WAL must have kept it whole.
    assert _query(db, "PRAGMA integrity_check") == [("ok",)]
    before = dict(_query(db, "SELECT key, attempts FROM tasks WHERE state = 'SUCCEEDED'"))
    assert 150 <= len(before) < count
    ran_before = _attempt_rows(db, before)
    rerun = _start(script, str(store), str(count))
    try:
        out, err = rerun.communicate(timeout=240)
    finally:
        reap(rerun)
    assert rerun.returncode == 0, err[-3000:]
    executed, ok, wrong = out.split("SUMMARY")[1].split()
    assert ok == "True" and wrong == "0", out
    assert int(executed) <= count - len(before)  # what finished before the kill did not run
    assert _count(db, "SUCCEEDED") == count
    assert _attempt_rows(db, before) == ran_before, "a task recorded SUCCEEDED ran again"
    now = dict(_query(db, "SELECT key, attempts FROM tasks WHERE state = 'SUCCEEDED'"))
    assert {k: now.get(k) for k in before} == before  # no attempt counted for them either
    assert _verify_results(db) == count


# -- 2. worker loss ----------------------------------------------------------------------------


def test_a_worker_killed_mid_task_and_its_tasks_run_again_elsewhere(store: Path) -> None:
    from distributed import Client, LocalCluster

    from nbpipe import Pipeline, State

    # A cluster of its own: killing a worker of the shared one would disturb other tests.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as lc, Client(lc) as client:
        pipe = Pipeline("worker-loss", store=store, cluster=client)

        @pipe.task
        def slow(i: int) -> int:
            time.sleep(1.5)
            return i + 100

        refs = [slow(i) for i in range(8)]
        try:
            pipe.run(wait=False)
            wait_for(lambda: any(r.state is State.RUNNING and r.worker for r in refs), timeout=60)
            victim = next(r for r in refs if r.state is State.RUNNING and r.worker)
            pids = client.run(os.getpid)
            os.kill(pids[victim.worker], signal.SIGKILL)  # the worker process, mid-task
            summary = pipe.run(timeout=120)
            assert summary.ok, summary
            assert [r.result() for r in refs] == [i + 100 for i in range(8)]
            assert victim.state is State.SUCCEEDED
            # the attempt on the dead worker left no outcome; the one that counted ran elsewhere
            (last,) = [a for a in pipe.store.attempts(pipe.pipeline_id, victim.key)
                       if a["state"] == "SUCCEEDED"]
            assert last["worker"] != victim.worker or last["pid"] != pids[victim.worker]
        finally:
            pipe.close()


# -- 3. torn files -----------------------------------------------------------------------------

TORN = """
import sys
from nbpipe import Pipeline

pipe = Pipeline("torn", store=sys.argv[1], cluster=sys.argv[2])


@pipe.task
def blob(i: int) -> bytes:
    return bytes([i]) * 100_000  # surely a file of its own


@pipe.task
def total(blobs: list, salt: int) -> int:
    return sum(len(b) + b[-1] for b in blobs)


if __name__ == "__main__":
    blobs = [blob(i) for i in range(6)]
    result = total(blobs, salt=int(sys.argv[3]))
    summary = pipe.run()
    print("RESULT", result.result(), summary.executed, flush=True)
"""
TORN_TOTAL = 6 * 100_000 + sum(range(6))


def _run_torn(script: Path, store: Path, address: str, salt: int) -> int:
    """Run the torn-files pipeline; return how many tasks it executed."""
    done = subprocess.run([sys.executable, str(script), str(store), address, str(salt)],
                          cwd=script.parent, env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    value, executed = done.stdout.split("RESULT")[1].split()
    assert int(value) == TORN_TOTAL
    return int(executed)


def _result_of(db: Path, label: str) -> Path:
    ((path,),) = _query(db, "SELECT r.path FROM results r JOIN tasks t USING (key) "
                            "WHERE t.label = ? AND t.active", label)
    return Path(locate(db.parent, path))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    """Damage a file in place, keeping its size (only a checksum tells)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _attempts_by_label(db: Path) -> dict[str, int]:
    return dict(_query(db, "SELECT label, attempts FROM tasks WHERE active"))


@pytest.fixture
def torn(tmp_path: Path, cluster) -> tuple[Path, Path, str]:
    """The torn-files pipeline run once: (script, store, scheduler address)."""
    script = write(tmp_path / "torn.py", TORN)
    store = tmp_path / ".nbpipe"
    assert _run_torn(script, store, cluster.scheduler_address, salt=0) == 7
    return script, store, cluster.scheduler_address


def test_truncated_and_corrupted_results_are_detected_on_resume_and_their_tasks_rerun(torn) -> None:
    script, store, address = torn
    db = store / "nbpipe.sqlite"
    _truncate(_result_of(db, "blob(i=0)"))
    _flip(_result_of(db, "blob(i=1)"))  # same size: found only by its checksum
    # `total` runs again (new salt) and reads every blob: the truncated one is found so on
    # resume (its size), the other when `total` reads it on a worker (its checksum); both are
    # computed again and `total` gets the right values
    _run_torn(script, store, address, salt=1)
    attempts = _attempts_by_label(db)
    assert attempts["blob(i=0)"] == attempts["blob(i=1)"] == 2
    assert all(attempts[f"blob(i={i})"] == 1 for i in range(2, 6))
    assert _verify_results(db) == 8


STUCK = """
import sys, time
from nbpipe import Pipeline, State

pipe = Pipeline("stuck", store=sys.argv[1], cluster=sys.argv[2])


@pipe.task
def slow() -> int:
    time.sleep(2)
    return 2


if __name__ == "__main__":
    ref = slow()
    pipe.run(wait=False)
    while ref.state is not State.RUNNING:
        time.sleep(0.02)
    print("RUNNING", flush=True)
    time.sleep(600)
"""


def test_doctor_reports_what_crashes_leave_and_repair_makes_the_next_run_whole(torn, tmp_path) -> None:
    script, store, address = torn
    db = store / "nbpipe.sqlite"
    _truncate(_result_of(db, "blob(i=0)"))
    _flip(_result_of(db, "blob(i=1)"))
    _result_of(db, "blob(i=2)").unlink()
    # what a worker killed while writing leaves (and one being written right now)
    old_temp = store / "results" / "aa" / f".{'a' * 32}.pkl.4242.tmp"
    old_temp.parent.mkdir(exist_ok=True)
    old_temp.write_bytes(b"half a pickle")
    os.utime(old_temp, (time.time() - 3600, time.time() - 3600))
    fresh_temp = old_temp.with_name(f".{'a' * 31}b.pkl.4243.tmp")
    fresh_temp.write_bytes(b"being written")
    orphan_spec = store / "specs" / "ff" / f"{'f' * 32}.pkl"
    orphan_spec.parent.mkdir(parents=True)
    orphan_spec.write_bytes(b"spec of a deleted task")
    # a runner killed while its task runs: its lock, runner record and RUNNING task stay behind
    stuck = _start(write(tmp_path / "stuck.py", STUCK), str(store), address)
    try:
        assert stuck.stdout is not None and stuck.stdout.readline().strip() == "RUNNING"
        os.kill(stuck.pid, signal.SIGKILL)
        stuck.wait(timeout=30)
    finally:
        reap(stuck)

    check = _nbpipe(store, "doctor", "--json")
    assert check.returncode == 1, check.stderr
    report = json.loads(check.stdout)
    assert report["integrity"] == ["ok"]
    assert sorted(b["problem"] for b in report["bad_results"]) == [
        "checksum mismatch", "missing", "wrong size"]
    assert report["temp_files"] == [str(old_temp)]
    assert [r["pipeline"] for r in report["stale_runners"]] == ["stuck"]
    assert [(t["label"], t["state"]) for t in report["stale_tasks"]] == [("slow", "RUNNING")]
    assert report["orphan_specs"] == [str(orphan_spec)]
    text = _nbpipe(store, "doctor").stdout
    assert "damaged or missing result files: 3" in text and "nbpipe doctor --repair" in text

    repaired = _nbpipe(store, "doctor", "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    again = _nbpipe(store, "doctor")
    assert again.returncode == 0, again.stdout
    assert not old_temp.exists() and fresh_temp.exists() and not orphan_spec.exists()
    states = {r["label"]: r["state"] for r in json.loads(_nbpipe(store, "tasks", "torn", "--json").stdout)}
    assert [states[f"blob(i={i})"] for i in range(6)] == ["WAITING"] * 3 + ["SUCCEEDED"] * 3
    assert json.loads(_nbpipe(store, "tasks", "stuck", "--json").stdout)[0]["state"] == "WAITING"
    assert _run_torn(script, store, address, salt=0) == 3  # exactly the three damaged blobs
    attempts = _attempts_by_label(db)
    assert [attempts[f"blob(i={i})"] for i in range(6)] == [2, 2, 2, 1, 1, 1]
    assert _verify_results(db) >= 7


BURST = """
import sys
from nbpipe.store import Batch, Store

store = Store(sys.argv[1])
pid = store.pipeline_id("burst")
n = 0
while True:
    n += 1
    batch = Batch()
    batch.events += [(pid, float(n), f"k{i}", "RUNNING", f"batch {n}") for i in range(50)]
    store.write(batch)  # one transaction of 50 rows
    if n == 20:
        print("WRITING", flush=True)
"""


def test_a_store_cut_off_mid_transaction_opens_intact_with_whole_transactions_only(
    tmp_path: Path,
) -> None:
    from nbpipe.store import Store

    store = tmp_path / ".nbpipe"
    writer = _start(write(tmp_path / "burst.py", BURST), str(store))
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "WRITING"
        time.sleep(0.3)
        os.kill(writer.pid, signal.SIGKILL)  # in the middle of a transaction, most likely
        writer.wait(timeout=30)
    finally:
        reap(writer)
    wal = store / "nbpipe.sqlite-wal"
    assert wal.exists() and wal.stat().st_size > 0  # the recovery path is really taken
    opened = Store(store)  # recovers the write-ahead log
    conn = opened.connect()
    assert [tuple(r) for r in conn.execute("PRAGMA integrity_check")] == [("ok",)]
    sizes = conn.execute("SELECT message, COUNT(*) FROM events GROUP BY message").fetchall()
    assert len(sizes) > 20
    assert {n for _, n in sizes} == {50}  # every transaction whole or absent, none torn
    assert _nbpipe(store, "doctor").returncode == 0
    opened.close()


# -- 4. concurrent use -------------------------------------------------------------------------

KERNEL = """
import os, sys, time
from nbpipe import Pipeline, PipelineBusy
from nbpipe.store import RunnerLock

store, address, name, count, gate = sys.argv[1:6]
pipe = Pipeline(name, store=store, cluster=address)


@pipe.task
def work(i: int, tag: str) -> int:
    time.sleep(0.01 + (i % 3) * 0.005)
    return i * 3


@pipe.task
def hold(flag: str) -> int:
    while not os.path.exists(flag):  # keeps the pipeline running until the test says
        time.sleep(0.05)
    return 1


if __name__ == "__main__":
    refs = [work(i, name) for i in range(int(count))]  # distinct keys in each pipeline
    if gate != "-":
        hold(gate)
    for turn in (1, 2):
        try:
            summary = pipe.run()
        except PipelineBusy as exc:
            print("BUSY", exc, flush=True)
            while RunnerLock(pipe.store, name).busy():  # until the other runner is done
                time.sleep(0.1)
            continue
        wrong = sum(r.result() != i * 3 for i, r in enumerate(refs))
        print("DONE", summary.executed, summary.ok, wrong, flush=True)
        break
"""


def test_two_kernels_and_the_command_line_share_a_store_with_one_runner_per_pipeline(
    tmp_path: Path, cluster,
) -> None:
    store = tmp_path / ".nbpipe"
    db = store / "nbpipe.sqlite"
    script = write(tmp_path / "kernel.py", KERNEL)
    gate = tmp_path / "gate"
    address = cluster.scheduler_address
    alpha = _start(script, str(store), address, "alpha", "300", str(gate))
    beta = _start(script, str(store), address, "beta", "300", "-")
    # a second kernel on alpha (the same notebook opened twice) while the first runs it
    twin = None
    outputs: list[str] = []
    try:
        wait_for(lambda: _count(db, "SUCCEEDED") >= 20, timeout=120)
        twin = _start(script, str(store), address, "alpha", "300", str(gate))
        assert twin.stdout is not None
        busy = twin.stdout.readline()
        assert busy.startswith("BUSY pipeline 'alpha' is already being run by pid"), busy
        assert f"pid {alpha.pid} " in busy
        rounds = 0
        while beta.poll() is None or rounds < 3:
            for args in (["tasks", "alpha", "--json"], ["pipelines", "--json"],
                         ["show", "beta", "work", "--json"], ["doctor"]):
                done = _nbpipe(store, *args)
                outputs.append(done.stdout + done.stderr)
                assert done.returncode in (0, 1), done.stderr  # doctor: 1 for a RUNNING gate
            rounds += 1
            if rounds == 2:
                gate.touch()  # let alpha finish
        results = [p.communicate(timeout=180) for p in (alpha, beta, twin)]
    finally:
        for p in (alpha, beta, twin):
            if p is not None:
                reap(p)
    for (out, err), proc in zip(results, (alpha, beta, twin), strict=True):
        outputs += [out, err]
        assert proc.returncode == 0, err[-3000:]
    assert results[0][0].split()[-3:] == ["301", "True", "0"]  # alpha: every task, once
    assert results[1][0].split()[-3:] == ["300", "True", "0"]
    # the twin ran after alpha's runner had finished: nothing left to compute
    assert results[2][0].split()[-3:] == ["0", "True", "0"], results[2][0]
    assert not [o for o in outputs if "database is locked" in o]
    assert _query(db, "SELECT COUNT(*), COUNT(DISTINCT key) FROM attempts") == [(601, 601)]
    assert _count(db, "SUCCEEDED") == 601
    assert _query(db, "PRAGMA integrity_check") == [("ok",)]


def test_a_runner_starting_while_another_process_probes_its_lock_is_not_refused(store: Path) -> None:
    import threading

    from nbpipe.store import RunnerLock, Store

    opened = Store(store)
    probe = RunnerLock(opened, "probed")
    probe.acquire()  # what `busy()` does for an instant (the command line, `nbpipe doctor`)
    threading.Timer(0.1, probe.release).start()
    runner = RunnerLock(opened, "probed")
    runner.acquire()  # would raise PipelineBusy without its short retry
    assert runner.held and probe.busy()
    runner.release()


# -- 5. disk full ------------------------------------------------------------------------------


def _file_size_limit(limit: int | None) -> None:
    """On a worker: writes beyond ``limit`` bytes fail with EFBIG (None: no limit again)."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an OSError, not a dead worker
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard if limit is None else limit, hard))


def test_a_result_that_does_not_fit_on_disk_fails_its_task_clearly_and_a_retry_succeeds(
    store: Path,
) -> None:
    from distributed import Client, LocalCluster

    from nbpipe import Pipeline, State

    # A worker of its own whose files may not grow beyond 64 KB: the disk is "full".
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as lc, Client(lc) as client:
        client.run(_file_size_limit, 64 * 1024)
        pipe = Pipeline("disk-full", store=store, cluster=client)

        @pipe.task
        def small() -> int:
            return 7

        @pipe.task
        def big(n: int) -> bytes:
            return b"x" * n

        @pipe.task
        def size(data: bytes) -> int:
            return len(data)

        fits, ref = small(), big(1_000_000)
        after = size(ref)
        try:
            summary = pipe.run()
            assert fits.result() == 7 and ref.state is State.FAILED
            assert after.state is State.UPSTREAM_FAILED and summary.failed == ["big(n=1000000)"]
            assert ref.error.startswith("ResultWriteError: task 'big(n=1000000)' finished but its "
                                        "result could not be written"), ref.error
            assert "the file-size limit (ulimit -f) is exceeded" in ref.error
            assert "retry the task" in ref.error
            db = store / "nbpipe.sqlite"
            assert _query(db, "PRAGMA integrity_check") == [("ok",)]
            assert not list((store / "results").rglob("*.tmp"))  # no half-written file left
            assert not _query(db, "SELECT 1 FROM results WHERE key = ?", ref.key)

            client.run(_file_size_limit, None)  # space is back
            pipe.retry(ref)
            assert after.result() == 1_000_000
            assert ref.state is State.SUCCEEDED and ref.attempts == 2
            assert _verify_results(db) == 3
        finally:
            pipe.close()


DRIVER_FULL = """
import os, resource, signal, sys, time
from nbpipe import Pipeline, State

pipe = Pipeline("driver-full", store=sys.argv[1], cluster=sys.argv[2])


@pipe.task
def step(i: int) -> int:
    time.sleep(0.05)
    return i


if __name__ == "__main__":
    refs = [step(i) for i in range(60)]
    pipe.run(wait=False)
    while sum(r.state is State.SUCCEEDED for r in refs) < 5:
        time.sleep(0.01)
    # The disk of the store fills up under the runner: its commits fail for a while.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1, hard))
    time.sleep(1.5)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space is back
    summary = pipe.run()
    print("DONE", summary.ok, sum(r.result() == i for i, r in enumerate(refs)), flush=True)
"""


def test_a_store_whose_disk_fills_under_the_runner_keeps_every_transition(
    tmp_path: Path, cluster,
) -> None:
    store = tmp_path / ".nbpipe"
    db = store / "nbpipe.sqlite"
    done = subprocess.run(
        [sys.executable, str(write(tmp_path / "full.py", DRIVER_FULL)), str(store),
         cluster.scheduler_address], cwd=tmp_path, env=_env(), capture_output=True, text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["True", "60"], done.stdout
    assert "nbpipe: cannot write to the store" in done.stderr  # it did hit the limit
    assert "is writable again" in done.stderr
    assert _query(db, "PRAGMA integrity_check") == [("ok",)]
    assert _count(db, "SUCCEEDED") == 60  # no transition lost while commits failed
    assert _query(db, "SELECT COUNT(*), COUNT(DISTINCT key) FROM attempts") == [(60, 60)]
    assert _verify_results(db) == 60


# -- 6. soak -----------------------------------------------------------------------------------

SOAK = """
import hashlib, json, sys, time
import psutil
from nbpipe import Pipeline, context

pipe = Pipeline("soak", store=sys.argv[1], cluster=sys.argv[3])


def flaky(i: int) -> bool:
    return int(hashlib.blake2b(str(i).encode(), digest_size=4).hexdigest(), 16) % 100 == 0


@pipe.task(retries=2)
def work(i: int) -> int:
    if flaky(i) and context().attempt == 1:  # 1 % fail once, at random but by seed
        raise RuntimeError(f"random failure of {i}")
    return i


if __name__ == "__main__":
    count = int(sys.argv[2])
    refs = [work(i) for i in range(count)]
    me = psutil.Process()
    start = time.monotonic()
    pipe.run(wait=False)
    rss = {}
    while True:
        done = sum(r.state.final for r in refs)
        for mark in (25, 50, 75):
            if done * 100 >= mark * count and mark not in rss:
                rss[mark] = me.memory_info().rss
        if done == count:
            break
        time.sleep(0.2)
    summary = pipe.run()
    rss[100] = me.memory_info().rss
    print("SOAK", json.dumps({
        "count": count, "seconds": time.monotonic() - start, "ok": summary.ok,
        "succeeded": summary.counts.get("SUCCEEDED", 0), "rss": rss,
        "flaky": sorted(r.key for i, r in enumerate(refs) if flaky(i)),
        "wrong": sum(r.result() != i for i, r in enumerate(refs)),
    }), flush=True)
"""


@pytest.mark.soak
def test_soak_thousands_of_tasks_with_random_failures_completes_with_exact_counts_and_flat_memory(
    tmp_path: Path, cluster,
) -> None:
    """NBPIPE_SOAK_TASKS sets the count (CI: 2,000; the full soak: 20,000, see reliability.md).

    The driver runs on a scheduler in another process (the shared cluster's), so that its
    memory is nbpipe's and the client's only: a local cluster's scheduler lives in the driver
    and keeps about 1 KB per Dask task of its own (see docs/reliability.md).
    """
    count = int(os.environ.get("NBPIPE_SOAK_TASKS", "2000"))
    store = tmp_path / ".nbpipe"
    db = store / "nbpipe.sqlite"
    done = subprocess.run(
        [sys.executable, str(write(tmp_path / "soak.py", SOAK)), str(store), str(count),
         cluster.scheduler_address],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=3600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.split("SOAK", 1)[1])
    print(json.dumps({k: v for k, v in report.items() if k != "flaky"}))  # the figures (pytest -s)
    flaky = set(report["flaky"])
    assert count // 200 < len(flaky) < count // 50  # about 1 %
    assert report["ok"] and report["succeeded"] == count and report["wrong"] == 0
    assert _count(db, "SUCCEEDED") == count
    attempts = dict(_query(db, "SELECT key, attempts FROM tasks WHERE active"))
    assert {k for k, n in attempts.items() if n == 2} == flaky
    assert {n for k, n in attempts.items() if k not in flaky} == {1}
    rows = _query(db, "SELECT state, COUNT(*), COUNT(DISTINCT key) FROM attempts GROUP BY state")
    assert sorted(rows) == [("FAILED", len(flaky), len(flaky)), ("SUCCEEDED", count, count)]
    assert {k for (k,) in _query(db, "SELECT key FROM attempts WHERE state = 'FAILED'")} == flaky
    rss = report["rss"]
    assert rss["100"] - rss["25"] < 10 * 2**20, rss  # driver memory stays flat


def _topic_history(topic: str, dask_scheduler: Any = None) -> int | None:
    topics = dask_scheduler._broker._topics
    return len(topics[topic].events) if topic in topics else None


def test_the_scheduler_keeps_only_a_short_history_of_a_runners_events(pipe) -> None:
    """A runner's events carry batches of outcomes; the scheduler kept the last 1,000 of them
    (in the driver, for a local cluster) and beyond the runner's life."""
    import dask

    @pipe.task
    def tiny(i: int) -> int:
        return i

    refs = [tiny(i) for i in range(60)]
    with dask.config.set({"nbpipe.batch-seconds": 0}):  # one Dask task, two events, per task
        assert pipe.run().ok
    runner = pipe._runner
    assert [r.result() for r in refs] == list(range(60))
    assert pipe.client.run_on_scheduler(_topic_history, runner.topic) <= 16
    client = pipe.client
    pipe.close()
    # Closing drops the topic; an event published late (a worker's, in flight at the close)
    # may create it again, still bounded.
    wait_for(lambda: (client.run_on_scheduler(_topic_history, runner.topic) or 0) <= 16)
