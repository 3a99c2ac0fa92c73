"""The store on SQLite: one database file, one connection per thread, WAL, migrations, and
the runner's writes in one :class:`Batch` per tick (see :mod:`nbpipe.store`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sqlite3
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config import DEFAULTS, setting
from ..errors import (
    InvalidArgument,
    StoreDamaged,
    StoreError,
    StoreNotWritable,
    StoreOnNetworkFS,
    StoreVersionError,
)
from ..results import make_private, write_private
from .connections import ThreadConnections, open_count
from .mounts import network_mount
from .registry import remember
from .schema import SCHEMA, SCHEMA_VERSION

__all__ = ["DATABASE_FILE", "DATABASE_POINTER", "Batch", "Store", "is_damage", "is_store"]

#: The database file in a store folder, and the record of a database kept elsewhere.
DATABASE_FILE = "nbpipe.sqlite"
DATABASE_POINTER = "database.json"

#: Default seconds a connection waits for another process's write (``store-busy-timeout``).
BUSY_TIMEOUT: float = DEFAULTS["store-busy-timeout"]


class Batch:
    """Writes collected by a runner and committed together in one transaction.

    A task that changes state several times within one batch (a quick task goes PENDING,
    RUNNING and SUCCEEDED between two writes) gets one row update, to its last state, and its
    PENDING and RUNNING events give way to the next one (which keeps their message, such as
    the worker); other events (a failed attempt, a retry) all stay.
    """

    def __init__(self) -> None:
        self.states: dict[tuple[int, str], tuple[Any, ...]] = {}  # (pipeline, key) -> row values
        self.attempts: list[tuple[Any, ...]] = []
        self.results: list[tuple[Any, ...]] = []
        self.events: list[tuple[Any, ...] | None] = []
        self._last_event: dict[tuple[int, str], int] = {}  # (pipeline, key) -> index in events
        self.envs: list[tuple[str, str]] = []

    def __bool__(self) -> bool:
        return bool(self.states or self.attempts or self.results or self.events or self.envs)

    def state(
        self, pipeline_id: int, key: str, state: str, *, attempts: int, error: str | None = None,
        reason: str | None = None, message: str | None = None,
    ) -> None:
        """Record a task's new state (and an event saying so)."""
        now = time.time()
        earlier = self.states.get((pipeline_id, key))
        if reason is None and earlier is not None:
            reason = earlier[3]  # the row keeps the last reason given (as COALESCE does)
        self.states[pipeline_id, key] = (state, attempts, error, reason, now, pipeline_id, key)
        last = self._last_event.get((pipeline_id, key))
        if last is not None:
            before = self.events[last]
            assert before is not None
            if before[3] in ("PENDING", "RUNNING"):
                self.events[last] = None
                message = message or before[4]
        self._last_event[pipeline_id, key] = len(self.events)
        self.events.append((pipeline_id, now, key, state, message))


class Store:
    """A store directory and its SQLite database (one connection per thread)."""

    #: The database engine (``postgresql`` for :class:`~nbpipe.store.postgres.PostgresStore`).
    engine = "sqlite"

    #: A batch's attempt rows. Idempotent: a batch whose commit raised although SQLite kept it
    #: (a full disk at the WAL checkpoint) is written again, without a second row.
    _INSERT_ATTEMPT = """INSERT INTO attempts (pipeline_id, key, number, state, start, end,
            worker, hostname, pid, job_id, exit_code, error, traceback, stdout, stderr, env_id)
        SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?
        WHERE NOT EXISTS (SELECT 1 FROM attempts WHERE pipeline_id = ? AND key = ?
                          AND number = ? AND start IS NOT DISTINCT FROM ?)"""

    def __new__(cls, path: str | os.PathLike[str] | None = None, *,
                database: str | os.PathLike[str] | None = None,
                results: str | os.PathLike[str] | None = None) -> Store:
        """A URL (``postgresql://...``), or a folder whose ``database.json`` names one, opens a
        :class:`~nbpipe.store.postgres.PostgresStore`; anything else the store in a folder."""
        if cls is Store and (path is None or isinstance(path, (str, os.PathLike))):
            named = os.fspath(path or os.environ.get("NBPIPE_STORE") or ".nbpipe")
            pointer = {}
            with contextlib.suppress(OSError, ValueError):
                pointer = json.loads((Path(named) / DATABASE_POINTER).read_text())
            if re.match(r"postgres(ql)?://", named, re.IGNORECASE) or (
                    isinstance(pointer, dict) and "url" in pointer):
                from .postgres import PostgresStore

                return super().__new__(PostgresStore)
        return super().__new__(cls)

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 database: str | os.PathLike[str] | None = None,
                 results: str | os.PathLike[str] | None = None):
        """Open (or create) the store in folder ``path`` (default ``$NBPIPE_STORE``, else
        ``./.nbpipe``).

        ``database`` places the SQLite file elsewhere than ``<path>/nbpipe.sqlite`` -- on a
        local disk when the folder is on a network file system, where SQLite's write-ahead log
        does not work (:mod:`nbpipe.store.mounts`); result files stay in the folder. Default:
        ``$NBPIPE_DATABASE`` (a :class:`~nbpipe.Pipeline` passes the ``database`` setting of
        ``nbpipe.yaml``), else what the store recorded when its database was placed elsewhere
        (``database.json``), else in the folder.

        A PostgreSQL URL instead of a folder opens a store shared across hosts
        (:class:`~nbpipe.store.postgres.PostgresStore`), with its result files in the folder
        ``results``; for a folder, ``results`` must be left out (they are in the folder).
        """
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise InvalidArgument(
                f"store={path!r} is not a folder: pass a path (a str or pathlib.Path) such as "
                "store='.nbpipe', or leave it out for ./.nbpipe"
            )
        named = os.fspath(path or os.environ.get("NBPIPE_STORE") or ".nbpipe")
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", named):  # not a folder named 'mysql:'
            raise InvalidArgument(
                f"store={re.sub(r'//[^/@]*@', '//', named)!r} is a URL nbpipe cannot open: a "
                "store is a folder (store='.nbpipe') or a PostgreSQL database "
                "(store='postgresql://user@host/db', with results=DIR); see docs/store.md"
            )
        if results is not None and os.path.abspath(os.fspath(results)) != os.path.abspath(named):
            raise InvalidArgument(
                f"results={os.fspath(results)!r}: the store {named} keeps its result files in its "
                "own folder; results= goes with a PostgreSQL store (store='postgresql://...')"
            )
        self.path = Path(named).absolute()
        self.db_path, pointer = _database_path(self.path, database)
        #: Seconds a connection waits for another process's write before it gives up (the
        #: ``store-busy-timeout`` setting): a runner writes each tick, and the command line,
        #: the sidebar and workers write between its ticks.
        self.busy_timeout: float = setting("store-busy-timeout", BUSY_TIMEOUT, despite_file=True)
        _refuse_network(self.path, self.db_path)
        _refuse_newer(self.path, self.db_path, self.busy_timeout)  # before anything is created
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            (self.path / "results").mkdir(mode=0o700, exist_ok=True)
            (self.path / "locks").mkdir(mode=0o700, exist_ok=True)
            make_private(self.path, 0o700)  # made by an older nbpipe, or by hand, with 0755
            if pointer is not None:
                self.db_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                write_private(_owner_file(self.db_path), f"{self.path}\n".encode())
                write_private(self.path / DATABASE_POINTER, pointer)
        except OSError as exc:
            raise StoreNotWritable(
                f"cannot create the nbpipe store at {self.path}: {exc.strerror}; choose a "
                "writable directory with Pipeline(store=...) or the NBPIPE_STORE variable"
            ) from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise StoreNotWritable(
                f"the nbpipe store {self.path} is not writable by this user; fix its "
                "permissions or choose another with Pipeline(store=...) or NBPIPE_STORE"
            )
        self._connections = ThreadConnections(self._open, where=os.path.realpath(self.db_path))
        self._init_schema()
        remember(self.path)

    # -- connections ------------------------------------------------------------------------

    def connect(self) -> sqlite3.Connection:
        """This thread's connection (created on first use)."""
        return self._connections.get()

    def _open(self) -> sqlite3.Connection:
        """A new connection to the database, set up as the store uses it."""
        try:
            # Private from its first byte (SQLite gives its -wal and -shm files the same
            # mode): a kill between creating and a chmod cannot leave it readable by all.
            # Only when it does not exist: closing any descriptor of a database file drops
            # every POSIX lock this process's SQLite connections hold on it (then another
            # process may delete the write-ahead log under them).
            if not self.db_path.exists():
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(self.db_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            for suffix in ("", "-wal", "-shm"):  # an older nbpipe's, or copied with 0644
                make_private(Path(f"{self.db_path}{suffix}"), 0o600)
            conn = sqlite3.connect(self.db_path, timeout=self.busy_timeout, isolation_level=None,
                                   factory=_Connection)
            conn.store = weakref.ref(self)
        except (OSError, sqlite3.OperationalError) as exc:
            raise StoreNotWritable(f"cannot open {self.db_path}: {exc}") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA cache_size = -16384")  # 16 MiB (default 2): fewer reads
            conn.execute("PRAGMA foreign_keys = OFF")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise _damage(self, exc) from None
        conn.row_factory = sqlite3.Row
        return conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (taken at once, so concurrent writers queue instead of failing)."""
        conn = self.connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite may have rolled back already (disk full, I/O error)
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close this thread's connection."""
        self._connections.close()

    def close_all(self) -> None:
        """Close the connections of every thread that can be closed from here (a store
        dropped for good; SQLite closes a connection only in the thread that made it)."""
        self._connections.close_all()

    def damaged(self, exc: BaseException) -> StoreError:
        """The error for ``exc`` raised by SQLite while using this store: :class:`StoreDamaged`
        saying what to do when the database file is damaged, else a :class:`StoreError`."""
        if isinstance(exc, StoreError):  # converted already (see _Connection)
            return exc
        if not is_damage(exc):
            return StoreError(f"the store {self.path} cannot be used: {exc}")
        if self.db_path.parent != self.path:  # kept elsewhere (database=): copy the file aside
            return SQLiteDamaged(
                f"the store {self.path} is damaged: SQLite cannot read its database {self.db_path} "
                f"({exc}); copy it aside (cp -a {self.db_path} {self.db_path}.damaged), then "
                f"recover what SQLite can with `sqlite3 {self.db_path}.damaged .recover | sqlite3 "
                f"{self.db_path}` after removing the damaged {self.db_path.name}, or start a new "
                "store; result files stay valid and the next run adopts them"
            )
        return SQLiteDamaged(
            f"the store {self.path} is damaged: SQLite cannot read {self.db_path.name} ({exc}); "
            f"copy the folder aside (cp -a {self.path} {self.path}.damaged), then recover what "
            f"SQLite can with `sqlite3 {self.path}.damaged/{self.db_path.name} .recover | "
            f"sqlite3 {self.db_path}` after removing the damaged {self.db_path.name}, or start a "
            "new store; result files stay valid and the next run adopts them"
        )

    def integrity(self) -> list[str]:
        """The database's own check (``["ok"]`` when whole), as ``nbpipe doctor`` reports it."""
        return [r[0] for r in self.connect().execute("PRAGMA integrity_check")]

    def runner_lock(self, pipeline: str) -> Any:
        """The lock that makes one process the runner of ``pipeline`` (a lock file)."""
        from .lock import RunnerLock

        return RunnerLock(self, pipeline)

    def wait_for_events(self, pipeline_id: int, since: int, timeout: float) -> bool:
        """Wait until pipeline ``pipeline_id`` has an event after ``since`` (True) or
        ``timeout`` seconds passed (False). SQLite cannot tell a reader about a commit: it
        looks every 0.2 s (PostgreSQL's store listens instead)."""
        deadline = time.monotonic() + timeout
        while not self.events(pipeline_id, since, 1):
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        return True

    @property
    def name(self) -> str:
        """How messages name the store (its folder; a PostgreSQL store's URL without password)."""
        return str(self.path)

    def _check_length(self, conn: sqlite3.Connection) -> None:
        """A database file shorter than its header says was cut (a copy that stopped half-way,
        a full disk): refuse it now rather than fail on whichever page is missing later. Only
        when the write-ahead log is empty: until a checkpoint, pages may live there."""
        wal = Path(f"{self.db_path}-wal")
        if wal.exists() and wal.stat().st_size > 0:
            return
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        if self.db_path.stat().st_size < pages * size:
            raise sqlite3.DatabaseError(
                f"the file has {self.db_path.stat().st_size} bytes, its header says "
                f"{pages * size}: it was cut short")

    def _init_schema(self) -> None:
        try:
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise self.damaged(exc) from None

    def _migrate(self) -> None:
        conn = self.connect()
        self._check_length(conn)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:  # created newer between _refuse_newer and now
            raise _newer(self.path, version)
        if version < SCHEMA_VERSION:
            try:  # every statement is idempotent, so concurrent first opens are safe
                statements = []
                if version == 1:  # v2: attempts.slurm_job_id became job_id; tasks.cell, jobs added
                    statements += ["ALTER TABLE attempts RENAME COLUMN slurm_job_id TO job_id",
                                   "ALTER TABLE tasks ADD COLUMN cell TEXT"]
                if 1 <= version <= 2:  # v3: inline results
                    statements.append("ALTER TABLE results ADD COLUMN data BLOB")
                for statement in statements:
                    with contextlib.suppress(sqlite3.OperationalError):  # another opener did it
                        conn.execute(statement)
                conn.executescript(SCHEMA)
                if 1 <= version <= 3:  # v4: result paths relative to the store root
                    # A recorded path ends in results/<key[:2]>/<key>.pkl whatever spelling of
                    # the store (or its old place, for a moved project) it was written under.
                    conn.execute(
                        "UPDATE results SET path = 'results/' || substr(key, 1, 2) || '/' || key"
                        " || '.pkl' WHERE path != '' AND path LIKE '%/results/' || substr(key, 1, 2)"
                        " || '/' || key || '.pkl'"
                    )
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            except sqlite3.OperationalError as exc:
                if is_damage(exc):
                    raise
                raise StoreError(f"cannot initialise the store {self.path}: {exc}") from None

    # -- pipelines ----------------------------------------------------------------------------

    def pipeline_id(self, name: str, *, create: bool = True, source: str | None = None) -> int:
        """The id of pipeline ``name``, created when ``create`` is true."""
        conn = self.connect()
        row = conn.execute("SELECT id FROM pipelines WHERE name = ?", (name,)).fetchone()
        if row is not None:
            return int(row[0])
        if not create:
            from ..errors import UnknownTask

            raise UnknownTask(f"no pipeline named {name!r} in the store {self.path}; "
                              "`nbpipe pipelines` lists the pipelines of a store")
        with self.transaction() as tx:
            tx.execute(
                "INSERT OR IGNORE INTO pipelines (name, created, source) VALUES (?, ?, ?)",
                (name, time.time(), source),
            )
        return int(conn.execute("SELECT id FROM pipelines WHERE name = ?", (name,)).fetchone()[0])

    def pipelines(self) -> list[sqlite3.Row]:
        """Every pipeline of the store."""
        return self.connect().execute("SELECT * FROM pipelines ORDER BY name").fetchall()

    def set_paused(self, pipeline_id: int, paused: bool) -> None:
        """Mark a pipeline paused (no new task starts) or not."""
        with self.transaction() as tx:
            tx.execute("UPDATE pipelines SET paused = ? WHERE id = ?", (int(paused), pipeline_id))

    def is_paused(self, pipeline_id: int) -> bool:
        """Whether the pipeline is paused."""
        row = self.connect().execute(
            "SELECT paused FROM pipelines WHERE id = ?", (pipeline_id,)
        ).fetchone()
        return bool(row and row[0])

    def set_runner(self, pipeline_id: int, info: dict[str, Any] | None) -> None:
        """Record (or clear) which process runs the pipeline."""
        with self.transaction() as tx:
            tx.execute(
                "UPDATE pipelines SET runner = ? WHERE id = ?",
                (json.dumps(info) if info else None, pipeline_id),
            )

    # -- batch jobs ---------------------------------------------------------------------------

    def add_jobs(self, pipeline_id: int, kind: str, jobs: Iterable[tuple[str, str, str]]) -> None:
        """Record batch jobs (job id, pool, worker name) a runner submitted."""
        now = time.time()
        with self.transaction() as tx:
            tx.executemany(
                "INSERT OR IGNORE INTO jobs (pipeline_id, kind, job_id, pool, name, submitted, state)"
                " VALUES (?, ?, ?, ?, ?, ?, 'SUBMITTED')",
                [(pipeline_id, kind, job_id, pool, name, now) for job_id, pool, name in jobs],
            )

    def end_jobs(self, pipeline_id: int, kind: str, jobs: Iterable[tuple[str, str]]) -> None:
        """Mark batch jobs (job id, last state) ended."""
        now = time.time()
        with self.transaction() as tx:
            tx.executemany(
                "UPDATE jobs SET ended = ?, state = ? WHERE pipeline_id = ? AND kind = ? AND job_id = ?",
                [(now, state, pipeline_id, kind, job_id) for job_id, state in jobs],
            )

    def edges(self, pipeline_id: int) -> list[tuple[str, str, str]]:
        """Every edge of a pipeline: (parent key, child key, kind), in the order recorded."""
        return [tuple(r) for r in self.connect().execute(
            "SELECT parent, child, kind FROM edges WHERE pipeline_id = ? ORDER BY rowid", (pipeline_id,))]

    def jobs(self, pipeline_id: int, *, open_only: bool = False) -> list[sqlite3.Row]:
        """Batch jobs recorded for a pipeline (only those not known to have ended)."""
        sql = "SELECT * FROM jobs WHERE pipeline_id = ?" + (" AND ended IS NULL" if open_only else "")
        return self.connect().execute(sql + " ORDER BY submitted", (pipeline_id,)).fetchall()

    # -- tasks --------------------------------------------------------------------------------

    def register(
        self, pipeline_id: int, rows: Sequence[dict[str, Any]], edges: Iterable[tuple[str, str, str]]
    ) -> None:
        """Insert or refresh task rows and their edges; older tasks with the same labels retire.

        A task already in the store keeps its state and attempts; the row is marked active.
        Only a task found done (an intact result) becomes SUCCEEDED whatever its row said: a
        runner killed while it ran leaves RUNNING behind, and its worker may still finish.
        """
        now = time.time()
        with self.transaction() as tx:
            tx.executemany(
                "UPDATE tasks SET active = 0 WHERE pipeline_id = ? AND label = ? AND key != ?",
                [(pipeline_id, r["label"], r["key"]) for r in rows],
            )
            tx.executemany(
                """INSERT INTO tasks (pipeline_id, key, name, label, kind, state, active,
                       components, reason, resources, created, updated, cell)
                   VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (pipeline_id, key) DO UPDATE SET
                       active = 1, name = excluded.name, label = excluded.label,
                       resources = excluded.resources, cell = COALESCE(excluded.cell, tasks.cell),
                       -- a runner elsewhere may be running it: keep its state, unless the
                       -- task was found done (its result exists: e.g. written by a worker
                       -- whose runner died, which left the state behind)
                       state = CASE WHEN tasks.state IN ('PENDING', 'RUNNING')
                                         AND excluded.state != 'SUCCEEDED' THEN tasks.state
                                    ELSE excluded.state END,
                       reason = COALESCE(excluded.reason, tasks.reason),
                       updated = excluded.updated""",
                [
                    (
                        pipeline_id, r["key"], r["name"], r["label"], r["kind"], r["state"],
                        json.dumps(r["components"], sort_keys=True), r.get("reason"),
                        _json_text(r.get("resources") or {}), now, now, r.get("cell"),
                    )
                    for r in rows
                ],
            )
            tx.executemany(
                "INSERT OR IGNORE INTO edges (pipeline_id, parent, child, kind) VALUES (?, ?, ?, ?)",
                [(pipeline_id, p, c, k) for p, c, k in edges],
            )

    def retire_keys(self, pipeline_id: int, keys: dict[str, str]) -> None:
        """Replace provisional task keys by final ones (``{old: new}``, see :mod:`nbpipe.content`):
        edges and events move to the final key, the provisional rows go."""
        if not keys:
            return
        pid = (pipeline_id,)
        with self.transaction() as tx:
            # One pass over the pipeline's events and edges, whatever the number of keys.
            tx.execute("CREATE TEMP TABLE IF NOT EXISTS retired (old TEXT PRIMARY KEY, new TEXT)")
            tx.execute("DELETE FROM temp.retired")
            tx.executemany("INSERT OR REPLACE INTO temp.retired VALUES (?, ?)", list(keys.items()))
            old = "(SELECT old FROM temp.retired)"
            for column, other in (("parent", "child"), ("child", "parent")):
                # An edge moves to its final key unless that edge would clash: the final key
                # has it already, or an earlier edge of another provisional key of the same
                # final key moves there in this statement (two provisional keys that turn out
                # one task). The guard is the statement's own: PostgreSQL has no UPDATE OR
                # IGNORE (it raises on the clash) and checks NOT EXISTS against the rows as
                # they were before the statement. Moved edges keep their place (rowid).
                new = f"(SELECT new FROM temp.retired WHERE old = edges.{column})"
                tx.execute(
                    f"UPDATE OR IGNORE edges SET {column} = {new} WHERE pipeline_id = ? AND "
                    f"{column} IN {old} AND NOT EXISTS (SELECT 1 FROM edges AS e WHERE "
                    f"e.pipeline_id = edges.pipeline_id AND e.{column} = {new} AND "
                    f"e.{other} = edges.{other}) AND NOT EXISTS (SELECT 1 FROM edges AS e "
                    f"JOIN temp.retired AS r ON r.old = e.{column} WHERE e.pipeline_id = "
                    f"edges.pipeline_id AND e.{other} = edges.{other} AND r.new = {new} AND "
                    f"e.rowid < edges.rowid)", pid)
            tx.execute(f"DELETE FROM edges WHERE pipeline_id = ? AND (parent IN {old} "
                       f"OR child IN {old})", pid)
            tx.execute("UPDATE events SET key = (SELECT new FROM temp.retired WHERE old = events.key)"
                       f" WHERE pipeline_id = ? AND key IN {old}", pid)
            tx.execute(f"DELETE FROM tasks WHERE pipeline_id = ? AND key IN {old}", pid)
            tx.execute("DELETE FROM temp.retired")

    def task_rows(
        self, pipeline_id: int, keys: Sequence[str] | None = None, *, active_only: bool = True
    ) -> dict[str, sqlite3.Row]:
        """Task rows by key: the given keys, or every (active) task of the pipeline."""
        conn = self.connect()
        if keys is None:
            sql = "SELECT * FROM tasks WHERE pipeline_id = ?" + (" AND active = 1" if active_only else "")
            return {r["key"]: r for r in conn.execute(sql, (pipeline_id,))}
        found: dict[str, sqlite3.Row] = {}
        for chunk in _chunks(list(keys), 900):
            marks = ",".join("?" * len(chunk))
            for r in conn.execute(
                f"SELECT * FROM tasks WHERE pipeline_id = ? AND key IN ({marks})", (pipeline_id, *chunk)
            ):
                found[r["key"]] = r
        return found

    def latest_by_label(self, pipeline_id: int, labels: Sequence[str]) -> dict[str, sqlite3.Row]:
        """For each label, the most recently updated task row that carried it."""
        conn = self.connect()
        found: dict[str, sqlite3.Row] = {}
        for chunk in _chunks(list(labels), 900):
            marks = ",".join("?" * len(chunk))
            for r in conn.execute(
                f"""SELECT * FROM tasks WHERE pipeline_id = ? AND label IN ({marks})
                    ORDER BY updated""",
                (pipeline_id, *chunk),
            ):
                found[r["label"]] = r
        return found

    def latest_by_name(self, pipeline_id: int, names: Sequence[str], per_name: int = 500
                       ) -> dict[str, list[sqlite3.Row]]:
        """For each task name, its most recently updated rows (newest first, at most
        ``per_name``): the previous calls of one function or cell, whatever their labels."""
        conn = self.connect()
        found: dict[str, list[sqlite3.Row]] = {}
        for name in dict.fromkeys(names):
            found[name] = conn.execute(
                "SELECT * FROM tasks WHERE pipeline_id = ? AND name = ? ORDER BY updated DESC "
                "LIMIT ?", (pipeline_id, name, per_name)).fetchall()
        return found

    def labels_of(self, keys: Sequence[str]) -> dict[str, str]:
        """Labels of tasks by key, across pipelines (for naming upstream tasks in reasons)."""
        conn = self.connect()
        found: dict[str, str] = {}
        for chunk in _chunks(list(keys), 900):
            marks = ",".join("?" * len(chunk))
            for r in conn.execute(f"SELECT key, label FROM tasks WHERE key IN ({marks})", chunk):
                found[r[0]] = r[1]
        return found

    def results(self, keys: Sequence[str]) -> dict[str, sqlite3.Row]:
        """Recorded result files by key."""
        conn = self.connect()
        found: dict[str, sqlite3.Row] = {}
        for chunk in _chunks(list(keys), 900):
            marks = ",".join("?" * len(chunk))
            for r in conn.execute(f"SELECT * FROM results WHERE key IN ({marks})", chunk):
                found[r["key"]] = r
        return found

    def result_data(self, key: str) -> bytes | None:
        """The bytes of an inline result (None when the result is a file or unknown)."""
        row = self.connect().execute("SELECT data FROM results WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def last_success(self, pipeline_id: int, label: str, *, exclude: str = "") -> sqlite3.Row | None:
        """The latest task of ``label`` that succeeded and whose result is still recorded (key,
        updated, and its result's path, checksum, size, data), other than ``exclude``."""
        for row in self.connect().execute(
            """SELECT t.key AS key, t.updated AS updated, r.path AS path, r.checksum AS checksum,
                      r.size AS size, r.data AS data
               FROM tasks t JOIN results r ON r.key = t.key
               WHERE t.pipeline_id = ? AND t.label = ? AND t.key != ? AND t.state = 'SUCCEEDED'
               ORDER BY t.updated DESC""", (pipeline_id, label, exclude)):
            if row["path"] == "" or (self.path / row["path"]).exists():
                return row
        return None

    def forget_result(self, key: str) -> None:
        """Drop the record of a result file that turned out missing or corrupt."""
        with self.transaction() as tx:
            tx.execute("DELETE FROM results WHERE key = ?", (key,))

    def attempts(self, pipeline_id: int, key: str) -> list[sqlite3.Row]:
        """Every attempt of a task, oldest first."""
        return self.connect().execute(
            "SELECT * FROM attempts WHERE pipeline_id = ? AND key = ? ORDER BY number, id",
            (pipeline_id, key),
        ).fetchall()

    def environment(self, env_id: str) -> dict[str, Any] | None:
        """A recorded environment snapshot."""
        row = self.connect().execute(
            "SELECT snapshot FROM environments WHERE id = ?", (env_id,)
        ).fetchone()
        return json.loads(row[0]) if row else None

    def events(self, pipeline_id: int, since: int = 0, limit: int = 10_000) -> list[sqlite3.Row]:
        """Events of a pipeline after event id ``since``."""
        return self.connect().execute(
            "SELECT * FROM events WHERE pipeline_id = ? AND id > ? ORDER BY id LIMIT ?",
            (pipeline_id, since, limit),
        ).fetchall()

    def set_states(self, pipeline_id: int, keys: Sequence[str], state: str, message: str) -> None:
        """Set tasks' state directly (used by commands when no runner is attached)."""
        batch = Batch()
        rows = self.task_rows(pipeline_id, keys)
        for key in keys:
            if key in rows:
                batch.state(pipeline_id, key, state, attempts=rows[key]["attempts"], message=message)
        self.write(batch)

    def write(self, batch: Batch) -> None:
        """Commit a batch of writes in one transaction."""
        if not batch:
            return
        with self.transaction() as tx:
            if batch.envs:
                tx.executemany("INSERT OR IGNORE INTO environments VALUES (?, ?)", batch.envs)
            if batch.results:
                tx.executemany(
                    "INSERT OR REPLACE INTO results (key, path, checksum, size, created, data) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    batch.results,
                )
            if batch.attempts:
                tx.executemany(self._INSERT_ATTEMPT,
                               [(*a, a[0], a[1], a[2], a[4]) for a in batch.attempts])
            if batch.states:
                tx.executemany(
                    """UPDATE tasks SET state = ?, attempts = ?, error = ?,
                           reason = COALESCE(?, reason), updated = ?
                       WHERE pipeline_id = ? AND key = ?""",
                    list(batch.states.values()),
                )
            if batch.events:
                tx.executemany(
                    "INSERT INTO events (pipeline_id, time, key, state, message) VALUES (?, ?, ?, ?, ?)",
                    [event for event in batch.events if event is not None],
                )

    # -- commands -------------------------------------------------------------------------------

    def post_command(self, pipeline_id: int, verb: str, **args: Any) -> int:
        """Queue a command for the pipeline's runner; returns its id."""
        with self.transaction() as tx:
            row = tx.execute(
                "INSERT INTO commands (pipeline_id, time, verb, args) VALUES (?, ?, ?, ?) "
                "RETURNING id",
                (pipeline_id, time.time(), verb, json.dumps(args)),
            ).fetchone()
            return int(row[0])

    def new_commands(self, pipeline_id: int) -> list[sqlite3.Row]:
        """Commands not yet handled, oldest first."""
        return self.connect().execute(
            "SELECT * FROM commands WHERE pipeline_id = ? AND status = 'new' ORDER BY id",
            (pipeline_id,),
        ).fetchall()

    def finish_command(self, command_id: int, status: str = "done", message: str = "") -> None:
        """Mark a command handled."""
        with self.transaction() as tx:
            tx.execute(
                "UPDATE commands SET status = ?, done_time = ?, message = ? WHERE id = ?",
                (status, time.time(), message, command_id),
            )

    def command_status(self, command_id: int) -> str:
        """``new``, ``done`` or ``failed``."""
        row = self.connect().execute(
            "SELECT status FROM commands WHERE id = ?", (command_id,)
        ).fetchone()
        return row[0] if row else "unknown"


class SQLiteDamaged(StoreDamaged, sqlite3.DatabaseError):
    """:class:`StoreDamaged` as the SQLite connection raises it: still a
    ``sqlite3.DatabaseError``, so code that handles SQLite's errors (the runner keeps its writes
    while a store is busy or full, and stops on damage) goes on handling it unchanged."""


# Users meet it as the public class: tracebacks and messages (``RunnerError``'s cause) say
# StoreDamaged, as the docs and the error catalogue do.
SQLiteDamaged.__name__ = SQLiteDamaged.__qualname__ = "StoreDamaged"


def _damage(store: Store | None, exc: sqlite3.Error) -> sqlite3.Error:
    """``exc`` as the caller should see it: :class:`StoreDamaged` naming the store and what to
    do when it says the database file is damaged, else unchanged."""
    if store is None or isinstance(exc, StoreDamaged) or not is_damage(exc):
        return exc
    damaged = store.damaged(exc)
    assert isinstance(damaged, SQLiteDamaged)
    return damaged


class _Cursor(sqlite3.Cursor):
    """A cursor whose damage errors name the store (rows are read page by page as they are
    fetched, so a damaged page can show at any fetch, not only at ``execute``)."""

    connection: _Connection

    def execute(self, *args: Any) -> _Cursor:  # type: ignore[override]
        try:
            return super().execute(*args)
        except sqlite3.DatabaseError as exc:
            raise _damage(self.connection.store(), exc) from None

    def executemany(self, *args: Any) -> _Cursor:  # type: ignore[override]
        try:
            return super().executemany(*args)
        except sqlite3.DatabaseError as exc:
            raise _damage(self.connection.store(), exc) from None

    def executescript(self, *args: Any) -> _Cursor:  # type: ignore[override]
        try:
            return super().executescript(*args)
        except sqlite3.DatabaseError as exc:
            raise _damage(self.connection.store(), exc) from None

    def fetchone(self) -> Any:
        try:
            return super().fetchone()
        except sqlite3.DatabaseError as exc:
            raise _damage(self.connection.store(), exc) from None

    def fetchmany(self, *args: Any) -> list[Any]:
        try:
            return super().fetchmany(*args)
        except sqlite3.DatabaseError as exc:
            raise _damage(self.connection.store(), exc) from None

    def fetchall(self) -> list[Any]:
        try:
            return super().fetchall()
        except sqlite3.DatabaseError as exc:
            raise _damage(self.connection.store(), exc) from None

    def __next__(self) -> Any:
        try:
            return super().__next__()
        except sqlite3.DatabaseError as exc:
            raise _damage(self.connection.store(), exc) from None


class _Connection(sqlite3.Connection):
    """The one place SQLite's errors become nbpipe's: every statement of every module runs
    through its cursors, so a store that opens but is damaged deeper down (a page of random
    bytes, a zeroed table, a broken index) gives :class:`StoreDamaged` at every door."""

    store: weakref.ref[Store]  # set as soon as it is made (Store.connect)

    def cursor(self, factory: Any = _Cursor) -> Any:  # type: ignore[override]
        # Connection.execute() and friends make their cursor with this method.
        return super().cursor(factory)

    def execute(self, *args: Any) -> _Cursor:  # type: ignore[override]
        return self.cursor().execute(*args)

    def executemany(self, *args: Any) -> _Cursor:  # type: ignore[override]
        return self.cursor().executemany(*args)

    def executescript(self, *args: Any) -> _Cursor:  # type: ignore[override]
        return self.cursor().executescript(*args)

    def commit(self) -> None:
        try:
            super().commit()
        except sqlite3.DatabaseError as exc:
            raise _damage(self.store(), exc) from None


def is_store(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is a store: it holds its database, or records where that is."""
    return (Path(folder) / DATABASE_FILE).is_file() or (Path(folder) / DATABASE_POINTER).is_file()


def _database_path(folder: Path, database: str | os.PathLike[str] | None
                   ) -> tuple[Path, bytes | None]:
    """Where the database of the store in ``folder`` is, and the record to write when the store
    starts keeping it elsewhere (None when nothing is to be recorded).

    A database outside the folder lies on one host's disk: the store records which host
    (``database.json``), so a process on another host is told so instead of silently opening
    an empty database of the same name on its own disk.
    """
    pointer = folder / DATABASE_POINTER
    recorded = None
    with contextlib.suppress(OSError, ValueError):
        recorded = json.loads(pointer.read_text())
    host = socket.gethostname()
    if database is None:  # (a Pipeline passes the `database` setting of nbpipe.yaml)
        database = os.environ.get("NBPIPE_DATABASE") or None
    if database is None and recorded is None:
        return folder / DATABASE_FILE, None
    if recorded is not None:
        where = Path(recorded["path"])
        if recorded.get("host") != host:
            raise StoreError(
                f"the store {folder} keeps its database on the local disk of host "
                f"{recorded.get('host')!r} ({where}), and this is host {host!r}: run nbpipe on "
                f"{recorded.get('host')!r}, or move the database back into the store folder "
                f"(`mv {where} {folder / DATABASE_FILE}` there, then remove "
                f"{pointer}) -- see docs/store.md, 'A store on a cluster'"
            )
        wanted = Path(os.path.abspath(os.path.expanduser(os.fspath(database)))) if database else where
        if wanted != where:
            raise StoreError(
                f"the store {folder} keeps its database at {where}, not at {wanted} (the "
                "database setting): unset the setting, or move the database there and remove "
                f"{pointer}"
            )
        return where, None
    where = Path(os.path.abspath(os.path.expanduser(os.fspath(database))))
    if where.parent == folder and where.name == DATABASE_FILE:
        return where, None
    if (folder / DATABASE_FILE).exists():  # its records are there: a new database would hide them
        raise StoreError(
            f"the store {folder} keeps its database in its folder ({DATABASE_FILE}), and the "
            f"database setting names {where}: unset the setting (NBPIPE_DATABASE, database:) for "
            f"this store, or move {folder / DATABASE_FILE} to {where} first, with no nbpipe "
            "process using the store"
        )
    # One setting (NBPIPE_DATABASE in a shell's profile) must not make two projects share one
    # database: their records would mix, and each would find the other's results missing.
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        owner = Path(_owner_file(where).read_text().strip())
        if owner != folder and json.loads((owner / DATABASE_POINTER).read_text())["path"] == str(where):
            raise StoreError(
                f"the database {where} belongs to the store {owner}; give the store {folder} a "
                f"database of its own (e.g. NBPIPE_DATABASE=/tmp/$USER/"
                f"{folder.parent.name or 'nbpipe'}.sqlite, a name per project)"
            )
    return where, json.dumps({"path": str(where), "host": host}, indent=1).encode() + b"\n"


def _owner_file(database: Path) -> Path:
    """The file beside a database kept outside its store that names the store's folder."""
    return Path(f"{database}.store")


def _refuse_network(folder: Path, db_path: Path) -> None:
    """Refuse a database on a network file system (:class:`StoreOnNetworkFS`), before anything
    is created: SQLite's write-ahead log keeps its index in memory shared by the processes of
    one host, so processes on two hosts can corrupt the database."""
    mount = network_mount(db_path.parent)
    if mount is None:
        return
    existing = (f" (move the existing {db_path.name} there first, with no nbpipe process using "
                "the store: "
                f"`mv {db_path} /tmp/$USER/{folder.parent.name or 'nbpipe'}.sqlite`)"
                if db_path.exists() else "")
    raise StoreOnNetworkFS(
        f"the store's database {db_path} would lie on a network file system ({mount.fstype} "
        f"{mount.device} mounted on {mount.point}), where SQLite's write-ahead log does not work "
        "across hosts (each host keeps its own index of it: the database can be corrupted); "
        "keep the database on a local disk of the host that runs the pipeline and the result "
        f"files in {folder}: set NBPIPE_DATABASE=/tmp/$USER/"
        f"{folder.parent.name or 'nbpipe'}.sqlite (or `database:` in nbpipe.yaml, or "
        f"Store(..., database=...)){existing}; see docs/store.md, 'A store on a cluster'"
    )


def _newer(path: Path, version: int) -> StoreVersionError:
    return StoreVersionError(
        f"the store {path} was written by a newer nbpipe (schema {version}; this nbpipe knows "
        f"{SCHEMA_VERSION}); upgrade nbpipe (pip install -U nbpipe) or use another store; "
        "the store was left untouched"
    )


def _refuse_newer(path: Path, db_path: Path, busy_timeout: float) -> None:
    """Raise :class:`StoreVersionError` for a store of a newer schema, having changed nothing:
    no folder created, no journal mode switched, no file written (not even SQLite's ``-shm``).

    Not for a database this process has SQLite connections open to (it was checked then):
    closing the descriptor read here would drop the POSIX locks those connections hold."""
    if open_count(os.path.realpath(db_path)):
        return
    try:
        with open(db_path, "rb") as f:
            header = f.read(100)
    except OSError:
        return  # none yet (or unreadable: the normal opening says what is wrong)
    if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
        return  # empty, or not a database: the normal opening says what is wrong
    version = int.from_bytes(header[60:64], "big")
    if version <= SCHEMA_VERSION and Path(f"{db_path}-wal").exists():
        # A write-ahead log may hold a newer first page: ask SQLite (its files exist already).
        with contextlib.suppress(sqlite3.Error):
            conn = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True, timeout=busy_timeout)
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
            finally:
                conn.close()
    if version > SCHEMA_VERSION:
        raise _newer(path, version)


def is_damage(exc: sqlite3.Error) -> bool:
    """Whether SQLite's error means the file is damaged (not busy, not full, not read-only, not
    a closed connection)."""
    if isinstance(exc, StoreDamaged):
        return True
    if "Could not decode to UTF-8" in str(exc):  # text with bytes SQLite never wrote
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
    return type(exc) is sqlite3.DatabaseError or "malformed" in str(exc)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _json_text(value: Any) -> str:
    """``value`` as JSON text with sorted keys (text given already is kept)."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
