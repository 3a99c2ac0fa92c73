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
>>> class Connection(sqlite3.Connection):  # (a subclass: weak references, as the store's)
...     pass
>>> held = ThreadConnections(lambda: sqlite3.connect(":memory:", factory=Connection), where="demo")
>>> held.get() is held.get(), open_count("demo")
(True, 1)
>>> held.close(); open_count("demo")
0
"""

from __future__ import annotations

import contextlib
import threading
import weakref
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
    :func:`open_count`. ``resource`` gives what must be closed when a connection is dropped
    unclosed (its thread ended) -- a wrapper's inner connection; a connection that closes
    itself when collected (SQLite's) needs none.

    Connections must take weak references (the store's own classes do; ``sqlite3.Connection``
    itself does not, a subclass does). The holder keeps no connection alive: a thread that
    ends without :meth:`close` (a status display's, a server request's) drops its connection,
    which is then closed and uncounted.
    """

    def __init__(self, opener: Callable[[], C], *, where: str,
                 is_closed: Callable[[C], bool] = lambda conn: False,
                 resource: Callable[[C], _Closable | None] = lambda conn: None) -> None:
        self._opener = opener
        self._is_closed = is_closed
        self._resource = resource
        self.where = where
        self._local = threading.local()
        # every open connection -> what closes and uncounts it once (when closed, or dropped)
        self._all: weakref.WeakKeyDictionary[C, weakref.finalize] = weakref.WeakKeyDictionary()
        self._guard = threading.Lock()

    def get(self) -> C:
        """This thread's connection (opened on first use, or again after it was closed)."""
        conn: C | None = getattr(self._local, "conn", None)
        if conn is not None and not self._is_closed(conn):
            return conn
        if conn is not None:  # closed under us: no longer counted
            self._forget(conn)
        conn = self._opener()
        _count(self.where, +1)
        with self._guard:
            self._all[conn] = weakref.finalize(conn, _release, self.where, self._resource(conn))
        self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close this thread's connection (the next :meth:`get` opens a new one)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            return
        self._local.conn = None
        conn.close()
        self._forget(conn)

    def close_all(self) -> None:
        """Close the connections of every thread (a store dropped for good) that can be closed
        from this one; threads that use the store again get new ones. (An SQLite connection
        closes only in its own thread: it stays open, counted, until that thread ends.)"""
        with self._guard:
            held = list(self._all.keys())
        for conn in held:
            try:
                conn.close()
            except Exception:  # noqa: BLE001,S112 (SQLite's of another thread, see above)
                continue
            self._forget(conn)
        self._local = threading.local()

    def _forget(self, conn: C) -> None:
        with self._guard:
            done = self._all.pop(conn, None)
        if done is not None:
            done()  # (once: a finalizer that ran does nothing again)


def _release(where: str, resource: _Closable | None) -> None:
    """A connection closed or dropped: uncount it and close what it left open."""
    _count(where, -1)
    if resource is not None:
        with contextlib.suppress(Exception):  # closed already
            resource.close()
