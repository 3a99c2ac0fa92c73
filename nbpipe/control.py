"""Steering a pipeline from outside the process that runs it: the command line and the sidebar.

Commands go through the store's command table when a runner is attached (in a kernel, a
detached runner or a script); without one, the store is changed directly and, for ``retry``
and ``resume``, a detached runner (``nbpipe spawn``) is started so the requested work happens.

>>> from nbpipe.control import steer
>>> steer(".nbpipe", "pi", "retry", failed=True)          # doctest: +SKIP
{'pipeline': 'pi', 'verb': 'retry', 'runner': 'attached', 'spawned': None}
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from . import queries
from .errors import NbpipeError
from .pipeline import Pipeline, _open, spawn
from .store import Store

__all__ = ["VERBS", "open_pipeline", "spawn_if_idle", "steer"]

#: What can be asked of a pipeline from outside.
VERBS = ("retry", "kill", "pause", "resume")


def open_pipeline(store: Store | str | os.PathLike[str], name: str) -> Pipeline:
    """A handle on an existing pipeline (UnknownPipeline-style error for a wrong name)."""
    store = store if isinstance(store, Store) else Store(store)
    store.pipeline_id(name, create=False)  # an unknown pipeline is an error, not a new one
    pipe = Pipeline(name, store=store)
    _open.discard(pipe)  # it starts no runner: nothing to close at exit
    return pipe


def spawn_if_idle(pipe: Pipeline) -> int | None:
    """Without a runner anywhere, start a detached one for unfinished tasks; return its pid."""
    if not pipe._offline():
        return None
    unfinished = [t for t in queries.tasks(pipe.store, pipe.name) if t["state"] != "SUCCEEDED"]
    return spawn(pipe.store, pipe.name) if unfinished else None


def steer(store: Store | str | os.PathLike[str], pipeline: str, verb: str, tasks: Sequence[str] = (),
          *, failed: bool = False, all: bool = False, start_runner: bool = True) -> dict[str, Any]:
    """Ask ``pipeline`` to ``retry``, ``kill``, ``pause`` or ``resume`` (tasks by name or label)."""
    if verb not in VERBS:
        raise NbpipeError(f"unknown command {verb!r}; use one of {', '.join(VERBS)}")
    pipe = open_pipeline(store, pipeline)
    attached = not pipe._offline()
    names = list(tasks) or None
    if verb == "retry":
        if names is None and not failed:
            raise NbpipeError("retry needs task names, or failed=True for every failed task")
        pipe.retry(names, failed=failed)
    elif verb == "kill":
        if names is None and not all:
            raise NbpipeError("kill needs task names, or all=True for every unfinished task")
        pipe.kill(names, all=all)
    elif verb == "pause":
        pipe.pause()
    else:
        pipe.resume()
    spawned = spawn_if_idle(pipe) if start_runner and verb in ("retry", "resume") else None
    return {"pipeline": pipeline, "verb": verb, "runner": "attached" if attached else "none",
            "spawned": spawned}
