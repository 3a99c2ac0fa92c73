"""The Dask cluster of a set of worker pools: one scheduler, batch jobs of every pool, scaled
to the work each pool has (see :mod:`nbpipe.pools` for the pools themselves).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dask.utils import format_bytes

from .errors import ClusterError, ResourceError
from .jobs import JobInfo, cancel_jobs, queue_states
from .pools import DEFAULT_IDLE, Pool
from .results import make_private, private_dirs
from .schedulers import ENDED, SCHEDULERS, cluster_class

__all__ = ["PoolCluster"]


class PoolCluster:
    """The Dask cluster of a set of pools: one scheduler, jobs of every pool, demand scaling."""

    def __init__(self, pools: list[Pool], *, security: Any = True, store_dir: Path | None = None,
                 scheduler_options: Mapping[str, Any] | None = None, idle_timeout: float = DEFAULT_IDLE):
        from distributed.security import Security

        self.pools = {p.name: p for p in pools}
        self.idle_timeout = idle_timeout
        first = pools[0]
        if security is True:
            security = Security.temporary()
        elif security is False or security is None:
            security = None
        elif isinstance(security, Mapping):
            security = Security(**security)
        # Workers read the temporary certificates from here: the store is on the shared file
        # system the jobs see. Without a store (a preview), a private temporary directory (the
        # certificate files go when the cluster object does).
        shared = self._tmp = None
        if security is not None:
            if store_dir is not None:
                shared = store_dir / "tls"
                shared.mkdir(mode=0o700, parents=True, exist_ok=True)
            else:
                shared = self._tmp = Path(tempfile.mkdtemp(prefix="nbpipe-tls-"))
        if store_dir is not None:  # private before dask-jobqueue makes it with the umask's mode
            private_dirs(store_dir / "jobs")
            make_private(store_dir / "jobs", 0o700)
        for pool in pools:
            if pool.job_kwargs.get("log_directory"):
                private_dirs(Path(pool.job_kwargs["log_directory"]))
        options = {"dashboard_address": ":0", **(scheduler_options or {})}
        try:
            self.cluster = cluster_class(first.kind)(
                n_workers=0, security=security, shared_temp_directory=str(shared) if shared else None,
                scheduler_options=options, **first.job_kwargs,
            )
        except (ValueError, TypeError) as exc:
            raise ClusterError(f"cluster pool {first.name!r}: dask-jobqueue refused the options: {exc}") \
                from None
        # what dask-jobqueue settled for the first pool's jobs (its worker spec, public as
        # SpecCluster.new_spec), every pool's jobs share: they join one scheduler
        first_options = self.cluster.new_spec["options"]
        common = {k: first_options[k] for k in ("interface", "protocol", "security")}
        self.specs: dict[str, dict[str, Any]] = {}
        for pool in pools:
            job_cls = cluster_class(pool.kind).job_cls
            opts = {**pool.job_kwargs, **common}
            opts.setdefault("config_name", job_cls.default_config_name())
            self.specs[pool.name] = {"cls": job_cls, "options": opts}
            try:
                job_cls(self.cluster.scheduler_address, name=f"{pool.name}-check", **opts)
            except (ValueError, TypeError) as exc:
                self.cluster.close()
                raise ClusterError(
                    f"cluster pool {pool.name!r}: dask-jobqueue refused the options: {exc}"
                ) from None
        self._pool_of: dict[str, str] = {}  # worker (job) name -> pool
        self._counter = 0
        self._surplus_since: dict[str, float] = {}
        self._wanted: dict[str, int] = {p.name: p.min_jobs for p in pools}
        self._known: dict[str, JobInfo] = {}  # job id -> info, every job this cluster submitted
        self._new: list[JobInfo] = []
        self._ended: list[JobInfo] = []
        self._jobs_lock = threading.Lock()  # the runner and a `%pipeline cluster` both poll
        if any(p.min_jobs for p in pools):
            self._apply(dict(self._wanted))

    # -- description --------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """The batch scheduler kind (``"slurm"``, ...); every pool of a cluster shares it."""
        return self.pools["default"].kind

    @property
    def address(self) -> str:
        """The scheduler's address (``tls://`` unless TLS was turned off)."""
        return self.cluster.scheduler_address

    def job_script(self, pool: str = "default") -> str:
        """The batch script a job of ``pool`` is submitted with."""
        spec = self.specs[pool]
        return spec["cls"](self.address, name=f"{pool}-preview", **spec["options"]).job_script()

    def previews(self) -> list[dict[str, str]]:
        """Each pool's name, description and job script (what ``nbpipe show``, ``nbpipe
        cluster`` and ``%pipeline cluster`` print); a script that cannot be made says why."""
        out = []
        for name, pool in self.pools.items():
            try:
                script = self.job_script(name)
            except Exception as exc:  # a preview must never stop a run
                script = f"(no preview: {exc})"
            out.append({"name": name, "description": pool.describe(), "job_script": script})
        return out

    def describe(self) -> str:
        """``slurm pools default (1 core, 1 GB, up to 2 jobs), big (...)``."""
        return "; ".join(p.describe() for p in self.pools.values())

    # -- placement ----------------------------------------------------------------------------

    def place(self, label: str, cores: int, memory: int | None, gpus: int, walltime: float | None,
              pool: str | None) -> Pool:
        """The pool a task runs in: its ``pool=``, else the smallest pool large enough for it."""
        if pool is not None and pool not in self.pools:
            raise ResourceError(
                f"task {label!r}: pool={pool!r} is not a pool of this cluster; its pools are "
                f"{', '.join(self.pools)} (add one under cluster 'pools')"
            )
        candidates = [self.pools[pool]] if pool is not None else list(self.pools.values())
        fitting = [p for p in candidates if p.fits(cores, memory, gpus, walltime)]
        if not fitting:
            need = [f"cores={cores}"]
            if memory:
                need.append(f"memory={format_bytes(memory)}")
            if gpus:
                need.append(f"gpus={gpus}")
            if walltime:
                need.append(f"walltime={SCHEDULERS[candidates[0].kind].walltime_text(walltime)}")
            largest = max(candidates, key=lambda p: (p.cores, p.memory, p.gpus, p.lifetime or math.inf))
            lifetime = (SCHEDULERS[largest.kind].walltime_text(largest.lifetime)
                        if largest.lifetime else "unlimited")
            raise ResourceError(
                f"task {label!r} needs {', '.join(need)}, more than "
                f"{'pool' if pool else 'the largest pool'} {largest.describe()} (worker lifetime "
                f"{lifetime}); "
                "ask for less, or give the cluster a pool that large"
            )
        return min(fitting, key=lambda p: (p.gpus, p.cores, p.memory, p.lifetime or math.inf))

    # -- scaling ------------------------------------------------------------------------------

    def adapt(self, demand: Mapping[str, float], now: float | None = None) -> None:
        """Scale each pool to the work it has: ``demand`` maps pool names to cores of work.

        More jobs are submitted at once (up to ``max_jobs``); surplus jobs go only after the
        pool has had more than it needs for ``idle_timeout`` (so short gaps don't churn jobs).
        """
        now = time.monotonic() if now is None else now
        targets = {}
        for name, pool in self.pools.items():
            need = math.ceil(demand.get(name, 0) / pool.cores)
            need = min(pool.max_jobs, max(pool.min_jobs, need))
            have = self._wanted.get(name, 0)
            if need > have:
                targets[name] = need
                self._surplus_since.pop(name, None)
            elif need < have:
                since = self._surplus_since.setdefault(name, now)
                if now - since >= self.idle_timeout:
                    targets[name] = need
                    self._surplus_since.pop(name, None)
            else:
                self._surplus_since.pop(name, None)
        if targets:
            self._wanted.update(targets)
            self._apply(targets)

    def _apply(self, targets: dict[str, int]) -> None:
        self.cluster.loop.add_callback(self._scale, dict(targets))

    def _scale(self, targets: dict[str, int]) -> None:
        """On the cluster's event loop: add or remove worker specs, then let the cluster act."""
        spec = self.cluster.worker_spec
        scheduler = self.cluster.scheduler
        busy = {ws.name for ws in scheduler.workers.values() if ws.processing}
        connected = {ws.name for ws in scheduler.workers.values()}
        for pool, n in targets.items():
            names = [name for name in spec if self._pool_of.get(name) == pool]
            while len(names) < n:
                self._counter += 1
                name = f"{pool}-{self._counter}"
                spec[name] = self.specs[pool]
                self._pool_of[name] = pool
                names.append(name)
            # Remove jobs still queued first, then idle workers; never a worker that runs a task.
            for name in sorted(names, key=lambda nm: (nm in connected, nm in busy)):
                if len(names) <= n or name in busy:
                    break
                del spec[name]
                names.remove(name)
        # the specs are set per pool above; scale() to their number starts and stops the jobs
        self.cluster.scale(jobs=len(spec))

    def poll(self) -> None:
        """Find jobs submitted or ended since the last call (one batch-queue query)."""
        with self._jobs_lock:
            self._poll()

    def _poll(self) -> None:
        workers = dict(self.cluster.workers)
        for name, job in workers.items():
            job_id = getattr(job, "job_id", None)
            if job_id and job_id not in self._known:
                info = JobInfo(self._pool_of.get(name, "default"), name, job_id)
                self._known[job_id] = info
                self._new.append(info)
        live = [i for i in self._known.values() if i.state not in ENDED]
        states = queue_states(self.pools["default"].kind, [i.job_id for i in live if i.job_id])
        dead: list[JobInfo] = []
        for info in live:
            if states is not None:
                state = states.get(info.job_id or "", "COMPLETED")
            elif workers.get(info.name) is None or getattr(workers[info.name], "job_id", None) != info.job_id:
                state = "COMPLETED"  # the cluster dropped the job: its worker went away
            else:
                state = "RUNNING"
            info.state = state
            if state in ENDED:
                dead.append(info)
        if dead:
            self._ended.extend(dead)
            self.cluster.loop.add_callback(self._forget, [i.name for i in dead],
                                           {i.name: i.job_id for i in dead})

    async def _forget(self, names: list[str], job_ids: dict[str, str | None]) -> None:
        """Drop the specs of jobs that ended, so the next scaling replaces them if needed."""
        for name in names:
            job = self.cluster.workers.get(name)
            if job is not None and getattr(job, "job_id", None) == job_ids[name]:
                del self.cluster.workers[name]
            if name in self.cluster.worker_spec and (job is None or job.job_id == job_ids[name]):
                del self.cluster.worker_spec[name]
                pool = self._pool_of.get(name)
                if pool is not None:
                    self._wanted[pool] = max(0, self._wanted.get(pool, 0) - 1)

    def saw_job(self, job_id: str, name: str | None) -> bool:
        """A worker reported running in batch job ``job_id``: know it now (the queue poll may
        not have seen it yet, nor dask-jobqueue set its id). True when it was new."""
        with self._jobs_lock:
            if job_id in self._known:
                return False
            if name is None or name not in self._pool_of:
                name = next((n for n, job in dict(self.cluster.workers).items()
                             if getattr(job, "job_id", None) == job_id), name or "")
            info = JobInfo(self._pool_of.get(name, "default"), name, job_id)
            self._known[job_id] = info
            self._new.append(info)
            return True

    def take_new(self) -> list[JobInfo]:
        """Jobs submitted since the last call."""
        with self._jobs_lock:
            out, self._new = self._new, []
        return out

    def take_ended(self) -> list[JobInfo]:
        """Jobs that ended since the last call."""
        with self._jobs_lock:
            out, self._ended = self._ended, []
        return out

    def jobs(self) -> list[JobInfo]:
        """Every job this cluster submitted, with its last known state."""
        return list(self._known.values())

    def close(self) -> None:
        """Cancel every job and stop the scheduler."""
        with contextlib.suppress(Exception):
            self.cluster.close(timeout=30)
        leftover = [i.job_id for i in self._known.values() if i.job_id and i.state not in ENDED]
        cancel_jobs(self.pools["default"].kind, leftover)  # jobs still queued when we closed
        for info in self._known.values():
            if info.state not in ENDED:
                info.state = "CANCELLED"
                self._ended.append(info)
