"""Launching a run: what ``pipe.run()`` hands to the runner, and what it reports back.

A run's plan (:func:`plan`) is the closure of its targets minus what ``skip=`` leaves out (and
what depends on that). Within it, tasks that failed or were killed before are reset to run
again, a task whose output file was deleted is looked at again, and ``keep_succeeded`` and
``trust_existing`` take as done what they may (:mod:`nbpipe.runmodes`). What is left WAITING is
the run's todo. :func:`run` hands the todo to the pipeline's runner -- started only when there
is something to do and the pipeline is not paused -- waits for it and sums the run up
(:class:`~nbpipe.RunSummary`). :func:`result` reads a task's value, computing a result found
corrupt again, once.

Every function takes the :class:`~nbpipe.Pipeline` and uses its public names only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from . import runmodes
from .errors import ResultCorrupt, TaskFailed
from .outcomes import RunSummary, load, raise_outcome, stopped, summarize, wait_for
from .policy import run_mode
from .states import BAD, State
from .task import TaskRef

if TYPE_CHECKING:
    from .pipeline import Pipeline
    from .runner import Runner

__all__ = ["hand", "plan", "result", "run", "summary", "unsubmitted", "wait"]


def plan(pipe: Pipeline, targets: Iterable[TaskRef] | None, modes: dict[str, Any],
         report: bool = False) -> tuple[list[TaskRef], list[TaskRef]]:
    """The tasks of a run of ``targets`` (None: every task) and, of those, what is to run.

    ``modes`` are the run modes of :meth:`Pipeline.run` (``skip``, ``keep_succeeded``,
    ``trust_existing``); with ``report``, the labels ``skip`` left out become ``pipe.skipped``.
    Returns ``(refs, todo)``: every task the run's summary counts, and the WAITING ones among
    them.
    """
    pipe.graph.rekey_changed()
    pipe.resolve(targets)
    refs = pipe.closure(targets if targets is not None else pipe.refs())
    left_out = runmodes.skipped(refs, modes.get("skip"))  # i20: run modes (nbpipe.runmodes)
    if left_out:
        refs = [r for r in refs if r not in left_out]
    if report:
        pipe.skipped = {r.label for r in left_out}
    for r in refs:  # what failed or was killed before runs again
        if r.state in BAD:
            r.queued = False
            r.update(state=State.WAITING, budget=r.attempts)
    gone = [r for r in refs if r.state is State.SUCCEEDED and r.out_files
            and not all(p.exists() for p in r.out_files)]
    if gone:  # an output file was deleted since the task ran here: it runs again, saying so
        with pipe.graph.lock:
            pipe.freshness.find_done(gone)
    with pipe.graph.lock:
        if run_mode("keep-succeeded", modes.get("keep_succeeded")):
            runmodes.keep_succeeded(pipe, refs)
        runmodes.adopt_existing(pipe, refs, run_mode("trust-existing", modes.get("trust_existing")))
    return refs, [r for r in refs if r.state is State.WAITING]


def hand(pipe: Pipeline, runner: Runner, todo: list[TaskRef], new: bool,
         stop_on_failure: bool | None = None) -> list[TaskRef]:
    """Hand ``todo`` to ``runner`` (``new``: started for this run); return what it was handed.

    A new runner may have waited for another process that ran some of ``todo`` meanwhile:
    those are found done instead. A task no worker pool can hold fails here, before any runs.
    """
    if new:
        todo = pipe.freshness.found_since(todo)
    runner.check(todo)
    runner.stop_on_failure = run_mode("stop-on-failure", stop_on_failure)
    for r in todo:
        r.queued = True
    pipe.ran.update(todo)
    runner.add(todo)
    return todo


def run(pipe: Pipeline, targets: Iterable[TaskRef] | TaskRef | None, *, wait: bool,
        check: bool = False, timeout: float | None = None, wait_for_runner: bool = False,
        report: bool = False, modes: dict[str, Any] | None = None) -> RunSummary:
    """:meth:`Pipeline.run`; ``report=False`` for the runs nbpipe makes itself
    (``ref.result()``, ``retry()``): what they execute is counted by the user's next ``run()``."""
    if isinstance(targets, TaskRef):
        targets = [targets]
    modes = modes or {}
    refs, todo = plan(pipe, targets, modes, report)
    live = pipe.runner is not None and pipe.runner.alive
    paused = pipe.runner.paused if live else pipe.paused
    if todo and (live or not paused):  # a paused pipeline starts no cluster for nothing
        runner = pipe.start_runner(wait_for_runner, timeout)
        todo = hand(pipe, runner, todo, not live, modes.get("stop_on_failure"))
        paused = runner.paused
    runner = pipe.runner
    if wait and runner is not None and runner.alive and not paused \
            and any(not r.state.final for r in refs):
        wait_for(runner, refs, timeout, pipe.name)
    if wait and todo and runner is not None and runner.fatal is not None:
        raise stopped(runner)  # it stopped before the wait began
    done = summary(pipe, refs, report)
    if check and done.failed:
        raise TaskFailed(
            f"pipeline {pipe.name!r}: {len(done.failed)} task(s) failed: "
            f"{', '.join(done.failed[:10])}; see pipe.tasks(state='FAILED') and "
            "ref.result() for their errors",
            done.failed,
        )
    return done


def summary(pipe: Pipeline, refs: list[TaskRef], report: bool = True) -> RunSummary:
    """What ``refs`` came to (see :func:`nbpipe.outcomes.summarize`); with ``report``, each
    task this process executed is reported once."""
    runner = pipe.runner
    paused = runner.paused if runner is not None else pipe.paused
    return summarize(refs, pipe.ran, paused, report)


def unsubmitted(pipe: Pipeline) -> list[TaskRef]:
    """The tasks of ``pipe`` registered in this process that no runner has."""
    runner = pipe.runner
    live = runner is not None and runner.alive
    return [r for r in pipe.refs() if r.state is State.WAITING and not (live and runner.was_handed(r))]


def wait(pipe: Pipeline, timeout: float | None = None) -> RunSummary:
    """Wait until every task handed to ``pipe``'s runner ended; sum them up."""
    waiting = set(unsubmitted(pipe))
    refs = [r for r in pipe.refs() if r not in waiting]
    if pipe.runner is not None:
        wait_for(pipe.runner, refs, timeout, pipe.name)
    return summary(pipe, refs)


def result(pipe: Pipeline, ref: TaskRef, timeout: float | None = None) -> Any:
    """The value of ``ref``, running it (and what it needs) first when it has not ended; a
    result file found corrupt is forgotten and computed again, once. A task that did not
    succeed raises what :func:`nbpipe.outcomes.raise_outcome` raises."""
    if not ref.state.final or ref.state in BAD and ref.exception is None and ref.error is None:
        run(pipe, [ref], wait=True, timeout=timeout)
    if ref.state is State.SUCCEEDED:
        try:
            return load(ref, pipe.runner, pipe.store)
        except ResultCorrupt:  # computed again, once
            pipe.store.forget_result(ref.key)
            ref.update(state=State.WAITING, result_file=None)
            ref.key_ = None
            pipe.resolve([ref])
            run(pipe, [ref], wait=True, timeout=timeout)
            if ref.state is State.SUCCEEDED and ref.result_file is not None:
                return load(ref, pipe.runner, pipe.store)
    raise_outcome(ref)
