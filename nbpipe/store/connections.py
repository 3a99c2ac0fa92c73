"""One database connection per thread, for either engine of the store.

SQLite connections must not cross threads, and a psycopg connection serves one transaction at a
time: each thread that uses a store gets a connection of its own, opened on first use. The
holder also keeps what both engines need to know about the connections they opened:

- how many connections this process holds on each database (:func:`open_count`): SQLite's
  store must not open and close a plain descriptor of a database file this process has
  connections to, as closing it drops every POSIX lock those connections hold;
- every thread's connection (:meth:`ThreadConnections.close_all`): a store dropped for good
  closes them all, not only the calling thread's.

>>> import sqlite3
>>> held = ThreadConnections(lambda: sqlite3.connect(":memory:"), where="demo")
>>> held.get() is held.get(), open_count("demo")
(True, 1)
>>> held.close(); open_count("demo")
0
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

__all__ = ["ThreadConnections", "open_count"]


class _Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Closable)

_counts: dict[str, int] = {}  # database -> connections this process holds open on it
_counts_guard = threading.Lock()


def open_count(where: str) -> int:
    """How many connections this process holds open on the database ``where`` (as named by
    the holders' ``where=``: a database file's real path, a URL)."""
    return _counts.get(where, 0)


def _count(where: str, change: int) -> None:
    with _counts_guard:
        _counts[where] = max(0, _counts.get(where, 0) + change)


class ThreadConnections(Generic[C]):
    """The connections of one store: one per thread, opened by ``opener`` on first use.

    ``is_closed`` tells a connection that went away under its thread (a PostgreSQL server that
    closed it): the next :meth:`get` opens a new one. ``where`` names the database for
    :func:`open_count`.
    """

    def __init__(self, opener: Callable[[], C], *, where: str,
                 is_closed: Callable[[C], bool] = lambda conn: False) -> None:
        self._opener = opener
        self._is_closed = is_closed
        self.where = where
        self._local = threading.local()
        self._all: list[C] = []
        self._guard = threading.Lock()

    def get(self) -> C:
        """This thread's connection (opened on first use, or again after it was closed)."""
        conn: C | None = getattr(self._local, "conn", None)
        if conn is not None and not self._is_closed(conn):
            return conn
        if conn is not None:  # closed under us: no longer counted
            self._forget(conn)
        conn = self._opener()
        self._local.conn = conn
        with self._guard:
            self._all.append(conn)
        _count(self.where, +1)
        return conn

    def current(self) -> C | None:
        """This thread's connection if it has one open (no connection is opened)."""
        return getattr(self._local, "conn", None)

    def close(self) -> None:
        """Close this thread's connection (the next :meth:`get` opens a new one)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            return
        self._local.conn = None
        self._forget(conn)
        conn.close()

    def close_all(self) -> None:
        """Close the connections of every thread (a store dropped for good). Threads that use
        the store again get new ones."""
        with self._guard:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 (SQLite's of another thread: it stays open, counted)
                with self._guard:
                    self._all.append(conn)
            else:
                _count(self.where, -1)
        self._local = threading.local()

    def _forget(self, conn: C) -> None:
        with self._guard:
            for i, held in enumerate(self._all):
                if held is conn:
                    del self._all[i]
                    _count(self.where, -1)
                    return
