"""Handing tasks to Dask ahead: a task's dependents go to Dask as soon as it is submitted, with
its future as their input. They take its value from memory, and end exactly as before when it
fails, is retried, killed or the pipeline pauses; the store records every transition in order."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import wait_for

from nbpipe import Pipeline, State


def _events(pipe: Pipeline, key: str) -> list[tuple[int, str]]:
    return [(e["id"], e["state"]) for e in pipe.store.events(pipe.pipeline_id) if e["key"] == key]


def _first(events: list[tuple[int, str]], state: str) -> int:
    return next(i for i, s in events if s == state)


def _run_until_running(pipe: Pipeline, ref: object) -> None:
    """Start the pipeline's run in the background and wait until ``ref``'s task runs."""
    pipe.run(wait=False)
    wait_for(lambda: ref.state is State.RUNNING, timeout=60)


def _inc(pipe: Pipeline) -> object:
    """The task ``inc(x)`` of ``pipe``: x + 1."""
    @pipe.task
    def inc(x: int) -> int:
        return x + 1

    return inc


def _two_dependents(pipe: Pipeline, first: object) -> list[object]:
    """``inc(first)`` and ``inc`` of that: a chain of two behind ``first``."""
    inc = _inc(pipe)
    chain = [inc(first)]
    chain.append(inc(chain[-1]))
    return chain


def _running_held_chain(pipe: Pipeline, tmp_path: Path, dependents: int
                        ) -> tuple[Path, list[object]]:
    """``held(gate)``, which runs until the file ``gate`` exists and gives 1, then a chain of
    ``dependents`` ``inc`` tasks; run until ``held`` runs. The gate and the chain, ``held``
    first."""
    gate = tmp_path / "gate"

    @pipe.task
    def held(gate: str) -> int:
        import os

        while not os.path.exists(gate):
            time.sleep(0.05)
        return 1

    inc = _inc(pipe)
    chain = [held(str(gate))]
    for _ in range(dependents):
        chain.append(inc(chain[-1]))
    _run_until_running(pipe, chain[0])
    return gate, chain


def test_a_consumer_takes_its_upstream_value_from_memory_not_from_the_result_file(
        pipe: Pipeline) -> None:
    @pipe.task
    def produce() -> bytearray:
        import builtins

        time.sleep(1.0)  # the consumer is submitted meanwhile
        value = bytearray(20_000_000)  # large: Dask runs the consumer where it is
        builtins._nbpipe_ahead_probe = value  # type: ignore[attr-defined]
        return value

    @pipe.task
    def consume(value: bytearray) -> bool:
        import builtins

        return value is getattr(builtins, "_nbpipe_ahead_probe", None)

    made = produce()
    used = consume(made)
    pipe.run(check=True)
    assert used.result() is True  # the very object: not read back from the file
    assert len(made.result()) == 20_000_000  # ... which was still written, for resume
    assert pipe.store.results([made.key])[made.key]["size"] > 20_000_000


def test_a_chain_records_each_transition_after_its_upstream_succeeded(pipe: Pipeline) -> None:
    @pipe.task
    def inc(x: int, i: int = 0) -> int:
        return x + 1

    refs = [inc(0)]
    for i in range(30):
        refs.append(inc(refs[-1], i))
    pipe.run(check=True)
    assert refs[-1].result() == 31
    for up, down in zip(refs, refs[1:], strict=False):
        ups, downs = _events(pipe, up.key), _events(pipe, down.key)
        # (the store keeps one event of PENDING/RUNNING/SUCCEEDED written in one transaction)
        moves = [(i, s) for i, s in downs if s != "WAITING"]
        assert moves[-1][1] == "SUCCEEDED"
        assert [s for _, s in moves] in (["SUCCEEDED"], ["PENDING", "SUCCEEDED"],
                                         ["RUNNING", "SUCCEEDED"],
                                         ["PENDING", "RUNNING", "SUCCEEDED"])
        assert moves[0][0] > _first(ups, "SUCCEEDED")
        assert down.attempts == 1 and len(pipe.store.attempts(pipe.pipeline_id, down.key)) == 1


def test_dependents_of_a_failed_task_end_upstream_failed_without_an_attempt(
        pipe: Pipeline) -> None:
    @pipe.task
    def broken() -> int:
        time.sleep(0.5)
        raise ValueError("no")

    first = broken()
    chain = _two_dependents(pipe, first)
    pipe.run(check=False)
    assert first.state is State.FAILED
    for ref in chain:
        assert ref.state is State.UPSTREAM_FAILED, ref
        assert ref.attempts == 0
        assert pipe.store.attempts(pipe.pipeline_id, ref.key) == []
        assert {s for _, s in _events(pipe, ref.key)} <= {"WAITING", "UPSTREAM_FAILED"}
    rows = pipe.store.task_rows(pipe.pipeline_id, [r.key for r in chain])
    assert {rows[r.key]["state"] for r in chain} == {"UPSTREAM_FAILED"}


def test_dependents_wait_for_the_retry_of_a_failed_attempt_and_run_once(
        pipe: Pipeline, tmp_path: Path) -> None:
    marker = str(tmp_path / "failed-once")

    @pipe.task(retries=2)
    def flaky(marker: str) -> int:
        import os

        time.sleep(0.3)
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("first attempt fails")
        return 1

    @pipe.task
    def inc(x: int) -> int:
        return x + 1

    first = flaky(marker)
    second = inc(first)
    third = inc(second)
    pipe.run(check=True)
    assert third.result() == 3
    assert first.attempts == 2
    for ref in (second, third):
        assert ref.attempts == 1
        assert [a["state"] for a in pipe.store.attempts(pipe.pipeline_id, ref.key)] == ["SUCCEEDED"]
        moves = [i for i, s in _events(pipe, ref.key) if s != "WAITING"]
        assert moves[0] > _first(_events(pipe, first.key), "SUCCEEDED")


def test_killing_a_running_task_fails_its_handed_ahead_dependents(pipe: Pipeline) -> None:
    @pipe.task
    def spin() -> int:
        while True:
            pass

    first = spin()
    chain = _two_dependents(pipe, first)
    _run_until_running(pipe, first)
    pipe.kill(first)
    wait_for(lambda: all(r.state.final for r in chain), timeout=60)
    assert first.state is State.KILLED
    for ref in chain:
        assert ref.state is State.UPSTREAM_FAILED and ref.attempts == 0


def test_killing_a_handed_ahead_task_leaves_its_upstream_running(
        pipe: Pipeline, tmp_path: Path) -> None:
    gate, (first, second, third) = _running_held_chain(pipe, tmp_path, 2)
    pipe.kill(second)
    wait_for(lambda: second.state.final, timeout=60)
    gate.touch()
    pipe.wait(timeout=120)
    assert first.state is State.SUCCEEDED
    assert second.state is State.KILLED and second.attempts == 0
    assert third.state is State.UPSTREAM_FAILED and third.attempts == 0
    assert pipe.store.attempts(pipe.pipeline_id, second.key) == []


def test_pausing_takes_handed_ahead_tasks_back_until_resume(
        pipe: Pipeline, tmp_path: Path) -> None:
    gate, (first, second) = _running_held_chain(pipe, tmp_path, 1)
    pipe.pause()
    wait_for(lambda: pipe.paused, timeout=60)
    gate.touch()
    wait_for(lambda: first.state is State.SUCCEEDED, timeout=60)
    time.sleep(1.0)  # (a dependent that was not taken back would run now)
    assert second.state is State.WAITING and second.attempts == 0
    assert {s for _, s in _events(pipe, second.key)} <= {"WAITING"}
    pipe.resume()
    pipe.run(check=True)
    assert second.result() == 2 and second.attempts == 1


# -- chains fused into one Dask task -----------------------------------------------------------
#
# A chain of tasks of one function, each the only dependent of the one before, runs as one Dask
# task (Dask's per-task cost paid once, not per level); each task still has its own key, state,
# attempt record and result file, recorded in order.





def test_a_chain_of_one_function_runs_in_fewer_dask_tasks_each_task_recorded_in_order(
        pipe: Pipeline) -> None:
    @pipe.task
    def step(seen: list[str] | None, i: int) -> list[str]:
        from distributed import get_worker

        return [*(seen or []), str(get_worker().get_current_task())]

    refs = [step(None, 0)]
    for i in range(1, 40):
        refs.append(step(refs[-1], i))
    pipe.run(check=True)
    seen = refs[-1].result()
    assert len(seen) == 40
    assert len(set(seen)) < 20  # fused: many tasks per Dask task (not one Dask task per task)
    results = pipe.store.results([r.key for r in refs])
    for number, (up, down) in enumerate(zip(refs, refs[1:], strict=False), 2):
        assert down.result() == seen[:number]  # its own result, read back from the store
        assert down.key in results
        assert down.attempts == 1
        assert [a["state"] for a in pipe.store.attempts(pipe.pipeline_id, down.key)] == \
            ["SUCCEEDED"]
        moves = [(i, s) for i, s in _events(pipe, down.key) if s != "WAITING"]
        assert moves[0][0] > _first(_events(pipe, up.key), "SUCCEEDED")


def test_a_chain_is_not_fused_with_batching_off_nor_across_functions(pipe: Pipeline) -> None:
    import dask

    def where(seen: list[str] | None) -> list[str]:
        from distributed import get_worker

        return [*(seen or []), str(get_worker().get_current_task())]

    one, two = pipe.task(where, name="one"), pipe.task(where, name="two")
    alternating = [one(None)]
    for i in range(1, 8):
        alternating.append((two if i % 2 else one)(alternating[-1]))
    pipe.run(check=True)
    assert len(set(alternating[-1].result())) == 8

    with dask.config.set({"nbpipe.batch-seconds": 0}):
        other = Pipeline(pipe.name + "-unbatched", store=pipe.store.path, cluster=pipe.client)
        try:
            step = other.task(where, name="step")
            chain = [step(None)]
            for _ in range(7):
                chain.append(step(chain[-1]))
            other.run(check=True)
            assert len(set(chain[-1].result())) == 8
        finally:
            other.close()


def test_a_failure_inside_a_fused_chain_is_retried_and_what_follows_runs_once(
        pipe: Pipeline, tmp_path: Path) -> None:
    @pipe.task(retries=1)
    def step(x: int, fail_at: int, marker: str) -> int:
        import os

        if x == fail_at and not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("first attempt fails")
        return x + 1

    marker = str(tmp_path / "failed-once")
    refs = [step(0, 5, marker)]
    for _ in range(11):
        refs.append(step(refs[-1], 5, marker))
    pipe.run(check=True)
    assert refs[-1].result() == 12
    assert [r.attempts for r in refs] == [1] * 5 + [2] + [1] * 6
    failed = refs[5]
    for ref in refs[6:]:
        assert [a["state"] for a in pipe.store.attempts(pipe.pipeline_id, ref.key)] == \
            ["SUCCEEDED"]
        moves = [i for i, s in _events(pipe, ref.key) if s != "WAITING"]
        assert moves[0] > _first(_events(pipe, failed.key), "SUCCEEDED")


def test_a_failure_inside_a_fused_chain_fails_what_follows_without_an_attempt(
        pipe: Pipeline) -> None:
    @pipe.task
    def step(x: int) -> int:
        if x == 4:
            raise ValueError("no")
        return x + 1

    refs = [step(0)]
    for _ in range(9):
        refs.append(step(refs[-1]))
    pipe.run(check=False)
    assert [r.state for r in refs[:4]] == [State.SUCCEEDED] * 4
    assert refs[4].state is State.FAILED
    for ref in refs[5:]:
        assert ref.state is State.UPSTREAM_FAILED and ref.attempts == 0
        assert pipe.store.attempts(pipe.pipeline_id, ref.key) == []
        assert {s for _, s in _events(pipe, ref.key)} <= {"WAITING", "UPSTREAM_FAILED"}


def _skips(dask_worker: object = None) -> list[str]:
    from nbpipe import worker

    return sorted(worker._killed)


def _running_gated_chain(pipe: Pipeline, tmp_path: Path, length: int
                         ) -> tuple[list[object], Path, Path]:
    """A gated chain of ``length`` (:func:`_gated_chain`) run until its first task runs: the
    refs, the gate file that lets it go on, and the folder where each task marks it ran."""
    gate, ran = tmp_path / "gate", tmp_path / "ran"
    ran.mkdir()
    refs = _gated_chain(pipe, gate, ran, length)
    _run_until_running(pipe, refs[0])
    return refs, gate, ran


def _gated_chain(pipe: Pipeline, gate: Path, ran: Path, length: int) -> list[object]:
    @pipe.task
    def step(x: int, gate: str, ran: str) -> int:
        import os

        while x == 0 and not os.path.exists(gate):
            time.sleep(0.05)
        open(os.path.join(ran, str(x)), "w").close()
        return x + 1

    refs = [step(0, str(gate), str(ran))]
    for _ in range(length - 1):
        refs.append(step(refs[-1], str(gate), str(ran)))
    return refs


def test_killing_a_task_inside_a_fused_chain_skips_it_and_fails_what_follows(
        pipe: Pipeline, tmp_path: Path) -> None:
    refs, gate, ran = _running_gated_chain(pipe, tmp_path, 6)
    pipe.kill(refs[3])
    wait_for(lambda: refs[3].state.final, timeout=60)
    # the workers were told to skip it before the chain goes on (the gate opens)
    wait_for(lambda: any(m.startswith(refs[3].key + "@")
                         for ms in pipe.client.run(_skips).values() for m in ms), timeout=60)
    gate.touch()
    pipe.wait(timeout=120)
    assert [r.state for r in refs[:3]] == [State.SUCCEEDED] * 3
    assert refs[3].state is State.KILLED and refs[3].attempts == 0
    assert pipe.store.attempts(pipe.pipeline_id, refs[3].key) == []
    for ref in refs[4:]:
        assert ref.state is State.UPSTREAM_FAILED and ref.attempts == 0
    assert sorted(p.name for p in ran.iterdir()) == ["0", "1", "2"]  # the killed one never ran


def test_pausing_takes_a_fused_chain_back_and_resume_runs_each_task_once(
        pipe: Pipeline, tmp_path: Path) -> None:
    refs, gate, ran = _running_gated_chain(pipe, tmp_path, 6)
    pipe.pause()
    wait_for(lambda: pipe.paused, timeout=60)
    wait_for(lambda: any(m.startswith(refs[1].key + "@")
                         for ms in pipe.client.run(_skips).values() for m in ms), timeout=60)
    gate.touch()
    wait_for(lambda: refs[0].state is State.SUCCEEDED, timeout=60)
    for ref in refs[1:]:
        assert ref.state is State.WAITING and ref.attempts == 0
        assert {s for _, s in _events(pipe, ref.key)} <= {"WAITING"}
    pipe.resume()
    pipe.run(check=True)
    assert refs[-1].result() == 6
    assert [r.attempts for r in refs] == [1] * 6


def test_a_task_added_later_reads_a_value_from_inside_a_fused_chain(
        pipe: Pipeline, tmp_path: Path) -> None:
    # The fused chain drops a task's value from memory once the next task read it: a task that
    # reads it and is added while the chain runs waits for its result instead of being handed
    # to Dask ahead with the chain's Dask task as its input.
    refs, gate, ran = _running_gated_chain(pipe, tmp_path, 6)

    @pipe.task
    def fresh() -> int:
        return 100

    @pipe.task
    def combine(a: int, b: int) -> int:
        return a + b

    late = combine(refs[2], fresh())  # (fresh goes to Dask at once: combine is a candidate)
    pipe.run(wait=False)
    gate.touch()
    pipe.run(check=True)
    assert late.result() == 103
    assert late.attempts == 1
    assert refs[-1].result() == 6
