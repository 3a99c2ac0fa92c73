"""One runner per pipeline: an exclusive lock file that names the process holding it."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import PipelineBusy

if TYPE_CHECKING:
    from .sqlite import Store

__all__ = ["LOCK_TRIES", "RunnerLock", "file_stem", "lock_name"]

LOCK_TRIES = 6  # attempts 50 ms apart before a runner lock counts as held by another process


def file_stem(pipeline: str) -> str:
    """A pipeline's name as part of a file name: readable, one per name, and short enough for
    any file system (locks, logs).

    The readable part alone is not enough (``a/b`` and ``a_b`` both read ``a_b``; a long name
    exceeds NAME_MAX): a digest of the exact name follows it.

    >>> file_stem("a/b") != file_stem("a_b")
    True
    >>> len(file_stem("x" * 300))
    77
    """
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in pipeline)
    tag = hashlib.blake2b(pipeline.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"{safe[:60]}-{tag}"


def lock_name(pipeline: str) -> str:
    """The lock file name of a pipeline (see :func:`file_stem`)."""
    return f"{file_stem(pipeline)}.lock"


class RunnerLock:
    """An exclusive lock (``flock``) that makes one process the runner of a pipeline."""

    def __new__(cls, store: Store, pipeline: str) -> RunnerLock:
        """A PostgreSQL store's lock is the server's (:class:`~nbpipe.store.postgres.AdvisoryLock`)."""
        if cls is RunnerLock and store.engine == "postgresql":
            from .postgres import AdvisoryLock

            return super().__new__(AdvisoryLock)
        return super().__new__(cls)

    def __init__(self, store: Store, pipeline: str):
        self.path = store.path / "locks" / lock_name(pipeline)
        self.pipeline = pipeline
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`PipelineBusy` naming the process that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # A few tries: ``busy()`` in another process (the command line asking whether a
            # runner is attached, `nbpipe doctor`) holds the lock for an instant.
            for _ in range(LOCK_TRIES - 1):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(0.05)
            else:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.holder() or "another process"
            os.close(fd)
            raise PipelineBusy(
                f"pipeline {self.pipeline!r} is already being run by {holder}; wait for it to "
                "finish, watch it with `nbpipe tasks`, or stop it with `nbpipe pause` "
                "(only one process may run a pipeline at a time)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd

    def holder(self) -> str:
        """``pid N on HOST`` as the last holder wrote it ('' when none is recorded)."""
        try:
            return Path(self.path).read_text(errors="replace").strip()
        except OSError:
            return ""

    def forget(self) -> None:
        """Clear the record of a holder that died (``nbpipe doctor --repair``)."""
        with contextlib.suppress(OSError):
            self.path.write_text("")

    def release(self) -> None:
        """Give the lock back."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def busy(self) -> bool:
        """Whether another process (or another lock object) holds the lock right now."""
        try:
            self.acquire()
        except PipelineBusy:
            return True
        self.release()
        return False

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None
