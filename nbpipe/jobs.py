"""Batch jobs of worker pools: what nbpipe records of each, the queue's view, cancelling, and
the runner's side of them (placing tasks in pools, scaling pools to the work, reaping the jobs an
earlier runner left, recording jobs in the store).

>>> queue_states("pbs", ["42"]) is None        # no queue query for PBS: the Dask scheduler tells
True
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import shlex
import subprocess
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ResourceError
from .schedulers import SCHEDULERS, cluster_class

if TYPE_CHECKING:
    from .task import TaskRef

__all__ = ["JobInfo", "PoolScaling", "cancel_jobs", "queue_states", "record_jobs"]

log = logging.getLogger("nbpipe")

SCALE_POLL = 1.0  # seconds between scaling decisions for worker pools


@dataclass
class JobInfo:
    """A batch job that runs (or ran) one worker of a pool."""

    pool: str
    name: str
    job_id: str | None
    state: str = "SUBMITTED"
    worker: str | None = None


def queue_states(kind: str, job_ids: list[str]) -> dict[str, str] | None:
    """States of ``job_ids`` in the batch queue, in one call; None when the kind has no query.

    Jobs the queue no longer knows are left out: they ended. Kinds without a
    :attr:`~nbpipe.schedulers.Scheduler.queue_query` (all but Slurm) are not queried: nbpipe
    relies on the Dask scheduler seeing the worker go.
    """
    query = SCHEDULERS[kind].queue_query if kind in SCHEDULERS else None
    if query is None:
        return None
    if not job_ids:
        return {}
    try:
        out = subprocess.run(
            [part.format(user=getpass.getuser()) for part in query],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("%s failed: %s", query[0], exc)
        return None
    wanted = set(job_ids)
    states = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in wanted:
            states[parts[0]] = parts[1]
    return states


def cancel_jobs(kind: str, job_ids: list[str]) -> None:
    """Cancel batch jobs (``scancel``, ``qdel``, ``bkill``, ``condor_rm``) in one call."""
    if not job_ids or kind not in SCHEDULERS or not SCHEDULERS[kind].batch:
        return
    command = shlex.split(cluster_class(kind).job_cls.cancel_command)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run([*command, *job_ids], capture_output=True, timeout=60)


def record_jobs(store: Any, pipeline_id: int, pools: Any) -> None:
    """Write the batch jobs a pool cluster submitted or saw end since the last call."""
    new, ended = pools.take_new(), pools.take_ended()
    if new:
        store.add_jobs(pipeline_id, pools.kind, [(j.job_id, j.pool, j.name) for j in new])
    if ended:
        store.end_jobs(pipeline_id, pools.kind, [(j.job_id, j.state) for j in ended if j.job_id])


class PoolScaling:
    """The runner's worker pools (mixed into :class:`nbpipe.runner.Runner`): which pool a task
    runs in, how many jobs each pool needs, and the batch jobs recorded in the store."""

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
        if now - self._last_jobs >= self.job_poll:
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
