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
from collections import Counter
from pathlib import Path
from typing import Any

from .errors import UnknownTask
from .results import INLINE, checksum_of
from .store import RunnerLock, Store

__all__ = [
    "cluster_detail", "delete_pipeline", "doctor", "events", "find_store", "gc", "graph", "pipelines",
    "task_detail", "tasks",
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
        # A runner record outlives a killed process: trust it only while the lock is held.
        alive = row["runner"] and RunnerLock(store, row["name"]).busy()
        runner = json.loads(row["runner"]) if alive else None
        c = counts.get(row["id"], Counter())
        out.append({"name": row["name"], "tasks": sum(c.values()), "states": dict(c),
                    "paused": bool(row["paused"]), "runner": runner})
    return out


def _pipeline_id(store: Store, pipeline: str) -> int:
    return store.pipeline_id(pipeline, create=False)


def graph(store: Store, pipeline: str) -> dict[str, Any]:
    """A pipeline's graph for live views: tasks (nodes), edges, counts and the last event id.

    A view loads this once, then asks :func:`events` for what changed after ``last_event``.
    """
    pid = _pipeline_id(store, pipeline)
    conn = store.connect()
    rows = store.task_rows(pid)
    nodes = [{"key": r["key"], "name": r["name"], "label": r["label"], "kind": r["kind"],
              "state": r["state"], "attempts": r["attempts"], "reason": r["reason"],
              "error": (r["error"] or "")[:500] or None, "cell": r["cell"]}
             for r in sorted(rows.values(), key=lambda r: r["created"])]
    edges = [{"parent": p, "child": c, "kind": k} for p, c, k in conn.execute(
        "SELECT parent, child, kind FROM edges WHERE pipeline_id = ?", (pid,)) if p in rows and c in rows]
    last = conn.execute("SELECT MAX(id) FROM events WHERE pipeline_id = ?", (pid,)).fetchone()[0]
    info = next(p for p in pipelines(store) if p["name"] == pipeline)
    return {"pipeline": pipeline, "nodes": nodes, "edges": edges, "counts": info["states"],
            "paused": info["paused"], "runner": info["runner"], "last_event": last or 0}


def events(store: Store, pipeline: str, since: int = 0, limit: int = 5_000) -> dict[str, Any]:
    """State changes of a pipeline after event id ``since`` (oldest first), and the last id."""
    pid = _pipeline_id(store, pipeline)
    rows = store.events(pid, since, limit)
    out = [{"id": r["id"], "time": r["time"], "key": r["key"], "state": r["state"],
            "message": r["message"]} for r in rows]
    return {"events": out, "last_event": out[-1]["id"] if out else since,
            "paused": store.is_paused(pid)}


def cluster_detail(store: Store, pipeline: str, *, live: bool = True) -> dict[str, Any]:
    """A pipeline's cluster: its runner's cluster, worker pools with job scripts, batch jobs.

    Jobs the store has not seen end are looked up in the batch queue (one ``squeue``) when
    ``live``; a job the queue no longer knows shows as ``GONE``.
    """
    from .pools import queue_states

    pid = _pipeline_id(store, pipeline)
    row = store.connect().execute("SELECT runner FROM pipelines WHERE id = ?", (pid,)).fetchone()
    runner = json.loads(row["runner"]) if row["runner"] and RunnerLock(store, pipeline).busy() else None
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
        "cluster": runner and runner.get("cluster"),
        "dashboard": runner and runner.get("dashboard"),
        "pools": (runner or {}).get("pools") or [],
        "jobs": jobs,
    }


def tasks(store: Store, pipeline: str, state: str | None = None, name: str | None = None
          ) -> list[dict[str, Any]]:
    """Active tasks of a pipeline, filtered by state and a name glob (matched on name or label)."""
    rows = store.task_rows(_pipeline_id(store, pipeline)).values()
    out = []
    for r in sorted(rows, key=lambda r: r["created"]):
        if state and r["state"] != state.upper():
            continue
        if name and not (fnmatch.fnmatchcase(r["name"], name) or fnmatch.fnmatchcase(r["label"], name)):
            continue
        out.append({"name": r["name"], "key": r["key"], "label": r["label"], "state": r["state"],
                    "attempts": r["attempts"], "reason": r["reason"], "error": r["error"]})
    return out


def _task_row(store: Store, pipeline_id: int, task: str) -> Any:
    rows = store.task_rows(pipeline_id, active_only=False).values()
    active = [r for r in rows if r["active"]]
    for pool in (active, list(rows)):
        # (an empty name is a prefix of every key: it names no task)
        matches = [r for r in pool if task in (r["label"], r["name"])
                   or (task and r["key"].startswith(task))]
        if matches:
            return max(matches, key=lambda r: r["updated"])
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
        result = {**dict(result), "inline": result["path"] == INLINE}
        result.pop("data", None)
    return {
        "name": row["name"], "key": row["key"], "label": row["label"], "state": row["state"],
        "attempts": attempts, "reason": row["reason"], "error": row["error"],
        "resources": json.loads(row["resources"] or "{}"),
        "components": json.loads(row["components"]),
        "result": result,
    }


def delete_pipeline(store: Store, pipeline: str, *, force: bool = False) -> dict[str, int]:
    """Delete a pipeline's records (results stay for ``gc``); without force, only count them."""
    pid = _pipeline_id(store, pipeline)
    tables = ("tasks", "edges", "attempts", "events", "commands", "jobs")
    conn = store.connect()
    counts = {t: conn.execute(f"SELECT COUNT(*) FROM {t} WHERE pipeline_id = ?", (pid,)).fetchone()[0]
              for t in tables}
    if force:
        with store.transaction() as tx:
            for table in tables:
                tx.execute(f"DELETE FROM {table} WHERE pipeline_id = ?", (pid,))
            tx.execute("DELETE FROM pipelines WHERE id = ?", (pid,))
    return counts


def gc(store: Store, *, dry_run: bool = False) -> list[str]:
    """Remove results that no task of any pipeline references; return them (file paths, and
    ``inline <key>`` for results kept in the database)."""
    conn = store.connect()
    referenced = {k for (k,) in conn.execute("SELECT DISTINCT key FROM tasks")}
    rows = conn.execute("SELECT key, path FROM results").fetchall()
    unreferenced = [(k, p) for k, p in rows if k not in referenced]
    orphans = [Path(p) for _, p in unreferenced if p != INLINE]
    known = {p for _, p in rows}
    orphans += [p for p in (store.path / "results").rglob("*.pkl") if str(p) not in known]
    if not dry_run:
        with store.transaction() as tx:
            tx.executemany("DELETE FROM results WHERE key = ?", [(k,) for k, _ in unreferenced])
        for path in orphans:
            path.unlink(missing_ok=True)
    return [str(p) for p in orphans] + [f"inline {k}" for k, p in unreferenced if p == INLINE]


#: Seconds after which a temporary file nobody writes to any more is left over from a crash.
STALE_TEMP = 600.0


def doctor(store: Store, *, repair: bool = False) -> dict[str, Any]:
    """Check a store; with ``repair``, fix what can be fixed. Returns a report (a dict).

    Checks: SQLite's ``integrity_check``; every recorded result (present, of its size, matching
    its checksum); temporary files a killed worker left (``.*.tmp``, untouched for 10 minutes);
    runner locks and runner records of processes that died; tasks left ``PENDING``/``RUNNING``
    by a runner that died; task specs of tasks the store does not know. Result files the store
    does not list are reported too, but are no problem: the next run adopts them (``nbpipe gc``
    removes them when no task wants them).

    ``repair`` forgets damaged results (their tasks show ``WAITING`` and run again the next
    time their pipeline runs), removes left-over temporary files and orphan specs, releases
    stale runner records and sets tasks a dead runner left back to ``WAITING``. A damaged
    database cannot be repaired here: ``ok`` stays false (see ``docs/reliability.md``).
    """
    import time

    conn = store.connect()
    integrity = [r[0] for r in conn.execute("PRAGMA integrity_check")]
    bad, listed = [], set()
    for row in conn.execute("SELECT * FROM results").fetchall():
        key, path, checksum, size = row["key"], row["path"], row["checksum"], row["size"]
        data: bytes | None = None
        if path:  # a result file
            listed.add(str(path))
            with contextlib.suppress(OSError):
                data = Path(path).read_bytes()
        elif "data" in row.keys():  # noqa: SIM118 (a Row: `in` looks at values) inline result
            data = row["data"]
        problem = ("missing" if data is None else "wrong size" if len(data) != size
                   else "checksum mismatch" if checksum_of(data) != checksum else None)
        if problem:
            bad.append({"key": key, "path": path, "problem": problem})
    unrecorded = [str(p) for p in (store.path / "results").rglob("*.pkl") if str(p) not in listed]
    now = time.time()
    temp = []
    for folder in ("results", "specs"):
        for p in (store.path / folder).rglob(".*.tmp"):
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > STALE_TEMP:
                    temp.append(str(p))
    known = {k for (k,) in conn.execute("SELECT DISTINCT key FROM tasks")}
    orphan_specs = [str(p) for p in (store.path / "specs").rglob("*.pkl") if p.stem not in known]
    stale_runners, stale_tasks = [], []
    for pid, name, runner in conn.execute("SELECT id, name, runner FROM pipelines").fetchall():
        lock = RunnerLock(store, name)
        if lock.busy():
            continue  # a live runner: its records are its own
        holder = lock.path.read_text().strip() if lock.path.exists() else ""
        if runner or holder:
            stale_runners.append({"pipeline": name, "runner": json.loads(runner) if runner else holder})
        stale_tasks += [{"pipeline": name, "key": k, "label": label, "state": state}
                        for k, label, state in conn.execute(
                            "SELECT key, label, state FROM tasks WHERE pipeline_id = ? AND active "
                            "AND state IN ('PENDING', 'RUNNING')", (pid,))]
    problems = bool(bad or temp or orphan_specs or stale_runners or stale_tasks)
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
    ok = integrity == ["ok"] and (repair or not problems)
    return {"integrity": integrity, "ok": ok, "bad_results": bad, "temp_files": temp,
            "stale_runners": stale_runners, "stale_tasks": stale_tasks,
            "orphan_specs": orphan_specs, "unrecorded_results": unrecorded,
            "repaired": repair and problems}
