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


def _counts(conn: Any) -> dict[str, int]:
    return {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES}


def _version(store: Store) -> int:
    if store.engine == "postgresql":
        return int(store.info()["schema"])  # type: ignore[attr-defined]
    return int(store.connect().execute("PRAGMA user_version").fetchone()[0])


def copy_store(source: Store, target: str | os.PathLike[str], *,
               database: str | os.PathLike[str] | None = None,
               results: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Copy the store ``source`` to ``target`` -- a new folder, or a PostgreSQL URL whose
    database holds no pipeline yet (result files then go to the folder ``results``) -- then
    verify the copy. Either engine to either engine.

    ``database`` places a folder copy's SQLite file elsewhere (see :class:`Store`). Refused
    with :class:`~nbpipe.PipelineBusy` while a runner of the source is live (its workers write
    results the copy would miss). SQLite to SQLite copies the database with SQLite's online
    backup (one consistent snapshot); between engines every table is copied row for row in one
    read snapshot of the source. Result files are copied atomically, and the copy is then
    checked as ``nbpipe doctor`` does (every recorded result present with its checksum) and
    row for row against the source. Returns the row counts, the number of files and ``ok``.
    """
    from .postgres import holds_records, is_url, refuse_results_folder, safe_url

    named = os.fspath(target)
    to_url = is_url(named)
    if not to_url:
        target = Path(named).absolute()
        if is_store(target):
            raise StoreError(f"{target} holds a store already; copy into a new folder (the copy "
                             "does not merge stores)")
        if target == source.path:
            raise StoreError(f"{target} is the store being copied; name another folder")
    live = live_runners(source)
    if live:
        raise PipelineBusy(
            f"cannot copy the store {source.name} while a runner is live ({', '.join(live)}): its "
            "workers write results the copy would miss; copy it once the run has finished"
        )
    if to_url:
        # Every refusal before anything is made: no tables, no results folder, no record of
        # one in the database (which later openers would take as the store's).
        chosen = results or os.environ.get("NBPIPE_RESULTS")
        if not chosen:
            raise StoreError(f"copying to the PostgreSQL store {safe_url(named)} needs a folder for "
                             "its result files, mounted by every host: --results DIR (or "
                             "NBPIPE_RESULTS)")
        folder = Path(os.path.expanduser(os.fspath(chosen))).absolute()
        refuse_results_folder(folder, safe_url(named))
        if folder == source.path:
            raise StoreError(f"{folder} holds the result files of the store being copied; "
                             "name another results folder")
        if holds_records(named):
            raise StoreError(f"the PostgreSQL store {safe_url(named)} holds pipelines already; copy "
                             "into an empty database or schema (the copy does not merge stores)")
        copy = Store(named, results=results)
        _copy_rows(source, copy)
    elif source.engine == "sqlite":
        copy = Store(target, database=database)  # the checks of any new store (file system, rights)
        copy.close()
        with sqlite3.connect(copy.db_path, timeout=copy.busy_timeout) as into:
            source.connect().backup(into)  # a consistent snapshot, whatever writes go on
        copy = Store(target, database=database)
    else:
        copy = Store(target, database=database)
        _copy_rows(source, copy)
    files = 0
    for folder in FOLDERS:
        for path in sorted((source.path / folder).rglob("*.pkl")):
            dest = copy.path / path.relative_to(source.path)
            dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            shutil.copyfile(path, tmp)
            os.chmod(tmp, 0o600)
            os.replace(tmp, dest)
            files += 1
    report = doctor(copy)
    expected, got = _counts(source.connect()), _counts(copy.connect())
    version = _version(copy)
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
    where = str(copy.db_path) if copy.engine == "sqlite" else copy.name
    return {"source": source.name, "target": copy.name, "database": where, "results": str(copy.path),
            "tables": got, "files": files, "ok": ok, "problems": problems}


#: Tables whose rows keep the order they were written in (``ORDER BY rowid`` reads them).
_ORDERED = ("tasks", "edges")


def _copy_rows(source: Store, copy: Store) -> None:
    """Every row of every table from ``source`` into the empty ``copy``, in one read snapshot
    of the source and one write transaction of the copy (between engines: plain rows)."""
    from .queries import snapshot

    with snapshot(source) as read, copy.transaction() as tx:
        for table in TABLES:
            cur = read.execute(f"SELECT * FROM {table}" + (" ORDER BY rowid" if table in _ORDERED
                                                          else ""))
            rows = cur.fetchall()
            if not rows:
                continue
            # rowid: SQLite's implicit order, PostgreSQL's explicit column; the copy numbers
            # its rows itself, in the source's order
            columns = [c for c in rows[0].keys() if c != "rowid"]  # noqa: SIM118 (a Row)
            marks = ", ".join("?" * len(columns))
            tx.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
                           [tuple(r[c] for c in columns) for r in rows])
        if copy.engine == "postgresql":  # identities go on after the copied ids
            for table, column in (("pipelines", "id"), ("attempts", "id"), ("events", "id"),
                                  ("commands", "id")):
                tx.execute(f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
                           f"COALESCE((SELECT MAX({column}) FROM {table}), 0) + 1, false)")
