"""Outcomes: what a run reports, waiting for tasks, and a finished task's value or error.

Given the task records a runner keeps up to date, these say what ``pipe.run()`` did
(:class:`RunSummary`), wait until tasks end (:func:`wait_for`, raising what stopped a runner),
read a result (:func:`load`) and turn a task that did not succeed into the exception its
reader gets (:func:`raise_outcome`: the task's own exception, with its worker's traceback as
the cause). Nothing here starts or steers a runner.

>>> str(RunSummary({"SUCCEEDED": 2}, [], 1, 1))
'1 executed, 1 already done (2 SUCCEEDED)'
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

import cloudpickle

from .errors import InvalidArgument, NbpipeError, StoreDamaged, TaskFailed, TaskKilled, UpstreamFailed
from .results import INLINE, read_result
from .states import State

if TYPE_CHECKING:
    from .runner import Runner
    from .store import Store
    from .task import TaskRef

__all__ = ["RemoteTraceback", "RunSummary", "TaskInfo", "load", "raise_outcome", "stopped",
           "summarize", "wait_for", "wanted_state"]


class TaskInfo(NamedTuple):
    """One row of ``pipe.tasks()``."""

    name: str
    key: str
    label: str
    state: str
    attempts: int
    error: str | None
    reason: str | None = None

    @classmethod
    def of(cls, ref: TaskRef) -> TaskInfo:
        """The row of a task registered in this process."""
        return cls(ref.name, ref.key, ref.label, ref.state.value, ref.attempts, ref.error,
                   ref.reason)

    @classmethod
    def of_row(cls, row: Any) -> TaskInfo:
        """The row of a task as the store records it (its columns have these names)."""
        return cls(*(row[field] for field in cls._fields))


def wanted_state(state: str | State | None, asked: str) -> str | None:
    """The state value a listing keeps (None: every one); :class:`~nbpipe.InvalidArgument`
    naming what was ``asked`` for a state that does not exist."""
    try:
        return State(state).value if state is not None else None
    except ValueError:
        raise InvalidArgument(f"{asked} is not a state; use one of "
                              f"{', '.join(s.value for s in State)}") from None


class RunSummary(NamedTuple):
    """What ``pipe.run()`` did: counts by state, failed task labels, how many ran.

    ``executed`` counts the tasks this process ran for the call -- also those a ``ref.result()``
    ran before it -- and ``cached`` the ones found done; a task is reported executed once.
    """

    counts: dict[str, int]
    failed: list[str]
    executed: int
    cached: int
    paused: bool = False

    @property
    def ok(self) -> bool:
        """True when every task of the run succeeded."""
        return not self.failed and set(self.counts) <= {State.SUCCEEDED.value}

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items()))
        text = f"{self.executed} executed, {self.cached} already done ({counts or 'no tasks'})"
        if self.failed:
            text += f"; failed: {', '.join(self.failed[:10])}"
            if len(self.failed) > 10:
                text += f" and {len(self.failed) - 10} more"
        if self.paused:
            text += "; the pipeline is paused (pipe.resume() to continue)"
        return text


class RemoteTraceback(Exception):
    """The traceback of a task's exception on its worker (set as the exception's cause)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def stopped(runner: Runner) -> NbpipeError:
    """What waiting on a runner that stopped on an error raises: a damaged store's own
    :class:`StoreDamaged` (every door tells a damaged store the same way), else the runner's
    :class:`RunnerError` naming the cause."""
    if isinstance(runner.error, StoreDamaged):
        return runner.error
    assert runner.fatal is not None
    return runner.fatal


def summarize(refs: list[TaskRef], ran: set[TaskRef], paused: bool, report: bool = True
              ) -> RunSummary:
    """Counts of ``refs``; *executed* are those in ``ran`` (this process ran them since a
    summary last reported them finished, a task run by ``ref.result()`` before ``run()``
    included), *already done* the others that succeeded. With ``report``, the finished ones
    leave ``ran``: each execution is reported once."""
    counts = Counter(r.state.value for r in refs)
    failed = [r.label for r in refs if r.state in (State.FAILED, State.KILLED)]
    # (held back by a pause before it started, or a late task found done once its upstream
    # content was known: it did not run)
    executed = [r for r in refs if r in ran and not (paused and r.state is State.WAITING)
                and r.reason != "found done"]
    cached = sum(r.state is State.SUCCEEDED for r in refs) - sum(
        r.state is State.SUCCEEDED for r in executed)
    if report:
        ran.difference_update([r for r in executed if r.state.final])
    return RunSummary(dict(counts), failed, len(executed), cached, paused)


def wait_for(runner: Runner, refs: list[TaskRef], timeout: float | None, pipeline: str) -> None:
    """Wait until every one of ``refs`` ended, the runner stopped, or a pause leaves none of
    them running; :class:`TimeoutError` after ``timeout`` seconds (the tasks keep running), and
    what stopped the runner (:func:`stopped`) when it stopped on an error."""
    deadline = None if timeout is None else time.monotonic() + timeout
    cursor = 0  # tasks end roughly in order: skip what ended, look at the rest later
    with runner.changed:
        while True:
            while cursor < len(refs) and refs[cursor].state.final:
                cursor += 1
            if runner.fatal is not None:
                raise stopped(runner)
            # (ended, but not yet recorded while the store fails: wait for it, or its end)
            if (cursor == len(refs) and runner.error is None) or not runner.alive:
                return
            if runner.paused and not any(r.state in (State.PENDING, State.RUNNING)
                                         for r in refs[cursor:]):
                return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                unfinished = sum(not r.state.final for r in refs)
                raise TimeoutError(
                    f"{unfinished} task(s) of pipeline {pipeline!r} not finished after "
                    f"{timeout} s (e.g. {refs[cursor].label}); they keep running"
                )
            runner.changed.wait(0.5 if left is None else min(0.5, left))


def load(ref: TaskRef, runner: Runner | None, store: Store) -> Any:
    """The value of a SUCCEEDED task, read from its result file (checked against its
    checksum), or, for a small inline result, from ``runner``'s memory or the store."""
    result_file = ref.result_file
    assert result_file is not None
    path, checksum = result_file
    data = None
    if path == INLINE:
        data = runner.inline_data(ref.key) if runner is not None else store.result_data(ref.key)
    return read_result(path, checksum, data)


def raise_outcome(ref: TaskRef) -> NoReturn:
    """Raise what reading a task that did not succeed raises: a failed task's own exception
    (its worker's traceback as the cause) or :class:`~nbpipe.TaskFailed`,
    :class:`~nbpipe.UpstreamFailed`, :class:`~nbpipe.TaskKilled`, else an error saying the task
    has not ended (the pipeline is paused)."""
    run = ref.run_state  # one record: the exception, traceback and error of the same failure
    if run.state is State.FAILED:
        if run.exception is not None:
            try:
                exc = cloudpickle.loads(run.exception)
            except Exception:
                exc = None
            if isinstance(exc, BaseException):
                if run.traceback:
                    exc.__cause__ = RemoteTraceback(
                        f"\nTraceback of task {ref.label!r} on its worker:\n{run.traceback}")
                raise exc
        raise TaskFailed(f"task {ref.label!r} failed: {run.error}\n{run.traceback or ''}",
                         [ref.label])
    if run.state is State.UPSTREAM_FAILED:
        raise UpstreamFailed(f"task {ref.label!r} did not run: {run.error}", [ref.label])
    if run.state is State.KILLED:
        raise TaskKilled(f"task {ref.label!r} was killed")
    raise NbpipeError(f"task {ref.label!r} is {run.state.value} (the pipeline is paused?)")
