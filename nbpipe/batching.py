"""Adaptive batching: how many ready tasks of one function go into one Dask task.

Tiny tasks cost Dask more to schedule than to run. Once a function's tasks are known to be short,
ready ones run in batches of about ``batch_seconds`` of work per Dask task, and chains of them are
fused into one Dask task (each task keeps its own key, state, attempts and result). While their
durations are unknown and many tasks wait, a few run first as probes.

Pure: no Dask, no store. The runner feeds it durations and asks it for decisions.

>>> policy = BatchPolicy(batch_seconds=0.2)
>>> for _ in range(4):
...     policy.record("f", 0.001, now=0.0)
>>> [len(b) for b in policy.batches("f", list(range(500)), now=1.0, running=0, threads=2)[0]]
[125, 125, 125, 125]
>>> policy.fuse_limit("f", batch_jobs=False)
200
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

__all__ = ["BATCH_SECONDS", "FUSE_UNKNOWN", "MAX_BATCH", "PROBE_COUNT", "PROBE_MIN", "PROBE_START",
           "PROBE_TIME", "BatchPolicy"]

BATCH_SECONDS = 0.2  # work per Dask task when tiny tasks are batched (config nbpipe.batch-seconds)
MAX_BATCH = 256  # tasks per automatic batch at most
PROBE_MIN = 64  # fewer ready tasks of a function than this are never held back
PROBE_COUNT = 16  # tasks run first to learn how long a function's tasks take
PROBE_TIME = 0.5  # seconds the other tasks wait for more probes once the first one finished
PROBE_START = 30.0  # seconds at most they wait for a first probe to finish (workers starting)
FUSE_UNKNOWN = 16  # tasks of a chain fused into one Dask task while their durations are unknown

T = TypeVar("T")


class BatchPolicy:
    """What the runner learned of each function's task durations, and the batching it implies.

    Functions are any hashable (the runner uses its task functions). ``batch_seconds`` <= 0
    turns batching and fusion off (``nbpipe.batch-seconds: 0``).
    """

    def __init__(self, batch_seconds: float = BATCH_SECONDS) -> None:
        self.batch_seconds = batch_seconds
        self.durations: dict[Hashable, tuple[int, float]] = {}  # function -> (count, seconds)
        self.probe_deadline: dict[Hashable, float] = {}  # function -> end of its probing
        self.probe_seen: dict[Hashable, float] = {}  # function -> when its tasks were first held

    def record(self, func: Hashable, seconds: float, now: float) -> None:
        """One task of ``func`` ran for ``seconds`` (``now``: the runner's monotonic clock)."""
        count, total = self.durations.get(func, (0, 0.0))
        self.durations[func] = (count + 1, total + max(0.0, seconds))
        self.probe_deadline.setdefault(func, now + PROBE_TIME)

    def known(self, func: Hashable) -> bool:
        """Whether enough of ``func``'s tasks ran to batch by their mean duration."""
        return self.durations.get(func, (0, 0.0))[0] >= PROBE_COUNT // 4

    def _per_batch(self, func: Hashable) -> int:
        count, total = self.durations[func]
        return min(MAX_BATCH, int(self.batch_seconds / max(total / count, 1e-4)))

    def batches(self, func: Hashable, refs: Sequence[T], now: float, *, running: int,
                threads: int, capped: bool = False) -> tuple[list[list[T]], list[T]]:
        """How to submit ready tasks of one function: (batches to submit now, tasks to hold).

        ``running``: tasks of the function in flight (probes among them); ``threads``: worker
        threads in the cluster; ``capped``: a ``max_concurrent`` applies (caps count tasks, so
        they go one at a time). While durations are unknown and at least PROBE_MIN tasks wait,
        PROBE_COUNT run first as probes, the rest held for at most PROBE_TIME after the first
        one finished (or PROBE_START after they were first held: a fresh cluster's workers take
        a while to start, so the rest are not sent one by one just because they were slow).
        """
        singles = [[r] for r in refs]
        if capped or self.batch_seconds <= 0:
            return singles, []
        if self.known(func):
            size = min(self._per_batch(func), len(refs) // (2 * threads))
            if size <= 1:
                return singles, []
            return [list(refs[i:i + size]) for i in range(0, len(refs), size)], []
        deadline = self.probe_deadline.get(func, self.probe_seen.setdefault(func, now) + PROBE_START)
        if len(refs) < PROBE_MIN or now >= deadline:
            return singles, []
        probes = max(0, PROBE_COUNT - running)
        return singles[:probes], list(refs[probes:])

    def fuse_limit(self, func: Hashable, *, batch_jobs: bool) -> int:
        """How many tasks of a chain of ``func`` one Dask task may run (1: no fusion).

        About ``batch_seconds`` of work once durations are known; FUSE_UNKNOWN before, except on
        batch jobs (``batch_jobs``), whose walltime may end a long fused run.
        """
        if self.batch_seconds <= 0:
            return 1
        if not self.known(func):
            return 1 if batch_jobs else FUSE_UNKNOWN
        return self._per_batch(func)
