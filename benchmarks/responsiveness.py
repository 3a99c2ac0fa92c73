"""Kernel responsiveness: how fast a plain cell answers while 500 tasks run.

Starts a real ipykernel, loads nbpipe, submits 500 tasks that each sleep briefly, and while they
run measures the round trip of a trivial cell (``execute_request`` -> ``execute_reply``) several
times. Target: under 0.5 s. The same round trip is measured on an idle kernel for comparison.

    python benchmarks/responsiveness.py [--tasks 500] [--probes 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from jupyter_client.manager import start_new_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section  # noqa: E402

SETUP = """
%load_ext nbpipe
from nbpipe import task
import time

@task
def work(i: int) -> int:
    time.sleep({sleep})
    return i

refs = [work(i) for i in range({n})]
_summary = __import__("nbpipe").current_pipeline().run(wait=False)
"""


def round_trip(client, code: str = "1 + 1", timeout: float = 60) -> float:
    """Seconds from sending ``code`` to its execute_reply."""
    start = time.perf_counter()
    client.execute_interactive(code, timeout=timeout, output_hook=lambda msg: None)
    return time.perf_counter() - start


def measure(n_tasks: int, probes: int, sleep: float) -> dict[str, float]:
    """Run the benchmark in a fresh kernel and store; return the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "NBPIPE_STORE": f"{tmp}/.nbpipe", "NBPIPE_PIPELINE": "responsive",
               "NBPIPE_WIDGETS": "0"}
        km, kc = start_new_kernel(kernel_name="python3", env=env, cwd=tmp)
        try:
            idle = [round_trip(kc) for _ in range(probes)]
            kc.execute_interactive(SETUP.format(n=n_tasks, sleep=sleep), timeout=300,
                                   output_hook=lambda msg: None)
            busy = []
            for _ in range(probes):
                busy.append(round_trip(kc))
                time.sleep(0.1)
            state = []
            kc.execute_interactive(
                "print(sum(not r.state.final for r in refs))", timeout=60,
                output_hook=lambda msg: state.append(msg["content"].get("text", "")),
            )
            still_running = int("".join(state).strip() or 0)
            kc.execute_interactive("__import__('nbpipe').current_pipeline().wait()", timeout=600,
                                   output_hook=lambda msg: None)
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
    return {
        "idle_median": statistics.median(idle), "busy_median": statistics.median(busy),
        "busy_max": max(busy), "still_running_after_probes": still_running,
    }


def main() -> None:
    """Print the figures and whether the target is met."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--sleep", type=float, default=0.05)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/performance.md")
    args = parser.parse_args()
    figures = measure(args.tasks, args.probes, args.sleep)
    verdict = "PASS" if figures["busy_max"] < 0.5 else "MISS"
    print(f"plain cell round trip while {args.tasks} tasks run: median "
          f"{figures['busy_median'] * 1000:.1f} ms, max {figures['busy_max'] * 1000:.1f} ms "
          f"(idle median {figures['idle_median'] * 1000:.1f} ms; "
          f"{figures['still_running_after_probes']} tasks still unfinished after the probes) "
          f"target < 500 ms: {verdict}")
    if args.no_write:
        return
    body = f"""A plain cell (`1 + 1`) sent to a real ipykernel while {args.tasks} tasks of
{args.sleep} s each run from the same kernel ({args.probes} probes, 0.1 s apart).

| measure | value |
| --- | --- |
| round trip while tasks run, median | {figures['busy_median'] * 1000:.1f} ms |
| round trip while tasks run, max | {figures['busy_max'] * 1000:.1f} ms |
| round trip on the idle kernel, median | {figures['idle_median'] * 1000:.1f} ms |
| tasks still unfinished after the probes | {figures['still_running_after_probes']} |

Target: under 500 ms -- **{verdict}**. The runner lives in its own thread and the magics
return at once, so the kernel keeps answering.
"""
    write_section(Path(__file__).resolve().parent.parent / "docs" / "performance.md",
                  "Kernel responsiveness", body, machine())


if __name__ == "__main__":
    main()
