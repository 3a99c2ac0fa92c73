"""Large results of single tasks are written after the value is handed on: consumers start at
once, and the task counts as done only when its file is written (nbpipe.worker's writer).

Real LocalClusters; a full disk is a real file-size limit (RLIMIT_FSIZE) on the worker. A write
held up, then let go or broken, is a named pipe (FIFO) put where the worker's writer opens its
temporary file: its open waits for a reader, and a reader that leaves breaks the write (EPIPE).
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dask
import numpy as np
import pytest
from conftest import wait_for
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster
from test_reliability import _file_size_limit, _query, _verify_results

from nbpipe import Pipeline, State
from nbpipe.reports import OUTCOME_GRACE
from nbpipe.results import locate, read_verified, result_path
from nbpipe.worker import DEFER_BYTES, WRITER_NICENESS, Done, Outcome, Unsettled, outcomes_of

# Values over DEFER_BYTES: in-band bytes, an array written out of band, several arrays.
BIG = {
    "bytes": lambda i: bytes([i]) * (2 * DEFER_BYTES),
    "array": lambda i: np.full(DEFER_BYTES // 4, float(i)),
    "dict of arrays": lambda i: {"a": np.full(DEFER_BYTES // 8, i), "b": np.arange(DEFER_BYTES // 8)},
}


def _threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate()]


def _niceness() -> tuple[int, int | None]:
    """On a worker: the niceness of its thread running tasks, and of its result writer."""
    import threading

    writer = next((t for t in threading.enumerate() if t.name == "nbpipe-result-writer"), None)
    return (os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
            None if writer is None else os.getpriority(os.PRIO_PROCESS, writer.native_id))


def _total(value: object) -> float:
    if isinstance(value, bytes):
        return float(sum(value[:10]))
    if isinstance(value, dict):
        return float(sum(v.sum() for v in value.values()))
    return float(value.sum())  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", list(BIG))
def test_a_large_result_counts_as_done_only_once_its_file_is_written(
    pipe: Pipeline, store: Path, kind: str
) -> None:
    make = BIG[kind]

    @pipe.task
    def produce(i: int) -> object:
        return make(i)

    @pipe.task
    def consume(values: list) -> float:
        return sum(_total(v) for v in values)

    parts = [produce(i) for i in range(4)]
    end = consume(parts)
    pipe.run(check=True)
    assert end.result() == sum(_total(make(i)) for i in range(4))
    db = store / "nbpipe.sqlite"
    for ref in parts:
        ((path, checksum, size, ended),) = _query(
            db, "SELECT r.path, r.checksum, r.size, a.end FROM results r JOIN attempts a "
                "USING (key) WHERE key = ?", ref.key)
        file = Path(locate(store, path))
        assert size >= DEFER_BYTES and read_verified(file) == (checksum, size)
        assert ended >= os.stat(file).st_mtime - 0.01  # its end: after its file was written
    assert _verify_results(db) == 5
    again = Pipeline(pipe.name, store=store, cluster=pipe.client)
    try:
        produce2, consume2 = again.task(produce), again.task(consume)
        again_end = consume2([produce2(i) for i in range(4)])
        summary = again.run(check=True)
        assert summary.executed == 0 and again_end.result() == end.result()
    finally:
        again.close()


@pytest.mark.parametrize("kind", list(BIG))
def test_a_large_result_that_cannot_be_written_fails_its_task_and_its_consumer_waits(
    store: Path, kind: str
) -> None:
    make = BIG[kind]
    # One worker whose files may not grow beyond 64 KB: the disk is "full". Its consumer may
    # already have run on the value in memory: it must not count, and runs after the retry.
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as lc, Client(lc) as client:
        client.run(_file_size_limit, 64 * 1024)
        pipe = Pipeline("deferred-full", store=store, cluster=client)

        @pipe.task
        def produce(i: int) -> object:
            return make(i)

        @pipe.task
        def consume(value: object) -> float:
            return _total(value)

        ref = produce(3)
        after = consume(ref)
        try:
            summary = pipe.run()
            assert ref.state is State.FAILED and after.state is State.UPSTREAM_FAILED
            assert summary.failed == ["produce(i=3)"]
            assert ref.error.startswith("ResultWriteError: task 'produce(i=3)' finished but its "
                                        "result could not be written"), ref.error
            assert "the file-size limit (ulimit -f) is exceeded" in ref.error
            # (this worker's files were written after their values were handed on, by a
            # thread that gives way to the tasks and the transfers of values)
            assert "nbpipe-result-writer" in next(iter(client.run(_threads).values()))
            tasks, writer = next(iter(client.run(_niceness).values()))
            assert writer == min(19, tasks + WRITER_NICENESS)
            db = store / "nbpipe.sqlite"
            assert not _query(db, "SELECT 1 FROM results")  # neither counts as done
            assert not list((store / "results").rglob("*.tmp"))  # no half-written file left
            client.run(_file_size_limit, None)  # space is back
            pipe.retry(ref)
            assert after.result() == _total(make(3))
            assert ref.state is State.SUCCEEDED and ref.attempts == 2
            assert _verify_results(db) == 2
        finally:
            pipe.close()


# -- copies of a value never wait for its file ------------------------------------------------


def _outcome(key: str) -> Outcome:
    return Outcome(key=key, attempt=1, state="SUCCEEDED", start=0.0, end=0.0, worker="w",
                   hostname="h", pid=1, env_id="e")


def test_a_copy_of_a_value_whose_file_is_being_written_is_made_at_once_without_its_outcome() -> None:
    written = threading.Event()
    value = np.arange(10)
    done = Done([_outcome("k")], {"k": value}, written, origin="tcp://producer:1")
    started = time.monotonic()
    copy = pickle.loads(pickle.dumps(done))  # what Dask sends to a consumer's worker
    assert time.monotonic() - started < 1.0  # (it waited for the file before)
    assert np.array_equal(copy.values["k"], value)
    # Neither the copy nor the original tells a success before the file is written ...
    assert copy.outcomes is None and outcomes_of(copy) == Unsettled("tcp://producer:1")
    assert outcomes_of(done) == Unsettled("tcp://producer:1")
    written.set()  # ... once it is, the original does, and so does a copy made after
    assert outcomes_of(done) == done.outcomes
    assert outcomes_of(pickle.loads(pickle.dumps(done))) == done.outcomes


# Two workers, one thread each: "a" alone has a GPU, "b" alone advertises memory. A producer that
# asks for a GPU runs on "a", a consumer that asks for memory on "b": its input is a copy.
TWO = {"a": {"gpus": 1}, "b": {"memory": 8e9}}


@pytest.fixture
def two_workers() -> Iterator[tuple[Client, dict[str, str]]]:
    """A real cluster of the two workers of TWO; the client and each worker's address by name."""
    # (no replica is dropped behind the test's back: a consumer's copy stays where it ran)
    with dask.config.set({"distributed.scheduler.active-memory-manager.start": False}):
        cluster = SpecCluster(
            scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}},
            workers={name: {"cls": Nanny, "options": {"nthreads": 1, "resources": res,
                                                      "name": name}}
                     for name, res in TWO.items()})
    with cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        addresses = {info["name"]: address
                     for address, info in client.scheduler_info(n_workers=-1)["workers"].items()}
        yield client, addresses


def _held_write(client: Client, worker: str, store: Path, key: str) -> Path:
    """A FIFO where ``worker``'s writer opens the temporary file of ``key``'s result: that
    write waits (in its open) until the test reads the FIFO."""
    pid = client.run(os.getpid, workers=[worker])[worker]
    final = result_path(store, key)
    final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fifo = final.with_name(f".{final.name}.{pid}.tmp")
    os.mkfifo(fifo, 0o600)
    return fifo


def _pair(pipe: Pipeline, marker: Path, retries: int = 0) -> tuple[object, object]:
    """``produce`` (a 32 MB array, on "a") and ``consume`` of it (on "b", noting each run)."""

    @pipe.task(gpus=1, retries=retries)
    def produce(i: int) -> object:
        return np.full(DEFER_BYTES // 4, float(i))

    @pipe.task(memory="1GB")
    def consume(value: object, marker: str) -> float:
        with open(marker, "a") as f:
            f.write("ran\n")
        return float(value.sum())  # type: ignore[attr-defined]

    made = produce(3)
    return made, consume(made, str(marker))


def _states(db: Path, key: str) -> list[str]:
    return [s for (s,) in _query(db, "SELECT state FROM events WHERE key = ? ORDER BY id", key)]


def _recorded_after(db: Path, up: str, down: str) -> bool:
    """Whether every move of ``down`` past WAITING was recorded after ``up`` SUCCEEDED (the
    store keeps one event of PENDING/RUNNING/SUCCEEDED written in one transaction)."""
    events = _query(db, "SELECT id, key, state FROM events ORDER BY id")
    succeeded = next(i for i, k, s in events if k == up and s == "SUCCEEDED")
    moves = [i for i, k, s in events if k == down and s != "WAITING"]
    return bool(moves) and min(moves) > succeeded


def _while_the_write_is_held(pipe: Pipeline, db: Path, made: object, used: object,
                             marker: Path) -> None:
    """Run; wait for the consumer to run on its copy while the producer's file is held up."""
    pipe.run(wait=False)
    wait_for(marker.exists, timeout=180)  # it ran, on the other worker, on a copy
    assert not _query(db, "SELECT 1 FROM results")  # nothing counts as done yet
    assert "SUCCEEDED" not in _states(db, made.key) + _states(db, used.key)


def test_a_consumer_on_another_worker_runs_while_the_file_is_written_and_counts_after_it(
    two_workers: tuple[Client, dict[str, str]], store: Path, tmp_path: Path
) -> None:
    client, workers = two_workers
    pipe = Pipeline("copies", store=store, cluster=client)
    marker = tmp_path / "consumed"
    made, used = _pair(pipe, marker)
    db = store / "nbpipe.sqlite"
    fifo = _held_write(client, workers["a"], store, made.key)
    try:
        _while_the_write_is_held(pipe, db, made, used, marker)
        # Held past the grace after which the runner asks the workers for the outcomes
        # itself: it must keep waiting, not take the copy's word nor hold a worker's thread.
        time.sleep(OUTCOME_GRACE + 1.5)
        assert made.state is State.PENDING or made.state is State.RUNNING
        assert used.state is State.WAITING
        with open(fifo, "rb") as f:  # let the write go: the file's bytes pass through here
            content = f.read()
        summary = pipe.wait()
        assert summary.failed == [] and used.result() == 3.0 * (DEFER_BYTES // 4)
        assert _states(db, made.key)[-1] == "SUCCEEDED" and _states(db, used.key)[-1] == "SUCCEEDED"
        # the store records the producer's success before its consumer even leaves WAITING
        assert _recorded_after(db, made.key, used.key)
        assert marker.read_text() == "ran\n"  # the consumer ran once
        # The result file is what passed through the FIFO (the writer renamed the FIFO into
        # place): put those bytes in place; they verify against the recorded checksum.
        final = result_path(store, made.key)
        final.unlink()
        final.write_bytes(content)
        ((checksum, size),) = _query(db, "SELECT checksum, size FROM results WHERE key = ?",
                                     made.key)
        assert read_verified(final) == (checksum, size)
    finally:
        pipe.close()


@pytest.mark.parametrize("retries", [0, 1])
def test_a_write_that_fails_after_a_consumer_took_the_value_never_counts_that_consumer(
    two_workers: tuple[Client, dict[str, str]], store: Path, tmp_path: Path, retries: int
) -> None:
    client, workers = two_workers
    pipe = Pipeline("copies-fail", store=store, cluster=client)
    marker = tmp_path / "consumed"
    made, used = _pair(pipe, marker, retries=retries)
    db = store / "nbpipe.sqlite"
    fifo = _held_write(client, workers["a"], store, made.key)
    try:
        _while_the_write_is_held(pipe, db, made, used, marker)
        with open(fifo, "rb"):  # a reader that leaves at once: the write breaks (EPIPE)
            pass
        summary = pipe.wait()
        attempts = _query(db, "SELECT number, state, error FROM attempts WHERE key = ? "
                              "ORDER BY number", made.key)
        assert attempts[0][1] == "FAILED"
        assert attempts[0][2].startswith(f"ResultWriteError: task {made.label!r} finished but "
                                         "its result could not be written"), attempts[0][2]
        used_attempts = _query(db, "SELECT state FROM attempts WHERE key = ?", used.key)
        if retries == 0:  # the producer failed: its consumer's run on the value does not count
            assert summary.failed == [made.label]
            assert made.state is State.FAILED and used.state is State.UPSTREAM_FAILED
            assert _states(db, used.key)[-1] == "UPSTREAM_FAILED"
            assert not {"PENDING", "RUNNING", "SUCCEEDED"} & set(_states(db, used.key))
            assert used_attempts == [] and not _query(db, "SELECT 1 FROM results")
        else:  # retried: the consumer runs again on the new value, recorded once, after it
            assert summary.failed == [] and [a[1] for a in attempts] == ["FAILED", "SUCCEEDED"]
            assert used.result() == 3.0 * (DEFER_BYTES // 4)
            assert used_attempts == [("SUCCEEDED",)]
            assert marker.read_text() == "ran\nran\n"
            assert _recorded_after(db, made.key, used.key)
            assert _verify_results(db) == 2
        assert not fifo.exists()  # (the writer removed its temporary file)
    finally:
        pipe.close()


def test_a_producer_whose_worker_dies_before_its_file_is_written_does_not_count(
    two_workers: tuple[Client, dict[str, str]], store: Path, tmp_path: Path
) -> None:
    client, workers = two_workers
    pipe = Pipeline("copies-lost", store=store, cluster=client)
    marker = tmp_path / "consumed"
    made, used = _pair(pipe, marker)
    db = store / "nbpipe.sqlite"
    _held_write(client, workers["a"], store, made.key)
    try:
        _while_the_write_is_held(pipe, db, made, used, marker)
        pid = client.run(os.getpid, workers=[workers["a"]])[workers["a"]]
        os.kill(pid, signal.SIGKILL)  # its value lives on in the consumer's copy on "b"
        summary = pipe.wait()
        assert summary.failed == [made.label]
        assert made.state is State.FAILED and used.state is State.UPSTREAM_FAILED
        assert made.error == (f"task {made.label!r}: the worker that ran it ({workers['a']}) "
                              "left before its result file was written"), made.error
        assert "SUCCEEDED" not in _states(db, made.key) + _states(db, used.key)
        assert not _query(db, "SELECT 1 FROM results")
    finally:
        pipe.close()
