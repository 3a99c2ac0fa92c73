"""Handing tasks ahead: a task whose upstream tasks are all submitted (or done) is submitted too.

Part of :class:`nbpipe.runner.Runner` (a mixin over its tables, see ``Runner.__init__``).

A task handed ahead goes to Dask with its upstream tasks' futures as inputs: Dask runs it as soon
as they end, on the worker that holds their values (no round trip through the runner per level,
no read-back of a result still in memory). It stays WAITING until the runner has recorded its
upstream tasks' success, then becomes PENDING, and what its worker reported meanwhile is applied
then, so the store records transitions in order. When one of them fails, is killed, or the
pipeline pauses, it is taken back and ends exactly as a task that was never sent (waits for a
retry, UPSTREAM_FAILED, WAITING). Chains of quick tasks are fused into one Dask task. Which tasks
may go ahead and which chains fuse are the pure decisions of :mod:`nbpipe.readiness`.

Late tasks (keys waiting for upstream content, :mod:`nbpipe.content`) are settled here too, by
the pipeline (``RunnerHost.settle_late``), before ready tasks are submitted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .readiness import chain_below, groupable, may_hand
from .states import State
from .submission import cap_identity

if TYPE_CHECKING:
    from .task import TaskRef

__all__ = ["HandingAhead"]


class HandingAhead:
    """The runner's hand-ahead, fusion and late tasks (mixed into :class:`nbpipe.runner.Runner`)."""

    def _may_hand(self, ref: TaskRef) -> bool:
        """Whether ``ref`` can be handed to Dask ahead of its upstream tasks' outcomes
        (:func:`nbpipe.readiness.may_hand`; capped tasks wait for a free slot instead)."""
        if self.paused or ref.func is None:
            return False
        capped = self.max_concurrent is not None or ref.func.opts.max_concurrent is not None
        return may_hand(ref, self.host.deps(ref), waits_for=self.blockers.get(ref, 0),
                        sent=self.sub_of, killing=self.kill_requested, capped=capped)

    def _chain_below(self, ref: TaskRef) -> list[TaskRef]:
        """The tasks to fuse with ``ref`` into its Dask task (:func:`nbpipe.readiness.chain_below`),
        as many as :meth:`nbpipe.batching.BatchPolicy.fuse_limit` allows.

        Each task keeps its own key, state, attempt record and result file, and the worker
        streams the outcomes back as they come (nbpipe.worker).
        """
        func = ref.func
        if (self.paused or func is None or ref.late or func.opts.max_concurrent is not None
                or self.max_concurrent is not None or groupable(ref) or ref in self.memory_boost):
            return []
        limit = self.policy.fuse_limit(func, batch_jobs=self.pools is not None)
        if limit <= 1:
            return []
        return chain_below(ref, limit, children=self.children, deps_of=self.host.deps,
                           waits_for=self.blockers, sent=self.sub_of,
                           excluded=lambda r: r in self.memory_boost or r in self.kill_requested)

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
            ref.update(attempts=ref.attempts - 1, worker=None)
        else:
            ref.update(worker=None)

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
        ref.update(state=State.PENDING)
        self.host.executed([ref])
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
                else:  # (payload: why its outcomes were lost, if not a failed future)
                    self._failed_future(sub, payload)

    def _settle_late(self) -> None:
        """Ready late tasks (keys waiting for upstream content, see :mod:`nbpipe.content`) get
        their final keys: found done, or submitted under them. What they release settles too."""
        while self.has_late:
            late = [r for r in self.ready if r.late and r.state is State.WAITING
                    and not self.blockers.get(r, 0)]
            if not late:
                return
            settled = self.host.settle_late(late)
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
                    self._finish(ref, State.SUCCEEDED, result_file=twin.result_file,
                                 reason="found done")  # the same content, computed already
                elif twin is not None and twin is not ref and not twin.state.final:
                    ref.late = True  # the same content, being computed: settled after it
                    self.children[twin].add(ref)
                    self.blockers[ref] = 1
                else:
                    self.by_key[ref.key] = ref
                    if ref.state is State.SUCCEEDED:
                        self._finish(ref, State.SUCCEEDED)
