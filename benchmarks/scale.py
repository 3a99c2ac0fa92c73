"""Scale: resuming many done tasks, driver memory per task, store transitions per second.

- *resume*: a store holds N finished no-op tasks; a fresh process registers the same N tasks and
  calls ``run()``, which must find every one done and execute nothing. Timed from the first
  registration to ``run()`` returning, in a new Python process (imports excluded), for 10,000
  and 100,000 tasks. Targets: <= 1 s and <= 10 s.
- *memory*: the driver's RSS growth per registered task while registering 100,000 tasks (no
  run). Target: <= 2 KB.
- *store*: state transitions recorded per second (each one a row update plus an event), in the
  runner's batches of 1,000 per transaction. Target: >= 10,000/s.

    python benchmarks/scale.py [--sizes 10000 100000] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section  # noqa: E402

from nbpipe import Pipeline  # noqa: E402
from nbpipe.store import Batch, Store  # noqa: E402

CHILD = """
import json, sys, time
import psutil
from nbpipe import Pipeline

store, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
pipe = Pipeline("scale", store=store, cluster={"kind": "local", "workers": 2})


@pipe.task
def noop(i: int) -> int:
    return i


def main() -> None:
    rss0 = psutil.Process().memory_info().rss
    start = time.perf_counter()
    refs = [noop(i) for i in range(n)]
    if mode == "memory":
        pipe._resolve()
        rss = psutil.Process().memory_info().rss
        print(json.dumps({"per_task": (rss - rss0) / n, "refs": len(refs)}))
        return
    summary = pipe.run(check=True)
    print(json.dumps({"seconds": time.perf_counter() - start, "executed": summary.executed,
                      "cached": summary.cached}))
    pipe.close()


if __name__ == "__main__":
    main()
"""


def child(store: Path, n: int, mode: str) -> dict:
    """Run CHILD as a script file (as users do: task functions have their source)."""
    script = store / "child.py"
    script.write_text(CHILD)
    out = subprocess.run([sys.executable, str(script), str(store / ".nbpipe"), str(n), mode],
                         capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def resume(n: int) -> dict:
    """Build a store of n done tasks (first run), then time a fresh process finding them done."""
    with tempfile.TemporaryDirectory() as tmp:
        first = child(Path(tmp), n, "run")
        assert first["executed"] == n, first
        again = child(Path(tmp), n, "run")
        assert again["executed"] == 0 and again["cached"] == n, again
        return {"first": first["seconds"], "resume": again["seconds"]}


def memory(n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        return child(Path(tmp), n, "memory")["per_task"]


def store_rate(total: int = 200_000, batch_size: int = 1000) -> float:
    """Transitions per second written through the runner's batches."""
    with tempfile.TemporaryDirectory() as tmp:
        pipe = Pipeline("store-rate", store=tmp)

        @pipe.task
        def noop(i: int) -> int:
            return i

        keys = [noop(i) for i in range(batch_size)]
        pipe._resolve()
        store: Store = pipe.store
        pid = pipe.pipeline_id
        key_list = [r.key for r in keys]
        start = time.perf_counter()
        written = 0
        states = ("PENDING", "RUNNING", "SUCCEEDED")
        while written < total:
            batch = Batch()
            state = states[(written // batch_size) % 3]
            for key in key_list:
                batch.state(pid, key, state, attempts=1)
            store.write(batch)
            written += batch_size
        rate = written / (time.perf_counter() - start)
        pipe.close()
        return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--no-write", action="store_true", help="do not update docs/performance.md")
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        r = resume(n)
        target = 1.0 if n <= 10_000 else 10.0 * n / 100_000
        verdict = "PASS" if r["resume"] <= target else "MISS"
        rows.append((n, r, target, verdict))
        print(f"resume {n:,}: {r['resume']:.2f} s (first run {r['first']:.1f} s); target <= {target:g} s: "
              f"{verdict}")
    per_task = memory(max(args.sizes))
    mem_verdict = "PASS" if per_task <= 2048 else "MISS"
    print(f"memory: {per_task:.0f} bytes per registered task at {max(args.sizes):,}: {mem_verdict}")
    rate = store_rate()
    store_verdict = "PASS" if rate >= 10_000 else "MISS"
    print(f"store: {rate:,.0f} transitions/s: {store_verdict}")
    if args.no_write:
        return
    table = "\n".join(
        f"| {n:,} | {r['resume']:.2f} s | {target:g} s | **{verdict}** | {r['first']:.1f} s |"
        for n, r, target, verdict in rows)
    body = f"""A store holds N finished no-op tasks; a new Python process registers the same N
tasks and calls `run()`, which finds every one done and executes nothing (no cluster starts).
Timed from the first registration to `run()` returning, imports excluded.

| tasks | resume | target | verdict | first run (for scale) |
| --- | --- | --- | --- | --- |
{table}

Driver memory: registering {max(args.sizes):,} tasks (keys computed, nothing run) grows the
process by **{per_task:.0f} bytes per task** (target <= 2 KB: **{mem_verdict}**).

Store: **{rate:,.0f} state transitions per second** (a row update and an event each, 1,000 per
transaction as the runner batches them; target >= 10,000/s: **{store_verdict}**).

What bounds resume and memory (cProfile of 10,000 tasks): about 60 % of the time is the
content identity itself -- `identity.encode` runs four digests per task (its arguments, its
components, the key) and re-encodes the function's code identity (helpers, globals, module
versions) for every call of the same function; `_find_done` (one SQLite read for all keys)
and `_add`'s bookkeeping share most of the rest. The next step is to encode a function's code
identity once per registration burst and reuse its bytes (the keys stay the same), and to drop
per-task objects the driver does not need (each `TaskRef` keeps its label, components and
arguments: most of the ~2.4 KB per task).
"""
    write_section(Path(__file__).resolve().parent.parent / "docs" / "performance.md",
                  "Scale: resume, memory, store", body, machine())


if __name__ == "__main__":
    main()
