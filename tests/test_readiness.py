"""The runner's pure decisions, without a cluster: readiness, hand-ahead, chain fusion, batching.

Small graphs of real TaskRefs (a Pipeline on a temporary store, resolved, never run) and the
tables the runner keeps, built by hand; each test checks one decision of nbpipe.readiness or
nbpipe.batching.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from nbpipe import Pipeline
from nbpipe.batching import (
    FUSE_UNKNOWN,
    MAX_BATCH,
    PROBE_COUNT,
    PROBE_MIN,
    PROBE_START,
    PROBE_TIME,
    BatchPolicy,
)
from nbpipe.readiness import chain_below, count_blockers, may_hand
from nbpipe.states import State
from nbpipe.submission import Submission
from nbpipe.task import TaskRef


@pytest.fixture
def pipe(tmp_path: Path):
    pipe = Pipeline("ready", store=tmp_path / ".nbpipe")
    yield pipe
    pipe.close()


def children_of(pipe: Pipeline, refs: list[TaskRef]) -> dict[TaskRef, set[TaskRef]]:
    """The runner's ``children`` table for ``refs``."""
    children: dict[TaskRef, set[TaskRef]] = defaultdict(set)
    for ref in refs:
        for dep in pipe.deps(ref):
            children[dep].add(ref)
    return children


def chain(pipe: Pipeline, length: int) -> list[TaskRef]:
    @pipe.task
    def step(x: int, i: int = 0) -> int:
        return x + 1

    refs = [step(0)]
    for _ in range(length - 1):
        refs.append(step(refs[-1]))
    pipe.resolve()
    return refs


# -- what a task waits for ------------------------------------------------------------------------

@pytest.mark.parametrize(("states", "waiting", "failed"), [
    ([], 0, None),
    ([State.SUCCEEDED, State.SUCCEEDED], 0, None),
    ([State.SUCCEEDED, State.RUNNING, State.WAITING], 2, None),
    ([State.RUNNING, State.FAILED], 2, 1),
    ([State.KILLED], 1, 0),
    ([State.UPSTREAM_FAILED, State.SUCCEEDED], 1, 0),
])
def test_a_task_waits_for_every_upstream_task_not_succeeded_and_names_one_that_failed(
        pipe: Pipeline, states: list[State], waiting: int, failed: int | None) -> None:
    refs = chain(pipe, len(states) + 1)[:len(states)]
    for ref, state in zip(refs, states, strict=True):
        ref.update(state=state)
    count, bad = count_blockers(refs)
    assert count == waiting
    assert bad is (None if failed is None else refs[failed])


# -- handing ahead ---------------------------------------------------------------------------------

def test_a_dependent_of_a_task_in_flight_is_handed_ahead(pipe: Pipeline) -> None:
    a, b = chain(pipe, 2)
    sent = {a: Submission("a", [a])}
    assert may_hand(b, pipe.deps(b), waits_for=1, sent=sent, killing=set(), capped=False)


def test_a_dependent_of_a_task_not_sent_waits(pipe: Pipeline) -> None:
    a, b, c = chain(pipe, 3)
    sent = {a: Submission("a", [a])}
    assert not may_hand(c, pipe.deps(c), waits_for=1, sent=sent, killing=set(), capped=False)


def test_a_dependent_of_a_task_being_killed_waits(pipe: Pipeline) -> None:
    a, b = chain(pipe, 2)
    sent = {a: Submission("a", [a])}
    assert not may_hand(b, pipe.deps(b), waits_for=1, sent=sent, killing={a}, capped=False)


def test_only_the_end_of_a_fused_chain_hands_its_value_ahead(pipe: Pipeline) -> None:
    """Inside a fused chain a value is dropped once the next task read it."""
    a, b, c, side = chain(pipe, 4)
    fused = Submission("abc", [a, b, c], fused=True)
    sent = {a: fused, b: fused, c: fused}
    # a task reading the middle of the chain waits; one reading its end goes ahead
    assert not may_hand(side, [b], waits_for=1, sent=sent, killing=set(), capped=False)
    assert may_hand(side, [c], waits_for=1, sent=sent, killing=set(), capped=False)


def test_a_task_whose_upstream_succeeded_and_others_in_flight_is_handed_ahead(
        pipe: Pipeline) -> None:
    @pipe.task
    def make(i: int) -> int:
        return i

    @pipe.task
    def join(a: int, b: int) -> int:
        return a + b

    a, b = make(1), make(2)
    j = join(a, b)
    pipe.resolve()
    a.update(state=State.SUCCEEDED)
    assert may_hand(j, pipe.deps(j), waits_for=1, sent={b: Submission("b", [b])},
                    killing=set(), capped=False)
    assert not may_hand(j, pipe.deps(j), waits_for=1, sent={}, killing=set(), capped=False)


@pytest.mark.parametrize("why", ["capped", "late", "chunked", "not waiting", "already sent",
                                 "ready", "no function"])
def test_these_tasks_are_never_handed_ahead(pipe: Pipeline, why: str) -> None:
    a, b = chain(pipe, 2)
    sent: dict[TaskRef, Submission] = {a: Submission("a", [a])}
    waits_for, capped = 1, False
    if why == "capped":  # a max_concurrent: it waits for a free slot
        capped = True
    elif why == "late":  # its key waits for upstream content
        b.late = True
    elif why == "chunked":  # map(..., chunksize=): submitted with its chunk
        b.group, b.chunksize = "g", 4
    elif why == "not waiting":
        b.update(state=State.KILLED)
    elif why == "already sent":
        sent[b] = Submission("b", [b])
    elif why == "ready":  # waits for nothing: it is submitted as a ready task
        waits_for = 0
    elif why == "no function":  # a revived task this process cannot run
        b.func = None  # type: ignore[assignment]
    assert not may_hand(b, pipe.deps(b), waits_for=waits_for, sent=sent, killing=set(),
                        capped=capped)


# -- fusing chains ---------------------------------------------------------------------------------

def fuse(pipe: Pipeline, refs: list[TaskRef], start: TaskRef, limit: int = FUSE_UNKNOWN,
         **kwargs) -> list[TaskRef]:
    waits = {r: 1 for r in refs if pipe.deps(r)}
    return chain_below(start, limit, children=children_of(pipe, refs), deps_of=pipe.deps,
                       waits_for=kwargs.pop("waits_for", waits), sent=kwargs.pop("sent", set()),
                       **kwargs)


def test_a_straight_chain_is_fused_below_its_first_task(pipe: Pipeline) -> None:
    refs = chain(pipe, 6)
    assert fuse(pipe, refs, refs[0]) == refs[1:]


@pytest.mark.parametrize("limit", [1, 2, 4])
def test_a_fused_chain_holds_at_most_the_limit(pipe: Pipeline, limit: int) -> None:
    refs = chain(pipe, 8)
    assert fuse(pipe, refs, refs[0], limit) == refs[1:limit]


def test_a_chain_stops_where_a_task_has_two_dependents(pipe: Pipeline) -> None:
    refs = chain(pipe, 3)
    step = refs[0].func
    branch = step(refs[1], 1)  # (another call than refs[2]: not the same task)
    pipe.resolve()
    assert fuse(pipe, [*refs, branch], refs[0]) == [refs[1]]


def test_a_chain_stops_where_a_task_reads_two_upstream_tasks(pipe: Pipeline) -> None:
    @pipe.task
    def step(x: int, y: int = 0) -> int:
        return x + y

    a = step(0)
    b = step(a)
    other = step(100)
    c = step(b, other)
    pipe.resolve()
    assert fuse(pipe, [a, b, other, c], a) == [b]


def test_a_chain_stops_at_another_function(pipe: Pipeline) -> None:
    refs = chain(pipe, 2)

    @pipe.task
    def other(x: int) -> int:
        return x

    tail = other(refs[-1])
    pipe.resolve()
    assert fuse(pipe, [*refs, tail], refs[0]) == [refs[1]]


@pytest.mark.parametrize("why", ["excluded", "sent", "late", "not waiting", "waits for more"])
def test_a_chain_stops_at_a_task_that_cannot_join_it(pipe: Pipeline, why: str) -> None:
    refs = chain(pipe, 5)
    stop = refs[3]
    kwargs: dict = {}
    if why == "excluded":  # the runner's reasons: a kill requested, memory grown
        kwargs["excluded"] = lambda r: r is stop
    elif why == "sent":
        kwargs["sent"] = {stop}
    elif why == "late":
        stop.late = True
    elif why == "not waiting":
        stop.update(state=State.SUCCEEDED)
    elif why == "waits for more":  # (an upstream task runs again: its count went up)
        kwargs["waits_for"] = {r: 2 if r is stop else 1 for r in refs[1:]}
    assert fuse(pipe, refs, refs[0], **kwargs) == refs[1:3]


# -- batching ------------------------------------------------------------------------------------

def learned(seconds: float, batch_seconds: float = 0.2) -> BatchPolicy:
    policy = BatchPolicy(batch_seconds)
    for _ in range(PROBE_COUNT // 4):
        policy.record("f", seconds, now=0.0)
    return policy


def test_tasks_of_unknown_duration_go_one_by_one_when_few() -> None:
    batches, held = BatchPolicy().batches("f", list(range(PROBE_MIN - 1)), 0.0, running=0,
                                          threads=2)
    assert batches == [[i] for i in range(PROBE_MIN - 1)] and held == []


def test_many_tasks_of_unknown_duration_send_probes_first_and_hold_the_rest() -> None:
    policy = BatchPolicy()
    refs = list(range(500))
    batches, held = policy.batches("f", refs, 0.0, running=0, threads=2)
    assert batches == [[i] for i in range(PROBE_COUNT)] and held == refs[PROBE_COUNT:]
    # probes in flight count: no more are sent while they run
    batches, held = policy.batches("f", held, 1.0, running=PROBE_COUNT, threads=2)
    assert batches == [] and len(held) == 500 - PROBE_COUNT


def test_held_tasks_go_one_by_one_when_no_probe_ends_in_time() -> None:
    """Workers slow to start: the rest are not held for ever."""
    policy = BatchPolicy()
    policy.batches("f", list(range(500)), 0.0, running=0, threads=2)
    batches, held = policy.batches("f", list(range(400)), PROBE_START, running=PROBE_COUNT,
                                   threads=2)
    assert len(batches) == 400 and held == []


def test_held_tasks_wait_a_short_while_for_more_probes_after_the_first_ends() -> None:
    policy = BatchPolicy()
    policy.batches("f", list(range(500)), 0.0, running=0, threads=2)
    policy.record("f", 0.001, now=10.0)
    assert policy.batches("f", list(range(400)), 10.0, running=0, threads=2)[1]
    batches, held = policy.batches("f", list(range(400)), 10.0 + PROBE_TIME, running=0, threads=2)
    assert len(batches) == 400 and held == []


@pytest.mark.parametrize(("seconds", "threads", "count"), [
    (0.001, 2, 1000), (0.001, 4, 1000), (0.0001, 2, 5000), (0.01, 1, 300), (0.05, 2, 100)])
def test_known_short_tasks_go_in_batches_of_about_batch_seconds_of_work(
        seconds: float, threads: int, count: int) -> None:
    policy = learned(seconds)
    refs = list(range(count))
    batches, held = policy.batches("f", refs, 0.0, running=0, threads=threads)
    assert held == [] and [r for b in batches for r in b] == refs  # each once, in order
    size = len(batches[0])
    assert size <= MAX_BATCH and size <= count // (2 * threads)  # every thread gets work
    assert size * seconds <= 0.2 + 1e-9
    # (the mean duration is a float: a size one short of the exact quotient is fine)
    assert size >= min(MAX_BATCH, int(0.2 / seconds), count // (2 * threads)) - 1


@pytest.mark.parametrize("case", ["long", "capped", "off", "few"])
def test_these_tasks_go_one_by_one(case: str) -> None:
    policy = learned(1.0 if case == "long" else 0.001, 0.0 if case == "off" else 0.2)
    refs = list(range(3 if case == "few" else 1000))
    batches, held = policy.batches("f", refs, 0.0, running=0, threads=2,
                                   capped=case == "capped")
    assert batches == [[r] for r in refs] and held == []


def test_durations_are_learned_per_function() -> None:
    policy = learned(0.001)
    assert policy.known("f") and not policy.known("g")
    batches, held = policy.batches("g", list(range(500)), 0.0, running=0, threads=2)
    assert len(batches) == PROBE_COUNT and held


@pytest.mark.parametrize(("seconds", "batch_jobs", "limit"), [
    (None, False, FUSE_UNKNOWN), (None, True, 1), (0.001, False, 200), (0.001, True, 200),
    (0.00001, False, MAX_BATCH), (1.0, False, 0)])
def test_how_long_a_fused_chain_may_be(seconds: float | None, batch_jobs: bool,
                                       limit: int) -> None:
    policy = BatchPolicy(0.2) if seconds is None else learned(seconds)
    assert policy.fuse_limit("f", batch_jobs=batch_jobs) in (limit, limit - 1)  # (float rounding)


def test_no_fusion_when_batching_is_off() -> None:
    assert BatchPolicy(0).fuse_limit("f", batch_jobs=False) == 1
    assert learned(0.001, 0).fuse_limit("f", batch_jobs=False) == 1
