"""nbpipe against the tools its users would pick instead: Parsl and raw Dask, on one machine.

Every side gets two worker processes of one thread (the same Dask LocalCluster for nbpipe and
raw Dask; a Parsl ``HighThroughputExecutor`` with two workers on a ``LocalProvider``), all
started once before the rounds, so start-up times are not counted. Rounds alternate the sides
and the medians are compared as ratios.

- *peer*: 5,000 no-op tasks, one call each -- tasks per second. nbpipe registers them, keys
  them, records every transition and result in a fresh store, and batches the tiny ones.
- *chunked map*: ``noop.map(range(N), chunksize=C)`` in nbpipe (each item keeps its own key,
  state, attempt record and result) against one Parsl app per item and one Dask future per
  item -- items per second.

    python benchmarks/peer.py [--tasks 5000] [--items 100000] [--chunksize 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distributed import Client, LocalCluster, wait

from nbpipe import Pipeline

try:
    from benchmarks.report import machine, write_section
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from report import machine, write_section  # type: ignore[no-redef]

WORKERS = 2
MAP_TARGET = 5.0


def noop(i: int) -> int:
    """The task: nothing to do."""
    return i


def start_parsl(run_dir: str) -> tuple[Any, Callable[[int], Any]] | None:
    """A loaded Parsl DataFlowKernel with an HTEX of WORKERS workers, and the no-op app."""
    try:
        import parsl
        from parsl.config import Config
        from parsl.executors import HighThroughputExecutor
        from parsl.providers import LocalProvider
    except ImportError:
        return None
    # HTEX starts its interchange and workers as commands found on PATH (this venv's bin).
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    config = Config(
        executors=[HighThroughputExecutor(
            label="htex", max_workers_per_node=WORKERS, address="127.0.0.1",
            provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1))],
        run_dir=run_dir, strategy="none",
    )
    dfk = parsl.load(config)
    app = parsl.python_app(noop)
    app(0).result()  # the workers are up
    return dfk, app


def parsl_items(app: Callable[[int], Any], n: int) -> float:
    """Seconds for n Parsl apps, one per item."""
    start = time.perf_counter()
    futures = [app(i) for i in range(n)]
    total = sum(f.result() for f in futures)
    elapsed = time.perf_counter() - start
    assert total == n * (n - 1) // 2
    return elapsed


def dask_items(client: Client, n: int) -> float:
    """Seconds for n Dask futures, one per item."""
    start = time.perf_counter()
    futures = client.map(noop, range(n), pure=False)
    wait(futures)
    total = sum(client.gather(futures))
    elapsed = time.perf_counter() - start
    assert total == n * (n - 1) // 2
    del futures
    return elapsed


def nbpipe_items(client: Client, n: int, chunksize: int | None, name: str) -> float:
    """Seconds for n nbpipe tasks in a fresh store: one call each, or a chunked map."""
    store = tempfile.mkdtemp(prefix="nbpipe-peer-")
    try:
        start = time.perf_counter()
        pipe = Pipeline(name, store=store, cluster=client)
        task = pipe.task(noop)
        refs = task.map(range(n), chunksize=chunksize) if chunksize else [task(i) for i in range(n)]
        summary = pipe.run(check=True)
        elapsed = time.perf_counter() - start
        assert summary.executed == n, summary
        assert refs[-1].result() == n - 1
        pipe.close()
    finally:
        shutil.rmtree(store, ignore_errors=True)
    return elapsed


def median_rate(n: int, seconds: list[float]) -> float:
    """Items per second at the median time."""
    return n / statistics.median(seconds)


def main() -> None:
    """Run the rounds, print rates and ratios, write docs/performance.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--chunksize", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/performance.md")
    args = parser.parse_args()
    run_dir = tempfile.mkdtemp(prefix="parsl-runinfo-")
    parsl_side = start_parsl(run_dir)
    if parsl_side is None:
        print("Parsl is not installed (pip install -e '.[bench]'): skipping the peer benchmark")
        return
    dfk, app = parsl_side
    peer: dict[str, list[float]] = {"nbpipe": [], "parsl": [], "dask": []}
    chunked: dict[str, list[float]] = {"nbpipe": [], "parsl": [], "dask": []}
    try:
        with LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            for r in range(args.rounds):
                peer["nbpipe"].append(nbpipe_items(client, args.tasks, None, f"peer-{r}"))
                peer["parsl"].append(parsl_items(app, args.tasks))
                peer["dask"].append(dask_items(client, args.tasks))
                chunked["nbpipe"].append(
                    nbpipe_items(client, args.items, args.chunksize, f"chunked-{r}"))
                chunked["parsl"].append(parsl_items(app, args.items))
                chunked["dask"].append(dask_items(client, args.items))
                print(f"round {r + 1}: " + ", ".join(
                    f"{side} {times[-1]:.1f} s" for group in (peer, chunked)
                    for side, times in group.items()), flush=True)
    finally:
        dfk.cleanup()
        shutil.rmtree(run_dir, ignore_errors=True)
    report(args.tasks, args.items, args.chunksize, args.rounds, peer, chunked, write=not args.no_write)


def report(tasks: int, items: int, chunksize: int, rounds: int, peer: dict[str, list[float]],
           chunked: dict[str, list[float]], *, write: bool = True) -> None:
    """Print the rates and ratios of the rounds' times; write them to docs/performance.md."""
    rates = {side: median_rate(tasks, t) for side, t in peer.items()}
    map_rates = {side: median_rate(items, t) for side, t in chunked.items()}
    vs_parsl = statistics.median(p / c for p, c in zip(chunked["parsl"], chunked["nbpipe"],
                                                       strict=True))
    vs_dask = statistics.median(d / c for d, c in zip(chunked["dask"], chunked["nbpipe"],
                                                      strict=True))
    verdict = "PASS" if min(vs_parsl, vs_dask) >= MAP_TARGET else "MISS"
    print(f"peer ({tasks:,} tasks): " + ", ".join(f"{s} {v:,.0f}/s" for s, v in rates.items()))
    print(f"chunked map ({items:,} items): " + ", ".join(
        f"{s} {v:,.0f}/s" for s, v in map_rates.items())
        + f"; nbpipe is {vs_parsl:.1f}x Parsl and {vs_dask:.1f}x Dask: {verdict}")
    if not write:
        return
    import parsl

    lead = rates["nbpipe"] / rates["parsl"]
    body = f"""Two worker processes of one thread on every side, started before the rounds (start-up not
counted); {rounds} rounds alternating the sides; medians. Parsl {parsl.__version__}
(`HighThroughputExecutor`, `LocalProvider`, {WORKERS} workers); raw Dask and nbpipe share one
`LocalCluster`. Every nbpipe round uses a fresh store, so every task runs and is recorded.

| {tasks:,} no-op tasks, one call each | tasks/s | ratio to Parsl |
| --- | --- | --- |
| nbpipe (`[task(i) for i in ...]`, batching on) | {rates['nbpipe']:,.0f} | **{lead:.1f}** |
| Parsl HTEX (one app per task) | {rates['parsl']:,.0f} | 1.0 |
| raw Dask (one future per task) | {rates['dask']:,.0f} | {rates['dask'] / rates['parsl']:.1f} |

| {items:,} items | items/s | nbpipe's lead |
| --- | --- | --- |
| nbpipe `task.map(range(N), chunksize={chunksize})` | {map_rates['nbpipe']:,.0f} | |
| Parsl HTEX, one app per item | {map_rates['parsl']:,.0f} | **{vs_parsl:.1f}x** |
| raw Dask, one future per item (`client.map`) | {map_rates['dask']:,.0f} | **{vs_dask:.1f}x** |

Target: the chunked map at least {MAP_TARGET:g}x both -- **{verdict}**. Each item of the
chunked map keeps its own key, state, attempt record and result (small results of quick
tasks are kept inline in the store's database, see `docs/store.md`); chunks of
{chunksize:,} items go to Dask as one task each, so Dask's per-task cost is paid once per
chunk. The peers pay it (and Parsl its interchange round trip) once per item. All three
sides' processes stay up through the rounds and share the two cores (an idle Parsl
interchange and its workers poll), so every per-task rate is lower than each tool alone
shows (raw Dask alone: the *Overhead* section); the ratios are what to read.
"""
    write_section(Path(__file__).resolve().parent.parent / "docs" / "performance.md",
                  "Peers: Parsl and raw Dask", body, machine())


if __name__ == "__main__":
    main()
