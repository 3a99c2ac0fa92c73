"""Batch jobs of worker pools: what nbpipe records of each, the queue's view, cancelling.

>>> queue_states("pbs", ["42"]) is None        # no queue query for PBS: the Dask scheduler tells
True
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import shlex
import subprocess
from dataclasses import dataclass

from .schedulers import SCHEDULERS, cluster_class

__all__ = ["JobInfo", "cancel_jobs", "queue_states"]

log = logging.getLogger("nbpipe")


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
