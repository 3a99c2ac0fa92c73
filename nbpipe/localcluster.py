"""The default local cluster, run by a process of its own so its workers never run the user's script.

Dask's ``LocalCluster`` starts worker processes with multiprocessing's ``spawn``, which imports
the parent's ``__main__`` module again in every child (as ``__mp_main__``). For a pipeline
script written at module level -- no ``if __name__ == "__main__":`` guard, as people write
them -- every worker would run the whole pipeline again: open the store, find it busy, start a
cluster of its own. nbpipe therefore starts its LocalCluster in a child process whose main
module is this one (``serve``): the workers it spawns import nbpipe, never the user's script.
Task functions defined in the script still reach the workers, by value (cloudpickle).

The child lives as long as the driver holds the write end of its standard input: closing it
(``close()``), or the driver dying in any way, shuts the cluster down. The driver's
``sys.path``, working directory and Dask configuration go along, so the workers import the
driver's own modules as an in-process LocalCluster's workers would.

>>> from distributed import Client
>>> with LocalProcessCluster(n_workers=1) as cluster, Client(cluster.scheduler_address) as client:
...     client.submit(sum, [1, 2]).result()                    # doctest: +SKIP
3
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import dask

from .errors import ClusterError

__all__ = ["LocalProcessCluster", "serve"]

START_TIMEOUT = 120.0  # seconds for the child to report its scheduler (a loaded machine is slow)

#: Dask's defaults that a starved machine (a shared login node, a laptop running a test suite)
#: outlasts, and what nbpipe's own local cluster uses instead unless the user set them. Every
#: process of the cluster is on this machine: a reply that takes longer than Dask's 30 s is the
#: machine being busy, not a peer gone, and a worker that gives up on it logs a traceback
#: (``Failed to communicate with scheduler during heartbeat``) or leaves.
PATIENT = {"distributed": {"comm": {"timeouts": {"connect": "180s", "tcp": "180s"}},
                           "scheduler": {"worker-ttl": "15 minutes"}}}


def _inheritable_config() -> str:
    """Dask's configuration as ``DASK_INTERNAL_INHERIT_CONFIG`` carries it (Dask's own way of
    passing configuration to processes it starts); entries that are not plain data (a Client set
    as ``nbpipe.cluster``) stay behind."""
    kept = {}
    for key, value in dask.config.global_config.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        kept[key] = value
    return dask.config.serialize(kept)


class LocalProcessCluster:
    """A Dask ``LocalCluster`` of one-thread worker processes, run by a child process.

    Give a :class:`distributed.Client` its :attr:`scheduler_address`. ``close()`` stops it.
    """

    def __init__(self, n_workers: int, *, timeout: float = START_TIMEOUT):
        self.n_workers = n_workers
        read_end, write_end = os.pipe()
        options = {"n_workers": n_workers, "sys_path": list(sys.path), "report_fd": write_end}
        env = {**os.environ, "DASK_INTERNAL_INHERIT_CONFIG": _inheritable_config()}
        code = ("import json, sys; options = json.loads(sys.argv[1]); "
                "sys.path[:] = options['sys_path']; "
                "from nbpipe.localcluster import serve; serve(options)")
        try:
            # A session of its own: Ctrl-C in the driver's terminal interrupts the driver, which
            # then closes the cluster in order, instead of killing the workers under it.
            self.process = subprocess.Popen(
                [sys.executable, "-c", code, json.dumps(options)], stdin=subprocess.PIPE,
                pass_fds=(write_end,), env=env, start_new_session=True,
            )
        finally:
            os.close(write_end)
        try:
            report = self._read_report(read_end, timeout)
        except BaseException:
            self.close()
            raise
        finally:
            os.close(read_end)
        self.scheduler_address: str = report["address"]
        self.dashboard_link: str | None = report.get("dashboard")
        self.workers: int = report["workers"]

    def _read_report(self, fd: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        data = b""
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClusterError(
                    f"the local Dask cluster did not start within {timeout:.0f} s; the machine "
                    "may be overloaded: try again, or pass cluster={'kind': 'local', 'workers': 1}"
                )
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:  # the child exited before reporting (its error is on stderr)
                code = self.process.wait(timeout=10)
                raise ClusterError(
                    f"the local Dask cluster failed to start (its process exited with code "
                    f"{code}; its error is printed above)"
                )
            data += chunk
        return json.loads(data)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the cluster: its workers, then its scheduler (kills them after ``timeout``)."""
        process = self.process
        if process.poll() is None:
            with contextlib.suppress(OSError):
                process.stdin.close()  # type: ignore[union-attr]
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        elif process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()

    def __enter__(self) -> LocalProcessCluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LocalProcessCluster {self.scheduler_address} workers={self.workers}>"


def serve(options: dict[str, Any]) -> None:
    """The child's main: start the LocalCluster, report it, run until stdin closes."""
    from distributed import LocalCluster

    # Only the driver decides when the cluster ends: closing stdin, or dying.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Replaces Dask's defaults only: a value the user configured (inherited) stays. The
    # workers' processes get this configuration from their nannies.
    dask.config.update_defaults(PATIENT)
    cluster = LocalCluster(
        n_workers=options["n_workers"], threads_per_worker=1, processes=True,
        dashboard_address="127.0.0.1:0",  # the dashboard has no authentication: this machine only
        # Dask's ERROR records of a local cluster are its shutdown races (a heartbeat meeting a
        # closed scheduler): task errors reach the user through nbpipe, never through these.
        silence_logs=logging.CRITICAL,
    )
    report = {"address": cluster.scheduler_address, "dashboard": cluster.dashboard_link,
              "workers": len(cluster.workers)}
    fd = options["report_fd"]
    os.write(fd, (json.dumps(report) + "\n").encode())
    os.close(fd)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def wait_for_eof() -> None:
        with contextlib.suppress(OSError):
            while sys.stdin.buffer.read(4096):
                pass
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    stop.wait()
    # The workers go first, then the scheduler: closed together, a worker's heartbeat in
    # flight meets a closed scheduler and Dask logs a traceback at the end of a good run.
    with contextlib.suppress(Exception):
        cluster.scale(0)
        deadline = time.monotonic() + 10
        while cluster.workers and time.monotonic() < deadline:
            time.sleep(0.05)
    with contextlib.suppress(Exception):
        cluster.close(timeout=20)
