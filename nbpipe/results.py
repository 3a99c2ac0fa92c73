"""Results: written atomically by the worker, verified by checksum when read.

A result lives at ``<store>/results/<key[:2]>/<key>.pkl``. The worker writes it to a temporary
file in the same directory and renames it into place, so a reader sees the whole file or none.
The store records its path *relative to the store root* (``results/ab/<key>.pkl``: a moved or
renamed project keeps its results), its size and checksum.

A result file starts with a one-line header that carries the checksum of the pickle after it
(:data:`MAGIC`, the checksum, a newline). A file the worker wrote after its runner died is
therefore verified before the next run adopts it: a flipped bit is found, not served.

Small results of quick tasks -- at most :data:`INLINE_BYTES` pickled (the setting
``nbpipe.inline-bytes``; 0 turns this off), from a task that ran under :data:`INLINE_SECONDS`
-- are *inline*: the worker sends the bytes to the runner, which records them in the store's
database in the same transaction as the task's success (path ``""``). Creating a file costs
about a millisecond on many file systems, more than such a task; a runner that dies before
recording an inline result loses about a second of work at most (a chunk of a ``map`` pushes
its finished items every 0.5 s, see :mod:`nbpipe.worker`), whereas a longer task's file is
adopted by the next runner.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import pickle
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import cloudpickle

from .config import DEFAULTS
from .errors import ResultCorrupt

__all__ = ["INLINE", "INLINE_BYTES", "INLINE_SECONDS", "MAGIC", "ResultFile", "append_private",
           "checksum_of", "locate", "read_result", "read_verified", "relative_path", "result_path",
           "unpack", "write_result"]

INLINE = ""  # the path recorded for a result kept in the store's database
INLINE_BYTES: int = DEFAULTS["inline-bytes"]  # default of the nbpipe.inline-bytes setting (nbpipe.yaml)
INLINE_SECONDS = 1.0
MAGIC = b"nbpipe-result 1 "  # then the blake2b-128 hex checksum of the pickle, then a newline
_HEADER = len(MAGIC) + 32 + 1


class ResultFile(NamedTuple):
    """Where a result was written, and how to tell it is intact."""

    path: str
    checksum: str
    size: int


def relative_path(key: str) -> str:
    """The path of task ``key``'s result file relative to the store root (what is recorded).

    >>> relative_path("ab12")
    'results/ab/ab12.pkl'
    """
    return f"results/{key[:2]}/{key}.pkl"


def result_path(store_dir: str | os.PathLike[str], key: str) -> Path:
    """The path of the result file of task ``key`` in a store."""
    return Path(store_dir) / relative_path(key)


def locate(store_dir: str | os.PathLike[str], path: str) -> str:
    """A recorded result path made usable: joined to the store root (``""``, inline, stays).

    >>> locate("/data/.nbpipe", "results/ab/ab12.pkl")
    '/data/.nbpipe/results/ab/ab12.pkl'
    >>> locate("/data/.nbpipe", "")
    ''
    """
    return path if path == INLINE else os.path.join(store_dir, path)


def checksum_of(data: bytes) -> str:
    """The checksum recorded for a result file's bytes."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def write_result(store_dir: str | os.PathLike[str], key: str, value: Any, *,
                 inline: int = 0) -> tuple[ResultFile, bytes | None]:
    """Serialise ``value`` with cloudpickle; write it atomically to its file, or, when it takes
    at most ``inline`` bytes, return the bytes instead (the path is then :data:`INLINE`).
    """
    data = cloudpickle.dumps(value, protocol=5)
    if len(data) <= inline:
        return ResultFile(INLINE, checksum_of(data), len(data)), data
    checksum = checksum_of(data)
    write_private(result_path(store_dir, key), MAGIC + checksum.encode() + b"\n", data)
    return ResultFile(relative_path(key), checksum, _HEADER + len(data)), None


def unpack(raw: bytes) -> tuple[bytes, str | None]:
    """A result file's bytes split into (the pickle, the checksum its header carries); files of
    nbpipe before the header have none."""
    if raw.startswith(MAGIC) and raw[_HEADER - 1 : _HEADER] == b"\n":
        return raw[_HEADER:], raw[len(MAGIC) : _HEADER - 1].decode("ascii", "replace")
    return raw, None


def read_verified(path: str | os.PathLike[str]) -> tuple[str, int] | None:
    """(checksum, size) of a result file that verifies against the checksum in its own header;
    None when it is missing, carries no header (nothing to verify against) or was altered."""
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return None
    data, written = unpack(raw)
    if written is None or checksum_of(data) != written:
        return None
    return written, len(raw)


def private_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents, each readable by the user only (0700).

    (``mkdir(parents=True)`` would create the parents with the umask's wider mode.)
    """
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)


def make_private(path: Path, mode: int) -> None:
    """Take group and other permissions away from ``path`` if it is ours and has them (a folder
    an older nbpipe made with the umask's mode, a file copied in with 0644)."""
    with contextlib.suppress(OSError):  # missing, or not ours: leave it
        info = path.stat()
        if info.st_uid == os.getuid() and info.st_mode & 0o077:
            os.chmod(path, mode)


def write_private(path: Path, *parts: bytes) -> None:
    """Write ``parts`` to ``path`` atomically (temp file + rename), readable by the user only."""
    private_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:  # (not joined: a large result is not copied once more)
                f.write(part)
            if _shared(path.parent):
                # Another host may read it the moment the rename shows: the bytes reach the
                # server first, then the rename (same directory) and the directory entry.
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if _shared(path.parent):
            _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@functools.lru_cache(maxsize=1024)
def _shared(folder: Path) -> bool:
    """Whether ``folder`` lies on a network file system (results written there are fsynced:
    workers on other hosts and the runner read them; a local disk needs no fsync for that, and
    a file cut by a crash is caught by its checksum header)."""
    from .store.mounts import network_mount

    return network_mount(folder) is not None


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (and visible to other NFS clients at once)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory: the rename stands anyway
        pass
    finally:
        os.close(fd)


def append_private(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a log file for appending, created readable by the user only (0600)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")


def read_result(path: str | os.PathLike[str], checksum: str | None = None,
                data: bytes | None = None) -> Any:
    """Load a result (its file, or ``data`` for an inline one), raising :class:`ResultCorrupt`
    when it is missing or altered."""
    if data is None and path == INLINE:
        raise ResultCorrupt("an inline result is missing from the store; the task will run again")
    if data is not None:
        path = "(inline in the store)"
    else:
        try:
            data, written = unpack(Path(path).read_bytes())
        except FileNotFoundError:
            raise ResultCorrupt(f"result file {path} is missing; the task will run again") from None
        checksum = checksum or written
    if checksum is not None and checksum_of(data) != checksum:
        raise ResultCorrupt(
            f"result file {path} does not match its checksum (truncated or altered); "
            "the task will run again"
        )
    try:
        return cloudpickle.loads(data)
    except (pickle.UnpicklingError, EOFError) as exc:  # not a pickle: damaged before it was recorded
        raise ResultCorrupt(f"result file {path} cannot be read ({exc}); the task will run again") from None
