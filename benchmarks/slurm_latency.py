"""Slurm latency: seconds from ``pipe.run()`` to the first task running on a Slurm worker.

Two paths, alternated over several rounds on the local Slurm that `.ci/slurm-up` starts:

- *cold*: a new pipeline whose cluster is not started yet, so ``run()`` starts the Dask
  scheduler (with TLS certificates), submits a job, waits for it to start and its worker to
  connect, then sends the task;
- *warm*: the scheduler is up but the pool has scaled to zero jobs (the state of a notebook that
  sat idle), so ``run()`` submits a job and waits for its worker.

Target: <= 5 s. Skips with a reason where no Slurm answers.

    python benchmarks/slurm_latency.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import gc
import getpass
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section  # noqa: E402

from nbpipe import Pipeline, State  # noqa: E402

SPEC = {"kind": "slurm", "cores": 1, "memory": "1GB", "walltime": "00:10:00", "max_jobs": 1,
        "idle_timeout": "1s"}


def slurm_answers() -> bool:
    """Whether a Slurm controller answers with a usable node."""
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed", "alloc"))


def queued_jobs() -> int:
    """This user's jobs in the Slurm queue."""
    out = subprocess.run(["squeue", "-h", "-u", getpass.getuser()], capture_output=True, text=True)
    return len(out.stdout.splitlines())


def until_running(pipe: Pipeline, value: int) -> float:
    """Register one new task, call run(), return seconds until it is RUNNING on a worker."""

    @pipe.task(name="probe")
    def probe(i: int) -> int:
        return i

    ref = probe(value)
    start = time.perf_counter()
    pipe.run(wait=False)
    while ref.state not in (State.RUNNING, State.SUCCEEDED):
        if ref.state.final:
            raise RuntimeError(f"the probe task ended {ref.state.value}: {ref.error}")
        time.sleep(0.005)
    elapsed = time.perf_counter() - start
    pipe.wait()
    return elapsed


def wait_for_empty_queue(timeout: float = 60) -> None:
    """Wait until the pool has scaled to zero and Slurm let the jobs go."""
    deadline = time.monotonic() + timeout
    while queued_jobs() and time.monotonic() < deadline:
        time.sleep(0.2)


def measure(rounds: int) -> dict[str, list[float]]:
    """Alternate cold and warm rounds; return the seconds of each."""
    cold: list[float] = []
    warm: list[float] = []
    tmp = tempfile.mkdtemp(prefix="nbpipe-bench-")
    try:
        warm_pipe = Pipeline("warm", store=Path(tmp) / "warm", cluster=SPEC)
        warm_pipe.connection  # start the scheduler once  # noqa: B018
        try:
            for i in range(rounds):
                wait_for_empty_queue()
                pipe = Pipeline("cold", store=Path(tmp) / f"cold-{i}", cluster=SPEC)
                try:
                    cold.append(until_running(pipe, i))
                finally:
                    pipe.close()
                wait_for_empty_queue()
                warm.append(until_running(warm_pipe, i))
        finally:
            warm_pipe.close()
    finally:
        gc.collect()  # dask-jobqueue's certificate files go with their cluster objects
        shutil.rmtree(tmp, ignore_errors=True)
    return {"cold": cold, "warm": warm}


def main() -> None:
    """Print the figures and write them to docs/performance.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/performance.md")
    args = parser.parse_args()
    if not slurm_answers():
        print("slurm latency: skipped, no Slurm answers here (start one: sudo .ci/slurm-up)")
        return
    figures = measure(args.rounds)
    cold, warm = statistics.median(figures["cold"]), statistics.median(figures["warm"])
    verdict = "PASS" if max(cold, warm) <= 5.0 else "MISS"
    print(f"run() to first task running on a Slurm worker: cold median {cold:.2f} s "
          f"(max {max(figures['cold']):.2f} s), warm median {warm:.2f} s "
          f"(max {max(figures['warm']):.2f} s); target <= 5 s: {verdict}")
    if args.no_write:
        return
    cold_max, warm_max = max(figures["cold"]), max(figures["warm"])
    body = f"""Seconds from `pipe.run()` to the first task reported `RUNNING` on a Slurm worker,
on a single-node Slurm on localhost (`.ci/slurm-up`), {args.rounds} rounds alternating the
two paths; jobs of 1 core and 1 GB, TLS on.

| path | median | max |
| --- | --- | --- |
| cold: no scheduler yet (starts it, submits a job, waits for the worker) | {cold:.2f} s | {cold_max:.2f} s |
| warm: scheduler up, pool at zero jobs (submits a job, waits for worker) | {warm:.2f} s | {warm_max:.2f} s |

Target: <= 5 s -- **{verdict}**. Most of the time is the worker's own start inside the job
(Python, Dask and the TLS handshake); nbpipe asks for a job on the tick after the task became
ready (the runner wakes as soon as it is) and submits it at once rather than through Dask's
adaptive loop, which waits for its next interval. On a production cluster the queue wait
comes on top and dominates.
"""
    write_section(Path(__file__).resolve().parent.parent / "docs" / "performance.md",
                  "Slurm latency", body, machine())


if __name__ == "__main__":
    main()
