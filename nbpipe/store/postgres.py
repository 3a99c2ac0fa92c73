"""The store on PostgreSQL: one database shared by processes on many hosts (psycopg 3).

Chosen by URL wherever a store is named (``Pipeline(store="postgresql://host/db")``,
``NBPIPE_STORE``, ``nbpipe --store``, ``store:`` in ``nbpipe.yaml``). Result files live in a
folder named alongside (``results=``, ``NBPIPE_RESULTS``, ``results-dir:``), on a file system
that every host mounts; the database records that folder, and the folder records the database
(``database.json``), so either one names the store afterwards.

Every method of :class:`~nbpipe.store.Store` runs here unchanged: its SQL is written once, and
:func:`translate` makes the few spellings where SQLite and PostgreSQL differ (``?``
placeholders, ``INSERT OR IGNORE``/``OR REPLACE``, the reserved word ``end``) PostgreSQL's. What
only PostgreSQL does lives in this module: the schema's types (:func:`pg_schema`), one runner per
pipeline through a session advisory lock (:class:`AdvisoryLock`), and ``NOTIFY`` after every
write so live views wait for changes instead of polling (:meth:`PostgresStore.wait_for_events`).

>>> store = Store("postgresql://nbpipe@db.cluster/nbpipe", results="/project/ada/results")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import (
    InvalidArgument,
    PipelineBusy,
    StoreError,
    StoreNotWritable,
    StoreUnreachable,
    StoreVersionError,
)
from ..results import make_private, write_private
from .connections import ThreadConnections
from .lock import RunnerLock
from .registry import remember
from .schema import SCHEMA, SCHEMA_VERSION
from .sqlite import DATABASE_FILE, DATABASE_POINTER, Batch, Store

__all__ = ["AdvisoryLock", "PostgresStore", "StoreUnreachable", "holds_records",
           "in_schema", "is_url", "pg_schema", "refuse_results_folder", "safe_url",
           "scratch_schema", "translate"]

_URL = re.compile(r"(postgres|postgresql)://", re.IGNORECASE)

#: A SELECT whose list holds a parameter without a cast (``SELECT ?, ...``, not ``?::text``).
_UNTYPED_SELECT = re.compile(r"\bSELECT\b[^;]*?\?(?!::)")

#: Columns that make a row unique, for ``INSERT OR REPLACE`` (``ON CONFLICT ... DO UPDATE``).
_KEYS = {"results": ("key",), "environments": ("id",), "pg_temp.retired": ("old",),
         "nbpipe_store": ("name",)}
_COLUMNS = {"pg_temp.retired": ("old", "new")}

#: The store's own record in PostgreSQL (SQLite keeps the version in ``PRAGMA user_version``).
_INFO = "CREATE TABLE IF NOT EXISTS nbpipe_store (name TEXT PRIMARY KEY, value TEXT NOT NULL)"


def is_url(name: str) -> bool:
    """Whether a store name is a PostgreSQL URL (not a folder).

    >>> is_url("postgresql://nbpipe@db/nbpipe"), is_url(".nbpipe")
    (True, False)
    """
    return bool(_URL.match(name))


def safe_url(url: str) -> str:
    """``url`` without its password, for messages and listings.

    >>> safe_url("postgresql://ada:secret@db:5432/nbpipe")
    'postgresql://ada@db:5432/nbpipe'
    """
    return re.sub(r"//([^/@:]*)(:[^/@]*)?@", r"//\1@", url)


def holds_records(url: str) -> bool:
    """Whether the database at ``url`` holds an nbpipe store's records (a pipeline or a
    result), found by looking only: no table, row or results folder is created.

    >>> holds_records("postgresql://nbpipe@db/empty")  # doctest: +SKIP
    False
    """
    import psycopg

    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=30) as conn:
            for table in ("pipelines", "results"):
                # (to_regclass: the table as the URL's search_path finds it, or NULL)
                if conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0] \
                        and conn.execute(f"SELECT EXISTS (SELECT 1 FROM {table})").fetchone()[0]:
                    return True
    except psycopg.Error as exc:
        raise _error(safe_url(url), exc) from None
    return False


def refuse_results_folder(folder: Path, name: str) -> None:
    """Raise :class:`~nbpipe.errors.StoreError` when ``folder`` cannot hold the result files of
    the PostgreSQL store ``name``: it is an SQLite store's folder, whose records a
    ``database.json`` naming the database would hide."""
    if (folder / DATABASE_FILE).exists():
        raise StoreError(
            f"the results folder {folder} holds an SQLite store ({DATABASE_FILE}); name "
            f"another folder for the result files of {name} (to move that store into "
            f"PostgreSQL: nbpipe store copy {folder} URL --results NEW_FOLDER)"
        )


def in_schema(url: str, schema: str) -> str:
    """``url`` whose connections use ``schema`` (libpq's ``options``): stores of their own in
    one database.

    >>> in_schema("postgresql://nbpipe@db/nbpipe", "ada")
    'postgresql://nbpipe@db/nbpipe?options=-csearch_path%3Dada'
    """
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


@contextlib.contextmanager
def scratch_schema(url: str, prefix: str = "scratch") -> Iterator[str]:
    """A new schema in the database at ``url``, dropped with everything in it afterwards: the
    URL of an empty store for a trial, a test or a benchmark (:func:`in_schema`).

    >>> with scratch_schema("postgresql://nbpipe@db/nbpipe") as trial:  # doctest: +SKIP
    ...     Store(trial, results="/tmp/trial").pipelines()
    []
    """
    import uuid

    import psycopg

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield in_schema(url, schema)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def pg_schema() -> str:
    """:data:`~nbpipe.store.SCHEMA` in PostgreSQL's types: the same tables and columns, with
    ``rowid`` (SQLite's implicit insertion order) made explicit where the store orders by it."""
    sql = SCHEMA
    sql = re.sub(r"INTEGER PRIMARY KEY( AUTOINCREMENT)?",
                 "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", sql)
    sql = sql.replace("INTEGER", "BIGINT").replace("REAL", "DOUBLE PRECISION")
    sql = sql.replace("BLOB", "BYTEA")
    sql = re.sub(r"\bend\b", '"end"', sql)
    for key in ("PRIMARY KEY (pipeline_id, key)\n", "PRIMARY KEY (pipeline_id, parent, child)\n"):
        sql = sql.replace(key, key.rstrip("\n") + ",\n    rowid BIGINT GENERATED BY DEFAULT AS IDENTITY\n")
    return sql


@functools.lru_cache(maxsize=512)
def translate(sql: str, with_params: bool = True) -> str:
    """One statement of the store's SQL (SQLite's spelling) in PostgreSQL's.

    >>> translate("INSERT OR IGNORE INTO edges (a, b) VALUES (?, ?)")
    'INSERT INTO edges (a, b) VALUES (%s, %s) ON CONFLICT DO NOTHING'
    >>> translate("INSERT OR REPLACE INTO results (key, path) VALUES (?, ?)")
    'INSERT INTO results (key, path) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET path = EXCLUDED.path'
    """
    s = sql.strip()
    if s == "BEGIN IMMEDIATE":
        return "BEGIN"
    if s == "BEGIN":  # a read snapshot (nbpipe.store.queries): one view of every SELECT
        return "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
    s = s.replace("temp.retired", "pg_temp.retired")
    s = re.sub(r'(?<!")\bend\b(?!")', '"end"', s)  # a column; SQL's END is in capitals here
    s = s.replace("UPDATE OR IGNORE", "UPDATE")  # the statement itself skips what would clash
    conflict = ""
    if s.startswith("INSERT OR IGNORE INTO"):
        s = "INSERT INTO" + s[len("INSERT OR IGNORE INTO"):]
        conflict = " ON CONFLICT DO NOTHING"
    elif s.startswith("INSERT OR REPLACE INTO"):
        s = "INSERT INTO" + s[len("INSERT OR REPLACE INTO"):]
        table = s.split()[2]
        match = re.match(r"INSERT INTO \S+ \(([^)]*)\)", s)
        columns = [c.strip() for c in match.group(1).split(",")] if match else list(_COLUMNS[table])
        keys = _KEYS[table]
        sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns if c not in keys)
        conflict = f" ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {sets}"
    if conflict:
        head, sep, tail = s.partition(" RETURNING ")
        s = head + conflict + (sep + tail if sep else "")
    if with_params:
        s = s.replace("%", "%%").replace("?", "%s")
    return s


def _error(name: str, exc: Exception) -> StoreError:
    """:class:`StoreUnreachable` for psycopg's ``exc``, naming the store ``name`` (a safe URL)."""
    import psycopg

    if isinstance(exc, psycopg.errors.UndefinedTable):
        return StoreUnreachable(f"the store {name} has no nbpipe tables ({exc}); open it "
                                "with this nbpipe once to create them")
    if not isinstance(exc, psycopg.OperationalError):  # the server refused a statement
        return StoreUnreachable(f"the store {name} refused a statement: {str(exc).strip()}")
    return StoreUnreachable(f"the store {name} cannot be used: {str(exc).strip()}; check "
                            "that the PostgreSQL server runs and the URL (host, port, user, "
                            "database, password or ~/.pgpass) is right")


class _Row(tuple):
    """A row read by name or position, like ``sqlite3.Row`` (``row["key"]``, ``row[0]``,
    ``dict(row)``, unpacking)."""

    _names: tuple[str, ...] = ()
    _index: dict[str, int] = {}

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, str):
            return tuple.__getitem__(self, self._index[item])
        return tuple.__getitem__(self, item)

    def keys(self) -> list[str]:
        """The column names, in order (as ``sqlite3.Row.keys``)."""
        return list(self._names)


@functools.lru_cache(maxsize=256)
def _row_class(names: tuple[str, ...]) -> type[_Row]:
    return type("Row", (_Row,), {"_names": names, "_index": {n: i for i, n in enumerate(names)}})


def _row_factory(cursor: Any) -> Any:
    if cursor.description is None:
        return tuple
    cls = _row_class(tuple(d.name for d in cursor.description))
    return cls


class _Cursor:
    """A psycopg cursor behind the parts of ``sqlite3.Cursor`` the store uses."""

    def __init__(self, store: PostgresStore, raw: Any):
        self._store, self._raw = store, raw

    def _run(self, fn: Any, *args: Any) -> Any:
        import psycopg

        try:
            return fn(*args)
        except psycopg.Error as exc:
            raise _error(self._store.name, exc) from None

    def fetchone(self) -> Any:
        return self._run(self._raw.fetchone) if self._raw.description else None

    def fetchall(self) -> list[Any]:
        return self._run(self._raw.fetchall) if self._raw.description else []

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())

    @property
    def rowcount(self) -> int:
        return int(self._raw.rowcount)


class _Connection:
    """A psycopg connection behind the parts of ``sqlite3.Connection`` the store uses: the
    store's SQL goes through :func:`translate`, rows come back as :class:`_Row`, errors as
    :class:`StoreUnreachable`."""

    def __init__(self, store: PostgresStore, raw: Any):
        self._store, self.raw = store, raw

    def _cursor(self) -> Any:
        import psycopg

        # Client-side binding: parameters become literals, so PostgreSQL infers every type
        # from the statement as it does for text (a None in `SELECT ?, ?` stays a NULL of the
        # column's type instead of text).
        return psycopg.ClientCursor(self.raw, row_factory=_row_factory)

    def execute(self, sql: str, params: Any = ()) -> _Cursor:
        import psycopg

        cur = self._cursor()
        try:
            cur.execute(translate(sql, bool(params)), tuple(params) if params else None)
        except psycopg.Error as exc:
            raise _error(self._store.name, exc) from None
        return _Cursor(self._store, cur)

    def executemany(self, sql: str, rows: Any) -> _Cursor:
        import psycopg

        rows = [tuple(r) for r in rows]
        # Server-side binding where every parameter's type is known (from a column: UPDATE
        # SET, INSERT VALUES; or from a cast, ?::bigint): psycopg prepares the statement once
        # and pipelines a batch's thousands of rows through it. An untyped parameter in a
        # SELECT list has no type, so such statements bind client-side (see _cursor).
        cur = (self._cursor() if _UNTYPED_SELECT.search(sql)
               else self.raw.cursor(row_factory=_row_factory))
        if rows:
            try:
                cur.executemany(translate(sql, True), rows)
            except psycopg.Error as exc:
                raise _error(self._store.name, exc) from None
        return _Cursor(self._store, cur)

    def executescript(self, script: str) -> None:
        self.execute(script)

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return self.raw.info.transaction_status != TransactionStatus.IDLE

    def close(self) -> None:
        self.raw.close()


class PostgresStore(Store):
    """A store whose records live in PostgreSQL and whose result files live in a folder every
    host mounts (``path``). Made by :class:`~nbpipe.store.Store` when it is given a URL, or a
    results folder whose ``database.json`` names one."""

    engine = "postgresql"

    # The same statement with every parameter typed (by its column's type): a SELECT list
    # gives an untyped parameter no type, which binds client-side, as new text per row. Typed,
    # it binds server-side: executemany prepares it once and sends a batch's rows in one
    # pipeline (see _Connection.executemany).
    _INSERT_ATTEMPT = """INSERT INTO attempts (pipeline_id, key, number, state, start, end,
            worker, hostname, pid, job_id, exit_code, error, traceback, stdout, stderr, env_id)
        SELECT ?::bigint, ?::text, ?::bigint, ?::text, ?::double precision,
               ?::double precision, ?::text, ?::text, ?::bigint, ?::text, ?::bigint, ?::text,
               ?::text, ?::text, ?::text, ?::text
        WHERE NOT EXISTS (SELECT 1 FROM attempts WHERE pipeline_id = ?::bigint AND key = ?::text
                          AND number = ?::bigint
                          AND start IS NOT DISTINCT FROM ?::double precision)"""

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 database: str | os.PathLike[str] | None = None,
                 results: str | os.PathLike[str] | None = None):
        """Open (or create) the store at the URL ``path`` with result files in ``results``.

        ``results`` defaults to ``$NBPIPE_RESULTS``, then the folder the database recorded
        when it was first opened. A store opened for the first time with no folder named is
        refused (:class:`~nbpipe.errors.StoreError`): results written to a folder that only one
        host sees would be missing on the others.
        """
        named = os.fspath(path or os.environ.get("NBPIPE_STORE") or "")
        if not is_url(named):  # a results folder naming its database
            folder = Path(named).absolute()
            named = json.loads((folder / DATABASE_POINTER).read_text())["url"]
            results = results or folder
        if database is not None:
            raise InvalidArgument(f"database={database!r} places an SQLite file; the store "
                                  f"{safe_url(named)} is a PostgreSQL database: leave it out")
        self.url = named
        self.db_path = None  # type: ignore[assignment]
        named_results = results or os.environ.get("NBPIPE_RESULTS")
        if named_results:  # refused before the database is touched
            refuse_results_folder(Path(os.path.expanduser(os.fspath(named_results))).absolute(),
                                  self.name)
        self._connections = ThreadConnections(
            lambda: _Connection(self, self.open_connection()), where=self.url,
            is_closed=lambda conn: conn.raw.closed,  # (a server that went away closed it)
            resource=lambda conn: conn.raw)  # (a thread that ended leaves it open)
        self._migrate()
        recorded = self.info().get("results")
        chosen = results or os.environ.get("NBPIPE_RESULTS") or recorded
        if not chosen:
            raise StoreError(
                f"the store {self.name} has no results folder: name one that every host running "
                "the pipeline mounts, with Store(url, results=DIR) / Pipeline(store=url, "
                "results=DIR), NBPIPE_RESULTS=DIR or `results-dir:` in nbpipe.yaml; the database "
                "records it, so later openers need not name it again"
            )
        self.path = Path(os.path.expanduser(os.fspath(chosen))).absolute()
        refuse_results_folder(self.path, self.name)
        try:
            for folder in (self.path, self.path / "results", self.path / "locks"):
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            make_private(self.path, 0o700)
            pointer = json.dumps({"url": self.url, "engine": self.engine}, indent=1).encode() + b"\n"
            if not (self.path / DATABASE_POINTER).exists() or \
                    (self.path / DATABASE_POINTER).read_bytes() != pointer:
                write_private(self.path / DATABASE_POINTER, pointer)  # 0600: it may hold a password
        except OSError as exc:
            raise StoreNotWritable(
                f"cannot create the results folder {self.path} of the store {self.name}: "
                f"{exc.strerror}; name a writable folder with results=DIR or NBPIPE_RESULTS"
            ) from None
        if not recorded:
            with self.transaction() as tx:
                tx.execute("INSERT OR IGNORE INTO nbpipe_store VALUES ('results', ?)", (str(self.path),))
        remember(self.path)

    @property
    def name(self) -> str:
        """The store's URL without its password (for messages)."""
        return safe_url(self.url)

    def integrity(self) -> list[str]:
        """``["ok"]``: PostgreSQL checks its own files (``nbpipe doctor`` checks the results)."""
        self.connect().execute("SELECT 1")
        return ["ok"]

    # -- connections ------------------------------------------------------------------------

    def open_connection(self, **kwargs: Any) -> Any:
        """A new autocommit connection to the server (``kwargs`` go to ``psycopg.connect``)."""
        import psycopg

        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=30, **kwargs)
        except psycopg.Error as exc:
            raise _error(self.name, exc) from None

    def connect(self) -> _Connection:  # type: ignore[override]
        """This thread's connection (created on first use; autocommit outside
        :meth:`transaction`, so reads always see the latest commits)."""
        return self._connections.get()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[_Connection]:  # type: ignore[override]
        """A write transaction (READ COMMITTED, as PostgreSQL's writers are row-locked)."""
        conn = self.connect()
        nested = conn.in_transaction
        if not nested:
            conn.raw.execute("BEGIN")  # (not conn.execute: its BEGIN is a read snapshot)
        try:
            yield conn
            if not nested:
                conn.execute("COMMIT")
        except BaseException:
            if not nested and not conn.raw.closed:
                with contextlib.suppress(Exception):
                    conn.raw.execute("ROLLBACK")
            raise

    def damaged(self, exc: BaseException) -> StoreError:
        """PostgreSQL keeps its own files whole: an error is the server's or the network's."""
        return exc if isinstance(exc, StoreError) else _error(self.name, exc)  # type: ignore[arg-type]

    def info(self) -> dict[str, str]:
        """The store's own facts (schema version, results folder), as recorded in its table."""
        return {r[0]: r[1] for r in self.connect().execute("SELECT name, value FROM nbpipe_store")}

    def _migrate(self) -> None:
        with self.transaction() as tx:
            # One opener creates the tables; the others wait and find them made.
            tx.execute("SELECT pg_advisory_xact_lock(?)", (_lock_key("nbpipe schema"),))
            tx.execute(_INFO)
            row = tx.execute("SELECT value FROM nbpipe_store WHERE name = 'schema'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise StoreVersionError(
                    f"the store {self.name} was written by a newer nbpipe (schema {version}; this "
                    f"nbpipe knows {SCHEMA_VERSION}); upgrade nbpipe (pip install -U nbpipe) or "
                    "use another store; the store was left untouched")
            if version < SCHEMA_VERSION:
                tx.execute(pg_schema())
                tx.execute("INSERT OR REPLACE INTO nbpipe_store (name, value) VALUES (?, ?)",
                           ("schema", str(SCHEMA_VERSION)))

    # -- what differs from SQLite -------------------------------------------------------------

    @property
    def channel(self) -> str:
        """The ``LISTEN``/``NOTIFY`` channel of this store's writes."""
        return "nbpipe_" + hashlib.blake2b(self.url.encode(), digest_size=6).hexdigest()

    def write(self, batch: Batch) -> None:
        """Commit a batch (as SQLite's store does) and notify listeners of the pipelines it
        touched, at commit (:meth:`wait_for_events`)."""
        if not batch:
            return
        pipelines = {p for p, _ in batch.states} | {e[0] for e in batch.events if e is not None}
        with self.transaction() as tx:
            super().write(batch)
            for pid in sorted(pipelines):
                tx.execute("SELECT pg_notify(?, ?)", (self.channel, str(pid)))

    def wait_for_events(self, pipeline_id: int, since: int, timeout: float) -> bool:
        """Wait until pipeline ``pipeline_id`` has an event after ``since`` (True) or
        ``timeout`` seconds passed (False): ``LISTEN`` on the store's channel, no polling."""
        if self.events(pipeline_id, since, 1):
            return True
        deadline = time.monotonic() + timeout
        listener = self.open_connection()
        try:
            listener.execute(f"LISTEN {self.channel}")
            if self.events(pipeline_id, since, 1):  # committed before LISTEN took effect
                return True
            while (left := deadline - time.monotonic()) > 0:
                for note in listener.notifies(timeout=left, stop_after=1):
                    if note.payload == str(pipeline_id):
                        return True
            return False
        finally:
            listener.close()

    def runner_lock(self, pipeline: str) -> AdvisoryLock:
        """The lock that makes one process the runner of ``pipeline`` (on any host)."""
        return AdvisoryLock(self, pipeline)

    def live_runners(self) -> list[str]:
        """Who holds a runner lock of this store now (``pid ... on host (pipeline)``)."""
        rows = self.connect().execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND a.application_name LIKE ?", (f"nbpipe {_store_tag(self)} %",)).fetchall()
        return [_holder(r[0]) + f" ({r[0].split(' ', 2)[2].split(' @ ', 1)[1]})" for r in rows]


def _lock_key(text: str) -> int:
    """A signed 64-bit key for ``pg_advisory_lock`` from a name."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8)
                          .digest(), "big", signed=True)


def _store_tag(store: PostgresStore) -> str:
    # (the schema too: stores in two schemas of one database have locks of their own)
    return hashlib.blake2b(store.url.encode(), digest_size=4).hexdigest()


def _holder(application_name: str) -> str:
    """``pid N on HOST`` from a lock holder's application name."""
    return application_name.split(" ", 2)[2].split(" @ ", 1)[0]


class AdvisoryLock(RunnerLock):
    """One runner per pipeline across hosts: a session advisory lock held by a connection of
    its own, which PostgreSQL drops the moment the process dies (even by ``kill -9``). The
    holder names itself in the connection's ``application_name``, which others read in
    ``pg_stat_activity`` to say who runs the pipeline."""

    def __init__(self, store: PostgresStore, pipeline: str):  # noqa: D107
        self.store, self.pipeline = store, pipeline
        self.path = store.path / "locks" / "postgresql"  # (no file: the lock is the server's)
        self.key = _lock_key(f"{store.url}\0{pipeline}")
        self._conn: Any = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`PipelineBusy` naming the host and pid that hold it."""
        me = f"pid {os.getpid()} on {socket.gethostname()}"
        # application_name holds 63 bytes: the store's tag and who we are come first
        name = f"nbpipe {_store_tag(self.store)} {me} @ {self.pipeline}"[:63]
        conn = self.store.open_connection(application_name=name)
        try:
            got = conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()[0]
        except Exception:
            conn.close()
            raise
        if not got:
            conn.close()
            raise PipelineBusy(
                f"pipeline {self.pipeline!r} is already being run by {self.holder() or 'another process'}"
                "; wait for it to finish, watch it with `nbpipe tasks`, or stop it with `nbpipe "
                "pause` (only one process may run a pipeline at a time, on any host)"
            )
        self._conn = conn

    def holder(self) -> str:
        """``pid N on HOST`` of the process holding the lock ('' when none does)."""
        row = self.store.connect().execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND l.objsubid = 1 AND ((l.classid::bigint << 32) | l.objid::bigint) = ?",
            (self.key,)).fetchone()
        return _holder(row[0]) if row and row[0].startswith("nbpipe ") else ""

    def release(self) -> None:
        """Give the lock back (closing its connection)."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def busy(self) -> bool:
        """Whether a process holds the lock right now (a look, no try)."""
        return bool(self.holder())

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._conn is not None and not self._conn.closed

    def forget(self) -> None:
        """Nothing to clear: PostgreSQL drops a dead holder's lock itself."""
