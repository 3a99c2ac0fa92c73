"""Control through the store's command table: kill, pause, resume, retry — also from another process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

from nbpipe import Pipeline, State, TaskKilled


def test_kill_stops_a_cpu_bound_python_loop(pipe: Pipeline) -> None:
    @pipe.task
    def spin(n: int) -> int:
        total = 0
        while True:  # a pure-Python loop that never returns by itself
            total += n

    ref = spin(1)
    pipe.run(wait=False)
    wait_for(lambda: ref.state is State.RUNNING)
    pipe.kill(ref)
    # The loop never ends by itself: reaching a final state at all is the kill working (how
    # fast is a matter for benchmarks, not for a test on a loaded machine).
    wait_for(lambda: ref.state.final, timeout=120)
    assert ref.state is State.KILLED
    with pytest.raises(TaskKilled):
        ref.result()


def test_kill_stops_a_task_blocked_in_c_code_by_restarting_its_worker(pipe: Pipeline) -> None:
    @pipe.task
    def nap(seconds: float) -> float:
        time.sleep(seconds)  # blocked in C: the async exception cannot reach it
        return seconds

    ref = nap(600.0)
    pipe.run(wait=False)
    wait_for(lambda: ref.state is State.RUNNING)
    pipe.kill(ref)
    wait_for(lambda: ref.state.final, timeout=120)  # the nap alone would last 600 s
    assert ref.state is State.KILLED
    rows = pipe.store.task_rows(pipe.pipeline_id, [ref.key])
    assert rows[ref.key]["state"] == "KILLED"


def test_killing_a_task_marks_its_downstream_upstream_failed(pipe: Pipeline) -> None:
    @pipe.task
    def slow() -> int:
        while True:
            pass

    @pipe.task
    def after_slow(x: int) -> int:
        return x

    @pipe.task
    def independent() -> int:
        return 7

    first = slow()
    second = after_slow(first)
    other = independent()
    pipe.run(wait=False)
    wait_for(lambda: first.state is State.RUNNING)
    pipe.kill(first)
    wait_for(lambda: second.state.final)
    assert first.state is State.KILLED
    assert second.state is State.UPSTREAM_FAILED
    assert other.result() == 7


def test_pause_starts_no_new_task_and_resume_continues(pipe: Pipeline, tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    @pipe.task
    def blocker() -> str:
        while not gate.exists():
            time.sleep(0.05)
        return "open"

    @pipe.task
    def later(x: str) -> str:
        return x + "!"

    first = blocker()
    second = later(first)
    pipe.run(wait=False)
    wait_for(lambda: first.state is State.RUNNING)
    pipe.pause()
    assert pipe.paused
    gate.write_text("go")
    wait_for(lambda: first.state is State.SUCCEEDED)
    time.sleep(0.5)
    assert second.state is State.WAITING  # paused: not started
    summary = pipe.run()
    assert summary.paused
    pipe.resume()
    assert not pipe.paused
    assert second.result(timeout=180) == "open!"


def test_retry_reruns_a_failed_task_and_what_it_blocked(pipe: Pipeline, tmp_path: Path) -> None:
    flag = tmp_path / "fixed"

    @pipe.task
    def flaky() -> int:
        if not flag.exists():
            raise RuntimeError("not yet")
        return 1

    @pipe.task
    def plus_one(x: int) -> int:
        return x + 1

    a = flaky()
    b = plus_one(a)
    pipe.run()
    assert (a.state, b.state) == (State.FAILED, State.UPSTREAM_FAILED)
    flag.write_text("ok")
    pipe.retry(failed=True)
    wait_for(lambda: b.state.final)
    assert (a.state, b.state) == (State.SUCCEEDED, State.SUCCEEDED)
    assert b.result() == 2
    attempts = pipe.store.attempts(pipe.pipeline_id, a.key)
    assert [r["state"] for r in attempts] == ["FAILED", "SUCCEEDED"]


def test_retry_of_a_succeeded_task_runs_it_again(pipe: Pipeline, tmp_path: Path) -> None:
    counter = tmp_path / "count"

    @pipe.task
    def count() -> int:
        n = int(counter.read_text()) + 1 if counter.exists() else 1
        counter.write_text(str(n))
        return n

    ref = count()
    assert ref.result() == 1
    pipe.retry(ref)
    wait_for(lambda: counter.read_text() == "2")
    wait_for(lambda: ref.state is State.SUCCEEDED)
    assert ref.result() == 2


def test_commands_from_another_process_reach_the_runner(pipe: Pipeline, tmp_path: Path) -> None:
    @pipe.task
    def forever() -> None:
        while True:
            pass

    ref = forever()
    pipe.run(wait=False)
    wait_for(lambda: ref.state is State.RUNNING)
    code = (
        "from nbpipe import Pipeline\n"
        f"p = Pipeline({pipe.name!r}, store={str(pipe.store.path)!r})\n"
        f"p.kill({ref.key!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    wait_for(lambda: ref.state.final, timeout=120)  # the loop never ends by itself
    assert ref.state is State.KILLED


def test_pause_without_a_runner_is_kept_in_the_store(tmp_path: Path) -> None:
    store = tmp_path / ".nbpipe"
    Pipeline("offline", store=store).pause()
    fresh = Pipeline("offline", store=store)
    assert fresh.paused

    @fresh.task
    def one() -> int:
        return 1

    ref = one()
    summary = fresh.run()
    assert summary.paused
    assert ref.state is State.WAITING
    fresh.resume()
    assert not Pipeline("offline", store=store).paused
    fresh.close()


def _marks(dask_worker=None) -> list[str]:
    """The kill marks a worker holds (what makes it skip or stop a task when its turn comes)."""
    from nbpipe import worker
    return sorted(worker._killed)


def _hold(started: str, gate: str) -> None:
    """Keep a worker's one thread busy until ``gate`` exists."""
    Path(started).touch()
    while not Path(gate).exists():
        time.sleep(0.05)


def test_a_task_killed_inside_a_queued_chunk_runs_when_retried_on_the_other_worker(
    pipe: Pipeline, client, tmp_path: Path,
) -> None:
    """A kill of an item of a chunk not yet started reaches every worker (the chunk may run on
    any); the mark it leaves on the worker that did not run the chunk must not kill the item's
    next attempt there."""
    client.wait_for_workers(2, timeout=120)  # (an earlier test may have restarted one)
    workers = sorted(client.scheduler_info()["workers"])

    def hold(worker: str, name: str) -> tuple[Any, Path]:
        started, free = tmp_path / f"{name}.started", tmp_path / f"{name}.free"
        future = client.submit(_hold, str(started), str(free), workers=[worker], pure=False)
        wait_for(started.exists)
        return future, free

    @pipe.task
    def step(i: int) -> int:
        return i

    holds = [hold(w, f"first-{n}") for n, w in enumerate(workers)]  # the chunk waits
    refs = step.map(range(3), chunksize=3)
    pipe.run(wait=False)
    wait_for(lambda: all(r.state is State.PENDING for r in refs))
    pipe.kill(refs[1])
    # the kill is sent to both workers from a thread of the runner: wait until both hold it
    wait_for(lambda: all(any(refs[1].key in m for m in marks)
                         for marks in client.run(_marks).values()))
    for future, free in holds:
        free.touch()
        future.result()
    wait_for(lambda: all(r.state.final for r in refs))
    assert [r.state for r in refs] == [State.SUCCEEDED, State.KILLED, State.SUCCEEDED]

    # the worker that ran the chunk is kept busy: the retry goes to the other one
    chunk_worker = refs[0].worker
    (other,) = [w for w in workers if w != chunk_worker]
    future, free = hold(chunk_worker, "again")
    try:
        pipe.retry(refs[1])
        wait_for(lambda: refs[1].state.final)
        assert refs[1].state is State.SUCCEEDED, refs[1].error
        assert refs[1].worker == other
        assert refs[1].result() == 1
    finally:
        free.touch()
        future.result()


# -- without a runner, every door in this process changes its tasks as it changes the store -----

#: door -> (the kill, what becomes of the task waiting on the killed one)
KILLS = {
    "pipe.kill(refs)": (lambda pipe, refs: pipe.kill(refs), State.UPSTREAM_FAILED),
    "pipe.kill(all=True)": (lambda pipe, refs: pipe.kill(all=True), State.KILLED),
    "pipe.control.kill(keys)": (lambda pipe, refs: pipe.control.kill([r.key for r in refs]),
                                State.UPSTREAM_FAILED),
    "pipe.control.kill(all=True)": (lambda pipe, refs: pipe.control.kill(all=True), State.KILLED),
}
RETRIES = {
    "pipe.retry(refs)": lambda pipe, refs: pipe.retry(refs),
    "pipe.retry(failed=True)": lambda pipe, refs: pipe.retry(failed=True),
    "pipe.control.retry(keys)": lambda pipe, refs: pipe.control.retry([r.key for r in refs]),
    "pipe.control.retry(failed=True)": lambda pipe, refs: pipe.control.retry(failed=True),
}


def _same_as_the_store(pipe: Pipeline, refs: list[Any]) -> None:
    rows = pipe.control.rows()
    for r in refs:
        assert (r.state.value, r.error) == (rows[r.key]["state"], rows[r.key]["error"]), r.label


@pytest.mark.parametrize("kill", list(KILLS.values()), ids=list(KILLS))
@pytest.mark.parametrize("retry", list(RETRIES.values()), ids=list(RETRIES))
def test_kill_and_retry_without_a_runner_change_this_process_tasks_like_the_store(
        pipe: Pipeline, kill: Any, retry: Any) -> None:
    @pipe.task
    def first() -> int:
        return 1

    @pipe.task
    def second(x: int) -> int:
        return x + 1

    a, b = first(), second(first())
    pipe.resolve()
    pipe.pause()  # (so a retry through pipe.retry starts nothing either: the states stay to look at)
    kill, blocked = kill
    kill(pipe, [a])
    assert (a.state, b.state) == (State.KILLED, blocked)
    _same_as_the_store(pipe, [a, b])
    with pytest.raises(TaskKilled):
        a.result()
    retry(pipe, [a])
    assert (a.state, b.state) == (State.WAITING, State.WAITING)
    assert a.reason == b.reason == "retry requested"
    _same_as_the_store(pipe, [a, b])
    assert pipe.runner is None  # all of it without a runner
    pipe.resume()
    assert pipe.run().executed == 2
    assert b.result() == 2
