"""Results: written atomically by the worker, verified by checksum when read.

A result lives at ``<store>/results/<key[:2]>/<key>.pkl``. The worker writes it to a temporary
file in the same directory and renames it into place, so a reader sees the whole file or none.
The store records its path *relative to the store root* (``results/ab/<key>.pkl``: a moved or
renamed project keeps its results), its size and checksum.

A result file starts with a one-line header that carries the checksum of the bytes after it
(:data:`MAGIC`, the checksum, the layout, a newline). A file the worker wrote after its runner
died is therefore verified before the next run adopts it: a flipped bit is found, not served.

Large values are written without a copy: the pickle (protocol 5) keeps the raw buffers of
arrays out of band (``buffer_callback``), and the file holds the pickle, then each buffer
written straight from the array's memory; the checksum is XXH3-128 (``xxhash``), computed
over those parts as they are written. Reading fills one writable buffer from the file and
unpickles the arrays over it (no second copy). Files of earlier nbpipe versions (header
``nbpipe-result 1``: one in-band pickle, a BLAKE2b-128 checksum) are still read and verified;
a recorded checksum names its algorithm by its form (:func:`checksum_of`).

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
import xxhash

from .config import DEFAULTS
from .errors import ResultCorrupt

__all__ = ["INLINE", "INLINE_BYTES", "INLINE_SECONDS", "MAGIC", "MAGIC_1", "ResultFile",
           "Unwritten", "append_private",
           "checksum_of", "locate", "prepare_result", "read_result", "read_verified",
           "relative_path", "result_path", "unpack", "write_result"]

INLINE = ""  # the path recorded for a result kept in the store's database
INLINE_BYTES: int = DEFAULTS["inline-bytes"]  # default of the nbpipe.inline-bytes setting (nbpipe.yaml)
INLINE_SECONDS = 1.0
#: The header of a result file: then the XXH3-128 hex checksum of everything after it, a space,
#: the layout (the pickle's length, then each out-of-band buffer's, comma-separated), spaces, a
#: newline. The pickle and each buffer start at a multiple of :data:`ALIGN` bytes.
MAGIC = b"nbpipe-result 2 "
#: The header nbpipe wrote before: then the BLAKE2b-128 hex checksum of the pickle, a newline.
MAGIC_1 = b"nbpipe-result 1 "
_HEADER_1 = len(MAGIC_1) + 32 + 1
ALIGN = 64  # (arrays read back from a file stay aligned for vectorised code)
_DIGITS = 32  # hex digits of a checksum in a header
XXH3 = "xxh3:"  # the prefix of a recorded XXH3-128 checksum; BLAKE2b-128 ones are bare hex


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


def checksum_of(data: Any, like: str | None = None) -> str:
    """The checksum recorded for ``data`` (bytes, or any buffer): XXH3-128, written
    ``xxh3:<hex>``; with ``like``, in the algorithm of that recorded checksum (a bare hex one
    is BLAKE2b-128, what nbpipe recorded before), so old records still verify.

    >>> checksum_of(b"abc")
    'xxh3:06b05ab6733a618578af5f94892f3950'
    >>> checksum_of(b"abc", like="00" * 16)
    'cf4ab791c62b8d2b2109c90275287816'
    """
    if like is not None and not like.startswith(XXH3):
        return hashlib.blake2b(data, digest_size=16).hexdigest()
    return XXH3 + xxhash.xxh3_128_hexdigest(data)


def _pad(offset: int) -> int:
    return -offset % ALIGN


def _paddings(pickled: int, sizes: Any) -> list[int]:
    """The zero bytes before each out-of-band buffer in the payload (after a pickle of
    ``pickled`` bytes), so each starts at a multiple of :data:`ALIGN` (the payload does)."""
    pads, offset = [], pickled
    for n in sizes:
        pads.append(_pad(offset))
        offset += pads[-1] + n
    return pads


class Unwritten(NamedTuple):
    """A result pickled and checksummed whose file is not written yet (:func:`prepare_result`).

    Its parts are views of the value's own memory: a value changed in place before
    :meth:`write` ends no longer matches the checksum taken here, and reading the file says so.
    """

    result: ResultFile
    path: Path
    parts: list[Any]

    def write(self) -> ResultFile:
        """Write the file atomically; what the store records."""
        write_private(self.path, *self.parts)
        return self.result


def prepare_result(store_dir: str | os.PathLike[str], key: str, value: Any, *,
                   inline: int = 0) -> tuple[ResultFile, bytes] | Unwritten:
    """Serialise ``value`` with cloudpickle: when it takes at most ``inline`` bytes, (the
    record, the bytes: the path is then :data:`INLINE`); otherwise what to write to its file.

    Arrays and other objects that offer their buffers (pickle protocol 5) are written from
    their own memory, not copied into the pickle first.
    """
    buffers: list[pickle.PickleBuffer] = []
    data = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    views = [b.raw() for b in buffers]  # (flat byte views: contiguous, as protocol 5 gives them)
    size = len(data) + sum(v.nbytes for v in views)
    if size <= inline:
        if views:  # small: one self-contained pickle, as the store's database keeps it
            data = cloudpickle.dumps(value, protocol=5)
        return ResultFile(INLINE, checksum_of(data), len(data)), data
    layout = ",".join(str(n) for n in (len(data), *(v.nbytes for v in views))).encode()
    # The header's line is padded so that the pickle, and with it each buffer, starts at a
    # multiple of ALIGN from the file's start.
    line = len(MAGIC) + _DIGITS + 1 + len(layout) + 1
    tail = b" " + layout + b" " * _pad(line) + b"\n"  # what follows the checksum in the header
    parts: list[Any] = [tail, data]
    offset = len(data)
    for view, pad in zip(views, _paddings(len(data), [v.nbytes for v in views]), strict=True):
        parts += [bytes(pad), view]
        offset += pad + view.nbytes
    # The checksum covers everything after itself (the layout too): hashed first (XXH3 runs at
    # memory speed), then written from where the parts are, none copied.
    digest = xxhash.xxh3_128()
    for part in parts:
        digest.update(part)
    checksum = digest.hexdigest()
    record = ResultFile(relative_path(key), XXH3 + checksum,
                        len(MAGIC) + _DIGITS + len(tail) + offset)
    return Unwritten(record, result_path(store_dir, key), [MAGIC + checksum.encode(), *parts])


def write_result(store_dir: str | os.PathLike[str], key: str, value: Any, *,
                 inline: int = 0) -> tuple[ResultFile, bytes | None]:
    """Serialise ``value`` with cloudpickle; write it atomically to its file, or, when it takes
    at most ``inline`` bytes, return the bytes instead (the path is then :data:`INLINE`).
    """
    prepared = prepare_result(store_dir, key, value, inline=inline)
    if isinstance(prepared, Unwritten):
        return prepared.write(), None
    return prepared


class _Layout(NamedTuple):
    """What a result file's header says."""

    covered: int  # where the bytes its checksum covers start
    start: int  # where the pickle starts
    checksum: str | None  # as recorded (None: a file of nbpipe before headers, unverifiable)
    lengths: tuple[int, ...] = ()  # the pickle's length, then each out-of-band buffer's


def _layout(raw: bytes | bytearray) -> _Layout:
    """The header of a result file's bytes; a file without a recognised header is all pickle."""
    if raw[: len(MAGIC)] == MAGIC:
        end = raw.find(b"\n")  # (a layout names every buffer: no bound on its length)
        fields = bytes(raw[len(MAGIC) : max(end, 0)]).split()
        if len(fields) == 2 and len(fields[0]) == _DIGITS:
            try:
                lengths = tuple(int(n) for n in fields[1].split(b","))
                checksum = XXH3 + fields[0].decode("ascii")
            except (ValueError, UnicodeDecodeError):
                pass
            else:
                return _Layout(len(MAGIC) + _DIGITS, end + 1, checksum, lengths)
    if raw[: len(MAGIC_1)] == MAGIC_1 and raw[_HEADER_1 - 1 : _HEADER_1] == b"\n":
        checksum = bytes(raw[len(MAGIC_1) : _HEADER_1 - 1]).decode("ascii", "replace")
        return _Layout(_HEADER_1, _HEADER_1, checksum)
    return _Layout(0, 0, None)


def unpack(raw: bytes) -> tuple[bytes, str | None]:
    """A result file's bytes split into (the bytes its checksum covers, the checksum its header
    carries, as recorded); files of nbpipe before the header have none."""
    layout = _layout(raw)
    return raw[layout.covered :], layout.checksum


def _read_whole(path: str | os.PathLike[str]) -> bytearray:
    """A file's bytes in one writable buffer (arrays unpickled over it can be written to)."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        buffer = bytearray(size)
        view = memoryview(buffer)
        done = 0
        while done < size:
            n = f.readinto(view[done:])
            if not n:  # shrank while being read
                del view
                return buffer[:done]
            done += n
        return buffer


def read_verified(path: str | os.PathLike[str]) -> tuple[str, int] | None:
    """(checksum, size) of a result file that verifies against the checksum in its own header;
    None when it is missing, carries no header (nothing to verify against) or was altered."""
    try:
        raw = _read_whole(path)
    except OSError:
        return None
    layout = _layout(raw)
    if layout.checksum is None:
        return None
    with memoryview(raw) as view:
        if checksum_of(view[layout.covered :], like=layout.checksum) != layout.checksum:
            return None
    return layout.checksum, len(raw)


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
    lengths: tuple[int, ...] = ()
    if data is not None:
        path = "(inline in the store)"
        covered = payload = data
    else:
        try:
            raw = _read_whole(path)
        except FileNotFoundError:
            raise ResultCorrupt(f"result file {path} is missing; the task will run again") from None
        layout = _layout(raw)
        covered, payload = memoryview(raw)[layout.covered :], memoryview(raw)[layout.start :]
        if checksum and layout.checksum and layout.checksum != checksum:
            covered = b""  # its header names other bytes than were recorded: altered
        checksum, lengths = checksum or layout.checksum, layout.lengths
    if checksum is not None and checksum_of(covered, like=checksum) != checksum:
        raise ResultCorrupt(
            f"result file {path} does not match its checksum (truncated or altered); "
            "the task will run again"
        )
    try:
        if not lengths:
            return cloudpickle.loads(payload)
        pads = _paddings(lengths[0], lengths[1:])
        if len(payload) != sum(lengths) + sum(pads):
            raise EOFError("its parts do not add up to its length")
        return cloudpickle.loads(payload[: lengths[0]], buffers=_buffers(payload, lengths, pads))
    except (pickle.UnpicklingError, EOFError) as exc:  # damaged before it was recorded
        raise ResultCorrupt(f"result file {path} cannot be read ({exc}); the task will run again") from None


def _buffers(payload: memoryview, lengths: tuple[int, ...], pads: list[int]) -> list[memoryview]:
    """The out-of-band buffers of a payload, as views (no copy)."""
    out, offset = [], lengths[0]
    for n, pad in zip(lengths[1:], pads, strict=True):
        offset += pad
        out.append(payload[offset : offset + n])
        offset += n
    return out
