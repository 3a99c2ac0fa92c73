"""The code a task was hashed with is the code it runs: the user's own modules travel with it.

A task's identity follows the user's own modules (``mylib.py`` beside the notebook, a local
package) by content. The workers may not be able to import them at all (a cluster started
elsewhere, with another working directory and ``sys.path``), and a long-lived worker may have
imported an older version. So a task function is pickled together with the user's modules, by
value, and the worker puts them in ``sys.modules`` before it unpickles the function: ``import
mylib`` there gives the driver's. Which modules go:

- the module the function itself lives in (``pipe.task(mylib.f)``) and every user module its
  identity reached (``mylib.f(x)`` in its body, ``import mylib as m``, ``from mylib import f``);
- every other user module this process has shipped before that defines classes: the results of
  upstream tasks may be objects of those classes, and a worker unpickling them must know them;
- a package's parents and its loaded submodules (``from . import helpers`` inside ``pkg.sub``
  finds ``pkg.helpers`` on the worker).

Values that move from one worker to another (a handed-ahead consumer's inputs) carry the modules
their worker was given (:func:`carrying`), so a consumer on a worker that never ran a task of
those modules can unpickle them. A module that cannot be pickled by value (a lock at module
level) is left to the workers' own ``import``; when that fails there, the error says why and
what to do (:class:`NotShipped`).

>>> import cloudpickle
>>> fn = cloudpickle.loads(cloudpickle.dumps(bundle(len, [])))
>>> fn("abc")
3
"""

from __future__ import annotations

import copyreg
import functools
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import threading
import types
from collections.abc import Callable, Iterable
from typing import Any

import cloudpickle

from .identity import is_user_module

__all__ = ["NotShipped", "bundle", "by_value", "carrying"]

log = logging.getLogger("nbpipe")

#: In the driver: the user modules registered to be pickled by value (every one met so far).
_registered: set[str] = set()
#: In the driver: modules already found not to travel by value, and why (warned once).
_refused: dict[str, str] = {}
#: In a worker: module name -> the module nbpipe installed (to tell them from the worker's own).
_installed: dict[str, types.ModuleType] = {}
#: In a worker: the pickled modules it was given, newest last, to send along with values.
_blobs: dict[frozenset[str], bytes] = {}
_lock = threading.RLock()


def _register(name: str) -> bool:
    """Register ``name`` (loaded) to be pickled by value; False when cloudpickle refuses."""
    if name in _registered:
        return True
    module = sys.modules.get(name)
    if module is None:
        return False
    try:
        cloudpickle.register_pickle_by_value(module)
    except ValueError:  # not importable by that name: cloudpickle refuses it
        log.debug("nbpipe: module %s cannot travel by value", name)
        return False
    _registered.add(name)
    return True


def by_value(modules: Iterable[str]) -> None:
    """Pickle the functions and classes of these user modules by value from now on (values of
    a task's arguments and globals made from them too), with their packages."""
    for name in modules:
        if name not in _registered:  # (called for every task registered: the common case first)
            for part in _family(name):
                _register(part)


def _family(name: str) -> list[str]:
    """``name``, its parent packages that are user code, and the user submodules loaded under
    its top-level package (``pkg.sub`` -> ``pkg``, ``pkg.sub``, ``pkg.helpers``), in import
    order (parents first)."""
    top = name.partition(".")[0]
    names = {name}
    prefix = top + "."
    for other, module in list(sys.modules.items()):
        if (other == top or other.startswith(prefix)) and isinstance(module, types.ModuleType) \
                and is_user_module(module):
            names.add(other)
    return sorted(names, key=lambda n: (n.count("."), n))


def _own_module(fn: Any) -> str | None:
    """The user module a task function is defined in (through ``functools.wraps``, ``partial``
    and ``lru_cache``), or None for a script, a notebook or a library."""
    seen = 0
    while seen < 20:  # a wrapper chain ends; a cycle of __wrapped__ must not hang
        seen += 1
        inner = getattr(fn, "__wrapped__", None) or getattr(fn, "func", None)
        if inner is None or inner is fn:
            break
        fn = inner
    name = getattr(fn, "__module__", None) or ""
    module = sys.modules.get(name)
    if name == "__main__" or module is None or not is_user_module(module):
        return None
    return name


class NotShipped(importlib.abc.MetaPathFinder):
    """On a worker: the last resort of ``import`` for a user module nbpipe could not send by
    value. It runs only when the worker's own finders did not find the module, and raises
    ``ModuleNotFoundError`` saying which module, why it did not travel and what to do."""

    reasons: dict[str, str] = {}

    @classmethod
    def find_spec(cls, name: str, path: Any = None,
                  target: Any = None) -> importlib.machinery.ModuleSpec | None:
        reason = cls.reasons.get(name)
        if reason is None:
            return None
        raise ModuleNotFoundError(
            f"No module named {name!r} on this worker: nbpipe could not send your module "
            f"{name!r} to the workers by value ({reason}). Make it importable on the workers "
            f"(install it, or put its folder on the workers' PYTHONPATH), or keep values that "
            f"cannot be pickled (locks, open files, clients) out of its module level",
            name=name)


def _install_modules(blobs: tuple[bytes, ...], missing: dict[str, str], replace: bool) -> None:
    """Unpickle and install the modules of each of ``blobs`` in ``sys.modules`` (parents first,
    each also set as its parent's attribute). ``replace``: also over a module the worker imported
    itself (a task's function must run the code it was hashed with); values carried from another
    worker only fill in what is missing or was installed by nbpipe."""
    with _lock:
        if missing:
            NotShipped.reasons.update(missing)
            if NotShipped not in sys.meta_path:
                sys.meta_path.append(NotShipped)  # last: the worker's own finders come first
        for blob in blobs:
            modules: dict[str, types.ModuleType] = cloudpickle.loads(blob)
            for name in sorted(modules, key=lambda n: (n.count("."), n)):
                present = sys.modules.get(name)
                if present is not None and not replace and _installed.get(name) is not present:
                    continue
                module = sys.modules[name] = _installed[name] = modules[name]
                parent, _, leaf = name.rpartition(".")
                if parent:
                    holder = sys.modules.get(parent)
                    if holder is None:  # a namespace package (no __init__.py): an empty one
                        holder = sys.modules[parent] = _installed[parent] = \
                            types.ModuleType(parent)
                        holder.__path__ = []
                    setattr(holder, leaf, module)
            key = frozenset(modules)
            _blobs.pop(key, None)
            _blobs[key] = blob  # newest last


class _Modules:
    """Pickles as "install these modules": they are installed when it is unpickled, so before
    anything that follows it in the same pickle."""

    def __init__(self, blobs: tuple[bytes, ...], missing: dict[str, str], replace: bool):
        self.blobs, self.missing, self.replace = blobs, missing, replace

    def __reduce__(self) -> tuple[Any, ...]:
        return (_install_modules, (self.blobs, self.missing, self.replace))


def _second(_installed_first: Any, value: Any, folder: str = "") -> Any:
    if folder and folder != os.getcwd() and callable(value):
        return _in_folder(value, folder)
    return value


def _in_folder(fn: Callable[..., Any], folder: str) -> Callable[..., Any]:
    """``fn`` on a worker whose working directory is not the driver's ``folder``: a relative
    path the task cannot open gets a message saying where it was looked for, and the fix."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError as exc:
            name = exc.filename
            if not isinstance(name, (str, os.PathLike)) or os.path.isabs(name):
                raise
            here = os.getcwd()
            raise FileNotFoundError(  # (str() appends ": 'name'")
                exc.errno, f"{exc.strerror} on this worker, whose working directory is {here}, "
                f"not {folder} where the pipeline was defined (a relative path is looked for "
                f"there); give the task an absolute path (e.g. Path({os.fspath(name)!r})"
                f".resolve() in your script), or start the workers in that folder",
                name).with_traceback(exc.__traceback__) from None

    return run


def _rebuild(_installed_first: Any, rebuild: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    return rebuild(*args)


class _Bundle:
    """A function and the user modules it runs with; unpickles into the function alone, the
    modules installed first (the function's own pickle may name them)."""

    def __init__(self, fn: Callable[..., Any], modules: _Modules):
        self.fn = fn
        self.modules = modules

    def __reduce__(self) -> tuple[Any, ...]:
        return (_second, (self.modules, self.fn, os.getcwd()))


def carrying(rebuild: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, ...]:
    """A ``__reduce__`` value for an object that moves from worker to worker holding task
    values (:class:`nbpipe.worker.Done`): it carries the user modules this worker was given,
    installed on the receiving worker before the values are unpickled (a consumer whose own
    function never names ``mylib`` can still receive a ``mylib.Point``)."""
    with _lock:
        blobs = tuple(_blobs.values())
    if not blobs:
        return (rebuild, args)
    return (_rebuild, (_Modules(blobs, {}, False), rebuild, args))


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


def _defines_classes(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and any(
        isinstance(v, type) and v.__module__ == name for v in list(vars(module).values()))


def _refuse(name: str, exc: Exception, task: str) -> None:
    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    if name not in _refused:
        log.warning("nbpipe: task %r uses your module %r, which cannot be sent to the workers by "
                    "value (%s); the workers must import it themselves", task, name, reason)
    _refused[name] = reason


def bundle(fn: Callable[..., Any], modules: Iterable[str], task: str = "") -> Any:
    """``fn`` with the user modules it runs with, ready for ``cloudpickle.dumps``: ``modules``
    (those its identity reached), the module ``fn`` lives in, and the other user modules
    shipped before that define classes (see the module docstring), and the driver's working
    folder (a relative path a task cannot open then says where it looked). A module that cannot
    be pickled by value (a lock at module level) is left out, with a warning naming ``task``:
    the worker then imports its own copy, or says why it cannot."""
    wanted = set(modules)
    own = _own_module(fn)
    if own is not None:
        wanted.add(own)
    family = {part for name in wanted for part in _family(name)}  # (submodules imported since)
    family = {name for name in family if _register(name)}
    # Upstream results may be objects of any user class met so far: modules that define
    # classes go along (others only with the functions that use them).
    names = {n for n in family if n not in _refused}
    names |= {n for n in _registered - names if n not in _refused and _defines_classes(n)}
    found = {name: sys.modules[name] for name in sorted(names)}
    try:
        blob = cloudpickle.dumps(found, protocol=5) if found else b""
    except Exception:
        for name in sorted(found):  # which ones cannot travel: the others still do
            try:
                cloudpickle.dumps(found[name], protocol=5)
            except Exception as exc:
                _refuse(name, exc, task or getattr(fn, "__name__", "?"))
        found = {n: m for n, m in found.items() if n not in _refused}
        blob = cloudpickle.dumps(found, protocol=5) if found else b""
    missing = {n: r for n, r in _refused.items() if n in wanted or n in _registered}
    # (a bundle even without modules: it carries the driver's folder)
    return _Bundle(fn, _Modules((blob,) if blob else (), missing, True))
