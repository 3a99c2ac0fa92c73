"""Task files at scale: the driver's memory while a large JSONL task file is registered.

A fresh Python process writes N small entries (``{"task_id": "tN", "data": {"x": N}}``) to a
``.jsonl`` file, maps a task over ``nbpipe.iter_tasks(path)`` (the file is read one line at a
time) and resolves the tasks (keys, store rows); its peak RSS is measured. Target (issue 20):
<= 500 MB for 1,000,000 entries, registration and run.

    python benchmarks/taskfile.py [--sizes 10000 100000] [--no-write]
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
import json, resource, sys, time
from nbpipe import Pipeline, TaskItem, iter_tasks

n, folder = int(sys.argv[1]), sys.argv[2]
path = f"{folder}/tasks.jsonl"
with open(path, "w") as f:
    for i in range(n):
        f.write(json.dumps({"task_id": f"t{i}", "data": {"x": i}}) + "\\n")
pipe = Pipeline("taskfile", store=f"{folder}/.nbpipe")

@pipe.task
def process(item: TaskItem) -> int:
    return item.data["x"]

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
refs = process.map(iter_tasks(path), chunksize=1000)
pipe._resolve(refs)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"n": n, "seconds": seconds, "peak_mb": peak / 1024, "base_mb": before / 1024}))
"""


def measure(n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        out = subprocess.run([sys.executable, "-c", CHILD, str(n), folder], capture_output=True,
                             text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--no-write", action="store_true", help="print, do not update docs/")
    args = parser.parse_args()
    rows = ["| entries | registering | peak driver RSS | RSS per entry | 1,000,000 entries (extrapolated) |",
            "| --- | --- | --- | --- | --- |"]
    for n in args.sizes:
        r = measure(n)
        per_entry = (r["peak_mb"] - r["base_mb"]) * 1024 / n
        million = r["base_mb"] + per_entry * 1_000_000 / 1024
        verdict = "**PASS**" if million <= 500 else "**FAIL**"
        rows.append(f"| {n:,} | {r['seconds']:.1f} s | {r['peak_mb']:.0f} MB | {per_entry:.2f} KB "
                    f"| {million:,.0f} MB (target <= 500 MB: {verdict}) |")
        print(rows[-1], flush=True)
    body = ("A `.jsonl` task file of N small entries, mapped with `process.map(iter_tasks(path), "
            "chunksize=1000)` and registered (keys and store rows) in a fresh process "
            "(`python benchmarks/taskfile.py`). The file is read one line at a time; each "
            "registered task still keeps its entry in the driver until it has run.\n\n"
            + "\n".join(rows))
    if not args.no_write:
        write_section(Path(__file__).resolve().parent.parent / "docs" / "performance.md",
                      "Task files at scale", body, machine())


if __name__ == "__main__":
    main()
