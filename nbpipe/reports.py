"""Reports: what the workers report (a task started, an attempt ended), what a failed future
means (a lost worker, a crash record, a cancelled key), and retries.

Part of :class:`nbpipe.runner.Runner` (a mixin over its tables, see ``Runner.__init__``). Workers
push outcomes as events (no request per task); a finished future whose outcomes did not arrive
within OUTCOME_GRACE is gathered instead. Each attempt is recorded; whether a failed one runs
again is :mod:`nbpipe.policy`'s decision (retries, retry_on, memory grown after worker deaths).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

import cloudpickle
from dask.utils import format_bytes
from distributed.scheduler import KilledWorker

from . import policy  # i20: retry_on, timeouts (nbpipe.policy)
from .crashes import Crash, describe, read_crash
from .jobs import record_jobs
from .results import locate
from .states import BAD, State
from .submission import Submission, cap_identity
from .worker import NOT_RUN, TAIL, Outcome, Unsettled, outcomes_of

if TYPE_CHECKING:
    from .task import TaskRef

__all__ = ["OUTCOME_GRACE", "Reports"]

OUTCOME_GRACE = 2.0  # seconds a finished future waits for its outcome event before a gather


class Reports:
    """The runner's outcomes and retries (mixed into :class:`nbpipe.runner.Runner`)."""

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
            run = ref.update(state=State.RUNNING, worker=msg.get("worker"))
            job = f" (job {msg['job_id']})" if msg.get("job_id") else ""
            self.batch.state(self.pid, key, State.RUNNING.value, attempts=run.attempts,
                             message=f"{run.worker}{job}")
        if msg.get("worker") and msg.get("memory_limit"):
            self.worker_memory[msg["worker"]] = int(msg["memory_limit"])
        # A job seen running a task is recorded now, before the task's transitions are written:
        # the periodic poll alone could miss a job whose tasks all end between two polls, and
        # run() would return with the job unrecorded (a crash then could not reap it).
        if self.pools is not None and msg.get("job_id") and \
                self.pools.saw_job(str(msg["job_id"]), msg.get("name")):
            record_jobs(self.store, self.pid, self.pools)

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
        unsettled = []
        for sub in due:
            if id(sub) not in results:
                self._failed_future(sub)
            elif isinstance(results[id(sub)], Unsettled):
                unsettled.append((sub, results[id(sub)].origin))
            else:
                self._apply(sub, results[id(sub)])
        if unsettled:
            self._unsettled(unsettled, now)

    def _unsettled(self, subs: list[tuple[Submission, str | None]], now: float) -> None:
        """Finished Dask tasks whose outcomes are not final where they were read, each with
        its origin: its result file is still being written there, and that worker's writer
        pushes them once it is (the gather read the original, or a copy made before). Wait
        for that event again; when the origin has left the cluster, the file may never be
        written: the attempt is lost."""
        try:  # (one look at the cluster for all of them)
            workers = set(self.client.scheduler_info(n_workers=-1)["workers"])
        except Exception:  # the scheduler cannot say now: ask again later
            workers = None
        for sub, origin in subs:
            if workers is None or origin is None or origin in workers:
                self.awaiting[sub] = now + OUTCOME_GRACE
            else:
                self._failed_future(sub, f"task {sub.refs[0].label!r}: the worker that ran it "
                                         f"({origin}) left before its result file was written")

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

    def _failed_future(self, sub: Submission, reason: str | None = None) -> None:
        """``sub``'s Dask task failed (a lost worker, a cancelled key), or, with ``reason``,
        its outcomes were lost: every task of it that is still part of it failed an attempt."""
        future = sub.future
        exc = future.exception() if future.status == "error" and reason is None else None
        message = reason or (f"{type(exc).__name__}: {exc}" if exc is not None
                             else f"the Dask future was {future.status}")
        died = isinstance(exc, KilledWorker)
        # The record the dead process left says which item ended it, how, and what it printed.
        crash = (read_crash(self.store.path, sub.refs[0].key, sub.refs[0].attempts)
                 if died else None)
        for ref in list(sub.refs):
            if ref in self.ahead:  # its upstream failed too (then it is taken back) or not
                if self.sub_of.get(ref) is sub:
                    self.early[ref].append(("failed", sub, reason))
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
        self.policy.record(ref.func, o.end - o.start, time.monotonic())
        self.batch.attempts.append((
            self.pid, o.key, o.attempt, o.state, o.start, o.end, o.worker, o.hostname, o.pid,
            o.job_id, o.exit_code, o.error, o.traceback, o.stdout, o.stderr, o.env_id,
        ))
        if o.env is not None:
            self.batch.envs.append((o.env_id, json.dumps(o.env, sort_keys=True)))
        if o.state == State.SUCCEEDED.value and o.result is not None:
            path, checksum, size = o.result  # path relative to the store root
            self.batch.results.append((o.key, path, checksum, size, time.time(), o.data))
            if o.data is not None:  # downstream tasks may start before the batch is written
                self.batch_inline[o.key] = o.data
            self._finish(ref, State.SUCCEEDED, result_file=(locate(self.store.path, path), checksum))
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
        dep = next((d for d in self.host.deps(ref) if d.key == key), None)
        if dep is None or dep.state in BAD:
            return False
        self._unhand_below(ref)
        if dep.state is State.SUCCEEDED:
            self.store.forget_result(dep.key)
            self.by_key[dep.key] = dep
            dep.update(state=State.WAITING, result_file=None, budget=dep.attempts,
                       reason="its result file was damaged")
            self.batch.state(self.pid, dep.key, State.WAITING.value, attempts=dep.attempts,
                             reason=dep.reason,
                             message=f"result file damaged (read by {ref.label!r}); running it again")
            for child in self.children.get(dep, ()):  # those not yet sent wait for it again
                if child.state is State.WAITING and child in self.blockers:
                    self.blockers[child] += 1
            self._arm(dep)
        ref.update(state=State.WAITING, budget=ref.budget + 1)  # (this attempt is not counted)
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
        if policy.should_retry(ref, kind):  # i20: retries and retry_on (nbpipe.policy)
            self._unhand_below(ref)  # they wait for its next attempt
            ref.run_state = ref.run_state.ended(State.WAITING, error, tb, exception)
            self.batch.state(
                self.pid, ref.key, State.WAITING.value, attempts=ref.attempts, error=error,
                message=f"attempt {ref.attempts} failed ({error}); retrying",
            )
            self.ready.append(ref)
        else:
            self._finish(ref, State.FAILED, error, traceback=tb, exception=exception)
