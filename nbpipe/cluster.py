"""Choosing and connecting to a Dask cluster: one ``cluster=`` value, everywhere.

``cluster`` (in ``Pipeline(cluster=...)``, ``%pipeline cluster``, ``nbpipe run --cluster`` or the
``nbpipe.cluster`` setting of ``nbpipe.yaml`` / ``dask.config``) may be:

- ``None`` or ``"local"``: a LocalCluster of one-thread worker processes (``{"kind": "local",
  "workers": 4}`` sets how many);
- a batch scheduler kind, ``"slurm"``, ``"pbs"``, ``"sge"``, ``"lsf"`` or ``"htcondor"``, taking
  dask-jobqueue's configuration (``jobqueue.slurm``, ...), or a dict such as ``{"kind":
  "slurm", "cores": 1, "memory": "2GB", "walltime": "01:00:00", "max_jobs": 4, "queue": "short",
  "pools": {...}}`` (see :mod:`nbpipe.pools`);
- a scheduler address such as ``"tcp://host:8786"``;
- a running ``distributed`` Cluster or Client.

A pipeline holds its value in a :class:`ClusterHandle`, which connects on first use and closes
what it started.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dask.utils import parse_timedelta
from distributed import Client

from .config import setting
from .errors import ClusterError
from .jobs import record_jobs
from .localcluster import LocalProcessCluster
from .poolcluster import PoolCluster
from .pools import DEFAULT_IDLE, KINDS, parse_pools

if TYPE_CHECKING:
    from .store import Store

__all__ = ["ClusterError", "ClusterHandle", "Connection", "connect", "parse_words", "resolve_spec"]


class Connection:
    """A Dask client, what nbpipe started to get it (and so must close), and its worker pools."""

    def __init__(self, client: Client, owns_client: bool, cluster: Any = None, description: str = "",
                 pools: PoolCluster | None = None):
        self.client = client
        self.owns_client = owns_client
        self.cluster = cluster  # a cluster nbpipe started itself
        self.description = description
        self.pools = pools

    @property
    def dashboard(self) -> str | None:
        """The Dask dashboard address, when there is one."""
        try:
            return self.client.dashboard_link
        except Exception:
            return None

    def close(self) -> None:
        """Close what nbpipe opened (batch jobs are cancelled)."""
        if self.owns_client:
            self.client.close()
        if self.pools is not None:
            self.pools.close()
        elif self.cluster is not None:
            self.cluster.close()


def local_cluster(n_workers: int | None = None) -> LocalProcessCluster:
    """A LocalCluster of worker processes, one thread each, as many as the machine has cores.

    Processes (not threads) so that a killed task can be stopped for real and per-task
    environment variables do not leak between tasks; run by a process of its own so that the
    workers never import the user's script (see :mod:`nbpipe.localcluster`).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return LocalProcessCluster(n_workers or cores or 1)


def _is_address(value: str) -> bool:
    if "://" in value:
        return True
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit()


def resolve_spec(cluster: Any = None) -> Any:
    """Normalise a ``cluster=`` value: kinds and ``"local"`` become dicts with a ``kind``.

    A bare kind (``"slurm"``) or a dict without all options takes the rest from the
    ``nbpipe.cluster`` setting when that names the same kind.
    """
    configured = setting("cluster", None)
    if cluster is None:
        cluster = configured
    if cluster is None:
        return {"kind": "local"}
    if isinstance(cluster, str):
        text = cluster.strip()
        if text.lower() in KINDS or text.lower() == "local":
            cluster = {"kind": text.lower()}
        elif _is_address(text):
            return text
        else:
            raise ClusterError(
                f"cluster={cluster!r} is not something nbpipe can run on; use 'local', a batch "
                f"scheduler kind ({', '.join(KINDS)}), a scheduler address like "
                "'tcp://host:8786', a dict like {'kind': 'slurm', 'cores': 1, 'memory': '2GB'}, "
                "a dask Cluster or a Client"
            )
    if isinstance(cluster, Mapping):
        kind = str(cluster.get("kind", "")).lower()
        if kind != "local" and kind not in KINDS:
            raise ClusterError(
                f"cluster={dict(cluster)!r} needs a 'kind': 'local' or one of {', '.join(KINDS)}"
            )
        base = dict(configured) if isinstance(configured, Mapping) else {}
        if str(base.get("kind", "")).lower() != kind:
            base = {}
        return {**base, **cluster, "kind": kind}
    return cluster


def parse_words(words: list[str] | tuple[str, ...]) -> Any:
    """A ``cluster=`` value from command-line words: ``slurm cores=4 memory=16GB queue=short``.

    The first word is ``local``, a batch scheduler kind or a scheduler address; each later word
    is ``KEY=VALUE`` with VALUE read as YAML (``max_jobs=4`` is a number, ``pools={big: {cores:
    8}}`` a mapping). Without a first word the kind comes from the ``nbpipe.cluster`` setting.
    """
    import yaml

    words = list(words)
    if not words:
        return None
    head: Any = None
    if "=" not in words[0]:
        head = words.pop(0)
    options: dict[str, Any] = {}
    for word in words:
        key, sep, text = word.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ClusterError(f"cluster option {word!r}: write KEY=VALUE, e.g. memory=4GB")
        try:
            options[key] = yaml.safe_load(text) if text else None
        except yaml.YAMLError as exc:
            raise ClusterError(f"cluster option {word!r}: the value is not valid YAML ({exc})") from None
    if not options:
        return head
    if head is None:
        configured = setting("cluster", None)
        kind = configured.get("kind") if isinstance(configured, Mapping) else configured
        if not isinstance(kind, str) or kind.lower() not in (*KINDS, "local"):
            raise ClusterError(
                f"cluster options {' '.join(words)!r} need a kind first, e.g. 'slurm "
                f"{' '.join(words)}'"
            )
        head = kind
    if head.lower() not in (*KINDS, "local"):
        raise ClusterError(
            f"cluster {head!r} takes no options; options go with a kind: 'local' or one of "
            f"{', '.join(KINDS)}"
        )
    return {"kind": head.lower(), **options}


def validate(cluster: Any, store_dir: str | os.PathLike[str] | None = None) -> Any:
    """Check a ``cluster=`` value without starting anything; return its normal form."""
    spec = resolve_spec(cluster)
    if isinstance(spec, Mapping) and spec["kind"] in KINDS:
        parse_pools(spec, Path(store_dir) if store_dir is not None else None)
        _idle_timeout(spec)
    elif isinstance(spec, Mapping):
        _local_workers(spec)
    return spec


def _local_workers(spec: Mapping[str, Any]) -> int | None:
    unknown = set(spec) - {"kind", "workers"}
    if unknown:
        raise ClusterError(
            f"cluster kind 'local' takes only 'workers'; remove {', '.join(sorted(unknown))}"
        )
    workers = spec.get("workers")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ClusterError(f"cluster kind 'local': workers={workers!r} must be an integer >= 1")
    return workers


def _idle_timeout(spec: Mapping[str, Any]) -> float:
    value = spec.get("idle_timeout", setting("idle-timeout", None))
    if value is None:
        return DEFAULT_IDLE
    try:
        return float(parse_timedelta(value))
    except (ValueError, TypeError, KeyError):
        raise ClusterError(f"cluster idle_timeout={value!r} is not a duration; use e.g. '60s'") from None


def connect(cluster: Any = None, *, store_dir: str | os.PathLike[str] | None = None) -> Connection:
    """Turn a ``cluster=`` value (see the module docstring) into a :class:`Connection`.

    ``store_dir`` holds batch job logs and the TLS certificates workers read.
    """
    from distributed.deploy.cluster import Cluster

    spec = resolve_spec(cluster)
    if isinstance(spec, Client):
        return Connection(spec, owns_client=False, description=f"client {spec.scheduler.address}")
    if isinstance(spec, Cluster):
        return Connection(Client(spec), owns_client=True, description=type(spec).__name__)
    if isinstance(spec, str):
        try:
            client = Client(spec, timeout="10s")
        except OSError as exc:
            raise ClusterError(
                f"cannot reach the Dask scheduler at {spec!r}: {exc}; check the address "
                "and that the scheduler is running"
            ) from None
        return Connection(client, owns_client=True, description=f"scheduler {spec}")
    if isinstance(spec, Mapping) and spec["kind"] == "local":
        lc = local_cluster(_local_workers(spec))
        try:
            client = Client(lc.scheduler_address, timeout="30s")
        except BaseException:
            lc.close()
            raise
        return Connection(client, owns_client=True, cluster=lc,
                          description=f"local ({lc.workers} workers)")
    if isinstance(spec, Mapping):
        directory = Path(store_dir) if store_dir is not None else None
        pools = parse_pools(spec, directory)
        cluster_ = PoolCluster(
            pools, security=spec.get("security", True), store_dir=directory,
            scheduler_options=spec.get("scheduler_options"), idle_timeout=_idle_timeout(spec),
        )
        try:
            client = Client(cluster_.cluster, security=cluster_.cluster.security)
        except Exception:
            cluster_.close()
            raise
        names = ", ".join(pools_.name for pools_ in pools)
        return Connection(client, owns_client=True, cluster=cluster_.cluster, pools=cluster_,
                          description=f"{pools[0].kind} (pools {names})")
    raise ClusterError(
        f"cluster={spec!r} is not something nbpipe can run on; use 'local', a batch scheduler "
        f"kind ({', '.join(KINDS)}), a scheduler address, a dict with a 'kind', a dask Cluster "
        "or a Client"
    )


class ClusterHandle:
    """The cluster a pipeline runs on: its ``cluster=`` value, checked at once (a mistake shows
    when the pipeline is made, not when tasks first run), and the :class:`Connection` made from
    it on first use. Closing it closes what nbpipe started and records in ``store`` the batch
    jobs that were cancelled.

    >>> handle = ClusterHandle("local", store, pipeline_id)   # doctest: +SKIP
    >>> handle.connection.client          # the LocalCluster starts here   # doctest: +SKIP
    """

    def __init__(self, cluster: Any, store: Store, pipeline_id: int):
        validate(cluster, store.path)
        self.cluster = cluster
        self.store, self.pipeline_id = store, pipeline_id
        #: The connection once made (None: nothing needed the cluster yet).
        self.started: Connection | None = None

    @property
    def connection(self) -> Connection:
        """The running connection (made on first use)."""
        if self.started is None:
            self.started = connect(self.cluster, store_dir=self.store.path)
        return self.started

    def replace(self, cluster: Any) -> None:
        """Close what was started and hold ``cluster`` instead (checked first)."""
        validate(cluster, self.store.path)
        self.close()
        self.cluster = cluster

    def take(self) -> Connection | None:
        """Give the started connection away (to another pipeline's handle): closing this handle
        no longer closes it."""
        connection, self.started = self.started, None
        return connection

    def close(self) -> None:
        """Close the connection nbpipe started (its batch jobs cancelled, and recorded)."""
        connection = self.take()
        if connection is not None:
            connection.close()
            if connection.pools is not None:
                with contextlib.suppress(Exception):  # (the store may be closing too)
                    record_jobs(self.store, self.pipeline_id, connection.pools)
