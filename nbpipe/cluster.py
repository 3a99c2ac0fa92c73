"""Connecting to Dask: a LocalCluster on demand, a scheduler address, a Cluster or a Client.

(HPC clusters through dask-jobqueue arrive with the clusters issue; they plug in here.)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import dask
from distributed import Client, LocalCluster

from .errors import NbpipeError

__all__ = ["ClusterError", "Connection", "connect"]


class ClusterError(NbpipeError, ValueError):
    """``cluster=`` names something nbpipe cannot connect to."""


@dataclass
class Connection:
    """A Dask client and whether nbpipe started (and so must close) it and its cluster."""

    client: Client
    owns_client: bool
    cluster: Any = None  # a cluster nbpipe started itself
    description: str = ""

    @property
    def dashboard(self) -> str | None:
        """The Dask dashboard address, when there is one."""
        try:
            return self.client.dashboard_link
        except Exception:
            return None

    def close(self) -> None:
        """Close what nbpipe opened."""
        if self.owns_client:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def local_cluster(n_workers: int | None = None) -> LocalCluster:
    """A LocalCluster of worker processes, one thread each, as many as the machine has cores.

    Processes (not threads) so that a killed task can be stopped for real and per-task
    environment variables do not leak between tasks.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return LocalCluster(
        n_workers=n_workers or cores or 1, threads_per_worker=1, processes=True, dashboard_address=":0",
        silence_logs=logging.ERROR,
    )


def connect(cluster: Any = None) -> Connection:
    """Turn a ``cluster=`` value into a :class:`Connection`."""
    from distributed.deploy.cluster import Cluster

    if cluster is None:  # configuration: dask.config key nbpipe.cluster (env DASK_NBPIPE__CLUSTER)
        cluster = dask.config.get("nbpipe.cluster", None)
    if isinstance(cluster, Client):
        return Connection(cluster, owns_client=False, description=f"client {cluster.scheduler.address}")
    if isinstance(cluster, Cluster):
        return Connection(Client(cluster), owns_client=True, description=type(cluster).__name__)
    if cluster is None or cluster == "local":
        lc = local_cluster()
        return Connection(Client(lc), owns_client=True, cluster=lc,
                          description=f"local ({len(lc.workers)} workers)")
    if isinstance(cluster, str) and ("://" in cluster or ":" in cluster):
        try:
            client = Client(cluster, timeout="10s")
        except OSError as exc:
            raise ClusterError(
                f"cannot reach the Dask scheduler at {cluster!r}: {exc}; check the address "
                "and that the scheduler is running"
            ) from None
        return Connection(client, owns_client=True, description=f"scheduler {cluster}")
    raise ClusterError(
        f"cluster={cluster!r} is not something nbpipe can run on; use None or 'local' (a "
        "LocalCluster), a scheduler address like 'tcp://host:8786', a dask Cluster or a Client"
    )
