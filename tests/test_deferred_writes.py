"""Large results of single tasks are written after the value is handed on: consumers start at
once, and the task counts as done only when its file is written (nbpipe.worker's writer).

Real LocalClusters; a full disk is a real file-size limit (RLIMIT_FSIZE) on the worker.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster
from test_reliability import _file_size_limit, _query, _verify_results

from nbpipe import Pipeline, State
from nbpipe.results import locate, read_verified
from nbpipe.worker import DEFER_BYTES

# Values over DEFER_BYTES: in-band bytes, an array written out of band, several arrays.
BIG = {
    "bytes": lambda i: bytes([i]) * (2 * DEFER_BYTES),
    "array": lambda i: np.full(DEFER_BYTES // 4, float(i)),
    "dict of arrays": lambda i: {"a": np.full(DEFER_BYTES // 8, i), "b": np.arange(DEFER_BYTES // 8)},
}


def _threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate()]


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
            # (this worker's files were written after their values were handed on)
            assert "nbpipe-result-writer" in next(iter(client.run(_threads).values()))
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
