"""What a running task can know about itself: ``nbpipe.context()``.

>>> from nbpipe import task, context
>>> @task
... def long_job(n: int) -> int:
...     ctx = context()
...     for i in range(n):
...         if ctx.should_stop():      # the worker got SIGTERM: walltime or preemption
...             break
...     return i
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from .errors import NotInTask
from .schedulers import SCHEDULERS

__all__ = ["TaskContext", "batch_job_id", "context", "stop_requested"]

_local = threading.local()
_stop = threading.Event()


def stop_requested() -> threading.Event:
    """The worker-wide event set when the worker process receives SIGTERM."""
    return _stop


@dataclass(frozen=True)
class TaskContext:
    """Information about the task running in this thread."""

    name: str
    key: str
    label: str
    attempt: int
    pipeline: str
    worker: str | None = None
    job_id: str | None = field(default_factory=lambda: batch_job_id())

    def should_stop(self) -> bool:
        """True once the worker received SIGTERM (walltime, preemption): save and return soon."""
        return _stop.is_set()


#: Environment variables holding the batch job id, per scheduler (see :mod:`nbpipe.schedulers`).
JOB_ID_VARIABLES = tuple(s.job_id_variable for s in sorted(SCHEDULERS.values(),
                                                           key=lambda s: s.job_id_generic)
                         if s.job_id_variable)


def batch_job_id() -> str | None:
    """The id of the batch job (Slurm, PBS, LSF, SGE, HTCondor) this process runs in, if any."""
    for name in JOB_ID_VARIABLES:
        value = os.environ.get(name)
        if value:
            return value
    return None


def context() -> TaskContext:
    """The :class:`TaskContext` of the task running in the current thread.

    Raises :class:`~nbpipe.errors.NotInTask` when called outside a task.
    """
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        raise NotInTask("nbpipe.context() is only available inside a running task")
    return ctx


def _set(ctx: TaskContext | None) -> None:
    _local.ctx = ctx
