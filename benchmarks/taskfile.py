"""Task files at scale: the driver's peak memory while a large JSONL task file is run.

A fresh Python process (the driver) writes N small entries (``{"task_id": "tN", "data": {"x":
N}}``) to a ``.jsonl`` file, starts a LocalCluster (2 worker processes) and runs a no-op task
over the file with ``nbpipe.run_tasks(process, path, window=10_000, chunksize=1000)``: entries
are read one at a time, registered, run and dropped window by window. The driver's peak RSS
(``ru_maxrss``: the driver with its in-process scheduler, not the workers) is measured, and the
same file is run again (resume: nothing may execute). Target (issue 20): <= 500 MB for
1,000,000 entries, registration and run.

    python benchmarks/taskfile.py [--sizes 100000 1000000] [--window 10000] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section  # noqa: E402

CHILD = """
import json, os, resource, sys, time
from nbpipe import Pipeline, TaskItem, run_tasks

n, folder, window = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
path = f"{folder}/tasks.jsonl"
if not os.path.exists(path):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"task_id": f"t{i}", "data": {"x": i}}) + "\\n")
pipe = Pipeline("taskfile", store=f"{folder}/.nbpipe", cluster={"kind": "local", "workers": 2})

@pipe.task
def process(item: TaskItem) -> None:
    return None

@pipe.task
def warm() -> int:
    return 0

warm().result()  # the cluster is up: what follows is what the task file costs
load = [os.getloadavg()[0]]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
summary = run_tasks(process, path, window=window, chunksize=1000)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
load.append(os.getloadavg()[0])
pipe.close()
print(json.dumps({"n": n, "seconds": seconds, "peak_mb": peak / 1024, "base_mb": base / 1024,
                  "executed": summary.executed, "cached": summary.cached,
                  "failed": len(summary.failed), "load": load}))
"""


def measure(n: int, folder: str, window: int) -> dict[str, float]:
    # (the driver's progress lines, one per window, go to this process's stderr)
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), folder, str(window)],
                         stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--window", type=int, default=10_000)
    parser.add_argument("--no-write", action="store_true", help="print, do not update docs/")
    args = parser.parse_args()
    rows = ["| entries | first run | peak driver RSS | of which the file (above the warm driver) "
            "| rerun (resume) | target <= 500 MB | load (1 min, start-end) |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    peaks: list[tuple[int, float]] = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as folder:
            first = measure(n, folder, args.window)
            assert first["executed"] == n and not first["failed"], first
            again = measure(n, folder, args.window)
        peaks.append((n, max(first["peak_mb"], again["peak_mb"])))
        verdict = "**PASS**" if first["peak_mb"] <= 500 and again["peak_mb"] <= 500 else "**FAIL**"
        rows.append(
            f"| {n:,} | {first['seconds']:.0f} s ({n / first['seconds']:,.0f} entries/s) "
            f"| {max(first['peak_mb'], again['peak_mb']):.0f} MB "
            f"| {first['peak_mb'] - first['base_mb']:.0f} MB "
            f"| {again['seconds']:.0f} s, {again['executed']} executed, {again['cached']:,} done "
            f"| {verdict} | {first['load'][0]:.1f}-{first['load'][1]:.1f} |")
        print(rows[-1], flush=True)
    body = ("A `.jsonl` task file of N small entries, run with a no-op task by "
            f"`nbpipe.run_tasks(process, path, window={args.window:_}, chunksize=1000)` on a "
            "LocalCluster of 2 worker processes, in a fresh driver process, then run again from "
            "the same store (`python benchmarks/taskfile.py`). Peak RSS is the driver's "
            "(`ru_maxrss`, with its in-process scheduler; the workers are other processes). "
            "Entries are read one at a time and each window is dropped from the driver once it "
            "has run, so the peak follows the window, not the file. The last column is the "
            "machine's 1-minute load average when the first run began and ended (2 cores shared "
            "with other work: the times move with it).\n\n" + "\n".join(rows))
    (n1, p1), (n2, p2) = (peaks[-2], peaks[-1]) if len(peaks) > 1 else ((0, 0.0), (0, 0.0))
    if n2 < 1_000_000 and n2 > n1:  # what still grows with the file, carried on to a million
        million = p2 + (p2 - p1) / (n2 - n1) * (1_000_000 - n2)
        body += (f"\n\nThe peak still grows by {(p2 - p1) * 1024 * 1024 / (n2 - n1):,.0f} bytes per "
                 f"entry between {n1:,} and {n2:,} entries (in part the ids seen so far, kept to refuse "
                 "a duplicate, some 90 bytes each; the rest is not traced yet: the driver's live "
                 "Python memory stays flat, see tests/test_taskfile.py); carried on to 1,000,000 "
                 f"entries that is about **{million:,.0f} MB** (target <= 500 MB). The 1,000,000-entry "
                 "run itself was not part of this measurement (`--sizes 1000000`: some 35 minutes on "
                 "2 shared cores).")
    if not args.no_write:
        write_section(Path(__file__).resolve().parent.parent / "docs" / "performance.md",
                      "Task files at scale", body, machine())


if __name__ == "__main__":
    main()
