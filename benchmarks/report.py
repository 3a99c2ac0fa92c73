"""Writing benchmark results into docs/performance.md, one section per benchmark."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
from pathlib import Path

import dask
import distributed


def machine() -> str:
    """One line describing this machine and the software measured."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = f"{pages / 2**30:.0f} GiB"
    except (ValueError, OSError):
        memory = "unknown memory"
    return (f"{os.cpu_count()} cores ({cpu}), {memory}, Python {platform.python_version()}, "
            f"dask {dask.__version__}, distributed {distributed.__version__}")


HEADER = """# Performance

Figures measured by the scripts in `benchmarks/` (`make bench`). Each comparison runs both
sides in one process, alternating, and reports the median ratio: this machine is shared and
noisy, so absolute times mean little and side-by-side ratios mean a lot. Tests never assert
timings.
"""


def write_section(path: Path, heading: str, body: str, machine_line: str) -> None:
    """Replace (or add) the section ``## heading`` of ``path`` with a dated ``body``."""
    text = path.read_text() if path.exists() else HEADER
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = f"## {heading}\n\nMeasured {stamp} on {machine_line}.\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text.rstrip() + "\n")
