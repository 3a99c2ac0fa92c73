"""Worker pools on batch schedulers (Slurm, PBS, SGE, LSF, HTCondor) through dask-jobqueue.

A *pool* is a group of identical batch jobs, each running one Dask worker. A cluster spec names
the default pool's job and, optionally, more pools that inherit from it::

    {"kind": "slurm", "cores": 1, "memory": "2GB", "walltime": "01:00:00", "max_jobs": 8,
     "pools": {"bigmem": {"cores": 4, "memory": "64GB", "max_jobs": 2},
               "gpu": {"cores": 8, "memory": "32GB", "gpus": 1}}}

Every pool's jobs join one Dask scheduler (the default pool's cluster) and advertise their size
as Dask worker resources (``cores``, ``memory``, ``gpus``, ``pool-<name>``), so a task runs only
on a worker large enough for it. Pools scale on demand, from nothing to ``max_jobs``: the runner
says how many cores of work each pool has, new jobs are submitted at once, and jobs are removed
only after the pool has had more than it needs for ``idle_timeout``.
"""

from __future__ import annotations

import contextlib
import difflib
import getpass
import inspect
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
from dask.utils import format_bytes, parse_bytes, parse_timedelta

from .errors import ClusterError, ResourceError
from .results import make_private, private_dirs

__all__ = ["KINDS", "JobInfo", "Pool", "PoolCluster", "cancel_jobs", "parse_pools", "queue_states"]

log = logging.getLogger("nbpipe")

#: Batch scheduler kinds and their dask-jobqueue cluster classes.
KINDS = {
    "slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster",
    "htcondor": "HTCondorCluster",
}
#: Keys of a cluster spec that nbpipe reads itself; every other key goes to dask-jobqueue.
NBPIPE_KEYS = frozenset({
    "kind", "pools", "max_jobs", "min_jobs", "security", "idle_timeout", "lifetime", "gpus",
    "scheduler_options", "parallel_environment",
})
DEFAULT_MAX_JOBS = 8
DEFAULT_IDLE = 60.0  # seconds a pool keeps jobs it no longer needs
#: Scheduler states of a job that is gone for good (Slurm's names).
ENDED = frozenset({
    "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT",
})


def cluster_class(kind: str) -> type:
    """The dask-jobqueue cluster class of a scheduler kind (``"slurm"``, ``"pbs"``, ...)."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        import dask_jobqueue
    except ImportError:  # pragma: no cover - dask-jobqueue is a dependency
        raise ClusterError(
            f"cluster kind {kind!r} needs dask-jobqueue: pip install dask-jobqueue"
        ) from None
    finally:
        # dask_jobqueue.runner replaces the SIGINT handler on import (with sys.exit): in a
        # kernel, an interrupt must stay a KeyboardInterrupt.
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)
    return getattr(dask_jobqueue, KINDS[kind])


def _walltime_seconds(value: Any, kind: str, where: str) -> float | None:
    from .task import parse_walltime

    if value is None:
        return None
    if kind == "lsf" and isinstance(value, str) and value.count(":") == 1:  # LSF: [HH:]MM
        hours, minutes = value.split(":")
        if hours.isdigit() and minutes.isdigit():
            return float(int(hours) * 3600 + int(minutes) * 60)
    try:
        return parse_walltime(value, where)
    except Exception:
        raise ClusterError(
            f"{where}: walltime={value!r} is not a duration; use 'HH:MM:SS' (LSF: 'HH:MM'), "
            "'2h' or a number of seconds"
        ) from None


def _walltime_text(seconds: float, kind: str) -> str:
    minutes, secs = divmod(int(math.ceil(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if kind == "lsf":
        return f"{hours:02d}:{minutes + (1 if secs else 0):02d}"
    return f"{hours:02d}:{minutes:02d}:{secs:02d}"


def default_lifetime(walltime: float) -> tuple[float, float]:
    """(lifetime, stagger) in seconds for a worker in a job of ``walltime`` seconds.

    The worker retires (its tasks move to other workers) a margin before the scheduler would
    kill the job: 10 % of the walltime, at least 30 s and at most 5 min, never more than half
    of it. Workers retire a little apart (the stagger) so a pool does not vanish at once.
    """
    margin = min(max(walltime * 0.1, 30.0), 300.0, walltime / 2)
    return walltime - margin, margin / 4


@dataclass
class Pool:
    """One group of identical batch jobs, one Dask worker each."""

    name: str
    kind: str
    cores: int
    memory: int
    gpus: int = 0
    walltime: float | None = None
    lifetime: float | None = None
    max_jobs: int = DEFAULT_MAX_JOBS
    min_jobs: int = 0
    job_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def resource(self) -> str:
        """The Dask resource only this pool's workers have."""
        return f"pool-{self.name}"

    def worker_resources(self) -> dict[str, float]:
        """What each worker of the pool advertises to the Dask scheduler."""
        out = {"cores": float(self.cores), "memory": float(self.memory), self.resource: float(self.cores)}
        if self.gpus:
            out["gpus"] = float(self.gpus)
        return out

    def fits(self, cores: int, memory: int | None, gpus: int, walltime: float | None) -> bool:
        """Whether one worker of this pool can hold a task of that size."""
        if cores > self.cores or gpus > self.gpus or (memory or 0) > self.memory:
            return False
        horizon = self.lifetime or self.walltime
        return walltime is None or horizon is None or walltime <= horizon

    def describe(self) -> str:
        """``bigmem: slurm jobs of 4 cores, 64 GB, 1 GPU, 02:00:00, up to 2 jobs``."""
        parts = [f"{self.cores} core{'s' if self.cores != 1 else ''}", format_bytes(self.memory)]
        if self.gpus:
            parts.append(f"{self.gpus} GPU{'s' if self.gpus != 1 else ''}")
        if self.walltime:
            parts.append(f"walltime {_walltime_text(self.walltime, self.kind)}")
        return f"{self.name}: {self.kind} jobs of {', '.join(parts)}, up to {self.max_jobs} jobs"


def _int_option(value: Any, option: str, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ClusterError(f"{where}: {option}={value!r} must be an integer >= {minimum}")
    return value


def _job_extra_for_gpus(kind: str, gpus: int, kwargs: dict[str, Any]) -> None:
    """Ask the batch scheduler for GPUs the way each kind spells it (SGE has no one way)."""
    if not gpus:
        return
    if kind == "htcondor":
        kwargs["job_extra_directives"] = {**(kwargs.get("job_extra_directives") or {}),
                                          "request_gpus": str(gpus)}
        return
    directive = {"slurm": f"--gres=gpu:{gpus}", "pbs": f"-l ngpus={gpus}",
                 "lsf": f'-gpu "num={gpus}"'}.get(kind)
    if directive:
        kwargs["job_extra_directives"] = [*(kwargs.get("job_extra_directives") or []), directive]


def project_paths() -> list[str]:
    """The driver's ``sys.path`` entries outside the Python installation (its project code)."""
    installed = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    out = []
    for entry in sys.path:
        path = os.path.realpath(entry or os.getcwd())
        if not os.path.isdir(path) or path in out:
            continue
        if any(path == root or path.startswith(root + os.sep) for root in installed):
            continue
        if "site-packages" in path or "dist-packages" in path:
            continue
        out.append(path)
    return out


def make_pool(name: str, spec: Mapping[str, Any], store_dir: Path | None = None) -> Pool:
    """Validate one pool's spec (defaults from ``jobqueue.<kind>``) into a :class:`Pool`."""
    where = f"cluster pool {name!r}"
    kind = str(spec.get("kind", "")).lower()
    if kind not in KINDS:
        raise ClusterError(
            f"{where}: kind={spec.get('kind')!r} is not a batch scheduler nbpipe knows; use one of "
            f"{', '.join(KINDS)}"
        )
    kwargs = {k: v for k, v in spec.items() if k not in NBPIPE_KEYS}
    known = job_options(kind)
    for key in kwargs:
        # dask-jobqueue would refuse an unknown option only when the cluster starts
        if key not in known and key != "walltime":
            guess = difflib.get_close_matches(key, known | NBPIPE_KEYS, 1)
            hint = f"did you mean {guess[0]!r}? " if guess else ""
            raise ClusterError(
                f"{where}: {key!r} is not an option of {kind} jobs; {hint}see `nbpipe cluster "
                f"{kind}` and dask-jobqueue's {KINDS[kind]} for the options"
            )
    config = f"jobqueue.{kwargs.get('config_name') or kind}"
    cores = kwargs.get("cores", dask.config.get(f"{config}.cores", None))
    memory = kwargs.get("memory", dask.config.get(f"{config}.memory", None))
    if cores is None or memory is None:
        raise ClusterError(
            f"{where}: say how many cores and how much memory each {kind} job has, e.g. "
            f"cluster={{'kind': {kind!r}, 'cores': 4, 'memory': '16GB'}}, or set {config}.cores "
            f"and {config}.memory in Dask's configuration"
        )
    cores = _int_option(cores, "cores", where, 1)
    try:
        memory_bytes = int(parse_bytes(memory)) if isinstance(memory, str) else int(memory)
        if isinstance(memory, bool) or memory_bytes <= 0:
            raise ValueError
    except (ValueError, TypeError):
        raise ClusterError(f"{where}: memory={memory!r} is not a size; use e.g. '16GB'") from None
    if int(kwargs.get("processes") or 1) != 1:
        raise ClusterError(
            f"{where}: processes={kwargs['processes']!r}; nbpipe runs one worker per job so that "
            "a job's cores and memory are one worker's; remove processes (use more jobs instead)"
        )
    gpus = _int_option(spec.get("gpus", 0), "gpus", where, 0)
    walltime_value = kwargs.get("walltime", dask.config.get(f"{config}.walltime", None))
    walltime = _walltime_seconds(walltime_value, kind, where)
    if "walltime" in kwargs and not isinstance(kwargs["walltime"], str) and walltime is not None:
        kwargs["walltime"] = _walltime_text(walltime, kind)
    if kind == "htcondor":
        kwargs.pop("walltime", None)  # HTCondor jobs have no walltime option; lifetime still applies
    max_jobs = _int_option(spec.get("max_jobs", DEFAULT_MAX_JOBS), "max_jobs", where, 1)
    min_jobs = _int_option(spec.get("min_jobs", 0), "min_jobs", where, 0)
    if min_jobs > max_jobs:
        raise ClusterError(f"{where}: min_jobs={min_jobs} is more than max_jobs={max_jobs}")

    lifetime = stagger = None
    if spec.get("lifetime") is not None:
        try:
            lifetime = float(parse_timedelta(spec["lifetime"]))
        except (ValueError, TypeError, KeyError):
            raise ClusterError(f"{where}: lifetime={spec['lifetime']!r} is not a duration") from None
        stagger = min(lifetime / 10, 60.0)
    elif walltime is not None:
        lifetime, stagger = default_lifetime(walltime)

    pool = Pool(name=name, kind=kind, cores=cores, memory=memory_bytes, gpus=gpus, walltime=walltime,
                lifetime=lifetime, max_jobs=max_jobs, min_jobs=min_jobs)
    extra = list(kwargs.get("worker_extra_args")
                 or dask.config.get(f"{config}.worker-extra-args", None) or [])
    resources = ",".join(f"{k}={v:g}" for k, v in pool.worker_resources().items())
    extra += ["--resources", resources]
    if lifetime is not None:
        extra += ["--lifetime", f"{int(lifetime)}s", "--lifetime-stagger", f"{int(stagger or 0)}s"]
    kwargs["worker_extra_args"] = extra
    kwargs["cores"], kwargs["memory"], kwargs["processes"] = cores, memory, 1
    prologue = list(kwargs.get("job_script_prologue")
                    or dask.config.get(f"{config}.job-script-prologue", None) or [])
    paths = project_paths()
    if paths:  # the driver's own modules import on the workers, as on a LocalCluster
        joined = shlex.quote(os.pathsep.join(paths))
        prologue.append(f"export PYTHONPATH={joined}${{PYTHONPATH:+:$PYTHONPATH}}")
    kwargs["job_script_prologue"] = prologue
    kwargs.setdefault("job_name", f"nbpipe-{name}")
    kwargs.setdefault("local_directory", "${TMPDIR:-/tmp}")
    if store_dir is not None:
        kwargs.setdefault("log_directory", str(store_dir / "jobs"))
    if kwargs.get("job_extra_directives") is None:  # ours add to the configured ones
        kwargs["job_extra_directives"] = dask.config.get(f"{config}.job-extra-directives", None) or (
            {} if kind == "htcondor" else [])
    _job_extra_for_gpus(kind, gpus, kwargs)
    pe = spec.get("parallel_environment")
    if pe is not None:  # SGE asks for cores through a site-defined parallel environment
        if kind != "sge" or not isinstance(pe, str) or not pe.strip():
            raise ClusterError(
                f"{where}: parallel_environment={pe!r} is for SGE only and names the site's "
                "parallel environment, e.g. 'smp' (see `qconf -spl`)"
            )
        kwargs["job_extra_directives"] = [*(kwargs.get("job_extra_directives") or []), f"-pe {pe} {cores}"]
    pool.job_kwargs = kwargs
    return pool


def job_options(kind: str) -> set[str]:
    """The keyword options dask-jobqueue's cluster and job classes of ``kind`` accept."""
    cls = cluster_class(kind)
    names: set[str] = set()
    for klass in (*cls.__mro__, *cls.job_cls.__mro__):
        init = vars(klass).get("__init__")
        if init is None or klass is object:
            continue
        for param in inspect.signature(init).parameters.values():
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) and param.name != "self":
                names.add(param.name)
    return names


def parse_pools(spec: Mapping[str, Any], store_dir: Path | None = None) -> list[Pool]:
    """The pools of a cluster spec: ``default`` from its top level, then each of ``pools``.

    Each named pool inherits the top-level options and overrides what it sets.
    """
    from distributed.security import Security

    security = spec.get("security", True)
    if not isinstance(security, (bool, Mapping, Security)) and security is not None:
        raise ClusterError(
            f"cluster security={security!r}: use True (temporary TLS certificates, the default), "
            "a mapping of distributed.Security options, a Security object, or False to turn TLS off"
        )
    named = spec.get("pools") or {}
    if not isinstance(named, Mapping):
        raise ClusterError(
            f"cluster pools={named!r} must map pool names to options, e.g. "
            "{'bigmem': {'cores': 4, 'memory': '64GB'}}"
        )
    base = {k: v for k, v in spec.items() if k != "pools"}
    pools = [make_pool("default", base, store_dir)]
    for name, options in named.items():
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
            raise ClusterError(f"cluster pool name {name!r}: use letters, digits, '-' and '_'")
        if name == "default":
            raise ClusterError("cluster pool name 'default' is taken by the top-level job options")
        if not isinstance(options, Mapping):
            raise ClusterError(f"cluster pool {name!r}: options must be a mapping, not {options!r}")
        if str(options.get("kind", base.get("kind"))).lower() != pools[0].kind:
            raise ClusterError(
                f"cluster pool {name!r}: kind={options['kind']!r} differs from the cluster's "
                f"{pools[0].kind!r}; all pools of a cluster use one batch scheduler"
            )
        pools.append(make_pool(name, {**base, **options}, store_dir))
    return pools


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

    Jobs the queue no longer knows are left out: they ended. Only Slurm is queried (``squeue``);
    for other kinds nbpipe relies on the Dask scheduler seeing the worker go.
    """
    if kind != "slurm" or not job_ids:
        return None if kind != "slurm" else {}
    try:
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i %T", "--states=all", "-u", getpass.getuser()],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("squeue failed: %s", exc)
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
    if not job_ids or kind not in KINDS:
        return
    command = shlex.split(cluster_class(kind).job_cls.cancel_command)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run([*command, *job_ids], capture_output=True, timeout=60)


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
        common = {k: self.cluster._job_kwargs[k] for k in ("interface", "protocol", "security")}
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
                need.append(f"walltime={_walltime_text(walltime, 'slurm')}")
            largest = max(candidates, key=lambda p: (p.cores, p.memory, p.gpus, p.lifetime or math.inf))
            raise ResourceError(
                f"task {label!r} needs {', '.join(need)}, more than "
                f"{'pool' if pool else 'the largest pool'} {largest.describe()} (worker lifetime "
                f"{_walltime_text(largest.lifetime, 'slurm') if largest.lifetime else 'unlimited'}); "
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

    async def _scale(self, targets: dict[str, int]) -> None:
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
        await self.cluster._correct_state()

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

