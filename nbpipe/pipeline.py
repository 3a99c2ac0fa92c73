"""Pipelines: a named graph of tasks, recorded in a store, run on Dask, resumed by content.

>>> import nbpipe
>>> pipe = nbpipe.Pipeline("pi", store=".nbpipe")      # doctest: +SKIP
>>> @pipe.task
... def fraction(seed: int) -> float: ...              # doctest: +SKIP
>>> refs = [fraction(seed=i) for i in range(20)]        # doctest: +SKIP
>>> pipe.run(check=True)                                # doctest: +SKIP

Running the same script again executes nothing that already succeeded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from . import current, launch, ownership, runmodes
from .cluster import ClusterHandle, Connection, validate
from .config import check_configured, setting
from .control import Controller, local_runner_of
from .current import current_pipeline, default_name, open_pipelines, use
from .errors import ClusterError, TaskDefinitionError
from .freshness import Freshness
from .outcomes import (
    RemoteTraceback,  # noqa: F401  (lives in nbpipe.outcomes; imported from here before)
    RunSummary,
    TaskInfo,
    wanted_state,
)
from .policy import check_defaults, run_skip
from .resolution import TaskGraph
from .runner import Runner
from .specs import spawn  # noqa: F401  (lives in nbpipe.specs; imported from here before)
from .states import State
from .store import RunnerLock, Store
from .store.postgres import is_url
from .task import TaskFunction, TaskRef, bash_task, task

__all__ = ["Pipeline", "RunSummary", "TaskInfo", "current_pipeline", "open_pipelines", "use"]


class Pipeline:
    """A named pipeline of tasks in a store, run on a Dask cluster.

    ``store`` is a directory (default ``$NBPIPE_STORE``, the ``store`` setting, else
    ``./.nbpipe``) or a PostgreSQL URL (``postgresql://user@host/db``, a store shared across
    hosts) with its result files in the folder ``results`` (default ``$NBPIPE_RESULTS``, the
    ``results-dir`` setting, else the folder the database recorded; see docs/store.md); ``cluster`` is
    ``None`` (the ``nbpipe.cluster`` setting, else local), ``"local"``, a batch scheduler kind
    (``"slurm"``, ``"pbs"``, ``"sge"``, ``"lsf"``, ``"htcondor"``) or a dict of its job options,
    a scheduler address, a dask Cluster or a Client (see :mod:`nbpipe.cluster`). The cluster
    starts when the first task runs. ``defaults={"retries": 2, "timeout": "1h"}`` applies to
    every task that does not set the option itself (see :mod:`nbpipe.policy`).
    ``max_concurrent`` caps how many of its tasks run at once (default: the
    ``nbpipe.max-concurrent`` setting, else no cap); detached runners keep it.
    """

    def __init__(self, name: str | None = None, store: str | os.PathLike[str] | Store | None = None,
                 cluster: Any = None, defaults: dict[str, Any] | None = None,
                 max_concurrent: int | None = None,
                 results: str | os.PathLike[str] | None = None):
        name = default_name() if name is None else name
        if not isinstance(name, str) or not name.strip():
            raise TaskDefinitionError(f"a pipeline needs a non-empty name, got {name!r}")
        if max_concurrent is not None and (isinstance(max_concurrent, bool) or not isinstance(
                max_concurrent, int) or max_concurrent < 1):
            raise TaskDefinitionError(
                f"pipeline {name!r}: max_concurrent={max_concurrent!r} must be a whole number "
                ">= 1 (tasks running at once), or None for no cap")
        self.max_concurrent = max_concurrent
        self.name = name
        self.defaults = check_defaults(defaults, f"Pipeline({name!r}, defaults=...)")
        # (the database setting: a store folder on a network file system keeps it on a local disk)
        if not isinstance(store, Store):
            store = store or os.environ.get("NBPIPE_STORE") or setting("store")
            if isinstance(store, str) and is_url(store):  # PostgreSQL: results-dir names its files' folder
                results = results or os.environ.get("NBPIPE_RESULTS") or setting("results-dir")
            store = Store(store, database=setting("database"), results=results)
        self.store = store
        self.pipeline_id = self.store.pipeline_id(name, source=default_name())
        #: Which tasks are done, and why the others run.
        self.freshness = Freshness(self.store, self.pipeline_id, name, lambda: self.graph.by_label)
        # A mistake (in the argument or the configured nbpipe.cluster) shows now, not when
        # tasks first run.
        check_configured()
        #: The cluster the tasks run on (checked now), connected when a task first runs.
        self.cluster_handle = ClusterHandle(cluster, self.store, self.pipeline_id)
        #: The tasks registered in this process: their dependencies and keys.
        self.graph = TaskGraph(self, name)
        # (the graph's own containers and lock, under the names the rest of this class uses)
        self._refs, self._by_label, self._lock = self.graph.refs, self.graph.by_label, self.graph.lock
        self._runner: Runner | None = None
        # Tasks this process ran (or handed to its runner) that no summary has reported as
        # finished yet: what `run()` counts as executed, also when a `ref.result()` ran them
        # before it. The runner adds what it submits on its own (retries, retry commands).
        self.ran: set[TaskRef] = set()
        #: Labels of the tasks the last ``run(skip=...)`` left out (``nbpipe run --skip``
        #: does not count their old failures in its exit status).
        self.skipped: set[str] = set()
        #: Pause, resume, kill, retry: the same steering as ``nbpipe`` and the sidebar use.
        self.control = Controller(self.store, name, local=local_runner_of(self), refs=self.graph.refs.values)
        current.opened(self)

    def __repr__(self) -> str:
        return f"<Pipeline {self.name!r} store={str(self.store.path)!r} tasks={len(self._refs)}>"

    # -- registration -------------------------------------------------------------------------

    def task(self, fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """``@pipe.task``: like :func:`nbpipe.task`, registering into this pipeline."""
        decorate = task(_pipeline=self, **options)
        return decorate(fn) if fn is not None else decorate

    def bash_task(self, fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """``@pipe.bash_task``: like :func:`nbpipe.bash_task`, registering into this pipeline."""
        decorate = bash_task(_pipeline=self, **options)
        return decorate(fn) if fn is not None else decorate

    def __enter__(self) -> Pipeline:
        current.enter(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        current.leave(self)

    # -- resolution (nbpipe.resolution) and freshness (nbpipe.freshness) -----------------------

    def resolve(self, refs: Iterable[TaskRef] | None = None) -> None:
        """Key new tasks (and ``refs``), find what is already done, record them in the store."""
        with self._lock:
            runner = self._runner
            held = runner.blockers if runner is not None and runner.alive else ()
            changed, retired = self.graph.resolve(refs, held)
            if changed:
                self.freshness.find_done(changed, retired)

    def settle_late(self, refs: list[TaskRef]) -> list[tuple[TaskRef, str]] | None:
        """Final keys for late tasks the runner found ready (see :meth:`Freshness.settle`);
        None when this pipeline is busy resolving in another thread (the runner tries again at
        its next tick)."""
        if not self._lock.acquire(timeout=0.05):
            return None
        try:
            return self.freshness.settle(refs)
        finally:
            self._lock.release()

    def start_runner(self, wait_for_runner: bool = False, timeout: float | None = None) -> Runner:
        """This process's runner of the pipeline, started when none runs: it takes the runner
        lock first (:class:`~nbpipe.PipelineBusy` while another process runs the pipeline,
        unless ``wait_for_runner``: then it waits up to ``timeout`` seconds)."""
        if self._runner is not None and self._runner.alive:
            return self._runner
        lock = RunnerLock(self.store, self.name)
        ownership.take(lock, wait_for_runner, timeout)  # before starting a cluster: fails fast
        try:
            from .runner import RunnerHost
            from .specs import write_specs

            host = RunnerHost(deps=self.deps, refs=self.refs, executed=self.ran.update,
                              settle_late=self.settle_late,
                              write_specs=lambda refs: write_specs(self, refs))
            self._runner = Runner(self.store, self.pipeline_id, self.name, host, self.connection,
                                  lock, max_concurrent=self.max_concurrent)
        except BaseException:
            lock.release()
            raise
        return self._runner

    def run(self, targets: Iterable[TaskRef] | TaskRef | None = None, *, wait: bool = True,
            check: bool = False, timeout: float | None = None,
            wait_for_runner: bool = False, stop_on_failure: bool | None = None,
            skip: str | Sequence[str] | None = None, keep_succeeded: bool | None = None,
            trust_existing: bool | None = None) -> RunSummary:
        """Run what is not done: every task, or ``targets`` and what they need.

        ``wait=False`` returns at once while the tasks run in the background. ``check=True``
        raises :class:`~nbpipe.TaskFailed` naming the tasks that failed.

        When another process runs the pipeline (a script, or the runner `nbpipe retry`
        started), this raises :class:`~nbpipe.PipelineBusy`; ``wait_for_runner=True`` waits
        for that process to finish instead (up to ``timeout`` seconds), takes what it computed
        and runs what is left::

            pipe.run(wait_for_runner=True)   # 0 executed when the other runner did it all

        Run modes (each also set for a whole script by ``nbpipe run --stop-on-failure``,
        ``--keep-succeeded``, ``--trust-existing``, ``--skip PATTERN``): ``stop_on_failure=True``
        starts nothing new after the first failure; ``skip=["FAILED", "fit*"]`` leaves tasks
        out by state, name or label glob (and what depends on them); ``keep_succeeded=True``
        keeps the last successful result of tasks whose key changed (recorded as accepted, see
        :meth:`accept`);
        ``trust_existing=True`` adopts tasks whose declared ``Out`` files exist.
        """
        return launch.run(self, targets, wait=wait, check=check, timeout=timeout,
                          wait_for_runner=wait_for_runner, report=True,
                          modes={"stop_on_failure": stop_on_failure, "skip": run_skip(skip),
                                 "keep_succeeded": keep_succeeded, "trust_existing": trust_existing})

    def wait(self, timeout: float | None = None) -> RunSummary:
        """Wait until every task handed to the runner reached a final state.

        Tasks only registered (called, never run nor needed) are not waited for: see
        :meth:`unsubmitted`.
        """
        return launch.wait(self, timeout)

    def unsubmitted(self) -> list[TaskRef]:
        """Tasks registered in this process that no runner has: ``pipe.run()`` (or reading their
        values) runs them."""
        return launch.unsubmitted(self)

    def reopen(self, name: str, store: str | os.PathLike[str] | Store | None = None) -> Pipeline:
        """Another pipeline on this one's cluster: this pipeline's runner stops and the new one
        takes the cluster over (closing the new one closes it). Refused while tasks of this one
        run.

        >>> other = pipe.reopen("other")     # doctest: +SKIP
        """
        return ownership.reopen(self, name, store)

    # -- inspection ---------------------------------------------------------------------------

    def tasks(self, state: str | State | None = None) -> list[TaskInfo]:
        """The pipeline's tasks: those registered in this process, else those in the store."""
        wanted = wanted_state(state, f"pipeline {self.name!r}: tasks(state={state!r})")
        if self._refs:
            self.resolve()
            infos = [TaskInfo.of(r) for r in self.refs()]
        else:
            infos = [TaskInfo.of_row(r) for r in self.store.task_rows(self.pipeline_id).values()]
        return [i for i in infos if wanted is None or i.state == wanted]

    def why(self, task: TaskRef | str) -> str:
        """Why the task ran (or will run) in this pipeline's latest run."""
        ref = self.graph.find(task)[0]
        self.resolve([ref])
        return self.freshness.why(ref)

    def accept(self, tasks: Any) -> dict[str, str]:
        """Let the current definition of ``tasks`` (refs, names or labels) adopt the result of
        their last successful run, without running them (an edit you call cosmetic): they
        become SUCCEEDED and ``why`` says "accepted by hand on DATE". Undo with :meth:`retry`.
        Returns ``{label: reason}``."""
        return runmodes.accept(self, self.graph.find(tasks))

    # -- the public core: what the notebook layer, the CLI, specs and the runner use ------------

    def refs(self) -> list[TaskRef]:
        """The tasks registered in this process, in the order they were defined."""
        with self._lock:
            return list(self._refs.values())

    def add(self, func: TaskFunction, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
            *, label: str | None = None) -> TaskRef:
        """Register a call of ``func`` (a task function, a ``%%task`` cell) and return its ref;
        the same call again returns the same ref."""
        return self.graph.add(func, args, kwargs or {}, label=label)

    def add_many(self, func: TaskFunction, items: Iterable[Any], chunksize: int | None = None
                 ) -> list[TaskRef]:
        """Register one call of ``func`` per item (``func.map``); ``chunksize`` groups them."""
        return self.graph.add_many(func, items, chunksize)

    def forget(self, refs: Iterable[TaskRef]) -> None:
        """Drop finished tasks from this process (their refs, arguments and the runner's
        bookkeeping); the store keeps their identity and results, so a later run finds them
        done. What :func:`nbpipe.run_tasks` does after each window of a large task file."""
        refs = [r for r in refs if r.state.final]
        with self._lock:
            self.graph.forget(refs)
            self.ran.difference_update(refs)
        if self._runner is not None:
            self._runner.forget(refs)

    def adopt(self, refs: Iterable[TaskRef]) -> None:
        """Register refs made elsewhere (revived from specs by a detached runner) as they are."""
        self.graph.adopt(refs)

    def find(self, tasks: Any) -> list[TaskRef]:
        """Refs of tasks given as refs or names (:mod:`nbpipe.naming`'s rule);
        :class:`~nbpipe.UnknownTask` for a name no task has."""
        return self.graph.find(tasks)

    def closure(self, targets: Iterable[TaskRef]) -> list[TaskRef]:
        """``targets`` and every task they need, transitively."""
        return self.graph.closure(targets)

    def deps(self, ref: TaskRef) -> list[TaskRef]:
        """The tasks ``ref`` waits for (data, ``after=`` and file dependencies)."""
        return list(ref.deps)

    def result_of(self, ref: TaskRef, timeout: float | None = None) -> Any:
        """The value of ``ref`` (running what it needs first): what ``ref.result()`` returns."""
        return launch.result(self, ref, timeout)

    @property
    def started_connection(self) -> Connection | None:
        """The cluster connection when one was started (None: nothing started it yet)."""
        return self.cluster_handle.started

    @property
    def runner(self) -> Runner | None:
        """The runner of this process for this pipeline, when one was started."""
        return self._runner

    # -- control (works from any process, through the store's command table) ------------------

    def retry(self, tasks: Any = None, *, failed: bool = False, wait: bool = False) -> None:
        """Run tasks again, with everything they block; ``failed=True`` for every failed one.

        The same rules hold from every door (here, ``nbpipe retry``, the sidebar): see
        :class:`nbpipe.control.Controller`.
        """
        if tasks is None and not failed:
            raise TaskDefinitionError("pipe.retry() needs tasks to retry, or failed=True")
        keys = self.graph.keys(tasks, self.control.keys)
        if self.control.attached():
            self.control.command("retry", keys=keys, failed=failed)
            return
        reset = set(self.control.reset_for_retry(keys, failed=failed))  # (our refs too)
        if any(r.key_ in reset for r in self.refs()):
            launch.run(self, [r for r in self.refs() if r.state is not State.SUCCEEDED], wait=wait)

    def kill(self, tasks: Any = None, *, all: bool = False) -> None:
        """Stop tasks (running ones within seconds, CPU-bound Python loops included).

        Waiting tasks downstream of a killed one become UPSTREAM_FAILED; finished tasks are left
        as they are (the same from every door: see :class:`nbpipe.control.Controller`).
        """
        keys = [r.key for r in self.refs() if not r.state.final] if all and self._refs \
            else self.graph.keys(tasks, self.control.keys)
        if all and not self._refs:
            self.control.kill(all=True)
        elif self.control.attached():
            self.control.command("kill", keys=keys)
        else:
            self.control.kill_offline(keys)  # (our refs too)

    def pause(self) -> None:
        """Start no new task; running tasks finish."""
        self.control.pause()

    def resume(self) -> None:
        """Start tasks again after :meth:`pause`."""
        self.control.resume()

    def detach(self) -> int:
        """Hand the unfinished tasks to a detached runner (``nbpipe spawn``); return its pid.

        The runner survives this process (a kernel, a terminal) and exits when the pipeline is
        done or paused. Its output goes to ``<store>/logs/spawn-<pipeline>.log``.
        """
        return ownership.hand_over(self)

    @property
    def paused(self) -> bool:
        """Whether the pipeline is paused."""
        return self.store.is_paused(self.pipeline_id)

    def set_cluster(self, cluster: Any) -> None:
        """Run on another cluster from now on (see :mod:`nbpipe.cluster` for the forms).

        The cluster nbpipe started before is closed (its batch jobs cancelled); refused while
        tasks run on it.
        """
        validate(cluster, self.store.path)
        if self._runner is not None and self._runner.alive and self._runner.in_flight():
            raise ClusterError(
                f"pipeline {self.name!r}: {self._runner.in_flight()} task(s) are running on the "
                "current cluster; wait for them (pipe.wait()) or kill them before changing it"
            )
        with self._lock:
            self._stop()
            self.cluster_handle.replace(cluster)

    @property
    def cluster(self) -> Any:
        """The ``cluster=`` value the tasks run on (see :mod:`nbpipe.cluster`)."""
        return self.cluster_handle.cluster

    @property
    def connection(self) -> Connection:
        """The running cluster connection (started on first use)."""
        return self.cluster_handle.connection

    @property
    def client(self) -> Any:
        """The Dask client (connecting on first use)."""
        return self.connection.client

    def close(self) -> None:
        """Stop the runner and close the cluster nbpipe started."""
        self._stop()
        current.closed(self)

    def _stop(self) -> None:
        """Close the runner, then the cluster nbpipe started (recording the jobs it cancelled)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.close()
        self.cluster_handle.close()
