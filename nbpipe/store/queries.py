"""Read a store without running anything: what the command line and sidebar show.

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
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UnknownTask
from ..naming import find_task, find_tasks, row_fields
from ..policy import outcome
from ..results import INLINE, locate
from .lock import RunnerLock
from .sqlite import Store, is_store

__all__ = [
    "cell_changed", "cluster_detail", "events", "find_store", "graph", "pipelines", "related",
    "runner", "snapshot", "task_detail", "taskfile_entries", "tasks",
]


def find_store(start: str | os.PathLike[str] | None = None) -> Path | None:
    """The nearest ``.nbpipe`` directory from ``start`` (default: the cwd) upward."""
    here = Path(start or Path.cwd()).absolute()
    for folder in (here, *here.parents):
        candidate = folder / ".nbpipe"
        if is_store(candidate):
            return candidate
    return None


def pipelines(store: Store) -> list[dict[str, Any]]:
    """Every pipeline with its task counts by state (active tasks only)."""
    conn = store.connect()
    counts: dict[int, Counter[str]] = {}
    for pid, state, n in conn.execute(
        "SELECT pipeline_id, state, COUNT(*) FROM tasks WHERE active = 1 GROUP BY pipeline_id, state"
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
def snapshot(store: Store) -> Iterator[sqlite3.Connection]:
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
    with snapshot(store) as conn:
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
    with snapshot(store) as conn:
        pid = _pipeline_id(store, pipeline)
        rows = store.events(pid, since, limit)
        info = conn.execute("SELECT paused, runner FROM pipelines WHERE id = ?", (pid,)).fetchone()
        # How a task that ended in these events ended beyond its state (timed out, accepted,
        # adopted): its row now says, when it is still in that state (a view shows it live).
        ended = sorted({r["key"] for r in rows if r["key"] and r["state"] in ("FAILED", "SUCCEEDED")})
        now: dict[str, tuple[str, str | None]] = {}
        for i in range(0, len(ended), 500):
            part = ended[i:i + 500]
            for t in conn.execute(f"SELECT key, state, error, reason FROM tasks WHERE pipeline_id = ? "
                                  f"AND key IN ({', '.join('?' * len(part))})", (pid, *part)):
                now[t["key"]] = (t["state"], outcome(t["state"], t["error"], t["reason"]))
    out = [{"id": r["id"], "time": r["time"], "key": r["key"], "state": r["state"],
            "message": r["message"],
            "outcome": now[r["key"]][1] if now.get(r["key"], ("",))[0] == r["state"] else None}
           for r in rows]
    return {"events": out, "last_event": out[-1]["id"] if out else since,
            "paused": bool(info["paused"]), "runner": _live_runner(store, pipeline, info["runner"])}


def cluster_detail(store: Store, pipeline: str, *, live: bool = True) -> dict[str, Any]:
    """A pipeline's cluster: its runner's cluster, worker pools with job scripts, batch jobs.

    Jobs the store has not seen end are looked up in the batch queue (one ``squeue``) when
    ``live``; a job the queue no longer knows shows as ``GONE``.
    """
    from ..pools import queue_states

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


def cell_changed(store: Store, pipeline: str, task: str, source: str) -> bool | None:
    """Whether a ``%%task`` cell's current text defines other code than the task ``task``.

    ``source`` is the whole cell as the notebook holds it now (the ``%%task`` line first). A
    retry runs the task as it was defined, so the sidebar says when the cell has changed since.
    None for a task that no ``%%task`` cell defines (its code is not in one cell).

    >>> cell_changed(store, "pi", "stats", "%%task stats\\nmean = data.mean()")  # doctest: +SKIP
    False
    """
    from ..cells import code_digest

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


def taskfile_entries(store: Store, rows: list[dict[str, Any]], source: str | None = None) -> list[Any]:
    """The task-file entries (:class:`~nbpipe.TaskItem`) of listed tasks, in their order, to
    write back out as a task file: from the task file ``source`` (streamed), else from the
    specs the store keeps of unfinished and failed tasks. Tasks that are not task-file entries
    (no ``[task_id]`` in their label) are left out; one whose entry cannot be found is an error
    naming it."""
    from ..errors import TaskfileError
    from ..taskfile import TaskItem, iter_tasks, task_id_of

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
