"""Readiness: what a task still waits for, which tasks may be handed to Dask ahead of their
upstream tasks' outcomes, and which chains may be fused into one Dask task.

Pure decisions over the runner's tables (no Dask, no store): the runner keeps the tables and acts
on the answers. A "submission" here is anything with ``refs`` (the tasks one Dask task runs, in
order) and ``fused`` (a chain: each task reads only the value of the one before).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .states import BAD, State

if TYPE_CHECKING:
    from .task import TaskRef

__all__ = ["Sent", "chain_below", "count_blockers", "may_hand"]


class Sent(Protocol):
    """What readiness needs of a submission: its tasks in order, and whether it is a chain."""

    refs: list[TaskRef]
    fused: bool


def count_blockers(deps: Sequence[TaskRef]) -> tuple[int, TaskRef | None]:
    """How many of ``deps`` a task still waits for, and one that failed (then it never runs).

    >>> count_blockers([])
    (0, None)
    """
    waiting = 0
    failed = None
    for dep in deps:
        if dep.state is State.SUCCEEDED:
            continue
        if dep.state in BAD:
            failed = dep
        waiting += 1
    return waiting, failed


def groupable(ref: TaskRef) -> bool:
    """Whether ``ref`` is part of the user's own chunks (``map(..., chunksize=)``): those are
    submitted together, never alone."""
    return bool(ref.chunksize and ref.group)


def may_hand(ref: TaskRef, deps: Sequence[TaskRef], *, waits_for: int,
             sent: Mapping[TaskRef, Sent], killing: Collection[TaskRef],
             capped: bool) -> bool:
    """Whether ``ref`` can be submitted now with its upstream tasks' futures as inputs.

    ``waits_for``: how many upstream tasks it still waits for (0: it is simply ready);
    ``sent``: the submission each task in flight belongs to; ``killing``: tasks being killed;
    ``capped``: a ``max_concurrent`` applies to it (capped tasks wait for a free slot).
    Every upstream task must be done or in flight, not being killed, and not inside a fused
    chain unless it ends the chain (inside one, a value is dropped once the next task read it).
    """
    if (ref.state is not State.WAITING or ref in sent or ref.late or waits_for <= 0
            or ref.func is None or capped or groupable(ref)):
        return False
    for dep in deps:
        if dep.state is State.SUCCEEDED:
            continue
        sub = sent.get(dep)
        if sub is None or dep in killing or (sub.fused and sub.refs[-1] is not dep):
            return False
    return True


def chain_below(ref: TaskRef, limit: int, *, children: Mapping[TaskRef, Collection[TaskRef]],
                deps_of: Callable[[TaskRef], Sequence[TaskRef]],
                waits_for: Mapping[TaskRef, int], sent: Collection[TaskRef],
                excluded: Callable[[TaskRef], bool] = lambda r: False) -> list[TaskRef]:
    """The tasks to fuse with ``ref`` into one Dask task, at most ``limit`` with ``ref``.

    The chain below ``ref`` in which each task is the only dependent of the one before, has no
    other upstream task, the same function (so the same options), is WAITING for that one task
    only, not in flight (``sent``), not late, not chunked and not ``excluded`` (the runner's
    own reasons: memory grown after worker deaths, a kill requested). A chain runs one task
    after another whatever Dask does; as one Dask task it pays Dask's per-task cost once.
    """
    chain: list[TaskRef] = []
    func: Any = ref.func
    last = ref
    while len(chain) + 1 < limit:
        below = children.get(last, ())
        if len(below) != 1:
            break
        (child,) = below
        if (child.func is not func or child.state is not State.WAITING or child.late
                or child in sent or waits_for.get(child, 0) != 1 or excluded(child)
                or groupable(child) or len(deps_of(child)) != 1):
            break
        chain.append(child)
        last = child
    return chain
