"""A run's preparation (nbpipe.launch): what a run hands to the runner, decided before anything
starts -- no runner, no cluster -- and the same for every kind of task left out or reset."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbpipe import Pipeline, State, launch


@pytest.fixture
def offline(tmp_path: Path) -> Pipeline:
    """A pipeline whose cluster is never started by these tests (planning needs none)."""
    pipe = Pipeline("plan", store=tmp_path / ".nbpipe")
    yield pipe
    pipe.close()


def test_a_plan_is_the_closure_of_its_targets_and_starts_nothing(offline: Pipeline) -> None:
    @offline.task
    def load(seed: int) -> int:
        return seed

    @offline.task
    def total(xs: list[int]) -> int:
        return sum(xs)

    parts = [load(seed=i) for i in range(3)]
    whole = total(parts[:2])
    refs, todo = launch.plan(offline, [whole], {})
    assert set(refs) == {whole, *parts[:2]} and set(todo) == set(refs)  # parts[2] is not needed
    refs, todo = launch.plan(offline, None, {})
    assert set(refs) == {whole, *parts}
    assert offline.runner is None and offline.started_connection is None


def test_a_plan_leaves_out_what_skip_names_and_what_depends_on_it(offline: Pipeline) -> None:
    @offline.task
    def fit(k: int) -> int:
        return k

    @offline.task
    def report(x: int) -> int:
        return x

    fits = [fit(k) for k in range(2)]
    reports = [report(f) for f in fits]
    refs, todo = launch.plan(offline, None, {"skip": [fits[0].label]}, report=True)
    assert fits[0] not in refs and reports[0] not in refs  # its dependent cannot run either
    assert set(todo) == {fits[1], reports[1]}
    assert offline.skipped == {fits[0].label, reports[0].label}
    launch.plan(offline, None, {"skip": [fits[0].label]})  # a run nbpipe makes itself
    assert offline.skipped == {fits[0].label, reports[0].label}  # ... reports nothing new


@pytest.mark.parametrize("ended", [State.KILLED, State.UPSTREAM_FAILED])
def test_a_plan_runs_again_what_ended_badly_before(offline: Pipeline, ended: State) -> None:
    @offline.task
    def first() -> int:
        return 1

    @offline.task
    def second(x: int) -> int:
        return x

    a = first()
    b = second(a)
    offline.resolve()
    offline.kill(a)  # (without a runner: KILLED, and b UPSTREAM_FAILED)
    ref = a if ended is State.KILLED else b
    assert ref.state is ended
    refs, todo = launch.plan(offline, [ref], {})
    assert ref in todo and ref.state is State.WAITING
    assert offline.runner is None
