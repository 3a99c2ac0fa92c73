"""Steering a pipeline -- pause, resume, kill, retry, delete -- with nothing but its store.

One :class:`Controller` serves every door: :class:`~nbpipe.Pipeline` methods, the ``nbpipe``
command and the sidebar's REST API. It needs only the store: a pipeline whose ``nbpipe.yaml``
or cluster is broken can still be paused, killed and retried.

When a runner is attached (in a kernel, a script or a detached runner), commands go through the
store's command table and the runner applies them; without one, the store is changed directly,
with the same rules (:func:`retry_set`, :func:`blocked`), and for ``retry`` and ``resume`` a
detached runner (``nbpipe spawn``) can be started so the requested work happens.

>>> from nbpipe.control import Controller
>>> Controller(".nbpipe", "pi").retry(failed=True)        # doctest: +SKIP
'retrying 2 task(s)'
>>> from nbpipe.control import steer
>>> steer(".nbpipe", "pi", "retry", failed=True)          # doctest: +SKIP
{'pipeline': 'pi', 'verb': 'retry', 'runner': 'attached', 'spawned': None}
"""

from __future__ import annotations

import os
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, TypeVar

from . import queries
from .errors import NbpipeError, UnknownTask
from .graph import reach
from .naming import find_tasks, row_fields
from .results import result_path
from .states import BAD, State
from .store import Batch, RunnerLock, Store

__all__ = ["VERBS", "Controller", "blocked", "killed_message", "open_pipeline", "retry_set",
           "steer"]

#: What can be asked of a pipeline from outside.
VERBS = ("retry", "kill", "pause", "resume")

#: The reason and event message of a task reset by a retry (in every door).
RETRY_REASON = "retry requested"

T = TypeVar("T", bound=Hashable)


# -- the rules, shared by the runner (live tasks) and the controller (store rows) ---------------

def retry_set(targets: Iterable[T], state: Callable[[T], State],
              children: Callable[[T], Iterable[T]],
              busy: Callable[[T], bool] = lambda _: False) -> list[T]:
    """What a retry of ``targets`` resets: each target not running now (nor in a runner's
    hands, ``busy``), and every task downstream that it blocked (failed, upstream-failed or
    killed ones, transitively). Succeeded dependents are kept: they run again only if their key
    changes."""
    starts = [t for t in dict.fromkeys(targets)
              if state(t) not in (State.PENDING, State.RUNNING) and not busy(t)]
    return reach(starts, children, follow=lambda t: state(t) in BAD)


def blocked(killed: Iterable[T], state: Callable[[T], State],
            children: Callable[[T], Iterable[T]]) -> list[T]:
    """The waiting tasks downstream of ``killed`` ones: they become UPSTREAM_FAILED."""
    killed = list(killed)
    found = reach(killed, children, follow=lambda t: state(t) is State.WAITING)
    return found[len(killed):]


def killed_message(label: str, started: bool) -> str:
    """The error a killed task carries, the same whichever door killed it."""
    return (f"task {label!r} was killed on request" if started
            else f"task {label!r} was killed before it started")


def upstream_message(label: str, state: State | str) -> str:
    """The error of a task that did not run because an upstream task ended badly."""
    return f"upstream task {label!r} is {State(state).value}"


class Controller:
    """Steer pipeline ``name`` of ``store`` from any process: Python, the CLI, the sidebar.

    ``local`` is, for a :class:`~nbpipe.Pipeline`, a function giving its own runner (or None):
    commands to it are waited for, so a call returns once they are applied. ``refs`` gives that
    pipeline's tasks in this process: without a runner, a retry or kill changes them as it
    changes the store, as a runner changes its own (one behaviour from every door).

    >>> c = Controller(".nbpipe", "pi")      # doctest: +SKIP
    >>> c.pause(); c.paused                   # doctest: +SKIP
    True
    """

    def __init__(self, store: Store | str | os.PathLike[str], name: str,
                 local: Callable[[], Any] | None = None, refs: Callable[[], Iterable[Any]] = tuple):
        self.store = store if isinstance(store, Store) else Store(store)
        self.name = name
        # an unknown pipeline is an error (UnknownPipeline-style), not a new one
        self.pipeline_id = self.store.pipeline_id(name, create=False)
        self._local = local
        self._refs = refs

    def __repr__(self) -> str:
        return f"<Controller {self.name!r} store={str(self.store.path)!r}>"

    # -- who listens ----------------------------------------------------------------------------

    def local_runner(self) -> Any:
        """The live runner of the Pipeline this controller belongs to, if any."""
        runner = self._local() if self._local is not None else None
        return runner if runner is not None and runner.alive else None

    def attached(self) -> bool:
        """True when a runner (here or in another process) picks commands up."""
        return self.local_runner() is not None or RunnerLock(self.store, self.name).busy()

    @property
    def paused(self) -> bool:
        """Whether the pipeline is paused."""
        return self.store.is_paused(self.pipeline_id)

    def command(self, verb: str, **args: Any) -> str:
        """Post a command to the attached runner; when it runs in this process, wait (up to 30 s)
        until it is handled. Returns the command's status (``posted`` for another process)."""
        command_id = self.store.post_command(self.pipeline_id, verb, **args)
        runner = self.local_runner()
        if runner is None:
            return "posted"
        runner.poke()
        deadline = time.monotonic() + 30
        while self.store.command_status(command_id) == "new" and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.store.command_status(command_id)

    # -- naming tasks ---------------------------------------------------------------------------

    def rows(self) -> dict[str, Any]:
        """The pipeline's active task rows, by key."""
        return self.store.task_rows(self.pipeline_id)

    def keys(self, tasks: Iterable[str]) -> list[str]:
        """The keys of tasks named by name, label or key prefix (every match of each)."""
        rows = None
        keys: list[str] = []
        for t in tasks:
            if rows is None:
                rows = list(self.rows().values())
            matches = [r["key"] for r in find_tasks(t, rows, *row_fields)]
            if not matches:
                raise UnknownTask(f"no task {t!r} in pipeline {self.name!r}; see pipe.tasks()")
            keys.extend(matches)
        return list(dict.fromkeys(keys))

    def _graph(self) -> tuple[dict[str, Any], Callable[[str], list[str]]]:
        rows = self.rows()
        children: dict[str, list[str]] = defaultdict(list)
        for edge in queries.graph(self.store, self.name)["edges"]:
            children[edge["parent"]].append(edge["child"])
        return rows, lambda k: children.get(k, [])

    # -- verbs ----------------------------------------------------------------------------------

    def pause(self) -> str:
        """Start no new task; running tasks finish."""
        if self.attached():
            return self.command("pause")
        self.store.set_paused(self.pipeline_id, True)
        return "paused"

    def resume(self) -> str:
        """Start tasks again after :meth:`pause`."""
        if self.attached():
            return self.command("resume")
        self.store.set_paused(self.pipeline_id, False)
        return "resumed"

    def retry(self, keys: Sequence[str] = (), *, failed: bool = False) -> str:
        """Run tasks again (by key), with every task they blocked; ``failed=True`` adds every
        failed or killed task. The stored result of a retried task is forgotten, so no runner
        takes the old one for it: it runs again."""
        if not keys and not failed:
            raise NbpipeError("retry needs task names, or failed=True for every failed task")
        if self.attached():
            return self.command("retry", keys=list(keys), failed=failed)
        return f"retrying {len(self.reset_for_retry(keys, failed=failed))} task(s)"

    def reset_for_retry(self, keys: Sequence[str], *, failed: bool = False) -> list[str]:
        """Without a runner: reset in the store (and in this process's tasks) what a retry of
        ``keys`` resets; return those keys. (A runner does the same with :func:`retry_set` and
        :func:`forget_results`.)"""
        rows, children = self._graph()
        targets = [k for k in keys if k in rows]
        if failed:
            targets += [k for k, r in rows.items() if r["state"] in (State.FAILED.value,
                                                                    State.KILLED.value)]
        reset = retry_set(targets, lambda k: State(rows[k]["state"]) if k in rows else State.WAITING,
                          children)
        reset = [k for k in reset if k in rows]
        forget_results(self.store, [k for k in reset if rows[k]["state"] == State.SUCCEEDED.value])
        batch = Batch()
        for key in reset:
            batch.state(self.pipeline_id, key, State.WAITING.value, attempts=rows[key]["attempts"],
                        reason=RETRY_REASON, message=RETRY_REASON)
        self.store.write(batch)
        chosen = set(reset)
        for r in self._refs():
            if r.key_ in chosen:  # as a runner resets its own: the old result is not taken
                r.run_state, r.queued = r.run_state.retried(RETRY_REASON), False
        return reset

    def kill(self, keys: Sequence[str] = (), *, all: bool = False) -> str:
        """Stop tasks (by key; ``all=True``: every unfinished one). Waiting tasks downstream of
        a killed one become UPSTREAM_FAILED; finished tasks are left as they are."""
        if not keys and not all:
            raise NbpipeError("kill needs task names, or all=True for every unfinished task")
        if all:
            keys = [k for k, r in self.rows().items() if not State(r["state"]).final]
        if self.attached():
            return self.command("kill", keys=list(keys))
        return f"killing {len(self.kill_offline(keys))} task(s)"

    def kill_offline(self, keys: Sequence[str]) -> dict[str, tuple[State, str]]:
        """Without a runner: mark unfinished ``keys`` KILLED and what waits on them
        UPSTREAM_FAILED, in the store and in this process's tasks; return {key: (state, error)}
        of every task changed."""
        rows, children = self._graph()
        killed = [k for k in dict.fromkeys(keys) if k in rows and not State(rows[k]["state"]).final]
        changed: dict[str, tuple[State, str]] = {}
        for k in killed:
            started = rows[k]["state"] == State.RUNNING.value
            changed[k] = (State.KILLED, killed_message(rows[k]["label"], started))
        # each blocked task names the killed task it waits on
        for k in killed:
            for child in blocked([k], lambda c: State(rows[c]["state"]) if c in rows else State.SUCCEEDED,
                                 children):
                if child not in changed:
                    changed[child] = (State.UPSTREAM_FAILED,
                                      upstream_message(rows[k]["label"], State.KILLED))
        batch = Batch()
        for key, (state, error) in changed.items():
            batch.state(self.pipeline_id, key, state.value, attempts=rows[key]["attempts"],
                        error=error)
        self.store.write(batch)
        for r in self._refs():
            if r.key_ in changed:
                r.run_state = r.run_state.ended(*changed[r.key_])
        return changed

    def delete(self, *, force: bool = False) -> dict[str, int]:
        """Delete the pipeline's records (results stay for ``gc``); without force, only count.
        Refused (PipelineBusy) while a runner is live."""
        return queries.delete_pipeline(self.store, self.name, force=force)

    def spawn_if_idle(self) -> int | None:
        """Without a runner anywhere, start a detached one for unfinished tasks; return its pid."""
        from .specs import spawn

        if self.attached():
            return None
        unfinished = [r for r in self.rows().values() if r["state"] != State.SUCCEEDED.value]
        return spawn(self.store, self.name) if unfinished else None


def forget_results(store: Store, keys: Iterable[str]) -> None:
    """Forget the stored results of retried tasks: no runner may take them for the new run."""
    for key in keys:
        store.forget_result(key)
        # its file too: else it is adopted again at once (an accepted result would stay)
        result_path(store.path, key).unlink(missing_ok=True)


def local_runner_of(pipe: Any) -> Callable[[], Any]:
    """A function giving ``pipe``'s runner that keeps no reference to ``pipe``."""
    ref = weakref.ref(pipe)

    def runner() -> Any:
        p = ref()
        return p.runner if p is not None else None

    return runner


def open_pipeline(store: Store | str | os.PathLike[str], name: str) -> Controller:
    """A controller of an existing pipeline (an error names a wrong one); nothing of the
    pipeline's cluster or configuration is read."""
    return Controller(store, name)


def steer(store: Store | str | os.PathLike[str], pipeline: str, verb: str, tasks: Sequence[str] = (),
          *, failed: bool = False, all: bool = False, start_runner: bool = True) -> dict[str, Any]:
    """Ask ``pipeline`` to ``retry``, ``kill``, ``pause`` or ``resume`` (tasks by name or label)."""
    if verb not in VERBS:
        raise NbpipeError(f"unknown command {verb!r}; use one of {', '.join(VERBS)}")
    control = Controller(store, pipeline)
    attached = control.attached()
    keys = control.keys(tasks)
    if verb == "retry":
        control.retry(keys, failed=failed)
    elif verb == "kill":
        control.kill(keys, all=all)
    elif verb == "pause":
        control.pause()
    else:
        control.resume()
    spawned = control.spawn_if_idle() if start_runner and verb in ("retry", "resume") else None
    return {"pipeline": pipeline, "verb": verb, "runner": "attached" if attached else "none",
            "spawned": spawned}
