"""The current pipeline: which pipeline module-level ``@task`` functions register into, and
which pipelines of this process are open.

A script's (or a kernel's) tasks go to the pipeline chosen with ``with pipe:`` or
:func:`use`; without one, to a default pipeline named after the script, in ``./.nbpipe``.
Pipelines not closed yet are closed when the process exits.

>>> default_name() != ""
True
"""

from __future__ import annotations

import atexit
import contextlib
import sys
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["current_pipeline", "default_name", "enter", "leave", "opened", "closed",
           "open_pipelines", "use"]

_stack: list[Pipeline] = []
_default: Pipeline | None = None
_stack_lock = threading.Lock()
_open: weakref.WeakSet[Pipeline] = weakref.WeakSet()


def default_name() -> str:
    """The name of a pipeline made without one: the script's file name, else ``default``."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) or (sys.argv[0] if sys.argv else "")
    stem = Path(path).stem if path else ""
    if not stem or stem in ("-c", "ipykernel_launcher", "pytest", "__main__"):
        return "default"
    return stem


def current_pipeline() -> Pipeline:
    """The pipeline that module-level ``@task`` functions register into.

    ``with pipe:`` or ``nbpipe.use(pipe)`` choose it; otherwise a default pipeline named after
    the script, in ``./.nbpipe``.
    """
    from .pipeline import Pipeline

    global _default
    with _stack_lock:
        if _stack:
            return _stack[-1]
        if _default is None:
            _default = Pipeline(default_name())
        return _default


def use(pipeline: Pipeline) -> Pipeline:
    """Make ``pipeline`` the current pipeline for module-level ``@task`` functions."""
    global _default
    with _stack_lock:
        _default = pipeline
        _stack.clear()
    return pipeline


def enter(pipeline: Pipeline) -> None:
    """``with pipeline:`` -- current until :func:`leave`."""
    with _stack_lock:
        _stack.append(pipeline)


def leave(pipeline: Pipeline) -> None:
    """The end of ``with pipeline:``."""
    with _stack_lock:
        if pipeline in _stack:
            _stack.remove(pipeline)


def opened(pipeline: Pipeline) -> None:
    """Count ``pipeline`` among the open ones (closed at exit if still open)."""
    _open.add(pipeline)


def closed(pipeline: Pipeline) -> None:
    """``pipeline`` was closed."""
    _open.discard(pipeline)


def open_pipelines() -> list[Pipeline]:
    """The pipelines of this process not closed yet (what ``nbpipe run`` reports on)."""
    return list(_open)


@atexit.register
def _close_all() -> None:
    for pipe in list(_open):
        with contextlib.suppress(Exception):
            pipe.close()
