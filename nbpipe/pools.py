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

This module validates pools; :mod:`nbpipe.poolcluster` runs them, :mod:`nbpipe.jobs` follows
their batch jobs, and :mod:`nbpipe.schedulers` holds what differs between batch schedulers.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
from dask.utils import format_bytes, parse_bytes, parse_timedelta

from .config import DEFAULTS, setting
from .errors import ClusterError
from .jobs import JobInfo, cancel_jobs, queue_states
from .schedulers import BATCH_KINDS, SCHEDULERS, cluster_class

__all__ = ["KINDS", "JobInfo", "Pool", "cancel_jobs", "cluster_class", "parse_pools",
           "queue_states"]

log = logging.getLogger("nbpipe")

#: Batch scheduler kinds and their dask-jobqueue cluster classes (see :mod:`nbpipe.schedulers`).
KINDS = BATCH_KINDS
#: Keys of a cluster spec that nbpipe reads itself; every other key goes to dask-jobqueue.
NBPIPE_KEYS = frozenset({
    "kind", "pools", "max_jobs", "min_jobs", "security", "idle_timeout", "lifetime", "gpus",
    "scheduler_options", "parallel_environment",
})
#: The packaged defaults (nbpipe/nbpipe.yaml); settings may change them (see nbpipe.config).
DEFAULT_MAX_JOBS: int = DEFAULTS["max-jobs"]
DEFAULT_IDLE: float = float(parse_timedelta(DEFAULTS["idle-timeout"]))  # seconds a pool keeps
# jobs it no longer needs


def _walltime_seconds(value: Any, kind: str, where: str) -> float | None:
    from .task import parse_walltime

    if value is None:
        return None
    record = SCHEDULERS[kind]
    if isinstance(value, str):
        own = record.walltime_seconds(value)  # a kind's own short form (LSF: [HH:]MM)
        if own is not None:
            return own
    try:
        return parse_walltime(value, where)
    except Exception:
        raise ClusterError(
            f"{where}: walltime={value!r} is not a duration; use '{record.walltime_format}', "
            "'2h' or a number of seconds"
        ) from None


def _walltime_text(seconds: float, kind: str) -> str:
    return SCHEDULERS[kind].walltime_text(seconds)


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
    record = SCHEDULERS[kind]
    if not record.has_walltime:
        kwargs.pop("walltime", None)  # (HTCondor) no walltime option; lifetime still applies
    max_jobs = _int_option(spec.get("max_jobs", setting("max-jobs", DEFAULT_MAX_JOBS)), "max_jobs",
                           where, 1)
    min_jobs = _int_option(spec.get("min_jobs", setting("min-jobs", 0)), "min_jobs", where, 0)
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
        kwargs["job_extra_directives"] = (dask.config.get(f"{config}.job-extra-directives", None)
                                          or record.empty_directives())
    kwargs["job_extra_directives"] = record.gpu_directives(gpus, kwargs["job_extra_directives"])
    pe = spec.get("parallel_environment")
    if pe is not None:  # SGE asks for cores through a site-defined parallel environment
        if record.parallel_environment is None or not isinstance(pe, str) or not pe.strip():
            with_pe = [k for k, r in SCHEDULERS.items() if r.parallel_environment]
            raise ClusterError(
                f"{where}: parallel_environment={pe!r} is for {', '.join(with_pe).upper()} only "
                "and names the site's parallel environment, e.g. 'smp' (see `qconf -spl`)"
            )
        kwargs["job_extra_directives"] = record.pe_directives(pe, cores, kwargs["job_extra_directives"])
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


def __getattr__(name: str) -> Any:
    # PoolCluster lives in nbpipe.poolcluster (which imports this module); still found here.
    if name == "PoolCluster":
        from .poolcluster import PoolCluster

        return PoolCluster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
