"""Graph walks over tasks, pure: no store, no Dask, nothing but the nodes and a way to step.

Every part of nbpipe that follows dependencies uses these: what a run needs (:func:`reach`
over upstream tasks), what a failure or a retry touches (:func:`reach` over dependents), and in
which order tasks can be keyed (:func:`order`, which names a cycle).

>>> children = {"a": ["b"], "b": ["c"], "c": []}
>>> reach(["a"], children.__getitem__)
['a', 'b', 'c']
>>> order({"b": ["a"], "a": []})
['a', 'b']
"""

from __future__ import annotations

import graphlib
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import TypeVar

from .errors import CycleError

__all__ = ["order", "reach"]

N = TypeVar("N", bound=Hashable)


def reach(starts: Iterable[N], step: Callable[[N], Iterable[N]],
          follow: Callable[[N], bool] | None = None) -> list[N]:
    """``starts`` and every node reached from them by ``step`` (each once, starts first).

    ``follow`` limits the walk: a node it refuses is neither listed nor walked through (the
    starts are always listed).

    >>> reach([1], lambda n: [n + 1] if n < 4 else [], follow=lambda n: n != 3)
    [1, 2]
    """
    seen: dict[N, None] = dict.fromkeys(starts)
    todo = list(seen)
    while todo:
        for nxt in step(todo.pop()):
            if nxt not in seen and (follow is None or follow(nxt)):
                seen[nxt] = None
                todo.append(nxt)
    return list(seen)


def order(graph: Mapping[N, Iterable[N]], label: Callable[[N], str] = str,
          what: str = "tasks", fix: str = "remove one of these dependencies",
          start: N | None = None) -> list[N]:
    """The nodes of ``graph`` (node -> the nodes it depends on), dependencies first.

    A cycle raises :class:`~nbpipe.CycleError` naming it with ``label`` (from and back to
    ``start`` when it is on the cycle), and what to do.

    >>> order({"a": ["b"], "b": ["a"]})
    Traceback (most recent call last):
    nbpipe.errors.CycleError: tasks form a cycle: a -> b -> a; remove one of these dependencies
    """
    try:
        return list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        nodes = list(exc.args[1][:-1])  # graphlib gives it closed: first == last
        if start in nodes:
            at = nodes.index(start)
            nodes = nodes[at:] + nodes[:at]
        cycle = " -> ".join(label(n) for n in [*nodes, nodes[0]])
        raise CycleError(f"{what} form a cycle: {cycle}; {fix}") from None
