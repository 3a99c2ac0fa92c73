"""Commands: pause, resume, kill and retry, from this or another process, and kill fallbacks.

Part of :class:`nbpipe.runner.Runner` (a mixin over its tables, see ``Runner.__init__``). The
runner reads the store's command table each tick and calls ``_cmd_<verb>``; a bad command is
recorded as failed and never stops the runner. A task asked to stop gets TaskKilled raised in its
thread; one that does not stop within KILL_GRACE (blocked in C code) has its worker restarted.
Retry follows the same rules as without a runner (:mod:`nbpipe.control`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from .crashes import discard
from .states import State
from .worker import interrupt, skip_attempts

if TYPE_CHECKING:
    from .task import TaskRef

__all__ = ["KILL_GRACE", "Commands"]

log = logging.getLogger("nbpipe")

KILL_GRACE = 2.0  # seconds for an interrupted task to stop before its worker is restarted


class Commands:
    """The runner's commands and kill fallbacks (mixed into :class:`nbpipe.runner.Runner`)."""

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
                ref.update(state=State.WAITING, attempts=ref.attempts - 1)
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
                    self._interrupt(ref.key, None, within=sub.dask_key)
            elif ref.state is State.RUNNING:
                self.kill_requested.add(ref)
                self.kill_deadline[ref] = time.monotonic() + KILL_GRACE
                workers = [ref.worker] if ref.worker else None
                sub = self.sub_of.get(ref)
                self._interrupt(ref.key, workers, within=sub.dask_key if sub else None)
            else:
                continue
            killed += 1
        return f"killing {killed} task(s)"

    def _interrupt(self, key: str, workers: list[str] | None, within: str | None = None) -> None:
        """Raise TaskKilled in the thread running ``key`` (from a thread: never block the loop).

        ``within`` names the Dask task the attempt was sent in: the mark left on a worker that
        did not run it (or that it had already left) then matches that Dask task only, never
        the task's next attempt, which goes to Dask under another key.
        """

        def send() -> None:
            try:
                self.client.run(interrupt, key, within, workers=workers, on_error="ignore")
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
                    other.update(state=State.WAITING, attempts=other.attempts - 1)
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
            runnable = {r.key_: r for r in self.host.refs() if r.key_ in set(unknown)
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
            ref.run_state = ref.run_state.retried(RETRY_REASON)
            self.batch.state(self.pid, ref.key, State.WAITING.value, attempts=ref.attempts,
                             reason=RETRY_REASON, message=RETRY_REASON)
        for ref in reset:
            self._arm(ref)
        return f"retrying {len(reset)} task(s)"
