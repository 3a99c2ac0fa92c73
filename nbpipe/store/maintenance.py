"""Maintain a store: check and repair it (``doctor``), remove unused results (``gc``), delete a
pipeline's records. Used by ``nbpipe doctor``, ``nbpipe gc`` and ``nbpipe delete``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

from ..errors import PipelineBusy
from ..results import INLINE, checksum_of, locate, unpack
from .lock import RunnerLock
from .sqlite import Batch, Store

__all__ = ["PIPELINE_TABLES", "delete_pipeline", "doctor", "gc", "live_runners"]

#: Tables whose rows belong to one pipeline (``pipeline_id``); results are shared by the store.
PIPELINE_TABLES = ("tasks", "edges", "attempts", "events", "commands", "jobs")


def delete_pipeline(store: Store, pipeline: str, *, force: bool = False) -> dict[str, int]:
    """Delete a pipeline's records (results stay for ``gc``); without force, only count them.

    With ``force`` it holds the pipeline's runner lock while deleting: a live runner (whose
    workers go on writing events and results) makes it raise :class:`~nbpipe.PipelineBusy`.
    """
    pid = store.pipeline_id(pipeline, create=False)
    conn = store.connect()
    counts = {t: conn.execute(f"SELECT COUNT(*) FROM {t} WHERE pipeline_id = ?", (pid,)).fetchone()[0]
              for t in PIPELINE_TABLES}
    if force:
        lock = RunnerLock(store, pipeline)
        try:
            lock.acquire()  # no runner can start while its records go
        except PipelineBusy:
            holder = lock.holder() or "another process"
            raise PipelineBusy(
                f"cannot delete pipeline {pipeline!r}: it is being run by {holder}; wait for the "
                f"run to finish, or stop it (`nbpipe kill {pipeline} --all`, or end that "
                "process), then delete it"
            ) from None
        try:
            with store.transaction() as tx:
                for table in PIPELINE_TABLES:
                    tx.execute(f"DELETE FROM {table} WHERE pipeline_id = ?", (pid,))
                tx.execute("DELETE FROM pipelines WHERE id = ?", (pid,))
        finally:
            lock.release()
    return counts


def live_runners(store: Store) -> list[str]:
    """Who holds a runner lock of the store right now (``pid ... on host``), whatever pipeline
    (even one whose records are gone): every lock file is tried, not only known pipelines'."""
    if store.engine == "postgresql":  # advisory locks: the server lists them
        return store.live_runners()  # type: ignore[attr-defined, no-any-return]
    holders = []
    for path in sorted((store.path / "locks").glob("*.lock")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            holder = path.read_text(errors="replace").strip() or "another process"
            name = re.sub(r"-[0-9a-f]{16}$", "", path.stem)  # the lock of pipeline NAME
            holders.append(f"{holder} ({name})")
        finally:
            os.close(fd)
    return holders


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` lies in ``folder``, both in their canonical form (symlinks resolved)."""
    return os.path.commonpath([os.path.realpath(path), folder]) == folder


def gc(store: Store, *, dry_run: bool = False) -> list[str]:
    """Remove results that no task of any pipeline could use; return them (file paths, and
    ``inline <key>`` for results kept in the database).

    A result belongs to a task by its key (the file ``results/ab/<key>.pkl``, whatever spelling
    of the store's path it was recorded or is found under): the results of every registered
    task stay, recorded or not (an unrecorded file is adopted by the task's next run). It
    refuses with :class:`~nbpipe.PipelineBusy` while a runner is live (its workers write results
    of tasks the store may not list yet), and it works inside one write transaction, so no task
    can be registered between the look and the removal.
    """
    results_dir = os.path.realpath(store.path / "results")
    with store.transaction() as tx:
        if store.engine == "postgresql":  # its writers do not queue as SQLite's do: make them
            tx.execute("LOCK TABLE tasks, results IN SHARE ROW EXCLUSIVE MODE")
        live = live_runners(store)
        if live:
            raise PipelineBusy(
                f"nbpipe gc removes nothing while a runner is live in the store {store.path} "
                f"({', '.join(live)}): its workers write results the store does not list yet; "
                "run gc again once it has finished"
            )
        referenced = {k for (k,) in tx.execute("SELECT DISTINCT key FROM tasks")}
        rows = tx.execute("SELECT key, path FROM results").fetchall()
        unreferenced = [(k, p) for k, p in rows if k not in referenced]
        doomed = {os.path.realpath(locate(store.path, p)) for _, p in unreferenced if p != INLINE}
        doomed.update(os.path.realpath(f) for f in (store.path / "results").rglob("*.pkl")
                      if f.stem not in referenced)
        # Never anything outside the store's results folder (a path recorded by hand).
        orphans = sorted(p for p in doomed if _inside(p, results_dir) and os.path.exists(p))
        if not dry_run:
            tx.executemany("DELETE FROM results WHERE key = ?", [(k,) for k, _ in unreferenced])
            for path in orphans:
                Path(path).unlink(missing_ok=True)
    return orphans + [f"inline {k}" for k, p in unreferenced if p == INLINE]


#: Seconds after which a temporary file nobody writes to any more is left over from a crash.
STALE_TEMP = 600.0


def _left_worker_records(store: Store, conn: sqlite3.Connection, live: list[int],
                         now: float) -> list[str]:
    """Files in ``<store>/running/`` that nobody will read: records (and their output files) of
    Dask tasks whose worker was killed without a word while their runner is gone too.

    A record is kept while its worker process runs (on this host; one on another host is kept
    until it is :data:`STALE_TEMP` old) and while a runner of a pipeline with its task is live:
    that runner may have Dask run the task again, whose worker reads the record
    (:mod:`nbpipe.crashes`)."""
    from ..crashes import alive_here

    folder = store.path / "running"
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.is_file())
    records = {p.name for p in files if p.suffix not in (".out", ".err")}
    busy = {k for (k,) in conn.execute(
        f"SELECT DISTINCT key FROM tasks WHERE pipeline_id IN ({','.join('?' * len(live))})",
        live)} if live else set()
    left = []
    for path in files:
        record = folder / path.name.removesuffix(".out").removesuffix(".err")
        key = record.name.rpartition("-")[0]
        if key in busy:
            continue
        if record.name in records:
            try:
                age = now - record.stat().st_mtime
                header = json.loads(record.read_text(errors="replace").partition("\n")[0])
            except OSError:
                continue  # gone meanwhile
            except ValueError:  # not written yet (or cut): judged by its age alone
                header = {}
            if not isinstance(header, dict):
                header = {}
            if alive_here(header):
                continue
            if header.get("host") != socket.gethostname() and age <= STALE_TEMP:
                continue  # its worker may still run there
        left.append(str(path))
    return left


def doctor(store: Store, *, repair: bool = False) -> dict[str, Any]:
    """Check a store; with ``repair``, fix what can be fixed. Returns a report (a dict).

    Checks: SQLite's ``integrity_check``; every recorded result (present, of its size, matching
    its checksum); temporary files a killed worker left (``.*.tmp``, untouched for 10 minutes);
    runner locks and runner records of processes that died; tasks left ``PENDING``/``RUNNING``
    by a runner that died; task specs of tasks the store does not know; records (tasks, events,
    attempts, ...) of pipelines that are gone. Result files the store does not list are reported
    too, but are no problem: the next run adopts them (``nbpipe gc`` removes them when no task
    wants them).

    Records of running tasks in ``<store>/running/`` that no one will read (their worker was
    killed without a word and their runner is gone too) are left-overs as well.

    ``repair`` forgets damaged results (their tasks show ``WAITING`` and run again the next
    time their pipeline runs), removes left-over temporary files, orphan specs and orphan
    records, releases
    stale runner records and sets tasks a dead runner left back to ``WAITING``. A damaged
    database cannot be repaired here: ``ok`` stays false (see ``docs/reliability.md``).
    """
    conn = store.connect()
    integrity = store.integrity()
    bad, listed = [], set()
    for row in conn.execute("SELECT * FROM results").fetchall():
        key, path, checksum, size = row["key"], row["path"], row["checksum"], row["size"]
        raw: bytes | None = None  # what is stored (a file with its header, or inline bytes)
        if path:  # a result file
            path = locate(store.path, path)
            listed.add(os.path.realpath(path))
            with contextlib.suppress(OSError):
                raw = Path(path).read_bytes()
        elif "data" in row.keys():  # noqa: SIM118 (a Row: `in` looks at values) inline result
            raw = row["data"]
        problem = ("missing" if raw is None else "wrong size" if len(raw) != size
                   else "checksum mismatch"
                   if checksum_of(unpack(raw)[0] if path else raw, like=checksum) != checksum
                   else None)
        if problem:
            bad.append({"key": key, "path": path, "problem": problem})
    unrecorded = [str(p) for p in (store.path / "results").rglob("*.pkl")
                  if os.path.realpath(p) not in listed]
    now = time.time()
    temp = []
    for folder in ("results", "specs"):
        for p in (store.path / folder).rglob(".*.tmp"):
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > STALE_TEMP:
                    temp.append(str(p))
    known = {k for (k,) in conn.execute("SELECT DISTINCT key FROM tasks")}
    orphan_specs = [str(p) for p in (store.path / "specs").rglob("*.pkl") if p.stem not in known]
    stale_runners, stale_tasks, live = [], [], []
    for pid, name, runner in conn.execute("SELECT id, name, runner FROM pipelines").fetchall():
        lock = RunnerLock(store, name)
        if lock.busy():
            live.append(pid)
            continue  # a live runner: its records are its own
        holder = lock.holder()
        if runner or holder:
            stale_runners.append({"pipeline": name, "runner": json.loads(runner) if runner else holder})
        stale_tasks += [{"pipeline": name, "key": k, "label": label, "state": state}
                        for k, label, state in conn.execute(
                            "SELECT key, label, state FROM tasks WHERE pipeline_id = ? AND active = 1 "
                            "AND state IN ('PENDING', 'RUNNING')", (pid,))]
    # Rows of pipelines that are gone (a delete racing a runner's last writes, a crash).
    orphan_records = {}
    for table in PIPELINE_TABLES:
        (n,) = conn.execute(f"SELECT COUNT(*) FROM {table} WHERE pipeline_id NOT IN "
                            "(SELECT id FROM pipelines)").fetchone()
        if n:
            orphan_records[table] = n
    worker_records = _left_worker_records(store, conn, live, now)
    problems = bool(bad or temp or orphan_specs or stale_runners or stale_tasks or orphan_records
                    or worker_records)
    if repair:
        batch = Batch()
        ids = {name: pid for pid, name in conn.execute("SELECT id, name FROM pipelines")}
        for entry in bad:
            store.forget_result(entry["key"])
            if entry["path"]:
                Path(entry["path"]).unlink(missing_ok=True)
            for pid, attempts in conn.execute(
                    "SELECT pipeline_id, attempts FROM tasks WHERE key = ? AND state = 'SUCCEEDED'",
                    (entry["key"],)).fetchall():
                batch.state(pid, entry["key"], "WAITING", attempts=attempts,
                            reason="its result file was damaged",
                            message=f"nbpipe doctor: result file {entry['problem']}; runs again")
        for entry in stale_tasks:
            (attempts,) = conn.execute("SELECT attempts FROM tasks WHERE pipeline_id = ? AND key = ?",
                                       (ids[entry["pipeline"]], entry["key"])).fetchone()
            batch.state(ids[entry["pipeline"]], entry["key"], "WAITING", attempts=attempts,
                        message="nbpipe doctor: its runner died before it finished")
        store.write(batch)
        for entry in stale_runners:
            RunnerLock(store, entry["pipeline"]).forget()
            store.set_runner(ids[entry["pipeline"]], None)
        for path in (*temp, *orphan_specs):
            Path(path).unlink(missing_ok=True)
        for path in worker_records:
            Path(path).unlink(missing_ok=True)
        if orphan_records:
            with store.transaction() as tx:
                for table in orphan_records:
                    tx.execute(f"DELETE FROM {table} WHERE pipeline_id NOT IN "
                               "(SELECT id FROM pipelines)")
    ok = integrity == ["ok"] and (repair or not problems)
    return {"integrity": integrity, "ok": ok, "bad_results": bad, "temp_files": temp,
            "stale_runners": stale_runners, "stale_tasks": stale_tasks,
            "orphan_specs": orphan_specs, "orphan_records": orphan_records,
            "worker_records": worker_records,
            "unrecorded_results": unrecorded,
            "repaired": repair and problems}
