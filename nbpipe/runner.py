"""The runner: owns a Dask client, submits ready tasks, records every transition, obeys commands.

One runner thread per pipeline and process, holding the pipeline's lock, so there is exactly one
writer of task states. It wakes on task completions and start notices from the workers, polls
the store's command table (retry, kill, pause, resume, from this or another process), submits
what became ready and commits everything that changed in one transaction per tick. The thread
that registered the tasks never blocks while they run.

The runner is built from parts, each a module named for its idea (mixins over the tables set up
in ``Runner.__init__``, which this loop alone changes):

- :mod:`nbpipe.readiness` and :mod:`nbpipe.batching`: pure decisions (what may be handed ahead,
  which chains fuse; how many tasks go into one Dask task), unit-tested without Dask;
- :mod:`nbpipe.submission`: WorkItems built and sent to Dask;
- :mod:`nbpipe.ahead`: handing dependents to Dask ahead of their inputs' outcomes, fused chains;
- :mod:`nbpipe.reports`: what workers report, failed futures, retries;
- :mod:`nbpipe.commands`: pause, resume, kill, retry and kill fallbacks;
- :mod:`nbpipe.jobs`: worker pools, scaling and batch jobs;
- :mod:`nbpipe.events`: the topic workers report through.

Each task's run state (state, attempts, retry budget, error, result file, worker) is one
immutable :class:`~nbpipe.runstate.RunState` on ``TaskRef.run_state``, which a transition replaces
whole (``ref.update(...)``, ``_finish``): the kernel, the widget and the user's code read it from
other threads without the runner's lock and always see one moment of the task. Waiters that need
the store to agree as well (``run()``) look under ``Runner.changed``, held for each tick.

The runner knows the pipeline only through a :class:`RunnerHost` (what it asks of the pipeline).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import sqlite3
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distributed import as_completed

from .ahead import HandingAhead
from .batching import BATCH_SECONDS, FUSE_UNKNOWN, MAX_BATCH, BatchPolicy
from .cluster import Connection
from .commands import KILL_GRACE, Commands
from .config import setting
from .errors import RunnerError
from .events import Topic
from .jobs import PoolScaling, record_jobs
from .readiness import count_blockers
from .reports import OUTCOME_GRACE, Reports
from .results import INLINE_BYTES
from .states import State
from .store import Batch, RunnerLock, Store, is_damage
from .submission import SUBMIT_BYTES, Submission, Submitting
from .worker import Outcome, WorkItem

if TYPE_CHECKING:
    from .task import TaskRef

# (the constants of the parts are importable from here, as before the split)
__all__ = ["BATCH_SECONDS", "FUSE_UNKNOWN", "KILL_GRACE", "MAX_BATCH", "OUTCOME_GRACE",
           "SUBMIT_BYTES", "Runner", "RunnerHost", "record_jobs"]

log = logging.getLogger("nbpipe")

COMMAND_POLL = 0.2  # seconds between looks at the command table
RESULT_POLL = 0.02  # seconds between looks at the futures while tasks are in flight
JOB_POLL = 3.0  # seconds between looks at the batch queue (jobs started or ended)
STORE_PATIENCE = 300.0  # seconds the store may keep failing before the runner stops


@dataclass(frozen=True)
class RunnerHost:
    """What the runner asks of the pipeline whose tasks it runs, and nothing more of it.

    ``Pipeline`` builds one where it starts its runner; any other host gives the same five
    callables.
    """

    deps: Callable[[TaskRef], list[TaskRef]]
    """The upstream tasks of a task."""
    refs: Callable[[], list[TaskRef]]
    """Every task the pipeline knows (a retry may name one never handed to the runner)."""
    executed: Callable[[Iterable[TaskRef]], None]
    """Note tasks as executed in this run (what ``run()`` reports; retries included)."""
    settle_late: Callable[[list[TaskRef]], list[tuple[TaskRef, str]] | None]
    """Give ready late tasks their final keys; (task, old key) pairs, or None when busy."""
    write_specs: Callable[[list[TaskRef]], Any]
    """Write the specs of tasks that failed, so ``nbpipe retry`` runs them from another process."""


@dataclass
class _Counters:
    submitted: int = 0
    finished: Counter[str] = field(default_factory=Counter)


class Runner(HandingAhead, Submitting, Reports, Commands, PoolScaling):
    """Runs the tasks of one pipeline on one Dask client (see the module docstring)."""

    def __init__(self, store: Store, pipeline_id: int, name: str, host: RunnerHost,
                 connection: Connection, lock: RunnerLock, *, max_concurrent: int | None = None):
        self.host = host
        self.name = name
        self.store = store
        self.pid = pipeline_id
        self.connection = connection
        self.client = connection.client
        self.lock = lock
        self.inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.wake = threading.Event()
        self.changed = threading.Condition()
        self.by_key: dict[str, TaskRef] = {}
        self.handed: set[TaskRef] = set()
        self.children: dict[TaskRef, set[TaskRef]] = defaultdict(set)
        self.blockers: dict[TaskRef, int] = {}
        self.ready: deque[TaskRef] = deque()
        self.inflight: dict[str, Submission] = {}
        self.sub_of: dict[TaskRef, Submission] = {}
        self.active: Counter[Any] = Counter()
        self.kill_requested: set[TaskRef] = set()
        # Handed ahead: submitted with the futures of upstream tasks still running as inputs,
        # WAITING until they succeed (then PENDING); what their workers report before that is
        # kept in `early` and applied then, so the store records transitions in order.
        self.ahead: set[TaskRef] = set()
        self.early: dict[TaskRef, list[tuple[str, Any, Any]]] = defaultdict(list)
        self._ahead_subs: list[tuple[Submission, list[WorkItem], Any, Any]] = []
        self._released: deque[TaskRef] = deque()  # went from ahead to PENDING with reports kept
        self._sent = 0  # submissions so far: handed-ahead Dask keys are never reused
        self._collections: list[tuple[str, Any]] = []  # Dask collections in the items being built
        self._skip: list[tuple[str, str]] = []  # (task, Dask key) taken back from fused chains
        self.kill_deadline: dict[TaskRef, float] = {}
        self.paused = self.store.is_paused(self.pid)
        self.stop_on_failure = False  # i20: set by run(stop_on_failure=True) (nbpipe.policy)
        self.counters = _Counters()
        self.batch = Batch()
        self.batch_inline: dict[str, bytes] = {}  # inline results in the batch, not yet written
        self.inline_bytes = setting("inline-bytes", INLINE_BYTES)
        self.policy = BatchPolicy(setting("batch-seconds", BATCH_SECONDS))
        # The pipeline-wide cap: Pipeline(max_concurrent=), else nbpipe.max-concurrent.
        self.max_concurrent: int | None = max_concurrent or setting("max-concurrent", None)
        self.store_patience = setting("store-patience", STORE_PATIENCE)
        self._failing_since: float | None = None  # since when every tick fails to write
        self._fn_blobs: dict[Any, bytes] = {}
        self._blobs: dict[Submission, bytes] = {}  # pickled items of submissions being sent
        self._to_submit: dict[tuple[Any, tuple[Any, ...]], list[tuple[Submission, list[WorkItem]]]] = \
            defaultdict(list)
        self.awaiting: dict[Submission, float] = {}
        self.failed_since_tick: dict[TaskRef, None] = {}
        self.has_late = False  # a late task was handed over: ready ones are settled first
        self._thread_count = 1
        self._threads_checked = 0.0
        self._completed = as_completed()  # no per-future callbacks: drained each tick
        self.error: BaseException | None = None
        self.fatal: RunnerError | None = None  # set when the loop stopped on an error
        self._stop = False
        self._write_error: sqlite3.Error | None = None  # the store could not be written
        self._last_poll = 0.0
        self.events = Topic(self.client, self._on_event)  # what the workers report
        self.topic = self.events.name
        self.pools = connection.pools
        self.placement: dict[tuple[Any, ...], str] = {}  # (cores, memory, gpus, walltime, pool) -> pool
        self.memory_boost: dict[TaskRef, int] = {}  # tasks whose memory grew after worker deaths
        self.worker_memory: dict[str, int] = {}  # worker address -> memory limit (from start events)
        self._last_jobs = self._last_scale = 0.0
        self.job_poll = JOB_POLL  # (read when the runner starts: a script may set it before)
        self._demand_grew = False  # tasks were submitted since the last scaling decision
        self.worker_resources = self._advertised_resources() if self.pools is None else set()
        if self.pools is not None:
            self._reap_jobs()
        self.store.set_runner(
            self.pid,
            {"pid": os.getpid(), "host": socket.gethostname(),
             "started": time.time(), "cluster": connection.description,
             "dashboard": connection.dashboard, "pools": self.pools.previews() if self.pools else []},
        )
        self.thread = threading.Thread(target=self._loop, name=f"nbpipe-runner-{name}",
                                       daemon=True)
        self.thread.start()

    # -- called from other threads -----------------------------------------------------------

    def add(self, refs: list[TaskRef]) -> None:
        """Hand resolved tasks (WAITING) to the runner."""
        self.handed.update(refs)  # now, not at the next tick: a wait right after sees them
        self.inbox.put(("add", refs))
        self.wake.set()

    def forget(self, refs: list[TaskRef]) -> None:
        """Drop finished tasks from the runner's bookkeeping (``Pipeline.forget``: a large
        task file run window by window); done in the loop, which owns these tables."""
        self.inbox.put(("forget", refs))
        self.wake.set()

    def _forget(self, refs: list[TaskRef]) -> None:
        for ref in refs:
            if self.by_key.get(ref.key) is ref:
                del self.by_key[ref.key]
            self.handed.discard(ref)
            for table in (self.children, self.blockers, self.memory_boost, self.kill_deadline,
                          self.early):
                table.pop(ref, None)  # type: ignore[attr-defined]

    def was_handed(self, ref: TaskRef) -> bool:
        """Whether ``ref`` was handed to this runner (it runs, or waits for what it needs)."""
        return ref in self.handed

    def poke(self) -> None:
        """Look at the command table now."""
        self._last_poll = 0.0
        self.wake.set()

    @property
    def alive(self) -> bool:
        """Whether the runner thread is running."""
        return self.thread.is_alive() and not self._stop

    def in_flight(self) -> int:
        """How many tasks are submitted and not finished."""
        return sum(len(s.refs) for s in list(self.inflight.values()))

    def close(self) -> None:
        """Stop the thread, cancel what runs, give the pipeline's lock back."""
        self._stop = True
        self.wake.set()
        self.thread.join(timeout=30)
        # Under the waiters' lock, as the loop's own changes: a thread looking at the states
        # never sees tasks half taken back.
        with self.changed:
            for ref in list(self.ahead):
                self._unhand(ref)
            for sub in list(self.inflight.values()):
                for ref in sub.refs:
                    if ref.state in (State.PENDING, State.RUNNING):
                        ref.update(state=State.WAITING)
                        self.batch.state(self.pid, ref.key, State.WAITING.value, attempts=ref.attempts,
                                         message="runner closed before the task finished")
                if sub.future is not None:
                    sub.future.cancel()
            self.inflight.clear()
            try:
                self.store.write(self.batch)
                if self._write_error is not None:  # what failed to be written is written now
                    log.warning("nbpipe: the store %s is writable again", self.store.path)
                    self._write_error = None
                self.store.set_runner(self.pid, None)
            except Exception:  # pragma: no cover - closing at interpreter exit
                log.debug("could not record the runner's end", exc_info=True)
        self.events.close()
        self.lock.release()
        with self.changed:
            self.changed.notify_all()

    # -- callbacks from the Dask client's thread ----------------------------------------------

    def _on_event(self, event: Any) -> None:
        msg = event[1] if isinstance(event, tuple) else event
        self.inbox.put(("outcomes" if "outcomes" in msg else "start", msg))
        self.wake.set()

    # -- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop:
            self.wake.wait(timeout=RESULT_POLL if self.inflight else COMMAND_POLL)
            self.wake.clear()
            if self._stop:
                break
            # Waiters hold this lock while they look at states: they never see a state whose
            # transition is not yet committed to the store.
            with self.changed:
                began = time.monotonic()
                try:
                    self._tick()
                except sqlite3.Error as exc:
                    if is_damage(exc):  # a damaged database does not heal: stop, say so
                        self.error = exc
                        self._stopped_by(self.store.damaged(exc))
                        self.changed.notify_all()
                        return
                    if self.error is None or type(self.error) is not type(exc):
                        log.warning("nbpipe: the store %s failed (%s); trying again",
                                    self.store.path, exc)
                    self.error = exc  # busy, full, gone for a while: its writes are retried
                except Exception as exc:  # a bug or a broken cluster: stop, and say why
                    log.exception("nbpipe runner error")
                    self.error = exc
                    self._stopped_by(exc)
                    self.changed.notify_all()
                    return
                else:
                    if self._write_error is None:
                        self.error = None
                if self._gave_up(began):
                    self.changed.notify_all()
                    return
                self.changed.notify_all()

    def _gave_up(self, began: float) -> bool:
        """Stop when the store has failed for longer than ``nbpipe.store-patience`` seconds:
        ``run()`` raises instead of waiting forever for transitions that cannot be recorded."""
        if self.error is None:
            self._failing_since = None
            return False
        now = time.monotonic()
        if self._failing_since is None:  # (from the start of the tick: a write may wait long)
            self._failing_since = began
        if now - self._failing_since < self.store_patience:
            return False
        self._stopped_by(RunnerError(
            f"the store {self.store.path} could not be written for "
            f"{now - self._failing_since:.0f} s ({type(self.error).__name__}: {self.error}); "
            "what ran is in its result files: free the store (another process holding it, a "
            "full disk), then run again"), record=False)
        return True

    def _stopped_by(self, exc: BaseException, record: bool = True) -> None:
        """The loop cannot go on: every unfinished task fails naming the cause (the sidebar and
        ``nbpipe tasks`` show it; ``run()`` raises :class:`~nbpipe.RunnerError`), the store
        records it and the pipeline's lock is given back, so a new ``run()`` starts afresh."""
        cause = f"{type(exc).__name__}: {exc}"
        self.fatal = RunnerError(
            f"the runner of pipeline {self.name!r} stopped: {cause}; its unfinished tasks "
            "are marked FAILED with this message: fix the cause, then run again (or `nbpipe "
            "retry --failed`)"
        )
        self._stop = True
        try:
            for sub in list(self.inflight.values()):
                if sub.future is not None:
                    with contextlib.suppress(Exception):
                        sub.future.cancel()
            self.inflight.clear()
            self.sub_of.clear()
            self.ahead.clear()
            for ref in list(self.by_key.values()):
                if not ref.state.final:
                    self._finish(ref, State.FAILED, f"the runner stopped: {cause}")
            if record:  # (not into a store that keeps failing: each write waits for it)
                self.store.write(self.batch)
                self.batch = Batch()
                self.store.set_runner(self.pid, None)
        except Exception:  # the store itself may be what failed: the states are in memory
            log.debug("could not record the runner's end", exc_info=True)
        finally:
            self.lock.release()

    def _tick(self) -> None:
        if (self.inflight or self.ready) and self.client.status in ("closing", "closed"):
            # Its futures will never complete: stop now, saying why, rather than wait forever.
            raise RunnerError(f"the Dask client of pipeline {self.name!r} was closed while "
                              "its tasks ran; run again to use a new client")
        while True:
            try:
                kind, payload = self.inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self._integrate(payload)
            elif kind == "forget":  # nbpipe.Pipeline.forget
                self._forget(payload)
            elif kind == "start":
                self._started(payload)
            elif kind == "outcomes":
                sub = self.inflight.get(payload["dask_key"])
                if sub is None or sub.cancelled:
                    continue
                if payload["outcomes"] is None:  # too large for an event: gather it now
                    self.awaiting[sub] = 0.0
                else:
                    self._apply(sub, [Outcome(*o) for o in payload["outcomes"]])
        done = [f.key for f in self._completed.next_batch(block=False)]
        if done or self.awaiting:
            self._done(done)
        self._replay()
        now = time.monotonic()
        if now - self._last_poll >= COMMAND_POLL:
            self._last_poll = now
            for command in self.store.new_commands(self.pid):
                self._command(command)
        self._kill_fallbacks(now)
        self._submit_ready()
        if self.pools is not None:
            self._scale_pools(now)
        if self.batch:
            batch, self.batch = self.batch, Batch()
            try:
                self.store.write(batch)
            except sqlite3.Error as exc:  # a full disk, a store gone: keep the changes, try again
                if is_damage(exc):
                    self.batch = batch
                    raise
                self.batch = batch
                if self._write_error is None:
                    log.warning("nbpipe: cannot write to the store %s (%s); keeping the changes "
                                "and trying again", self.store.path, exc)
                self._write_error = self.error = exc
                return
            self.batch_inline.clear()
            if self._write_error is not None:
                log.warning("nbpipe: the store %s is writable again", self.store.path)
                self._write_error = None
        if self._skip:
            self._interrupt_attempts(self._skip)
            self._skip = []
        if self.failed_since_tick:  # so `nbpipe retry` can run them from another process
            refs, self.failed_since_tick = list(self.failed_since_tick), {}
            try:
                self.host.write_specs([r for r in refs if r.func is not None])
            except Exception:  # an unpicklable function: retry works from its own process only
                log.debug("could not write specs", exc_info=True)

    # -- graph bookkeeping --------------------------------------------------------------------

    def _integrate(self, refs: list[TaskRef]) -> None:
        for ref in refs:
            self.by_key[ref.key] = ref
            if ref.late:
                self.has_late = True
        for ref in refs:
            if ref.state is not State.WAITING or ref in self.sub_of or ref in self.blockers:
                continue  # not waiting, or already counted (run() twice before a tick)
            self._arm(ref)

    def _arm(self, ref: TaskRef) -> None:
        """Count what the task still waits for; queue it when nothing, fail it when upstream did."""
        deps = self.host.deps(ref)
        for dep in deps:
            self.children[dep].add(ref)
        waiting, failed_upstream = count_blockers(deps)
        self.blockers[ref] = waiting
        if failed_upstream is not None:
            self._finish(ref, State.UPSTREAM_FAILED,
                         f"upstream task {failed_upstream.label!r} is {failed_upstream.state.value}")
        elif waiting == 0:
            self.ready.append(ref)

    def _finish(self, ref: TaskRef, state: State, error: str | None = None, *,
                result_file: tuple[str, str] | None = None, **changes: Any) -> None:
        """``ref`` ended in ``state``: SUCCEEDED with its ``result_file`` (by default the one it
        has), else failed for ``error`` (``changes``: more fields of its run state, set in the
        same update: a reader never sees half of it)."""
        if ref in self.ahead:  # killed, or not sendable, before its upstream tasks finished
            self._unhand(ref)
        if state is State.SUCCEEDED:
            result_file = result_file or ref.result_file
            assert result_file is not None, f"task {ref.label!r} succeeded without a result file"
            ref.run_state = ref.run_state.succeeded(result_file, **changes)
        else:
            ref.run_state = ref.run_state.ended(state, error, **changes)
        self.blockers.pop(ref, None)
        self.kill_requested.discard(ref)
        self.kill_deadline.pop(ref, None)
        self.counters.finished[state.value] += 1
        self.batch.state(self.pid, ref.key, state.value, attempts=ref.attempts, error=ref.error)
        if state is State.FAILED and self.stop_on_failure:  # i20: stop_on_failure (policy)
            self._stop_submitting(ref)
        if state is State.SUCCEEDED:
            for child in self.children.get(ref, ()):
                if child.state is State.WAITING and child in self.blockers:
                    self.blockers[child] -= 1
                    if self.blockers[child] == 0:
                        if child in self.ahead:
                            self._go(child)
                        else:
                            self.ready.append(child)
            return
        self.failed_since_tick[ref] = None
        todo = list(self.children.get(ref, ()))
        while todo:
            child = todo.pop()
            self.failed_since_tick[child] = None
            if child in self.ahead:  # its Dask task gets no value from ref: taken back
                self._unhand(child)
            if child.state is State.WAITING and child not in self.sub_of:
                self.blockers.pop(child, None)
                child.run_state = child.run_state.ended(
                    State.UPSTREAM_FAILED, f"upstream task {ref.label!r} is {state.value}")
                self.counters.finished[State.UPSTREAM_FAILED.value] += 1
                self.batch.state(self.pid, child.key, child.state.value, attempts=child.attempts,
                                 error=child.error)
                todo.extend(self.children.get(child, ()))
