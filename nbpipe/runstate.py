"""A task's run state as one immutable record: ``TaskRef.run_state``.

The runner thread changes a task's state, attempts, error and result file while the kernel, the
sidebar's widget and the user's code read them from other threads. Each change therefore makes a
new :class:`RunState` and stores it with one assignment: a reader takes the record once and sees
one consistent moment (never SUCCEEDED with no result file yet, nor a new state with the error of
another attempt), without a lock.

>>> from nbpipe.runstate import RunState
>>> from nbpipe.states import State
>>> run = RunState()
>>> run.state, run.attempts
(<State.WAITING: 'WAITING'>, 0)
>>> sent = run.but(state=State.PENDING, attempts=1)
>>> done = sent.succeeded(("/store/results/ab.pkl", "xxh3:00"))
>>> done.state, done.attempts, done.result_file[0], run.state
(<State.SUCCEEDED: 'SUCCEEDED'>, 1, '/store/results/ab.pkl', <State.WAITING: 'WAITING'>)
>>> run.but(colour="red")  # doctest: +ELLIPSIS
Traceback (most recent call last):
    ...
TypeError: RunState has no field 'colour'; its fields are state, attempts, budget, error, ...
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .states import State

__all__ = ["FIELDS", "FIELD_DOCS", "RunState"]


# A NamedTuple, not a frozen dataclass: the runner makes a few of these per task and attempt on
# its hot path, and building a tuple costs about a third of ``dataclasses.replace``. It is just
# as immutable, and its fields read as fast as slots.
class RunState(NamedTuple):
    """Where a task is in its run: one immutable record, replaced whole on every change.

    ``error``, ``traceback`` and ``exception`` always describe one and the same failure: the
    one that ended the task (FAILED, KILLED, UPSTREAM_FAILED), or, while a retry waits or runs,
    the attempt before it. ``result_file`` is set exactly when the state is SUCCEEDED.
    """

    state: State = State.WAITING
    attempts: int = 0
    budget: int = 0
    error: str | None = None
    exception: bytes | None = None
    traceback: str | None = None
    result_file: tuple[str, str] | None = None
    reason: str | None = None
    worker: str | None = None

    def but(self, **changes: Any) -> RunState:
        """A copy with ``changes`` made: ``run.but(state=State.RUNNING, worker=address)``."""
        values = list(self)
        try:
            for name, value in changes.items():
                values[_INDEX[name]] = value
        except KeyError as exc:  # (a typo in nbpipe itself: say which names exist)
            raise TypeError(f"RunState has no field {exc.args[0]!r}; its fields are "
                            f"{', '.join(FIELDS)}") from None
        return tuple.__new__(RunState, values)

    def succeeded(self, result_file: tuple[str, str], **changes: Any) -> RunState:
        """SUCCEEDED with its result file, and no failure left over from an earlier attempt."""
        return self.but(state=State.SUCCEEDED, result_file=result_file, error=None,
                        traceback=None, exception=None, **changes)

    def ended(self, state: State, error: str | None, traceback: str | None = None,
              exception: bytes | None = None, **changes: Any) -> RunState:
        """An attempt or the task ended otherwise than SUCCEEDED: ``state`` is FAILED, KILLED,
        UPSTREAM_FAILED, or WAITING for a retry; the failure fields are this failure's only."""
        return self.but(state=state, error=error, traceback=traceback, exception=exception,
                        result_file=None, **changes)

    def retried(self, reason: str) -> RunState:
        """WAITING to run again by request (``retry``): its old result and failure are dropped,
        and its ``retries`` count from the attempts made so far."""
        return self.but(state=State.WAITING, result_file=None, budget=self.attempts, error=None,
                        traceback=None, exception=None, reason=reason)

    @property
    def retries_used(self) -> int:
        """Attempts made since the last retry by request."""
        return self.attempts - self.budget


#: The names of the fields, in order.
FIELDS: tuple[str, ...] = tuple(RunState.__annotations__)
_INDEX = {name: i for i, name in enumerate(FIELDS)}

#: What each field means; also the docstrings of ``TaskRef.state``, ``TaskRef.error``...
FIELD_DOCS = {
    "state": "WAITING, PENDING, RUNNING, or a final state (see :class:`~nbpipe.states.State`).",
    "attempts": "Attempts made so far (also those of earlier runs recorded in the store).",
    "budget": "Attempts made before the last retry by request: ``retries`` count from there.",
    "error": "The message of the failure (see :class:`RunState`), None when there is none.",
    "exception": "The task's own exception, pickled, when the failure was one it raised.",
    "traceback": "The traceback of that exception on its worker.",
    "result_file": "``(path, checksum)`` of a SUCCEEDED task's result, else None.",
    "reason": "Why the task runs (or was taken as done), e.g. ``'found done'``.",
    "worker": "The address of the worker running the current attempt, once it started.",
}
for _name, _doc in FIELD_DOCS.items():
    getattr(RunState, _name).__doc__ = _doc
