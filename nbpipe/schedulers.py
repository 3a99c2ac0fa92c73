"""What nbpipe knows about each batch scheduler, one record per kind.

As dask-jobqueue keeps ``slurm.py``/``pbs.py`` thin over ``core.py``, the generic code (pools,
the pool cluster, jobs, a task's context) reads these records and never tests a kind by name:
a new scheduler is a new :class:`Scheduler` entry in :data:`SCHEDULERS`.

>>> SCHEDULERS["lsf"].walltime_text(5400)
'01:30'
>>> SCHEDULERS["slurm"].gpu_directives(2, [])
['--gres=gpu:2']
>>> SCHEDULERS["htcondor"].gpu_directives(1, {})
{'request_gpus': '1'}
"""

from __future__ import annotations

import math
import signal
import threading
from dataclasses import dataclass
from typing import Any

from .errors import ClusterError

__all__ = ["BATCH_KINDS", "ENDED", "SCHEDULERS", "Scheduler", "cluster_class", "scheduler"]

#: Job states nbpipe itself gives a job that ended (queue states of a kind are added to these).
ENDED_BY_NBPIPE = frozenset({"COMPLETED", "CANCELLED"})


@dataclass(frozen=True)
class Scheduler:
    """The facts of one scheduler kind that differ from the others."""

    #: ``"slurm"``, ``"pbs"``, ``"sge"``, ``"lsf"``, ``"htcondor"`` or ``"local"``.
    kind: str
    #: The dask-jobqueue cluster class (None: not a batch scheduler).
    cluster_class: str | None = None
    #: The environment variable holding the id of the batch job a process runs in.
    job_id_variable: str | None = None
    #: Whether that variable's name is common enough to be set outside a job of this kind
    #: (SGE's ``JOB_ID``): it is looked at after the others.
    job_id_generic: bool = False
    #: Queue states of a job gone for good (as the queue query prints them).
    ended: frozenset[str] = ENDED_BY_NBPIPE
    #: The command listing this user's jobs as ``<id> <state>`` lines (``{user}`` is replaced);
    #: None: nbpipe relies on the Dask scheduler seeing a job's worker go.
    queue_query: tuple[str, ...] | None = None
    #: Whether walltimes are written ``HH:MM`` (LSF) rather than ``HH:MM:SS``.
    walltime_minutes: bool = False
    #: Whether jobs take a walltime option at all (HTCondor's do not).
    has_walltime: bool = True
    #: The job directive asking for GPUs, ``{gpus}`` replaced (None: no one way, as on SGE).
    gpu_directive: str | None = None
    #: A key of the job's directive mapping asking for GPUs (HTCondor's are a mapping).
    gpu_key: str | None = None
    #: The directive asking for cores through a site's parallel environment (SGE only).
    parallel_environment: str | None = None

    @property
    def batch(self) -> bool:
        """Whether this is a batch scheduler (run through dask-jobqueue)."""
        return self.cluster_class is not None

    @property
    def walltime_format(self) -> str:
        """How walltimes are written for this kind, for messages."""
        return "HH:MM" if self.walltime_minutes else "HH:MM:SS"

    def walltime_text(self, seconds: float) -> str:
        """``seconds`` as this kind writes a walltime (rounded up to what it can say)."""
        minutes, secs = divmod(int(math.ceil(seconds)), 60)
        hours, minutes = divmod(minutes, 60)
        if self.walltime_minutes:
            return f"{hours:02d}:{minutes + (1 if secs else 0):02d}"
        return f"{hours:02d}:{minutes:02d}:{secs:02d}"

    def walltime_seconds(self, value: str) -> float | None:
        """A walltime in this kind's own short form (LSF's ``[HH:]MM``) in seconds, else None
        (the generic forms are read by :func:`nbpipe.task.parse_walltime`)."""
        if self.walltime_minutes and value.count(":") == 1:
            hours, minutes = value.split(":")
            if hours.isdigit() and minutes.isdigit():
                return float(int(hours) * 3600 + int(minutes) * 60)
        return None

    def empty_directives(self) -> Any:
        """The empty job directives of this kind (a mapping for HTCondor, else a list)."""
        return {} if self.gpu_key is not None else []

    def gpu_directives(self, gpus: int, directives: Any) -> Any:
        """``directives`` with the request for ``gpus`` GPUs added (unchanged when none)."""
        if not gpus:
            return directives
        if self.gpu_key is not None:
            return {**(directives or {}), self.gpu_key: str(gpus)}
        if self.gpu_directive is not None:
            return [*(directives or []), self.gpu_directive.format(gpus=gpus)]
        return directives

    def pe_directives(self, pe: str, cores: int, directives: Any) -> Any:
        """``directives`` with the parallel environment ``pe`` of ``cores`` cores added."""
        assert self.parallel_environment is not None
        return [*(directives or []), self.parallel_environment.format(pe=pe, cores=cores)]


#: Every kind nbpipe runs on.
SCHEDULERS: dict[str, Scheduler] = {s.kind: s for s in (
    Scheduler(
        "slurm", "SLURMCluster", "SLURM_JOB_ID",
        ended=ENDED_BY_NBPIPE | {"FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                                 "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"},
        queue_query=("squeue", "-h", "-o", "%i %T", "--states=all", "-u", "{user}"),
        gpu_directive="--gres=gpu:{gpus}",
    ),
    Scheduler("pbs", "PBSCluster", "PBS_JOBID", gpu_directive="-l ngpus={gpus}"),
    Scheduler("sge", "SGECluster", "JOB_ID", parallel_environment="-pe {pe} {cores}",
              job_id_generic=True),
    Scheduler("lsf", "LSFCluster", "LSB_JOBID", walltime_minutes=True,
              gpu_directive='-gpu "num={gpus}"'),
    Scheduler("htcondor", "HTCondorCluster", "CONDOR_JOB_ID", has_walltime=False,
              gpu_key="request_gpus"),
    Scheduler("local"),
)}

#: The batch scheduler kinds and their dask-jobqueue cluster classes.
BATCH_KINDS: dict[str, str] = {k: s.cluster_class for k, s in SCHEDULERS.items()
                               if s.cluster_class is not None}

#: Every state, of any kind, of a job that ended.
ENDED: frozenset[str] = frozenset().union(*(s.ended for s in SCHEDULERS.values()))


def scheduler(kind: str) -> Scheduler:
    """The record of ``kind`` (``KeyError`` for a kind nbpipe does not know)."""
    return SCHEDULERS[kind]


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
    return getattr(dask_jobqueue, BATCH_KINDS[kind])
