"""Monte-Carlo estimate of pi: desipipe's getting-started example as an nbpipe pipeline.

Run it twice: the second run finds every task done and executes nothing.

    python pi.py
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from nbpipe import Pipeline

pipe = Pipeline("pi")


def draw_random_numbers(rng, size: int):
    """Uniform numbers in [-1, 1): a plain helper; editing it re-runs `fraction`."""
    return rng.uniform(-1, 1, size)


@pipe.task(cores=1, memory="1GB")
def fraction(seed: int = 42, size: int = 100_000) -> float:
    """Fraction of random points that fall inside the unit circle."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x, y = draw_random_numbers(rng, size), draw_random_numbers(rng, size)
    return float(np.mean(x**2 + y**2 < 1.0))


@pipe.task
def average(fractions: list[float]) -> float:
    """Four times the mean fraction: the estimate of pi."""
    return 4 * sum(fractions) / len(fractions)


@pipe.bash_task
def report(estimate: float) -> str:
    """A bash task: the shell prints the estimate."""
    return f"echo 'pi is about {estimate:.4f}'"


def main() -> int:
    """Register 20 fractions, their average and a bash echo; run; print the task table."""
    fractions = [fraction(seed=i) for i in range(20)]
    estimate = average(fractions)
    message = report(estimate)
    summary = pipe.run()
    console = Console()
    console.print(f"[bold]pi ≈ {estimate.result():.5f}[/]   {message.result().strip()}")
    table = Table(title=f"pipeline {pipe.name!r} in {pipe.store.path}")
    for column in ("task", "state", "attempts", "why it ran", "key"):
        table.add_column(column)
    for info in pipe.tasks():
        table.add_row(info.label, info.state, str(info.attempts), info.reason or "", info.key[:12])
    console.print(table)
    console.print(f"this run: {summary}")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
