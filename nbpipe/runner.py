"""The runner: owns a Dask client, submits ready tasks, records every transition, obeys commands.

One runner thread per pipeline and process, holding the pipeline's lock, so there is exactly one
writer of task states. It wakes on task completions and start notices from the workers, polls
the store's command table (retry, kill, pause, resume, from this or another process), submits
what became ready and commits everything that changed in one transaction per tick. The thread
that registered the tasks never blocks while they run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import sqlite3
import threading
import time
import uuid
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cloudpickle
from dask.utils import format_bytes
from distributed import as_completed
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.scheduler import KilledWorker

from . import policy  # i20: timeout, retry_on, stop_on_failure
from .cluster import Connection
from .config import setting
from .crashes import Crash, describe, discard, read_crash
from .errors import ResourceError, RunnerError
from .identity import is_dask_collection
from .pools import cancel_jobs
from .results import INLINE, INLINE_BYTES, locate
from .shipping import bundle
from .specs import write_specs
from .states import BAD, State
from .store import Batch, RunnerLock, is_damage
from .walk import any_leaf, holds_ref, is_ref, map_refs
from .worker import (
    NOT_RUN,
    TAIL,
    Outcome,
    Upstream,
    WorkItem,
    as_done,
    install_termination_notice,
    interrupt,
    outcomes_of,
    run_items,
    skip_attempts,
)

if TYPE_CHECKING:
    from .pipeline import Pipeline
    from .task import TaskRef

__all__ = ["Runner", "record_jobs"]

log = logging.getLogger("nbpipe")

KILL_GRACE = 2.0  # seconds for an interrupted task to stop before its worker is restarted
COMMAND_POLL = 0.2  # seconds between looks at the command table
RESULT_POLL = 0.02  # seconds between looks at the futures while tasks are in flight
JOB_POLL = 3.0  # seconds between looks at the batch queue (jobs started or ended)
SCALE_POLL = 1.0  # seconds between scaling decisions for worker pools
STORE_PATIENCE = 300.0  # seconds the store may keep failing before the runner stops
OUTCOME_GRACE = 2.0  # seconds a finished future waits for its outcome event before a gather
SUBMIT_BYTES = 4 * 2**20  # pickled items per client.map call
BATCH_SECONDS = 0.2  # work per Dask task when tiny tasks are batched (config nbpipe.batch-seconds)
MAX_BATCH = 256  # tasks per automatic batch at most
PROBE_MIN = 64  # fewer ready tasks of a function than this are never held back
PROBE_COUNT = 16  # tasks run first to learn how long a function's tasks take
PROBE_TIME = 0.5  # seconds the other tasks wait for more probes once the first one finished
PROBE_START = 30.0  # seconds at most they wait for a first probe to finish (workers starting)
FUSE_UNKNOWN = 16  # tasks of a chain fused into one Dask task while their durations are unknown


TOPIC_HISTORY = 16  # events of a runner's topic the scheduler keeps (it delivers them all)


def _bound_topic(topic: str, keep: int, dask_scheduler: Any = None) -> None:
    """On the scheduler: keep only the last ``keep`` events of ``topic`` (0: forget the topic).

    The scheduler keeps a history of every topic (``distributed.admin.low-level-log-length``,
    1,000 events); a runner's events carry the outcomes of whole batches of tasks, so that
    history held every outcome of the last 1,000 batches (for a local cluster, in the driver:
    about 18 MB over 20,000 tasks) and outlived the runner. Nobody reads it: the runner gets
    each event as it is published.
    """
    from collections import deque

    topics = dask_scheduler._broker._topics  # no public API bounds one topic's history
    if keep == 0:
        topics.pop(topic, None)
    else:
        topics[topic].events = deque(topics[topic].events, maxlen=keep)


class TerminationNoticePlugin(WorkerPlugin):
    """Installs the SIGTERM notice behind ``context().should_stop()`` on every worker."""

    name = "nbpipe-termination-notice"

    def setup(self, worker: Any) -> None:
        install_termination_notice()


@dataclass(eq=False)
class Submission:
    """One Dask future running one task attempt, or a chunk of a map."""

    dask_key: str
    refs: list[TaskRef]
    future: Any = None
    started: bool = False
    cancelled: bool = False
    pool: str | None = None  # the worker pool it runs in (batch clusters)
    remaining: int = -1  # its refs not yet detached (outcome, failure or release)
    inputs: list[Submission] = field(default_factory=list)  # upstream submissions (handed ahead)
    extra: list[Any] = field(default_factory=list)  # futures of Dask collections in its arguments
    fused: bool = False  # a chain: refs[1:] each read only the value of the one before (ahead)

    def __post_init__(self) -> None:
        self.remaining = len(self.refs)


@dataclass
class _Counters:
    submitted: int = 0
    finished: Counter[str] = field(default_factory=Counter)


class Runner:
    """Runs the tasks of one pipeline on one Dask client (see the module docstring)."""

    def __init__(self, pipeline: Pipeline, connection: Connection, lock: RunnerLock):
        self.pipe = pipeline
        self.store = pipeline.store
        self.pid = pipeline.pipeline_id
        self.connection = connection
        self.client = connection.client
        self.lock = lock
        self.topic = f"nbpipe-{uuid.uuid4().hex[:12]}"
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
        self.batch_seconds = setting("batch-seconds", BATCH_SECONDS)
        # The pipeline-wide cap: Pipeline(max_concurrent=), else nbpipe.max-concurrent.
        self.max_concurrent: int | None = getattr(pipeline, "max_concurrent", None) or \
            setting("max-concurrent", None)
        self.store_patience = setting("store-patience", STORE_PATIENCE)
        self._failing_since: float | None = None  # since when every tick fails to write
        self._fn_blobs: dict[Any, bytes] = {}
        self._blobs: dict[Submission, bytes] = {}  # pickled items of submissions being sent
        self._to_submit: dict[tuple[Any, tuple[Any, ...]], list[tuple[Submission, list[WorkItem]]]] = \
            defaultdict(list)
        self.awaiting: dict[Submission, float] = {}
        self.failed_since_tick: dict[TaskRef, None] = {}
        self.has_late = False  # a late task was handed over: ready ones are settled first
        self.durations: dict[Any, tuple[int, float]] = {}  # function -> (count, total seconds)
        self.probe_deadline: dict[Any, float] = {}
        self.probe_seen: dict[Any, float] = {}  # function -> when its tasks were first held
        self._thread_count = 1
        self._threads_checked = 0.0
        self._completed = as_completed()  # no per-future callbacks: drained each tick
        self.error: BaseException | None = None
        self.fatal: RunnerError | None = None  # set when the loop stopped on an error
        self._stop = False
        self._write_error: sqlite3.Error | None = None  # the store could not be written
        self._last_poll = 0.0
        self.client.subscribe_topic(self.topic, self._on_event)
        with contextlib.suppress(Exception):  # memory only: never worth failing a run for
            self.client.run_on_scheduler(_bound_topic, self.topic, TOPIC_HISTORY)
        try:
            self.client.register_plugin(TerminationNoticePlugin())
        except Exception:  # pragma: no cover - old schedulers without plugin support
            log.debug("could not register the termination notice plugin", exc_info=True)
        self.pools = connection.pools
        self.placement: dict[tuple[Any, ...], str] = {}  # (cores, memory, gpus, walltime, pool) -> pool
        self.memory_boost: dict[TaskRef, int] = {}  # tasks whose memory grew after worker deaths
        self.worker_memory: dict[str, int] = {}  # worker address -> memory limit (from start events)
        self._last_jobs = self._last_scale = 0.0
        self._demand_grew = False  # tasks were submitted since the last scaling decision
        self.worker_resources = self._advertised_resources() if self.pools is None else set()
        if self.pools is not None:
            self._reap_jobs()
        self.store.set_runner(
            self.pid,
            {"pid": __import__("os").getpid(), "host": __import__("socket").gethostname(),
             "started": time.time(), "cluster": connection.description,
             "dashboard": connection.dashboard, "pools": self.pools.previews() if self.pools else []},
        )
        self.thread = threading.Thread(target=self._loop, name=f"nbpipe-runner-{pipeline.name}",
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
        for ref in list(self.ahead):
            self._unhand(ref)
        for sub in list(self.inflight.values()):
            for ref in sub.refs:
                if ref.state in (State.PENDING, State.RUNNING):
                    ref.state = State.WAITING
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
        with contextlib.suppress(Exception):
            self.client.unsubscribe_topic(self.topic)
        # Before the client closes (else the scheduler keeps the topic), but a scheduler that is
        # gone delays closing by 5 s at most.
        dropping = threading.Thread(target=self._drop_topic, daemon=True)
        dropping.start()
        dropping.join(timeout=5)
        self.lock.release()
        with self.changed:
            self.changed.notify_all()

    def _drop_topic(self) -> None:
        with contextlib.suppress(Exception):  # a closed client or a scheduler gone: nothing kept
            self.client.run_on_scheduler(_bound_topic, self.topic, 0)

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
            f"the runner of pipeline {self.pipe.name!r} stopped: {cause}; its unfinished tasks "
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
            raise RunnerError(f"the Dask client of pipeline {self.pipe.name!r} was closed while "
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
                write_specs(self.pipe, [r for r in refs if r.func is not None])
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
        waiting = 0
        failed_upstream = None
        for dep in self.pipe.deps(ref):
            self.children[dep].add(ref)
            if dep.state is State.SUCCEEDED:
                continue
            if dep.state in BAD:
                failed_upstream = dep
            waiting += 1
        self.blockers[ref] = waiting
        if failed_upstream is not None:
            self._finish(ref, State.UPSTREAM_FAILED,
                         f"upstream task {failed_upstream.label!r} is {failed_upstream.state.value}")
        elif waiting == 0:
            self.ready.append(ref)

    def _finish(self, ref: TaskRef, state: State, error: str | None = None) -> None:
        if ref in self.ahead:  # killed, or not sendable, before its upstream tasks finished
            self._unhand(ref)
        ref.state = state
        ref.error = error if state is not State.SUCCEEDED else None
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
                child.state = State.UPSTREAM_FAILED
                child.error = f"upstream task {ref.label!r} is {state.value}"
                self.counters.finished[State.UPSTREAM_FAILED.value] += 1
                self.batch.state(self.pid, child.key, child.state.value, attempts=child.attempts,
                                 error=child.error)
                todo.extend(self.children.get(child, ()))

    # -- handing tasks ahead ------------------------------------------------------------------
    #
    # A task whose upstream tasks are all submitted (or done) is submitted too, with their
    # futures as inputs: Dask runs it as soon as they end, on the worker that holds their values
    # (no round trip through the runner per level, no read-back of a result still in memory).
    # It stays WAITING until the runner has recorded its upstream tasks' success, then becomes
    # PENDING; when one of them fails, is killed, or the pipeline pauses, it is taken back and
    # ends exactly as a task that was never sent (waits for a retry, UPSTREAM_FAILED, WAITING).

    def _may_hand(self, ref: TaskRef) -> bool:
        """Whether ``ref`` can be handed to Dask ahead of its upstream tasks' outcomes."""
        if (self.paused or ref.state is not State.WAITING or ref in self.sub_of or ref.late
                or self.blockers.get(ref, 0) <= 0 or ref.func is None
                or ref.func.opts.max_concurrent is not None or (ref.chunksize and ref.group)):
            return False  # (capped functions wait for a free slot, the runner's business)
        if self.max_concurrent is not None:
            return False
        for dep in self.pipe.deps(ref):
            if dep.state is not State.SUCCEEDED and (
                    dep not in self.sub_of or dep in self.kill_requested
                    or (self.sub_of[dep].fused and self.sub_of[dep].refs[-1] is not dep)):
                return False  # (inside a fused chain, a value is dropped once the next read it)
        return True

    def _chain_below(self, ref: TaskRef) -> list[TaskRef]:
        """The tasks to fuse with ``ref`` into its Dask task: the chain below it in which each
        task is the only dependent of the one before and has no other upstream task, with the
        same function (so the same options), while their durations are unknown or short.

        A chain runs one task after another whatever Dask does; as one Dask task it pays Dask's
        per-task cost (scheduling, a message each way, the worker's bookkeeping) once instead
        of once per level. Each task keeps its own key, state, attempt record and result file,
        and the worker streams the outcomes back as they come (nbpipe.worker).
        """
        func = ref.func
        if (self.paused or func is None or self.batch_seconds <= 0 or ref.late
                or func.opts.max_concurrent is not None or self.max_concurrent is not None
                or (ref.chunksize and ref.group) or ref in self.memory_boost):
            return []
        count, total = self.durations.get(func, (0, 0.0))
        if count < PROBE_COUNT // 4:
            if self.pools is not None:  # (a batch job's walltime may end a long fused run)
                return []
            limit = FUSE_UNKNOWN
        else:  # about BATCH_SECONDS of work per Dask task, as batches of independent tasks
            limit = min(MAX_BATCH, int(self.batch_seconds / max(total / count, 1e-4)))
        chain: list[TaskRef] = []
        last = ref
        while len(chain) + 1 < limit:
            below = self.children.get(last, ())
            if len(below) != 1:
                break
            (child,) = below
            if (child.func is not func or child.state is not State.WAITING or child.late
                    or child in self.sub_of or self.blockers.get(child, 0) != 1
                    or child in self.memory_boost or child in self.kill_requested
                    or (child.chunksize and child.group)
                    or len(self.pipe.deps(child)) != 1):
                break
            chain.append(child)
            last = child
        return chain

    def _hand_ahead(self, submitted: list[TaskRef]) -> None:
        """Submit the dependents of ``submitted`` that may go ahead, level after level."""
        frontier = submitted
        while frontier:
            ends = [self.sub_of[r].refs[-1] if r in self.sub_of else r for r in frontier]
            candidates = dict.fromkeys(c for r in ends for c in self.children.get(r, ()))
            frontier = [c for c in candidates if self._may_hand(c) and self._submit([c], ahead=True)]

    def _unhand(self, ref: TaskRef) -> None:
        """Take back a handed-ahead task: it waits as if never sent (its attempt not counted)."""
        self.ahead.discard(ref)
        self.early.pop(ref, None)
        sub = self.sub_of.pop(ref, None)
        if sub is not None:
            self.active[cap_identity(ref.func)] -= 1
            sub.remaining -= 1
            if sub.remaining <= 0:  # nothing of it is wanted any more
                sub.cancelled = True
                self.inflight.pop(sub.dask_key, None)
                self.awaiting.pop(sub, None)
                if sub.future is not None:
                    sub.future.cancel()
            else:  # a fused chain whose first tasks stay: its worker skips this attempt
                self._skip.append((ref.key, sub.dask_key))
            ref.attempts -= 1
        ref.worker = None

    def _unhand_below(self, ref: TaskRef) -> None:
        """Take back every handed-ahead task that waits for ``ref``'s current attempt."""
        todo = list(self.children.get(ref, ()))
        while todo:
            child = todo.pop()
            if child in self.ahead:
                self._unhand(child)
                todo.extend(self.children.get(child, ()))

    def _go(self, ref: TaskRef) -> None:
        """A handed-ahead task's upstream tasks all succeeded: it is PENDING now (its Dask task
        may be running or done already: what its worker reported is applied next)."""
        self.ahead.discard(ref)
        ref.state = State.PENDING
        self.pipe.ran.add(ref)
        self.batch.state(self.pid, ref.key, State.PENDING.value, attempts=ref.attempts,
                         reason=ref.reason)
        if ref in self.early:
            self._released.append(ref)

    def _replay(self) -> None:
        """Apply what workers reported for tasks that were still handed ahead then."""
        while self._released:
            ref = self._released.popleft()
            for kind, sub, payload in self.early.pop(ref, ()):
                if self.sub_of.get(ref) is not sub:
                    break
                if kind == "start":
                    self._started({**payload, "keys": [ref.key]})
                elif kind == "outcome":
                    self._apply(sub, [payload])
                else:
                    self._failed_future(sub)

    # -- worker pools (batch clusters) ----------------------------------------------------------

    def check(self, refs: list[TaskRef]) -> None:
        """Raise :class:`~nbpipe.ResourceError` for the first task no worker pool can hold."""
        if self.pools is not None:
            for ref in refs:
                self._place(ref)

    def _memory(self, ref: TaskRef) -> int | None:
        return self.memory_boost.get(ref, ref.func.opts.memory)

    def _place(self, ref: TaskRef) -> str:
        """The pool ``ref`` runs in (one lookup per distinct set of options)."""
        assert self.pools is not None
        opts = ref.func.opts
        need = (opts.cores, self._memory(ref), opts.gpus, opts.walltime, opts.pool)
        pool = self.placement.get(need)
        if pool is None:
            pool = self.pools.place(ref.label, *need).name
            self.placement[need] = pool
        return pool

    def _scale_pools(self, now: float) -> None:
        """Ask each pool for as many jobs as its queued and running work needs; record jobs."""
        assert self.pools is not None
        if self._demand_grew or now - self._last_scale >= SCALE_POLL:
            self._last_scale, self._demand_grew = now, False
            demand: Counter[str] = Counter()
            for sub in self.inflight.values():
                if sub.pool is not None and not sub.cancelled and sub.refs[0] not in self.ahead:
                    demand[sub.pool] += sub.refs[0].func.opts.cores
            if not self.paused:
                for ref in self.ready:
                    with contextlib.suppress(ResourceError):  # fails when it is submitted
                        demand[self._place(ref)] += ref.func.opts.cores
            self.pools.adapt(demand)
        if now - self._last_jobs >= JOB_POLL:
            self._last_jobs = now
            self.pools.poll()
            record_jobs(self.store, self.pid, self.pools)

    def _reap_jobs(self) -> None:
        """Cancel batch jobs an earlier runner of this pipeline left behind (a dead kernel's)."""
        assert self.pools is not None
        mine = {info.job_id for info in self.pools.jobs()}
        leftover: dict[str, list[str]] = defaultdict(list)
        for row in self.store.jobs(self.pid, open_only=True):
            if row["job_id"] not in mine:
                leftover[row["kind"]].append(row["job_id"])
        for kind, job_ids in leftover.items():
            log.warning("nbpipe: cancelling %d %s job(s) an earlier runner left: %s",
                        len(job_ids), kind, " ".join(job_ids))
            cancel_jobs(kind, job_ids)
            self.store.end_jobs(self.pid, kind, [(job_id, "CANCELLED") for job_id in job_ids])

    # -- submission ---------------------------------------------------------------------------

    def _advertised_resources(self) -> set[str]:
        try:
            workers = self.client.scheduler_info(n_workers=-1)["workers"].values()
        except TypeError:  # older distributed without n_workers
            workers = self.client.scheduler_info()["workers"].values()
        except Exception:
            return set()
        return {name for w in workers for name in (w.get("resources") or {})}

    def _submit_ready(self) -> None:
        if self.paused or not self.ready:
            return
        self._settle_late()
        now = time.monotonic()
        held: list[TaskRef] = []
        chunks: dict[str, list[TaskRef]] = defaultdict(list)
        by_func: dict[Any, list[TaskRef]] = defaultdict(list)
        seen: set[TaskRef] = set()
        picked: Counter[Any] = Counter()  # per cap identity, this tick
        total = sum(self.active.values())  # for the pipeline-wide cap
        submitted: list[TaskRef] = []
        while self.ready:
            ref = self.ready.popleft()
            if (ref.state is not State.WAITING or ref in self.sub_of or ref in seen
                    or self.blockers.get(ref, 0) > 0):  # an upstream runs again (damaged result)
                continue
            seen.add(ref)
            if ref.late:  # not settled yet (the pipeline was busy): next tick
                held.append(ref)
                continue
            limit, cap = ref.func.opts.max_concurrent, cap_identity(ref.func)
            if (limit is not None and self.active[cap] + picked[cap] >= limit) or (
                    self.max_concurrent is not None and total >= self.max_concurrent):
                held.append(ref)
                continue
            total += 1
            if ref.chunksize and ref.group:  # the user's own chunks (map(..., chunksize=))
                self.active[cap] += 1
                chunk = chunks[ref.group]
                chunk.append(ref)
                if len(chunk) >= ref.chunksize:
                    chunk = chunks.pop(ref.group)
                    if self._submit(chunk):
                        submitted.extend(chunk)
            else:
                picked[cap] += 1
                by_func[ref.func].append(ref)
        for chunk in chunks.values():
            if self._submit(chunk):
                submitted.extend(chunk)
        for func, refs in by_func.items():
            batches, rest = self._batches(func, refs, now)
            for batch in batches:
                self.active[cap_identity(func)] += len(batch)
                if self._submit(batch):
                    submitted.extend(batch)
            held.extend(rest)
        self.ready.extend(held)
        self._hand_ahead(submitted)
        self._flush_submissions()

    def _batches(self, func: Any, refs: list[TaskRef], now: float
                 ) -> tuple[list[list[TaskRef]], list[TaskRef]]:
        """How to submit ready tasks of one function: (batches to submit now, tasks to hold).

        Tiny tasks cost Dask more to schedule than to run, so once a function's tasks are known
        to be short, ready ones run in batches of about BATCH_SECONDS of work (each task keeps
        its own key, state, attempts and result). While durations are unknown and many tasks
        wait, a few run first as probes, for at most PROBE_TIME after the first one finished (a
        fresh cluster's workers take a while to start: the clock runs from then, so the rest
        are not sent one by one just because the workers were slow to come up).
        """
        singles = [[r] for r in refs]
        batch_seconds = self.batch_seconds
        if func.opts.max_concurrent is not None or self.max_concurrent is not None \
                or batch_seconds <= 0:  # (one at a time: caps count tasks, not batches)
            return singles, []
        count, total = self.durations.get(func, (0, 0.0))
        if count >= PROBE_COUNT // 4:
            mean = total / count
            size = min(MAX_BATCH, int(batch_seconds / max(mean, 1e-4)),
                       len(refs) // (2 * self._threads()))
            if size <= 1:
                return singles, []
            return [refs[i:i + size] for i in range(0, len(refs), size)], []
        deadline = self.probe_deadline.get(func, self.probe_seen.setdefault(func, now) + PROBE_START)
        if len(refs) < PROBE_MIN or now >= deadline:
            return singles, []
        probes = max(0, PROBE_COUNT - self.active[cap_identity(func)])
        return singles[:probes], refs[probes:]

    def _threads(self) -> int:
        """Worker threads in the cluster (looked up at most once a second)."""
        now = time.monotonic()
        if now - self._threads_checked > 1.0:
            self._threads_checked = now
            with contextlib.suppress(Exception):
                self._thread_count = max(1, sum(self.client.nthreads().values()))
        return self._thread_count

    def _upstream_value(self, ref: TaskRef, output: str | None = None) -> Upstream:
        if ref.state is not State.SUCCEEDED:  # handed ahead: the value comes with the inputs
            return Upstream(ref.key, "", "", output, ahead=True)
        assert ref.result_file is not None, f"{ref.label} has no result yet"
        path, checksum = ref.result_file
        data = self.inline_data(ref.key) if path == INLINE else None
        return Upstream(ref.key, path, checksum, output, data)

    def _substitute(self, value: Any) -> Any:
        from .task import TaskRef

        # (task results first: a TaskRef is a Dask collection too)
        return map_refs(value, lambda v: self._upstream_value(v) if isinstance(v, TaskRef)
                        else self._upstream_value(v.ref, v.name), other=self._substitute_other)

    def _substitute_other(self, value: Any) -> Any:
        """A Dask collection (not a task result) among the arguments: computed on the cluster,
        an input of the Dask task."""
        if not is_dask_collection(value):
            return value
        from dask.base import tokenize

        key = f"dask-{tokenize(value)}"
        self._collections.append((key, value))
        return Upstream(key, "", "", None, ahead=True)

    def inline_data(self, key: str) -> bytes | None:
        """An inline result's bytes: from this runner's next write (not yet in the store, e.g.
        while the store cannot be written), else from the store."""
        return self.batch_inline.get(key) or self.store.result_data(key)

    def _resources(self, ref: TaskRef) -> tuple[tuple[str, float], ...]:
        """The Dask resources one attempt of ``ref`` holds while it runs."""
        opts = ref.func.opts
        memory = self._memory(ref)
        if self.pools is not None:  # pinned to its pool; the pool's workers advertise their size
            out = [(f"pool-{self._place(ref)}", float(opts.cores))]
            out += [(n, float(a)) for n, a in (("memory", memory), ("gpus", opts.gpus)) if a]
            return tuple(out)
        return tuple(
            (name, amount) for name, amount in
            (("cores", opts.cores), ("memory", memory), ("gpus", opts.gpus))
            if name in self.worker_resources and amount
        )

    def _submit(self, refs: list[TaskRef], ahead: bool = False) -> bool:
        """Submit one Dask task for ``refs`` (sent at the end of the tick); ``ahead``: one task
        whose upstream tasks are still in flight (see _may_hand). False if it cannot run."""
        if ahead:
            self.active[cap_identity(refs[0].func)] += 1
        try:
            resources = self._resources(refs[0])
        except ResourceError as exc:  # memory grown past every pool after worker deaths
            for ref in refs:
                self.active[cap_identity(ref.func)] -= 1
                ref.attempts += 1
                self._finish(ref, State.FAILED, str(exc))
            return False
        items = []
        if not ahead:
            self.pipe.ran.update(refs)  # what run() reports as executed (retries included)
        chain = self._chain_below(refs[0]) if len(refs) == 1 else []
        for ref in chain:  # handed ahead inside the same Dask task (counted as _hand_ahead does)
            self.active[cap_identity(ref.func)] += 1
        for ref in [*refs, *chain]:
            needs = bool(ref.upstream) or holds_collection((ref.args, ref.kwargs))
            ref.attempts += 1
            ref.worker = None
            if ahead or ref in chain:
                self.ahead.add(ref)
            else:
                ref.state = State.PENDING
            items.append(WorkItem(
                key=ref.key, name=ref.name, label=ref.label, attempt=ref.attempts,
                args=self._substitute(ref.args) if needs else ref.args,
                kwargs=self._substitute(ref.kwargs) if needs else ref.kwargs,
                kind=ref.func.kind, env=ref.func.run_env(ref.shape),
                outputs=tuple(str(p) for p in ref.out_files), inline=self.inline_bytes,
                timeout=policy.timeout_of(ref),  # i20: enforced by the worker (nbpipe.policy)
                fused=bool(chain) and ref is not chain[-1],
            ))
            if not (ahead or ref in chain):
                self.batch.state(self.pid, ref.key, State.PENDING.value, attempts=ref.attempts,
                                 reason=ref.reason)
        first = refs[0]
        dask_key = f"{first.name}-{first.key[:16]}-{first.attempts}"
        if len(refs) > 1:
            dask_key += f"-x{len(refs)}"
        if chain:
            dask_key += f"-chain{len(chain) + 1}"
        self._sent += 1
        if ahead or chain:  # (taken back and sent again, it must not meet its cancelled key)
            dask_key += f"-a{self._sent}"
        sub = Submission(dask_key, [*refs, *chain], fused=bool(chain))
        if self._collections:
            sub.extra = [self.client.submit(as_done, key, self.client.compute(value), pure=False)
                         for key, value in dict(self._collections).items()]
            self._collections.clear()
        self.inflight[dask_key] = sub
        for ref in sub.refs:
            self.sub_of[ref] = sub
        self.counters.submitted += len(sub.refs)
        self._demand_grew = True
        if self.pools is not None:
            sub.pool = resources[0][0].removeprefix("pool-")
        if ahead:
            sub.inputs = list(dict.fromkeys(
                self.sub_of[d] for d in self.pipe.deps(first) if d.state is not State.SUCCEEDED))
            self._ahead_subs.append((sub, items, first.func, resources))
        else:
            self._to_submit[(first.func, resources)].append((sub, items))
        return True

    def _pickled(self, func: Any) -> bytes:
        """The task function, pickled once per run (not once per submission)."""
        blob = self._fn_blobs.get(func)
        if blob is None:
            modules = func.identity().user_modules if func.shape_identity is None \
                else func.shape_identity.user_modules
            blob = self._fn_blobs[func] = cloudpickle.dumps(bundle(func.fn, modules), protocol=5)
        return blob

    def _flush_submissions(self) -> None:
        """Submit what this tick made ready: ``client.map`` per function and resources, in
        groups of at most SUBMIT_BYTES (Dask warns about larger graphs)."""
        for (func, resources), batch in self._to_submit.items():
            self._send(func, resources, batch)
        self._to_submit.clear()
        # Handed-ahead tasks in levels: each level's inputs have their futures by then.
        level: dict[Submission, int] = {}
        groups: dict[tuple[int, Any, Any], list[tuple[Submission, list[WorkItem]]]] = \
            defaultdict(list)
        for sub, items, func, resources in self._ahead_subs:
            level[sub] = 1 + max((level.get(i, 0) for i in sub.inputs), default=0)
            groups[(level[sub], func, resources)].append((sub, items))
        self._ahead_subs.clear()
        for (_, func, resources), batch in sorted(groups.items(), key=lambda g: g[0][0]):
            # (an input that failed to be sent has taken its dependents back already)
            batch = [(sub, items) for sub, items in batch if self.inflight.get(sub.dask_key) is sub
                     and all(i.future is not None for i in sub.inputs)]
            if batch:
                self._send(func, resources, batch)

    def _send(self, func: Any, resources: Any,
              batch: list[tuple[Submission, list[WorkItem]]]) -> None:
        """``client.map`` the submissions of one function and resources, in groups of at most
        SUBMIT_BYTES (Dask warns about larger graphs)."""
        # Each chunk's items go pickled as one bytes object: Dask's own pickler would visit
        # every item in Python (about 40 us each), this costs a few.
        batch = [(sub, items) for sub, items in batch if not self._unsendable(sub, items)]
        if not batch:
            return
        try:
            fn_blob = self._pickled(func)
        except Exception as exc:  # noqa: BLE001 - whatever pickling raises names the cause
            for sub, _ in batch:
                self._not_sent(sub, f"its function {func.name!r} cannot be sent to a worker "
                                    f"({type(exc).__name__}: {exc})")
            return
        blobs = [self._blobs.pop(sub) for sub, _ in batch]
        start = size = 0
        for end in range(len(batch) + 1):
            if end == len(batch) or (size and size + len(blobs[end]) > SUBMIT_BYTES):
                part = batch[start:end]
                inputs = [[*(i.future for i in sub.inputs), *sub.extra] for sub, _ in part]
                extra = [inputs] if any(inputs) else []
                futures = self.client.map(
                    run_items, blobs[start:end], *extra, key=[sub.dask_key for sub, _ in part],
                    pure=False, resources=dict(resources) or None, fn=fn_blob,
                    store_dir=str(self.store.path), pipeline=self.pipe.name, topic=self.topic,
                )
                for (sub, _), future in zip(part, futures, strict=True):
                    sub.future = future
                self._completed.update(futures)
                start, size = end, 0
            if end < len(batch):
                size += len(blobs[end])

    def _settle_late(self) -> None:
        """Ready late tasks (keys waiting for upstream content, see :mod:`nbpipe.content`) get
        their final keys: found done, or submitted under them. What they release settles too."""
        while self.has_late:
            late = [r for r in self.ready if r.late and r.state is State.WAITING
                    and not self.blockers.get(r, 0)]
            if not late:
                return
            settled = self.pipe._settle_late(late)
            if settled is None:
                return
            for ref, old in settled:
                if self.by_key.get(old) is ref:
                    del self.by_key[old]
            for ref in late:
                twin = self.by_key.get(ref.key)
                if ref.late:  # its upstream tasks succeeded, yet a file they wrote is gone
                    gone = ", ".join(str(p) for p in ref.in_files if not p.exists())
                    self._finish(ref, State.FAILED, (
                        f"task {ref.label!r} reads {gone or 'an In file'}, which is gone although "
                        "the task that writes it succeeded; restore the file, or retry that task"))
                elif twin is not None and twin is not ref and twin.state is State.SUCCEEDED:
                    ref.result_file, ref.reason = twin.result_file, "found done"
                    self._finish(ref, State.SUCCEEDED)  # the same content, computed already
                elif twin is not None and twin is not ref and not twin.state.final:
                    ref.late = True  # the same content, being computed: settled after it
                    self.children[twin].add(ref)
                    self.blockers[ref] = 1
                else:
                    self.by_key[ref.key] = ref
                    if ref.state is State.SUCCEEDED:
                        self._finish(ref, State.SUCCEEDED)

    def _unsendable(self, sub: Submission, items: list[WorkItem]) -> bool:
        """Pickle a submission's items (kept in ``_blobs``); when they cannot be pickled (a
        lock, or a task result inside a namedtuple or a set, where nbpipe does not look for
        it) its tasks fail naming the argument, instead of the runner."""
        try:
            self._blobs[sub] = cloudpickle.dumps(items, protocol=5)
            return False
        except Exception:  # noqa: BLE001 - whatever pickling raises names the cause
            pass
        for ref, item in zip(sub.refs, items, strict=True):
            for name, value in [*enumerate(item.args), *item.kwargs.items()]:
                try:
                    cloudpickle.dumps(value, protocol=5)
                except Exception as exc:  # noqa: BLE001
                    what = f"argument {name!r}" if isinstance(name, str) else f"argument {name + 1}"
                    inner = " (it holds a task result inside a container other than a list, " \
                        "tuple or dict: pass the result directly, or in one of those)" \
                        if holds_ref(value) else ""
                    self._not_sent(sub, f"its {what} cannot be sent to a worker "
                                        f"({type(exc).__name__}: {exc}){inner}", only=ref)
                    break
            else:
                self._not_sent(sub, "it was in one chunk with a task whose arguments cannot be "
                                    "sent to a worker; fix that task, then retry both", only=ref)
        return True

    def _not_sent(self, sub: Submission, why: str, only: TaskRef | None = None) -> None:
        """Fail a submission's tasks (or one of them) that cannot be sent to a worker."""
        self.inflight.pop(sub.dask_key, None)
        for ref in sub.refs if only is None else [only]:
            self.sub_of.pop(ref, None)
            self.active[cap_identity(ref.func)] -= 1
            self._finish(ref, State.FAILED, f"task {ref.label!r}: {why}")

    # -- results ------------------------------------------------------------------------------

    def _started(self, msg: dict[str, Any]) -> None:
        for key in msg.get("keys", ()):
            ref = self.by_key.get(key)
            if ref in self.ahead:  # recorded once its upstream tasks' success is
                self.early[ref].append(("start", self.sub_of[ref], msg))
                continue
            if ref is None or ref.state is not State.PENDING:
                continue
            sub = self.sub_of.get(ref)
            if sub is not None:
                sub.started = True
            ref.state = State.RUNNING
            ref.worker = msg.get("worker")
            job = f" (job {msg['job_id']})" if msg.get("job_id") else ""
            self.batch.state(self.pid, key, State.RUNNING.value, attempts=ref.attempts,
                             message=f"{ref.worker}{job}")
        if msg.get("worker") and msg.get("memory_limit"):
            self.worker_memory[msg["worker"]] = int(msg["memory_limit"])
        # A job seen running a task is recorded now, before the task's transitions are written:
        # the periodic poll alone could miss a job whose tasks all end between two polls, and
        # run() would return with the job unrecorded (a crash then could not reap it).
        if self.pools is not None and msg.get("job_id") and \
                self.pools.saw_job(str(msg["job_id"]), msg.get("name")):
            record_jobs(self.store, self.pid, self.pools)

    def _release(self, sub: Submission) -> None:
        self.inflight.pop(sub.dask_key, None)
        for ref in sub.refs:
            if self.sub_of.get(ref) is sub:
                del self.sub_of[ref]
                self.active[cap_identity(ref.func)] -= 1
                self._unhand_below(ref)  # its future is cancelled: theirs with it
        sub.remaining = 0

    def _done(self, dask_keys: list[str]) -> None:
        """Futures that ended. Outcomes normally arrived first, pushed by the workers as events
        (no request per task); a finished future whose outcomes did not arrive in time is
        gathered instead, and a failed one (a lost worker, a cancelled key) fails its tasks."""
        now = time.monotonic()
        for key in dict.fromkeys(dask_keys):
            sub = self.inflight.get(key)
            if sub is None or sub.cancelled:
                continue
            if sub.future.status == "finished":
                self.awaiting.setdefault(sub, now + OUTCOME_GRACE)
            else:
                self._failed_future(sub)
        due = [sub for sub, deadline in self.awaiting.items()
               if now >= deadline or self.inflight.get(sub.dask_key) is not sub]
        for sub in due:
            del self.awaiting[sub]
        due = [sub for sub in due if self.inflight.get(sub.dask_key) is sub]
        if not due:
            return
        try:  # one gather for all of them, not a round trip per task; outcomes only, the
            # values stay on the workers (outcomes_of runs where they are)
            tag = uuid.uuid4().hex[:8]
            gathered = self.client.gather(self.client.map(
                outcomes_of, [sub.future for sub in due], pure=False,
                key=[f"nbpipe-outcomes-{tag}-{sub.dask_key}" for sub in due]), errors="skip")
        except Exception:
            gathered = []
        results = ({id(s): g for s, g in zip(due, gathered, strict=True)}
                   if len(gathered) == len(due) else {})
        for sub in due:
            if id(sub) in results:
                self._apply(sub, results[id(sub)])
            else:
                self._failed_future(sub)

    def _detach(self, sub: Submission, ref: TaskRef) -> bool:
        """Take ``ref`` out of ``sub``; False when it was no longer part of it."""
        if self.sub_of.get(ref) is not sub:
            return False
        del self.sub_of[ref]
        self.active[cap_identity(ref.func)] -= 1
        sub.remaining -= 1
        if sub.remaining <= 0:  # its last task: the future is no longer needed
            self.inflight.pop(sub.dask_key, None)
            self.awaiting.pop(sub, None)
            if sub.future is not None:
                sub.future.release()
        return True

    def _apply(self, sub: Submission, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            ref = self.by_key.get(outcome.key)
            if ref is None or outcome.attempt != ref.attempts:
                continue
            if ref in self.ahead:  # recorded once its upstream tasks' success is
                if self.sub_of.get(ref) is sub:
                    self.early[ref].append(("outcome", sub, outcome))
            elif self._detach(sub, ref):
                self._outcome(ref, outcome)

    def _failed_future(self, sub: Submission) -> None:
        future = sub.future
        exc = future.exception() if future.status == "error" else None
        message = (f"{type(exc).__name__}: {exc}" if exc is not None
                   else f"the Dask future was {future.status}")
        died = isinstance(exc, KilledWorker)
        # The record the dead process left says which item ended it, how, and what it printed.
        crash = (read_crash(self.store.path, sub.refs[0].key, sub.refs[0].attempts)
                 if died else None)
        for ref in list(sub.refs):
            if ref in self.ahead:  # its upstream failed too (then it is taken back) or not
                if self.sub_of.get(ref) is sub:
                    self.early[ref].append(("failed", sub, None))
                continue
            if not self._detach(sub, ref):
                continue
            if ref in self.kill_requested:
                self._finish(ref, State.KILLED, f"task {ref.label!r} was killed on request")
            elif died and crash is not None and crash.key == ref.key:
                self._crash_attempt(ref, crash)
            elif died:
                self._attempt_failed(ref, self._worker_died(ref, exc), None, None, "lost")
            else:
                self._attempt_failed(ref, message, None, None, "lost")

    def _crash_attempt(self, ref: TaskRef, crash: Crash) -> None:
        """Record the attempt that ended its worker process (Dask gave up: ``KilledWorker``)."""
        header = crash.header
        error = describe(ref.label, crash) if crash.timeout is None else \
            policy.timeout_error(ref.label, crash.timeout)  # i20: its watchdog ended the process
        self.batch.attempts.append((
            self.pid, ref.key, ref.attempts,
            State.FAILED.value if crash.timeout is None else policy.TIMED_OUT, header.get("start", 0.0),
            time.time(), header.get("worker"), header.get("host"), header.get("pid"), None,
            crash.exit_code, error, crash.fault or None, crash.stdout[-TAIL:],
            crash.stderr[-TAIL:], None,
        ))
        self._attempt_failed(ref, error, crash.fault or None, None,
                             "exit" if crash.timeout is None else "timeout")

    def _worker_died(self, ref: TaskRef, exc: Any) -> str:
        """Explain a task whose workers kept dying; grow its memory when it asks for that."""
        last = getattr(exc, "last_worker", None)
        address = getattr(last, "address", None) or ref.worker
        limit = getattr(last, "memory_limit", None) or self.worker_memory.get(address or "")
        had = f"a memory limit of {format_bytes(limit)}" if limit else "no memory limit"
        tries = getattr(exc, "allowed_failures", 0) + 1
        message = (
            f"task {ref.label!r}: the worker running it died ({tries} time{'s' if tries > 1 else ''}; "
            f"the last one, {address}, had {had}); a task that kills its worker usually runs out of "
            "memory: ask for more with memory=, or set retry_memory_factor= to grow it on each retry"
        )
        return message + self._grow_memory(ref, limit)

    def _grow_memory(self, ref: TaskRef, limit: int | None) -> str:
        """After a worker death: grow the task's memory for its retry (retry_memory_factor)."""
        factor = ref.func.opts.retry_memory_factor
        if factor and self._retries_left(ref):
            current = self._memory(ref) or limit
            if current:
                grown = int(current * factor)
                self.memory_boost[ref] = grown
                return f"; retrying with memory={format_bytes(grown)}"
        return ""

    def _outcome(self, ref: TaskRef, o: Outcome) -> None:
        count, total = self.durations.get(ref.func, (0, 0.0))
        self.durations[ref.func] = (count + 1, total + max(0.0, o.end - o.start))
        self.probe_deadline.setdefault(ref.func, time.monotonic() + PROBE_TIME)
        self.batch.attempts.append((
            self.pid, o.key, o.attempt, o.state, o.start, o.end, o.worker, o.hostname, o.pid,
            o.job_id, o.exit_code, o.error, o.traceback, o.stdout, o.stderr, o.env_id,
        ))
        if o.env is not None:
            self.batch.envs.append((o.env_id, json.dumps(o.env, sort_keys=True)))
        if o.state == State.SUCCEEDED.value and o.result is not None:
            path, checksum, size = o.result  # path relative to the store root
            ref.result_file = (locate(self.store.path, path), checksum)
            self.batch.results.append((o.key, path, checksum, size, time.time(), o.data))
            if o.data is not None:  # downstream tasks may start before the batch is written
                self.batch_inline[o.key] = o.data
            self._finish(ref, State.SUCCEEDED)
        elif o.state == NOT_RUN:  # its upstream's value was lost with a worker after all
            self._attempt_failed(ref, o.error, None, None)
        elif o.state == State.KILLED.value or ref in self.kill_requested:
            self._finish(ref, State.KILLED, o.error or f"task {ref.label!r} was killed on request")
        elif not (o.error or "").startswith("UpstreamCorrupt") or not self._upstream_corrupt(ref, o):
            self._attempt_failed(ref, o.error, o.traceback, o.exception, o.failure or "exception")

    def _upstream_corrupt(self, ref: TaskRef, o: Outcome) -> bool:
        """An upstream result read by ``ref`` was damaged: compute that task again, then run
        ``ref`` after it, its attempt not counted against its retries. False when that cannot be."""
        try:
            key = cloudpickle.loads(o.exception).key if o.exception else None
        except Exception:
            key = None
        dep = next((d for d in self.pipe.deps(ref) if d.key == key), None)
        if dep is None or dep.state in BAD:
            return False
        self._unhand_below(ref)
        if dep.state is State.SUCCEEDED:
            self.store.forget_result(dep.key)
            self.by_key[dep.key] = dep
            dep.state, dep.result_file, dep.budget = State.WAITING, None, dep.attempts
            dep.reason = "its result file was damaged"
            self.batch.state(self.pid, dep.key, State.WAITING.value, attempts=dep.attempts,
                             reason=dep.reason,
                             message=f"result file damaged (read by {ref.label!r}); running it again")
            for child in self.children.get(dep, ()):  # those not yet sent wait for it again
                if child.state is State.WAITING and child in self.blockers:
                    self.blockers[child] += 1
            self._arm(dep)
        ref.state, ref.budget = State.WAITING, ref.budget + 1
        self.batch.state(self.pid, ref.key, State.WAITING.value, attempts=ref.attempts,
                         error=o.error, message=f"waiting for {dep.label!r} to run again")
        self.blockers.pop(ref, None)
        self._arm(ref)
        return True

    @staticmethod
    def _retries_left(ref: TaskRef) -> bool:
        """Whether a lost worker's attempt of ``ref`` is followed by another (its ``retries``)."""
        return policy.should_retry(ref, "lost")

    def _attempt_failed(self, ref: TaskRef, error: str | None, tb: str | None,
                        exception: bytes | None, kind: str = "exception") -> None:
        ref.error, ref.traceback, ref.exception = error, tb, exception
        if policy.should_retry(ref, kind):  # i20: retries and retry_on (nbpipe.policy)
            self._unhand_below(ref)  # they wait for its next attempt
            ref.state = State.WAITING
            self.batch.state(
                self.pid, ref.key, State.WAITING.value, attempts=ref.attempts, error=error,
                message=f"attempt {ref.attempts} failed ({error}); retrying",
            )
            self.ready.append(ref)
        else:
            self._finish(ref, State.FAILED, error)

    # -- commands -----------------------------------------------------------------------------

    def _command(self, command: Any) -> None:
        args = json.loads(command["args"])
        verb = command["verb"]
        try:
            message = getattr(self, f"_cmd_{verb}")(**args)
            status = "done"
        except Exception as exc:  # a bad command must not stop the runner
            message, status = f"{type(exc).__name__}: {exc}", "failed"
        self.store.finish_command(command["id"], status, message or "")

    def _targets(self, keys: list[str] | None) -> list[TaskRef]:
        return [self.by_key[k] for k in keys or () if k in self.by_key]

    def _cmd_pause(self) -> str:
        self.paused = True
        self.store.set_paused(self.pid, True)
        requeue = self._take_back_queued()
        for ref in requeue:
            self.batch.state(self.pid, ref.key, State.WAITING.value, attempts=ref.attempts,
                             message="paused before it started")
        self.ready.extendleft(reversed(requeue))
        return f"paused; {len(requeue)} queued task(s) held back"

    def _take_back_queued(self) -> list[TaskRef]:
        """Take back what Dask holds but has not started: handed-ahead tasks (they wait, as if
        never sent) and queued submissions (WAITING again, their attempt not counted); return
        the latter, in queue order."""
        for ref in list(self.ahead):
            self._unhand(ref)
        taken = []
        for sub in list(self.inflight.values()):
            live = [r for r in sub.refs if self.sub_of.get(r) is sub]
            if sub.started or any(r.state is not State.PENDING for r in live):
                continue
            sub.cancelled = True
            sub.future.cancel()
            self._release(sub)
            for ref in live:
                ref.attempts -= 1
                ref.state = State.WAITING
                taken.append(ref)
        return taken

    def _stop_submitting(self, failed: TaskRef) -> None:
        """``run(stop_on_failure=True)``: after the first failure, tasks not yet sent to a worker
        are not started (they end KILLED, saying why; running ones finish). desipipe's
        ``spawn(mode='stop_at_error')``."""
        message = (f"not started: the run stopped at the failure of {failed.label!r} "
                   "(stop_on_failure); fix it, then run again")
        self._take_back_queued()
        for ref in list(self.by_key.values()):
            if ref.state is State.WAITING and ref not in self.sub_of:
                self._finish(ref, State.KILLED, message)

    def _cmd_resume(self) -> str:
        self.paused = False
        self.store.set_paused(self.pid, False)
        return "resumed"

    def _cmd_kill(self, keys: list[str] | None = None) -> str:
        from .control import killed_message

        killed = 0
        for ref in self._targets(keys):
            if ref.state is State.WAITING:
                self._finish(ref, State.KILLED, killed_message(ref.label, started=False))
            elif ref.state is State.PENDING:
                sub = self.sub_of[ref]
                if len(sub.refs) == 1:
                    sub.cancelled = True
                    sub.future.cancel()
                    self._release(sub)
                    self._finish(ref, State.KILLED, killed_message(ref.label, started=False))
                else:  # part of a chunk: every worker skips it when its turn comes
                    self.kill_requested.add(ref)
                    self._interrupt(ref.key, None)
            elif ref.state is State.RUNNING:
                self.kill_requested.add(ref)
                self.kill_deadline[ref] = time.monotonic() + KILL_GRACE
                workers = [ref.worker] if ref.worker else None
                self._interrupt(ref.key, workers)
            else:
                continue
            killed += 1
        return f"killing {killed} task(s)"

    def _interrupt(self, key: str, workers: list[str] | None) -> None:
        """Raise TaskKilled in the thread running ``key`` (from a thread: never block the loop)."""

        def send() -> None:
            try:
                self.client.run(interrupt, key, workers=workers, on_error="ignore")
            except Exception:  # the worker is gone: the restart fallback still applies
                log.debug("could not interrupt %s", key, exc_info=True)

        threading.Thread(target=send, daemon=True).start()

    def _interrupt_attempts(self, attempts: list[tuple[str, str]]) -> None:
        """Tell every worker to skip (or stop) these task attempts: taken back from a fused
        chain whose Dask task goes on (from a thread: never block the loop)."""

        def send() -> None:
            try:
                self.client.run(skip_attempts, attempts, on_error="ignore")
            except Exception:  # a worker gone: its Dask task is gone too
                log.debug("could not skip %d attempt(s)", len(attempts), exc_info=True)

        threading.Thread(target=send, daemon=True).start()

    def _kill_fallbacks(self, now: float) -> None:
        """Restart the worker of a killed task that did not stop (blocked in C code)."""
        for ref, deadline in list(self.kill_deadline.items()):
            if now < deadline:
                continue
            del self.kill_deadline[ref]
            sub = self.sub_of.get(ref)
            if sub is None or ref.state is not State.RUNNING:
                continue
            live = [r for r in sub.refs if self.sub_of.get(r) is sub and r not in self.ahead]
            sub.cancelled = True
            sub.future.cancel()
            self._release(sub)  # (a fused chain's handed-ahead tasks are taken back with it)
            if ref.worker:
                threading.Thread(target=self._restart_worker, daemon=True,
                                 args=(ref.worker, sub.refs[0].key, sub.refs[0].attempts)).start()
            for other in live:
                if other is ref or other in self.kill_requested:
                    self._finish(other, State.KILLED,
                                 f"task {other.label!r} was killed on request (worker restarted)")
                elif not other.state.final:
                    other.attempts -= 1
                    other.state = State.WAITING
                    self.ready.append(other)

    def _restart_worker(self, address: str, key: str, attempt: int) -> None:
        try:
            self.client.restart_workers([address], raise_for_error=False)
        except Exception:  # the cluster may be closing; the task is killed either way
            log.debug("could not restart worker %s", address, exc_info=True)
        discard(self.store.path, key, attempt)  # what the restarted worker left: not a crash

    def _cmd_retry(self, keys: list[str] | None = None, failed: bool = False) -> str:
        from .control import RETRY_REASON, forget_results, retry_set

        unknown = [k for k in keys or () if k not in self.by_key]
        if unknown:  # tasks never handed to the runner (found done): they run again too
            runnable = {r.key_: r for r in self.pipe.refs() if r.key_ in set(unknown)
                        and r.func is not None}
            self._integrate(list(runnable.values()))
            # (tasks this process cannot run: the next runner runs them)
            lost = [k for k in unknown if k not in runnable]
            rows = self.store.task_rows(self.pid, lost)
            forget_results(self.store, lost)
            for key, row in rows.items():
                self.batch.state(self.pid, key, State.WAITING.value, attempts=row["attempts"],
                                 reason=RETRY_REASON, message=RETRY_REASON)
        targets = self._targets(keys)
        if failed:
            targets += [r for r in self.by_key.values() if r.state in (State.FAILED, State.KILLED)]
        # the same rules as without a runner (nbpipe.control): one retry behaviour
        reset = retry_set(targets, lambda r: r.state, lambda r: self.children.get(r, ()),
                          busy=lambda r: r in self.sub_of)
        forget_results(self.store, [r.key for r in reset if r.state is State.SUCCEEDED])
        for ref in reset:
            if ref.state is State.SUCCEEDED:
                ref.result_file = None
            ref.state = State.WAITING
            ref.budget = ref.attempts
            ref.error = ref.traceback = ref.exception = None
            ref.reason = RETRY_REASON
            self.batch.state(self.pid, ref.key, State.WAITING.value, attempts=ref.attempts,
                             reason=RETRY_REASON, message=RETRY_REASON)
        for ref in reset:
            self._arm(ref)
        return f"retrying {len(reset)} task(s)"


def cap_identity(func: Any) -> tuple[str, str]:
    """What ``max_concurrent`` counts tasks by: the task function's kind and name, so copies
    (``with_options``) and the functions revived in a detached runner share one cap."""
    return (func.kind, func.name)


def holds_collection(value: Any) -> bool:
    """Whether ``value`` holds a Dask collection (not a task result) where nbpipe looks for task
    results: it is computed on the cluster as the task's input."""
    return any_leaf(value, lambda v: is_dask_collection(v) and not is_ref(v))


def record_jobs(store: Any, pipeline_id: int, pools: Any) -> None:
    """Write the batch jobs a pool cluster submitted or saw end since the last call."""
    new, ended = pools.take_new(), pools.take_ended()
    if new:
        store.add_jobs(pipeline_id, pools.kind, [(j.job_id, j.pool, j.name) for j in new])
    if ended:
        store.end_jobs(pipeline_id, pools.kind, [(j.job_id, j.state) for j in ended if j.job_id])
