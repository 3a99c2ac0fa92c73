"""Naming tasks: one rule for every place a user names a task with a string.

``after="load"``, ``pipe.retry("fit")``, ``nbpipe kill pi fit``, ``nbpipe why pi fit``,
``%pipeline logs fit`` and the sidebar all find tasks the same way:

1. every task whose label (``fit(x=1)``) or function/cell name (``fit``) is the string;
2. when none is, every task whose key starts with it: a key prefix of at least
   :data:`MIN_KEY_PREFIX` characters (``nbpipe tasks`` shows 12), so that a short name such as
   ``"add"`` never names a task by chance of its key.

Where one task is meant (``why``, ``logs``, ``after=``), it is the newest of those, a label
match before a name match.

>>> tasks = [("fit", "fit(x=1)", "ab12ef"), ("fit", "fit(x=2)", "cd34ef"), ("load", "load()", "ab99ef")]
>>> [t[1] for t in find_tasks("fit", tasks, *FIELDS)]
['fit(x=1)', 'fit(x=2)']
>>> [t[1] for t in find_tasks("ab12", tasks, *FIELDS)]
['fit(x=1)']
>>> find_tasks("ab", tasks, *FIELDS)
[]
>>> find_task("fit", tasks, *FIELDS)[1]
'fit(x=2)'
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

__all__ = ["MIN_KEY_PREFIX", "find_task", "find_tasks", "ref_fields", "row_fields"]

#: The shortest key prefix that names a task.
MIN_KEY_PREFIX = 4

T = TypeVar("T")
Field = Callable[[Any], Any]

#: (name, label, key) of a tuple, for the examples above.
FIELDS: tuple[Field, Field, Field] = (operator.itemgetter(0), operator.itemgetter(1),
                                      operator.itemgetter(2))
#: (name, label, key) of a store row.
row_fields: tuple[Field, Field, Field] = (operator.itemgetter("name"), operator.itemgetter("label"),
                                          operator.itemgetter("key"))
#: (name, label, key) of a TaskRef (its key only when already made: naming never computes one).
ref_fields: tuple[Field, Field, Field] = (operator.attrgetter("name"), operator.attrgetter("label"),
                                          operator.attrgetter("key_"))


def find_tasks(wanted: str, items: Iterable[T], name: Field, label: Field, key: Field) -> list[T]:
    """Every item ``wanted`` names (see the module's rule), in the order of ``items``."""
    items = list(items)
    found = [i for i in items if wanted in (name(i), label(i))]
    if found or len(wanted) < MIN_KEY_PREFIX:  # ("" is a prefix of every key: it names none)
        return found
    return [i for i in items if (k := key(i)) and str(k).startswith(wanted)]


def find_task(wanted: str, items: Iterable[T], name: Field, label: Field, key: Field) -> T | None:
    """The one item ``wanted`` names: the newest (last in ``items``) label match, else the
    newest name or key-prefix match; None when nothing matches."""
    found = find_tasks(wanted, items, name, label, key)
    by_label = [i for i in found if label(i) == wanted]
    return (by_label or found or [None])[-1]
