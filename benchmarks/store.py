"""Store placement: SQLite with its database in the store folder or elsewhere, and PostgreSQL.

On a cluster the store folder lies on a network file system: SQLite's database then goes on a
local disk (``database=`` / ``NBPIPE_DATABASE``, docs/store.md "A store on a cluster"), or the
store goes into PostgreSQL (``store="postgresql://..."``, result files in a shared folder). This
measures, for each placement:

- *transitions/s*: task state changes recorded through the runner's batches of 1,000 per
  transaction (each a row update plus an event);
- *resume of 10,000*: a fresh process registers 10,000 no-op tasks that are all done and
  ``run()`` executes nothing (as in benchmarks/scale.py; one LocalCluster, start-up not counted).

The placements alternate, three rounds each, and the medians are reported. The PostgreSQL row
needs a server: ``NBPIPE_BENCH_POSTGRES`` or ``NBPIPE_TEST_POSTGRES`` (``bash .ci/postgres-up``
prints one); each measurement gets a schema of its own, dropped afterwards.

    python benchmarks/store.py [--tasks 10000] [--rounds 3] [--no-write]   # -> docs/store.md
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

from distributed import LocalCluster

from nbpipe.store.postgres import scratch_schema

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section  # noqa: E402
from scale import CHILD, child, store_rate  # noqa: E402

SQLITE_HERE = "SQLite, database in the store folder"
SQLITE_ELSEWHERE = "SQLite, database elsewhere (`database=`), results in the folder"
POSTGRES = "PostgreSQL on this host (`store=URL`), results in a folder"


def _server() -> str | None:
    return os.environ.get("NBPIPE_BENCH_POSTGRES") or os.environ.get("NBPIPE_TEST_POSTGRES")


def _schema(server: str) -> contextlib.AbstractContextManager[str]:
    """A schema of the measurement's own on the server, dropped afterwards."""
    return scratch_schema(server, prefix="bench")


def _placed(name: str, where: Path) -> None:
    """Point this process (and the children it starts) at a placement."""
    os.environ.pop("NBPIPE_DATABASE", None)
    os.environ.pop("NBPIPE_RESULTS", None)
    if name == SQLITE_ELSEWHERE:
        os.environ["NBPIPE_DATABASE"] = str(where / "local-disk" / "store.sqlite")
    if name == POSTGRES:
        os.environ["NBPIPE_RESULTS"] = str(where / "results")


def _resume(folder: Path, store: str | None, address: str, tasks: int) -> dict:
    """A fresh process registering ``tasks`` tasks (scale.py's child) in a folder or at a URL."""
    if store is None:
        return child(folder, address, "run", tasks)
    import json
    import subprocess

    script = folder / "child.py"
    script.write_text(CHILD)
    out = subprocess.run([sys.executable, str(script), store, address, "run", str(tasks), "1"],
                         capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Measure, print, and write the "Store placement" section of docs/store.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/store.md")
    args = parser.parse_args()
    server = _server()
    placements = [SQLITE_HERE, SQLITE_ELSEWHERE, *([POSTGRES] if server else [])]
    rates: dict[str, list[float]] = {name: [] for name in placements}
    resumes: dict[str, list[float]] = {name: [] for name in placements}
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(LocalCluster(n_workers=2, threads_per_worker=1,
                                                   processes=True, dashboard_address=":0"))
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        folders, urls = {}, {}
        for number, name in enumerate(placements):  # a first run each
            folders[name] = Path(tmp) / f"placement-{number}"
            folders[name].mkdir()
            urls[name] = stack.enter_context(_schema(server)) if name == POSTGRES else None
            _placed(name, folders[name])
            first = _resume(folders[name], urls[name], cluster.scheduler_address, args.tasks)
            assert first["executed"] == args.tasks, first
        for _ in range(args.rounds):
            for name in placements:
                _placed(name, folders[name])
                again = _resume(folders[name], urls[name], cluster.scheduler_address, args.tasks)
                assert again["executed"] == 0 and again["cached"] == args.tasks, again
                resumes[name].append(again["seconds"])
                with tempfile.TemporaryDirectory() as scratch:
                    _placed(name, Path(scratch))
                    with contextlib.ExitStack() as fresh:
                        url = fresh.enter_context(_schema(server)) if name == POSTGRES else None
                        rates[name].append(store_rate(60_000, store=url))
                print(f"{name}: resume {again['seconds']:.2f} s, {rates[name][-1]:,.0f} "
                      "transitions/s", flush=True)
        _placed(SQLITE_HERE, Path(tmp))
    rows = "\n".join(
        f"| {name} | {statistics.median(rates[name]):,.0f} | {statistics.median(resumes[name]):.2f} s |"
        for name in placements)
    missing = "" if server else ("\nNo PostgreSQL server was named (NBPIPE_BENCH_POSTGRES), so "
                                 "its row is missing.\n")
    body = f"""Where the store's database lies (`python benchmarks/store.py`). Every placement is on
this machine's local disk and the PostgreSQL server runs on this host (over TCP on localhost):
the figures show what each engine costs nbpipe itself. A network file system under the result
files, or a server on another host, adds its own latency (per result file, per transaction),
which is not measured here. Medians of {args.rounds} alternating round(s) (`--rounds`).
{missing}
| placement | transitions/s (batches of 1,000) | resume of {args.tasks:,} done tasks |
| --- | --- | --- |
{rows}
"""
    print(body)
    if not args.no_write:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        write_section(Path(__file__).resolve().parent.parent / "docs" / "store.md",
                      "Store placement", body,
                      f"{machine()}, load average {load} (1, 5, 15 min) when it ended")


if __name__ == "__main__":
    main()
