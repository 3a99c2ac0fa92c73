"""Runner ownership: which process runs a pipeline, and handing it to another.

One runner per pipeline writes to the store at a time: it holds the pipeline's
:class:`~nbpipe.store.RunnerLock`. :func:`take` takes it, or waits while another process (a
script, the detached runner ``nbpipe retry`` started) runs the pipeline; :func:`hand_over`
gives unfinished tasks to a detached runner (their specs written by :mod:`nbpipe.specs`, then
``nbpipe spawn``).
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from .errors import PipelineBusy
from .specs import spawn, write_specs
from .states import State

if TYPE_CHECKING:
    from .pipeline import Pipeline
    from .store import RunnerLock

__all__ = ["hand_over", "reopen", "take"]

WAIT_STEP = 0.5  # seconds between two tries at a lock another runner holds


def take(lock: RunnerLock, wait_for_runner: bool, timeout: float | None) -> None:
    """Take the pipeline's runner lock; with ``wait_for_runner``, wait while another process
    runs the pipeline (up to ``timeout`` seconds). :class:`~nbpipe.PipelineBusy` says which
    process holds it and how to wait for it."""
    deadline = None if timeout is None else time.monotonic() + timeout
    told = False
    while True:
        try:
            lock.acquire()
            return
        except PipelineBusy as exc:
            if not wait_for_runner:
                raise PipelineBusy(
                    f"{exc}; to wait for that runner and then run what it left, use "
                    "pipe.run(wait_for_runner=True)"
                ) from None
            if deadline is not None and time.monotonic() >= deadline:
                raise PipelineBusy(
                    f"{exc}; still so after waiting {timeout} s (wait_for_runner=True)"
                ) from None
            if not told:  # a script that seems to hang says why
                print(f"nbpipe: {str(exc).split(';')[0]}; waiting for it to finish "
                      "(wait_for_runner=True)", file=sys.stderr, flush=True)
                told = True
            time.sleep(WAIT_STEP)


def hand_over(pipe: Pipeline) -> int:
    """Write the specs of ``pipe``'s unfinished tasks (what they need included) and start a
    detached runner (``nbpipe spawn``) for them; return its pid. Refused while this process
    runs the pipeline."""
    if pipe.runner is not None and pipe.runner.alive:
        raise PipelineBusy(f"pipeline {pipe.name!r} is running in this process already; "
                           "wait for it (or pause it) before detaching")
    pipe.resolve()
    write_specs(pipe, [r for r in pipe.closure(pipe.refs()) if r.state is not State.SUCCEEDED])
    return spawn(pipe.store, pipe.name)


def reopen(pipe: Pipeline, name: str, store: Any = None) -> Pipeline:
    """What ``pipe.reopen`` does: pipeline ``name`` (of ``store``, default ``pipe``'s) takes
    ``pipe``'s cluster over and ``pipe`` closes (its runner stops, its lock given back).
    Refused while tasks of ``pipe`` run."""
    runner = pipe.runner
    if runner is not None and runner.alive and runner.in_flight():
        raise PipelineBusy(
            f"pipeline {pipe.name!r}: {runner.in_flight()} task(s) are running; wait for them "
            f"(pipe.wait(), %pipeline wait) or kill them before switching to pipeline {name!r}"
        )
    new = type(pipe)(name, store=store if store is not None else pipe.store, cluster=pipe.cluster)
    with pipe.graph.lock:
        connection = pipe.cluster_handle.take()
    pipe.close()  # the runner (its lock given back); the cluster now belongs to `new`
    new.cluster_handle.started = connection
    return new
