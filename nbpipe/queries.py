"""Read and maintain a store without running anything: what the command line and sidebar show.

>>> from nbpipe.store import Store
>>> store = Store(".nbpipe")                                  # doctest: +SKIP
>>> [p["name"] for p in pipelines(store)]                    # doctest: +SKIP
['pi']
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import socket
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import PipelineBusy, UnknownTask
from .naming import find_task, find_tasks, row_fields
from .policy import outcome
from .results import INLINE, checksum_of, locate, unpack
from .store import RunnerLock, Store

__all__ = [
    "cell_changed", "cluster_detail", "delete_pipeline", "doctor", "events", "find_store", "gc", "graph",
    "pipelines", "runner", "task_detail", "tasks",
]


def find_store(start: str | os.PathLike[str] | None = None) -> Path | None:
    """The nearest ``.nbpipe`` directory from ``start`` (default: the cwd) upward."""
    here = Path(start or Path.cwd()).absolute()
    for folder in (here, *here.parents):
        candidate = folder / ".nbpipe"
        if (candidate / "nbpipe.sqlite").exists():
            return candidate
    return None


def pipelines(store: Store) -> list[dict[str, Any]]:
    """Every pipeline with its task counts by state (active tasks only)."""
    conn = store.connect()
    counts: dict[int, Counter[str]] = {}
    for pid, state, n in conn.execute(
        "SELECT pipeline_id, state, COUNT(*) FROM tasks WHERE active GROUP BY pipeline_id, state"
    ):
        counts.setdefault(pid, Counter())[state] = n
    out = []
    for row in store.pipelines():
        c = counts.get(row["id"], Counter())
        out.append({"name": row["name"], "tasks": sum(c.values()), "states": dict(c),
                    "paused": bool(row["paused"]), "runner": _live_runner(store, row["name"], row["runner"])})
    return out


def _live_runner(store: Store, pipeline: str, record: str | None) -> dict[str, Any] | None:
    """A pipeline's runner record, or None once its process died.

    A runner record outlives a killed process (a kernel restart, a crash): trust it only while
    the runner's lock is held.
    """
    if not record or not RunnerLock(store, pipeline).busy():
        return None
    return json.loads(record)


def runner(store: Store, pipeline: str) -> dict[str, Any] | None:
    """The live runner of a pipeline (pid, host, started, cluster, dashboard), or None."""
    row = store.connect().execute("SELECT runner FROM pipelines WHERE name = ?", (pipeline,)).fetchone()
    return _live_runner(store, pipeline, row[0] if row else None)


def _pipeline_id(store: Store, pipeline: str) -> int:
    return store.pipeline_id(pipeline, create=False)


@contextlib.contextmanager
def _snapshot(store: Store) -> Iterator[sqlite3.Connection]:
    """One read transaction: every SELECT inside sees the same committed state of the store.

    A view that takes a snapshot and then follows the events after its cursor must read both
    in one snapshot, or a commit between the two reads is lost to it (or applied twice).
    """
    conn = store.connect()
    if conn.in_transaction:  # already inside one (a caller's snapshot): share it
        yield conn
        return
    conn.execute("BEGIN")  # deferred: the first SELECT fixes the snapshot (WAL keeps it)
    try:
        yield conn
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("COMMIT")


def graph(store: Store, pipeline: str) -> dict[str, Any]:
    """A pipeline's graph for live views: tasks (nodes), edges, counts and the last event id.

    A view loads this once, then asks :func:`events` for what changed after ``last_event``.
    Tasks, edges and the cursor come from one read transaction, so every change committed
    after the snapshot has an event after ``last_event``, and none before it is missing.
    Nodes are in graph order: the order the tasks were defined.
    """
    with _snapshot(store) as conn:
        # the cursor first: inside the snapshot the order does not matter, but the cursor is
        # read first on its own too, so nothing can fall between it and the rows
        last = conn.execute("SELECT MAX(id) FROM events WHERE pipeline_id = "
                            "(SELECT id FROM pipelines WHERE name = ?)", (pipeline,)).fetchone()[0]
        pid = _pipeline_id(store, pipeline)
        rows = conn.execute("SELECT * FROM tasks WHERE pipeline_id = ? AND active = 1 "
                            "ORDER BY created, rowid", (pid,)).fetchall()
        keys = {r["key"] for r in rows}
        nodes = [{"key": r["key"], "name": r["name"], "label": r["label"], "kind": r["kind"],
                  "state": r["state"], "attempts": r["attempts"], "reason": r["reason"],
                  "error": (r["error"] or "")[:500] or None, "cell": r["cell"],
                  "outcome": outcome(r["state"], r["error"], r["reason"])} for r in rows]
        edges = [{"parent": p, "child": c, "kind": k} for p, c, k in conn.execute(
            "SELECT parent, child, kind FROM edges WHERE pipeline_id = ? ORDER BY rowid", (pid,))
            if p in keys and c in keys]
        info = conn.execute("SELECT paused, runner FROM pipelines WHERE id = ?", (pid,)).fetchone()
    counts = Counter(n["state"] for n in nodes)
    return {"pipeline": pipeline, "nodes": nodes, "edges": edges, "counts": dict(counts),
            "paused": bool(info["paused"]), "runner": _live_runner(store, pipeline, info["runner"]),
            "last_event": last or 0}


def events(store: Store, pipeline: str, since: int = 0, limit: int = 5_000) -> dict[str, Any]:
    """State changes of a pipeline after event id ``since`` (oldest first), and the last id.

    With them: whether the pipeline is paused and its live runner (None once it died), so a
    view that follows the events also follows the runner.
    """
    with _snapshot(store) as conn:
        pid = _pipeline_id(store, pipeline)
        rows = store.events(pid, since, limit)
        info = conn.execute("SELECT paused, runner FROM pipelines WHERE id = ?", (pid,)).fetchone()
    out = [{"id": r["id"], "time": r["time"], "key": r["key"], "state": r["state"],
            "message": r["message"]} for r in rows]
    return {"events": out, "last_event": out[-1]["id"] if out else since,
            "paused": bool(info["paused"]), "runner": _live_runner(store, pipeline, info["runner"])}


def cluster_detail(store: Store, pipeline: str, *, live: bool = True) -> dict[str, Any]:
    """A pipeline's cluster: its runner's cluster, worker pools with job scripts, batch jobs.

    Jobs the store has not seen end are looked up in the batch queue (one ``squeue``) when
    ``live``; a job the queue no longer knows shows as ``GONE``.
    """
    from .pools import queue_states

    pid = _pipeline_id(store, pipeline)
    live = runner(store, pipeline)
    jobs = [dict(j) for j in store.jobs(pid)]
    open_ids: dict[str, list[str]] = {}
    for job in jobs:
        if job["ended"] is None:
            open_ids.setdefault(job["kind"], []).append(job["job_id"])
    for kind, ids in open_ids.items():
        states = queue_states(kind, ids) if live else None
        if states is None:
            continue
        for job in jobs:
            if job["kind"] == kind and job["ended"] is None:
                job["state"] = states.get(job["job_id"], "GONE")
    return {
        "pipeline": pipeline,
        "cluster": live and live.get("cluster"),
        "dashboard": live and live.get("dashboard"),
        "pools": (live or {}).get("pools") or [],
        "jobs": jobs,
    }


def tasks(store: Store, pipeline: str, state: str | None = None, name: str | None = None,
          *, upstream: str | None = None, downstream: str | None = None) -> list[dict[str, Any]]:
    """Active tasks of a pipeline, filtered by state and a name glob (matched on name or label);
    ``upstream=TASK`` keeps what TASK needs (transitively), ``downstream=TASK`` what needs it
    (jobmon's sub-DAG); the task itself is included."""
    pid = _pipeline_id(store, pipeline)
    rows = store.task_rows(pid).values()
    keep: set[str] | None = None
    for task, direction in ((upstream, "up"), (downstream, "down")):
        if task is not None:
            found = related(store, pipeline, task, direction)
            keep = found if keep is None else keep & found
    out = []
    for r in sorted(rows, key=lambda r: r["created"]):
        if keep is not None and r["key"] not in keep:
            continue
        if state and r["state"] != state.upper():
            continue
        if name and not (fnmatch.fnmatchcase(r["name"], name) or fnmatch.fnmatchcase(r["label"], name)):
            continue
        out.append({"name": r["name"], "key": r["key"], "label": r["label"], "state": r["state"],
                    "attempts": r["attempts"], "reason": r["reason"], "error": r["error"],
                    "outcome": outcome(r["state"], r["error"], r["reason"])})
    return out


def related(store: Store, pipeline: str, task: str, direction: str) -> set[str]:
    """Keys of TASK (a name, label or key prefix) and every active task upstream (``"up"``) or
    downstream (``"down"``) of it."""
    pid = _pipeline_id(store, pipeline)
    rows = store.task_rows(pid)
    active = set(rows)
    # a name matches every task of it (fraction: its 20 calls); else one label or key prefix
    starts = [r["key"] for r in find_tasks(task, rows.values(), *row_fields)] or \
        [_task_row(store, pid, task)["key"]]
    links: dict[str, list[str]] = {}
    for parent, child in store.connect().execute(
            "SELECT parent, child FROM edges WHERE pipeline_id = ?", (pid,)):
        if parent in active and child in active:
            a, b = (child, parent) if direction == "up" else (parent, child)
            links.setdefault(a, []).append(b)
    seen = set(starts)
    todo = list(starts)
    while todo:
        for nxt in links.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _task_row(store: Store, pipeline_id: int, task: str) -> Any:
    rows = store.task_rows(pipeline_id, active_only=False).values()
    active = [r for r in rows if r["active"]]
    for pool in (active, list(rows)):
        found = find_task(task, sorted(pool, key=lambda r: r["updated"]), *row_fields)
        if found is not None:
            return found
    name = store.connect().execute("SELECT name FROM pipelines WHERE id = ?", (pipeline_id,)).fetchone()
    pipeline = name[0] if name else "?"
    raise UnknownTask(f"no task {task!r} in pipeline {pipeline!r}; `nbpipe tasks {pipeline}` "
                      "lists its tasks")


def task_detail(store: Store, pipeline: str, task: str) -> dict[str, Any]:
    """Everything recorded about one task: key, state, resources, why, attempts with versions."""
    pid = _pipeline_id(store, pipeline)
    row = _task_row(store, pid, task)
    attempts = []
    for a in store.attempts(pid, row["key"]):
        env = store.environment(a["env_id"]) if a["env_id"] else None
        attempts.append({
            "number": a["number"], "state": a["state"], "start": a["start"], "end": a["end"],
            "seconds": (a["end"] - a["start"]) if a["end"] and a["start"] else None,
            "worker": a["worker"], "hostname": a["hostname"], "pid": a["pid"],
            "job_id": a["job_id"], "exit_code": a["exit_code"], "error": a["error"],
            "traceback": a["traceback"], "stdout": a["stdout"], "stderr": a["stderr"],
            "python": env and env.get("python"), "git_commit": env and env.get("git_commit"),
            "packages": env and env.get("packages"),
        })
    result = store.results([row["key"]]).get(row["key"])
    if result is not None:  # where it is, not its bytes
        result = {**dict(result), "inline": result["path"] == INLINE,
                  "path": locate(store.path, result["path"])}
        result.pop("data", None)
    return {
        "name": row["name"], "key": row["key"], "label": row["label"], "state": row["state"],
        "attempts": attempts, "reason": row["reason"], "error": row["error"],
        "outcome": outcome(row["state"], row["error"], row["reason"]),
        "resources": json.loads(row["resources"] or "{}"),
        "components": json.loads(row["components"]),
        "result": result,
    }


#: Tables whose rows belong to one pipeline (``pipeline_id``); results are shared by the store.
PIPELINE_TABLES = ("tasks", "edges", "attempts", "events", "commands", "jobs")


def cell_changed(store: Store, pipeline: str, task: str, source: str) -> bool | None:
    """Whether a ``%%task`` cell's current text defines other code than the task ``task``.

    ``source`` is the whole cell as the notebook holds it now (the ``%%task`` line first). A
    retry runs the task as it was defined, so the sidebar says when the cell has changed since.
    None for a task that no ``%%task`` cell defines (its code is not in one cell).

    >>> cell_changed(store, "pi", "stats", "%%task stats\nmean = data.mean()")  # doctest: +SKIP
    False
    """
    from .cells import code_digest

    row = _task_row(store, _pipeline_id(store, pipeline), task)
    first, _, body = source.partition("\n")
    if not row["cell"] or not first.lstrip().startswith("%%task"):
        return None if not row["cell"] else True  # no longer a %%task cell: it changed
    recorded = json.loads(row["components"]).get("code")
    try:
        now = code_digest(body, row["kind"])
    except SyntaxError:
        return True  # it does not even parse now: not the code the task ran
    return now != recorded


def delete_pipeline(store: Store, pipeline: str, *, force: bool = False) -> dict[str, int]:
    """Delete a pipeline's records (results stay for ``gc``); without force, only count them.

    With ``force`` it holds the pipeline's runner lock while deleting: a live runner (whose
    workers go on writing events and results) makes it raise :class:`~nbpipe.PipelineBusy`.
    """
    pid = _pipeline_id(store, pipeline)
    conn = store.connect()
    counts = {t: conn.execute(f"SELECT COUNT(*) FROM {t} WHERE pipeline_id = ?", (pid,)).fetchone()[0]
              for t in PIPELINE_TABLES}
    if force:
        lock = RunnerLock(store, pipeline)
        try:
            lock.acquire()  # no runner can start while its records go
        except PipelineBusy:
            holder = lock.path.read_text(errors="replace").strip() or "another process"
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
    import fcntl

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
    from .crashes import alive_here

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
    import time

    conn = store.connect()
    integrity = [r[0] for r in conn.execute("PRAGMA integrity_check")]
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
                   else "checksum mismatch" if checksum_of(unpack(raw)[0] if path else raw) != checksum
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
        holder = lock.path.read_text().strip() if lock.path.exists() else ""
        if runner or holder:
            stale_runners.append({"pipeline": name, "runner": json.loads(runner) if runner else holder})
        stale_tasks += [{"pipeline": name, "key": k, "label": label, "state": state}
                        for k, label, state in conn.execute(
                            "SELECT key, label, state FROM tasks WHERE pipeline_id = ? AND active "
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
        from .store import Batch

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
            RunnerLock(store, entry["pipeline"]).path.write_text("")
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


def taskfile_entries(store: Store, rows: list[dict[str, Any]], source: str | None = None) -> list[Any]:
    """The task-file entries (:class:`~nbpipe.TaskItem`) of listed tasks, in their order, to
    write back out as a task file: from the task file ``source`` (streamed), else from the
    specs the store keeps of unfinished and failed tasks. Tasks that are not task-file entries
    (no ``[task_id]`` in their label) are left out; one whose entry cannot be found is an error
    naming it."""
    from .errors import TaskfileError
    from .taskfile import TaskItem, iter_tasks, task_id_of

    wanted = {task_id_of(r["label"]): r for r in rows if task_id_of(r["label"]) is not None}
    found: dict[str, Any] = {}
    if source is not None:
        for item in iter_tasks(source):
            if item.task_id in wanted:
                found[item.task_id] = item
    else:
        import cloudpickle

        for task_id, row in wanted.items():
            path = store.path / "specs" / row["key"][:2] / f"{row['key']}.pkl"
            with contextlib.suppress(Exception):  # a spec an older nbpipe wrote: not found
                spec = cloudpickle.loads(path.read_bytes())
                args = list(spec.get("args") or ()) + list((spec.get("kwargs") or {}).values())
                item = next((a for a in args if isinstance(a, TaskItem)), None)
                if item is not None:
                    found[task_id] = item
    missing = [wanted[t]["label"] for t in wanted if t not in found]
    if missing:
        where = (f"the task file {source}" if source
                 else "the store (it keeps the entries of unfinished and failed tasks only)")
        raise TaskfileError(
            f"no task-file entry for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
            f"in {where}; name the task file they came from with --from TASKFILE")
    return [found[t] for t in wanted]
