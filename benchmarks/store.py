"""Store placement: what keeping the SQLite database outside the store folder costs.

On a cluster the store folder lies on a network file system and the database on a local disk
(``database=`` / ``NBPIPE_DATABASE``, docs/store.md "A store on a cluster"). This measures, for
the database in the folder and for the database kept elsewhere (result files in the folder):

- *transitions/s*: task state changes recorded through the runner's batches of 1,000 per
  transaction (each a row update plus an event);
- *resume of 10,000*: a fresh process registers 10,000 no-op tasks that are all done and
  ``run()`` executes nothing (as in benchmarks/scale.py; one LocalCluster, start-up not counted).

The two placements alternate, three rounds each, and the medians are reported.

    python benchmarks/store.py [--tasks 10000] [--rounds 3] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from distributed import LocalCluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section  # noqa: E402
from scale import child, store_rate  # noqa: E402

PLACEMENTS = {
    "database in the store folder": False,
    "database elsewhere (`database=`), results in the folder": True,
}


def _placed(elsewhere: bool, where: Path) -> None:
    """Point this process (and the children it starts) at a database elsewhere, or not."""
    if elsewhere:
        os.environ["NBPIPE_DATABASE"] = str(where / "local-disk" / "store.sqlite")
    else:
        os.environ.pop("NBPIPE_DATABASE", None)


def main() -> None:
    """Measure, print, and write the "Store placement" section of docs/performance.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/performance.md")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {name: [] for name in PLACEMENTS}
    resumes: dict[str, list[float]] = {name: [] for name in PLACEMENTS}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for number, (name, elsewhere) in enumerate(PLACEMENTS.items()):  # a first run each
            folders[name] = Path(tmp) / f"placement-{number}"
            folders[name].mkdir()
            _placed(elsewhere, folders[name])
            first = child(folders[name], cluster.scheduler_address, "run", args.tasks)
            assert first["executed"] == args.tasks, first
        for _ in range(args.rounds):
            for name, elsewhere in PLACEMENTS.items():
                _placed(elsewhere, folders[name])
                again = child(folders[name], cluster.scheduler_address, "run", args.tasks)
                assert again["executed"] == 0 and again["cached"] == args.tasks, again
                resumes[name].append(again["seconds"])
                with tempfile.TemporaryDirectory() as scratch:
                    _placed(elsewhere, Path(scratch))
                    rates[name].append(store_rate(60_000))
                print(f"{name}: resume {again['seconds']:.2f} s, {rates[name][-1]:,.0f} "
                      "transitions/s", flush=True)
    _placed(False, Path(tmp))
    rows = "\n".join(
        f"| {name} | {statistics.median(rates[name]):,.0f} | {statistics.median(resumes[name]):.2f} s |"
        for name in PLACEMENTS)
    body = f"""Where the SQLite database lies, with result files in the store folder either way
(`python benchmarks/store.py`). Both placements are on this machine's local disk: the figures
show what keeping the database outside the folder costs nbpipe itself (a network file system
under the result files adds its own latency per result file, which is not measured here).
Medians of {args.rounds} alternating rounds.

| placement | transitions/s (batches of 1,000) | resume of {args.tasks:,} done tasks |
| --- | --- | --- |
{rows}
"""
    print(body)
    if not args.no_write:
        write_section(Path(__file__).resolve().parent.parent / "docs" / "performance.md",
                      "Store placement", body, machine())


if __name__ == "__main__":
    main()
