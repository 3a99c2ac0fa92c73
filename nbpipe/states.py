"""Task states and which of them are final."""

from __future__ import annotations

from enum import Enum


class State(str, Enum):
    """The state of a task; the value is what the store and the command line show."""

    WAITING = "WAITING"  #: registered; waits for its upstream tasks or for a runner
    PENDING = "PENDING"  #: submitted to Dask, not started yet
    RUNNING = "RUNNING"  #: running on a worker
    SUCCEEDED = "SUCCEEDED"  #: finished; its result file is recorded
    FAILED = "FAILED"  #: raised (after all its retries)
    UPSTREAM_FAILED = "UPSTREAM_FAILED"  #: not run because an upstream task failed
    KILLED = "KILLED"  #: stopped on request

    def __str__(self) -> str:
        return self.value

    @property
    def final(self) -> bool:
        """True for states a task stays in until it is retried or re-registered."""
        return self in FINAL


FINAL = frozenset({State.SUCCEEDED, State.FAILED, State.UPSTREAM_FAILED, State.KILLED})
BAD = frozenset({State.FAILED, State.UPSTREAM_FAILED, State.KILLED})
