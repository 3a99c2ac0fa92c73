"""Walking task arguments for task results: one rule, used wherever nbpipe looks for them.

nbpipe finds task results (a :class:`~nbpipe.TaskRef`, or one output of a cell) -- the data
dependencies -- in arguments themselves and inside lists, tuples and dicts of exactly those
types; anything else is a value. Registration (upstream slots), hand-over (specs by key),
revival and the runner (upstream values) all replace them with :func:`map_leaves`.

>>> map_leaves([1, (2, {"a": 3})], lambda v: v == 3, lambda v: "three")
[1, (2, {'a': 'three'})]
>>> holds_ref({1, 2})
False
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["any_leaf", "holds_ref", "is_ref", "map_leaves", "map_refs"]


def is_ref(value: Any) -> bool:
    """Whether ``value`` is a task result: a TaskRef or one output of it."""
    from .task import TaskOutput, TaskRef

    return isinstance(value, (TaskRef, TaskOutput))


def map_leaves(value: Any, is_leaf: Callable[[Any], bool], fn: Callable[[Any], Any],
               other: Callable[[Any], Any] | None = None) -> Any:
    """``value`` with each leaf (``is_leaf``) replaced by ``fn(leaf)``, through lists, tuples
    and dicts of exactly those types (subclasses are values); ``other`` maps every other value
    (default: kept as it is)."""
    if is_leaf(value):
        return fn(value)
    kind = type(value)
    if kind is list:
        return [map_leaves(v, is_leaf, fn, other) for v in value]
    if kind is tuple:
        return tuple(map_leaves(v, is_leaf, fn, other) for v in value)
    if kind is dict:
        return {k: map_leaves(v, is_leaf, fn, other) for k, v in value.items()}
    return value if other is None else other(value)


def any_leaf(value: Any, is_leaf: Callable[[Any], bool], depth: int = 0) -> bool:
    """Whether a leaf (``is_leaf``) sits where :func:`map_leaves` looks (lists, tuples and dicts
    of exactly those types, at most 20 deep)."""
    if is_leaf(value):
        return True
    kind = type(value)
    if depth >= 20 or kind not in (list, tuple, dict):
        return False
    items = value.values() if kind is dict else value
    return any(any_leaf(v, is_leaf, depth + 1) for v in items)


def map_refs(value: Any, fn: Callable[[Any], Any], other: Callable[[Any], Any] | None = None) -> Any:
    """``value`` with each task result in it replaced by ``fn(result)`` (see the module)."""
    return map_leaves(value, is_ref, fn, other)


def holds_ref(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` holds a task result somewhere nbpipe does not look for one (a set, an
    object's attributes, a subclass of list): to say so rather than pass the TaskRef itself."""
    if is_ref(value):
        return True
    if depth > 20:
        return False
    if isinstance(value, dict):
        return any(holds_ref(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(holds_ref(v, depth + 1) for v in value)
    fields = getattr(value, "__dict__", None)
    return isinstance(fields, dict) and any(holds_ref(v, depth + 1) for v in fields.values())
