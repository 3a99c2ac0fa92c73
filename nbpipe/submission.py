"""Submission: ready tasks become WorkItems, grouped into Dask tasks and sent with ``client.map``.

Part of :class:`nbpipe.runner.Runner` (a mixin over its tables, see ``Runner.__init__``): picking
what may go this tick (caps, batching, the user's chunks), building each task's WorkItem (upstream
values, Dask collections among the arguments, resources), pickling once per function and per
group, and sending at the end of the tick; a submission that cannot be sent fails its tasks
naming the cause instead of stopping the runner.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cloudpickle

from . import policy  # i20: timeout (nbpipe.policy)
from .errors import ResourceError
from .identity import is_dask_collection
from .results import INLINE
from .shipping import bundle
from .states import State
from .walk import any_leaf, holds_ref, is_ref, map_refs
from .worker import Upstream, WorkItem, as_done, run_items

if TYPE_CHECKING:
    from .task import TaskRef

__all__ = ["SUBMIT_BYTES", "Submission", "Submitting", "cap_identity", "holds_collection"]

SUBMIT_BYTES = 4 * 2**20  # pickled items per client.map call


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


def cap_identity(func: Any) -> tuple[str, str]:
    """What ``max_concurrent`` counts tasks by: the task function's kind and name, so copies
    (``with_options``) and the functions revived in a detached runner share one cap."""
    return (func.kind, func.name)


def holds_collection(value: Any) -> bool:
    """Whether ``value`` holds a Dask collection (not a task result) where nbpipe looks for task
    results: it is computed on the cluster as the task's input."""
    return any_leaf(value, lambda v: is_dask_collection(v) and not is_ref(v))


class Submitting:
    """The runner's submission side (mixed into :class:`nbpipe.runner.Runner`)."""

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
        """How to submit ready tasks of one function (:meth:`nbpipe.batching.BatchPolicy.batches`)."""
        capped = func.opts.max_concurrent is not None or self.max_concurrent is not None
        if capped or self.policy.batch_seconds <= 0 or not self.policy.known(func):
            threads = 1  # (only used once durations are known: no lookup)
        else:
            threads = self._threads()
        return self.policy.batches(func, refs, now, running=self.active[cap_identity(func)],
                                   threads=threads, capped=capped)

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
                self._finish(ref, State.FAILED, str(exc), attempts=ref.attempts + 1)
            return False
        items = []
        if not ahead:
            self.host.executed(refs)  # what run() reports as executed (retries included)
        chain = self._chain_below(refs[0]) if len(refs) == 1 else []
        for ref in chain:  # handed ahead inside the same Dask task (counted as _hand_ahead does)
            self.active[cap_identity(ref.func)] += 1
        for ref in [*refs, *chain]:
            needs = bool(ref.upstream) or holds_collection((ref.args, ref.kwargs))
            if ahead or ref in chain:  # WAITING until its upstream tasks succeed
                self.ahead.add(ref)
                ref.update(attempts=ref.attempts + 1, worker=None)
            else:
                ref.update(state=State.PENDING, attempts=ref.attempts + 1, worker=None)
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
                self.sub_of[d] for d in self.host.deps(first) if d.state is not State.SUCCEEDED))
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
            shipped = bundle(func.fn, modules, func.name)
            blob = self._fn_blobs[func] = cloudpickle.dumps(shipped, protocol=5)
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
                    store_dir=str(self.store.path), pipeline=self.name, topic=self.topic,
                )
                for (sub, _), future in zip(part, futures, strict=True):
                    sub.future = future
                self._completed.update(futures)
                start, size = end, 0
            if end < len(batch):
                size += len(blobs[end])

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

    def _release(self, sub: Submission) -> None:
        self.inflight.pop(sub.dask_key, None)
        for ref in sub.refs:
            if self.sub_of.get(ref) is sub:
                del self.sub_of[ref]
                self.active[cap_identity(ref.func)] -= 1
                self._unhand_below(ref)  # its future is cancelled: theirs with it
        sub.remaining = 0
