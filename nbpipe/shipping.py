"""The code a task was hashed with is the code it runs: the user's own modules travel with it.

A task's identity follows the user's own modules (``mylib.py`` beside the notebook, a local
package) by content. A long-lived worker may have imported an older version of such a module,
and ``import mylib`` inside a task body would find that one. So the task function is pickled
together with the modules its identity reached, by value, and the worker puts them in
``sys.modules`` when it unpickles the function: ``import mylib`` there gives the driver's.

>>> import cloudpickle
>>> fn = cloudpickle.loads(cloudpickle.dumps(bundle(len, [])))
>>> fn("abc")
3
"""

from __future__ import annotations

import copyreg
import functools
import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

import cloudpickle

__all__ = ["bundle", "by_value"]

log = logging.getLogger("nbpipe")

_registered: set[str] = set()


def by_value(modules: Iterable[str]) -> None:
    """Pickle the functions and classes of these user modules by value from now on (values of
    a task's arguments and globals made from them too)."""
    for name in modules:
        if name not in _registered and name in sys.modules:
            _registered.add(name)
            try:
                cloudpickle.register_pickle_by_value(sys.modules[name])
            except ValueError:  # not importable by that name: cloudpickle refuses it
                log.debug("nbpipe: module %s cannot travel by value", name)


class _Bundle:
    """A function and the user modules it runs with; unpickles into the function alone."""

    def __init__(self, fn: Callable[..., Any], modules: dict[str, Any]):
        self.fn = fn
        self.modules = modules

    def __reduce__(self) -> tuple[Any, ...]:
        return (_install, (self.fn, self.modules))


def _install(fn: Callable[..., Any], modules: dict[str, Any]) -> Callable[..., Any]:
    sys.modules.update(modules)
    return fn


def _cached(fn: Callable[..., Any], maxsize: int | None, typed: bool) -> Any:
    return functools.lru_cache(maxsize=maxsize, typed=typed)(fn)


def _reduce_lru_cache(wrapper: Any) -> Any:
    """``functools.lru_cache``/``cache`` around a function of a script or notebook: pickled as
    the function (by value) and a fresh cache of the same size on the worker. Cached functions
    of importable modules keep travelling by reference, as pickle does them."""
    module = sys.modules.get(getattr(wrapper, "__module__", "") or "")
    if module is not None and getattr(module, "__file__", None) and \
            wrapper.__module__ not in _registered and wrapper.__module__ != "__main__":
        return wrapper.__qualname__  # a global of an importable module: by reference
    params = wrapper.cache_parameters()
    return (_cached, (wrapper.__wrapped__, params["maxsize"], params["typed"]))


copyreg.pickle(functools._lru_cache_wrapper, _reduce_lru_cache)


def bundle(fn: Callable[..., Any], modules: Iterable[str]) -> Any:
    """``fn`` with the named user modules, ready for ``cloudpickle.dumps``; ``fn`` itself when
    there are none, or when a module cannot be pickled by value (a lock at module level: the
    worker then imports its own copy, as before)."""
    found = {name: sys.modules[name] for name in sorted(modules) if name in sys.modules}
    if not found:
        return fn
    by_value(found)
    try:
        cloudpickle.dumps(found)
    except Exception as exc:
        log.debug("nbpipe: modules %s travel by reference (%s)", ", ".join(found), exc)
        return fn
    return _Bundle(fn, found)
