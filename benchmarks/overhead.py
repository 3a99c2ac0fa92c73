"""Overhead of nbpipe over raw dask.distributed: 5,000 no-op tasks plus one reduce.

Both sides run on the same LocalCluster (worker processes, one thread each), alternating round
by round, and the median wall times are compared as a ratio: absolute times on a shared machine
are noise, ratios measured side by side are not.

- raw:      ``client.map(noop, range(n))`` then ``client.submit(sum, futures).result()``
- nbpipe:   ``[noop(i) for i in range(n)]`` as tasks, ``total(refs)``, ``pipe.run()``,
            ``total.result()`` -- registration, identity, store, result files included.
- nbpipe, one Dask task per task: the same with adaptive batching off
  (``nbpipe.batch-seconds: 0``), to show the per-task cost.

    python benchmarks/overhead.py [--tasks 5000] [--rounds 5] [--no-write]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import dask
from distributed import Client, LocalCluster

from nbpipe import Pipeline

try:
    from benchmarks.report import machine, write_section
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from report import machine, write_section  # type: ignore[no-redef]

TARGET = 1.15  # issue 8: nbpipe / raw dask.distributed


def noop(i: int) -> int:
    """The task: nothing to do."""
    return i


def raw_dask(client: Client, n: int) -> float:
    """Seconds for n no-op futures and one reduce with plain dask.distributed."""
    start = time.perf_counter()
    futures = client.map(noop, range(n), pure=False)
    total = client.submit(sum, futures).result()
    elapsed = time.perf_counter() - start
    assert total == n * (n - 1) // 2
    del futures
    return elapsed


def with_nbpipe(client: Client, n: int, round_: int, batching: bool) -> float:
    """Seconds for the same work as nbpipe tasks in a fresh store."""
    with tempfile.TemporaryDirectory() as store, dask.config.set(
        {"nbpipe.batch-seconds": None if batching else 0}
    ):
        start = time.perf_counter()
        pipe = Pipeline(f"overhead-{round_}", store=store, cluster=client)
        task, reduce = pipe.task(noop), pipe.task(sum)
        total = reduce([task(i) for i in range(n)])
        pipe.run(check=True)
        value = total.result()
        elapsed = time.perf_counter() - start
        pipe.close()
    assert value == n * (n - 1) // 2
    return elapsed


def main() -> None:
    """Run the rounds, print the medians and ratios, write docs/performance.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/performance.md")
    args = parser.parse_args()
    times: dict[str, list[float]] = {"raw": [], "nbpipe": [], "nbpipe-unbatched": []}
    with LocalCluster(threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        workers = len(cluster.workers)
        raw_dask(client, 200)  # warm up: imports and connections on every worker
        for r in range(args.rounds):
            times["raw"].append(raw_dask(client, args.tasks))
            times["nbpipe"].append(with_nbpipe(client, args.tasks, r, batching=True))
            times["nbpipe-unbatched"].append(with_nbpipe(client, args.tasks, r, batching=False))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                  flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["nbpipe"] / med["raw"]
    ratio_unbatched = med["nbpipe-unbatched"] / med["raw"]
    verdict = "PASS" if ratio <= TARGET else "MISS"
    print(f"median: raw {med['raw']:.2f} s, nbpipe {med['nbpipe']:.2f} s "
          f"(ratio {ratio:.2f}, target <= {TARGET}: {verdict}), one Dask task per task "
          f"{med['nbpipe-unbatched']:.2f} s (ratio {ratio_unbatched:.2f})")
    if args.no_write:
        return
    body = f"""{args.tasks:,} no-op tasks and one reduce on one LocalCluster ({workers} worker
processes x 1 thread), {args.rounds} rounds alternating the sides; medians.

| side | median wall time | ratio to raw Dask |
| --- | --- | --- |
| raw dask.distributed (`client.map` + `submit(sum)`) | {med['raw']:.2f} s | 1.00 |
| nbpipe (default: adaptive batching of tiny tasks) | {med['nbpipe']:.2f} s | **{ratio:.2f}** |
| nbpipe, one Dask task per task (`nbpipe.batch-seconds: 0`) | {med['nbpipe-unbatched']:.2f} s \
| {ratio_unbatched:.2f} |

Target: ratio <= {TARGET} -- **{verdict}**. nbpipe's figure includes registering the tasks,
computing their content keys, recording every transition and attempt in SQLite and writing
every result to its own file. It beats raw per-task futures because once a function's tasks are
known to take milliseconds, ready ones run in batches of about 0.2 s of work per Dask task (each
keeps its own key, state, attempt record and result file), which saves Dask's per-task
scheduling cost. Without batching the remaining overhead is the driver's CPU: on this 2-core
machine the scheduler, the client and the runner share one busy process.
"""
    write_section(Path(__file__).resolve().parent.parent / "docs" / "performance.md",
                  "Overhead against raw Dask", body, machine())
    print("wrote docs/performance.md")


if __name__ == "__main__":
    main()
