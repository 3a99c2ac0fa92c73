"""Copy a store -- its database and its result files -- to a new place, verified.

For moving a store between disks: a project's store onto a local disk, a database off a network
file system (``database=``), a store into a shared project folder. The copy keeps every record
(pipelines, tasks, attempts, events, results), so nothing is computed again after switching.

>>> copy_store(Store(".nbpipe"), "/scratch/ada/survey/.nbpipe")   # doctest: +SKIP
{'tables': {'pipelines': 1, 'tasks': 120, ...}, 'files': 118, 'ok': True}
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

from ..errors import PipelineBusy, StoreError
from .maintenance import doctor, live_runners
from .registry import remember
from .schema import SCHEMA_VERSION
from .sqlite import Store, is_store

__all__ = ["TABLES", "copy_store"]

#: Every table of the schema (all are copied, row for row).
TABLES = ("pipelines", "tasks", "edges", "results", "environments", "attempts", "events",
          "commands", "jobs")

#: The folders of a store whose files belong to it (locks and running markers belong to live
#: processes of the source, not to the copy).
FOLDERS = ("results", "specs")


def _counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES}


def copy_store(source: Store, target: str | os.PathLike[str], *,
               database: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Copy the store ``source`` into the folder ``target`` (which must hold no store yet), with
    its database placed at ``database`` if given (see :class:`Store`); then verify the copy.

    Refused with :class:`~nbpipe.PipelineBusy` while a runner of the source is live (its
    workers write results the copy would miss). The database is copied with SQLite's online
    backup (one consistent snapshot); result files are copied atomically, and the copy is then
    checked as ``nbpipe doctor`` does (every recorded result present with its checksum) and
    row for row against the source. Returns the row counts, the number of files and ``ok``.
    """
    target = Path(target).absolute()
    if is_store(target):
        raise StoreError(f"{target} holds a store already; copy into a new folder (the copy does "
                         "not merge stores)")
    if target == source.path:
        raise StoreError(f"{target} is the store being copied; name another folder")
    live = live_runners(source)
    if live:
        raise PipelineBusy(
            f"cannot copy the store {source.path} while a runner is live ({', '.join(live)}): its "
            "workers write results the copy would miss; copy it once the run has finished"
        )
    copy = Store(target, database=database)  # the checks of any new store (file system, rights)
    copy.close()
    with sqlite3.connect(copy.db_path) as into:
        source.connect().backup(into)  # a consistent snapshot, whatever writes go on
    copy = Store(target, database=database)
    files = 0
    for folder in FOLDERS:
        for path in sorted((source.path / folder).rglob("*.pkl")):
            dest = target / path.relative_to(source.path)
            dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            shutil.copyfile(path, tmp)
            os.chmod(tmp, 0o600)
            os.replace(tmp, dest)
            files += 1
    report = doctor(copy)
    expected, got = _counts(source.connect()), _counts(copy.connect())
    version = copy.connect().execute("PRAGMA user_version").fetchone()[0]
    remember(copy.path)
    # (not doctor's whole verdict: stale runner records come along from the source as they are)
    ok = (report["integrity"] == ["ok"] and not report["bad_results"] and expected == got
          and version == SCHEMA_VERSION)
    problems: dict[str, Any] = {}
    if report["integrity"] != ["ok"]:
        problems["integrity"] = report["integrity"]
    if report["bad_results"]:
        problems["bad_results"] = report["bad_results"]
    if expected != got:
        problems["rows"] = {"source": expected, "copy": got}
    return {"source": str(source.path), "target": str(copy.path), "database": str(copy.db_path),
            "tables": got, "files": files, "ok": ok, "problems": problems}
