"""File products and dependencies (depio's ``Product``/``Dependency``), declared with ``Annotated``.

>>> from pathlib import Path
>>> from typing import Annotated
>>> from nbpipe import In, Out, task
>>> @task
... def smooth(raw: Annotated[Path, In], out: Annotated[Path, Out]) -> None:
...     out.write_text(raw.read_text().upper())

A task that reads a path another task declares as ``Out`` depends on it, whatever the order in
which the two were registered. Input files enter the task's key by content.
"""

from __future__ import annotations

import hashlib
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["In", "Out", "FileRole", "file_digest", "file_params", "paths_in"]


class FileRole:
    """Marker for ``Annotated[Path, In]`` (an input file) and ``Annotated[Path, Out]`` (an output)."""

    def __init__(self, role: str):
        self.role = role

    def __repr__(self) -> str:
        return "In" if self.role == "in" else "Out"

    def __reduce__(self) -> str:
        return repr(self)

    def __nbpipe_token__(self) -> str:
        return self.role


In = FileRole("in")
Out = FileRole("out")


def file_params(fn: Callable[..., Any]) -> dict[str, str]:
    """Map each parameter of ``fn`` annotated with ``In``/``Out`` to ``"in"``/``"out"``."""
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # unresolvable forward references: no file parameters we can see
        return {}
    roles: dict[str, str] = {}
    for name, hint in hints.items():
        # Python 3.10 wraps a parameter defaulting to None in Optional[...]: look inside too.
        for part in (hint, *typing.get_args(hint)) if typing.get_origin(hint) is not None else (hint,):
            for meta in getattr(part, "__metadata__", ()):
                if isinstance(meta, FileRole):
                    roles[name] = meta.role
    return roles


def paths_in(value: Any) -> list[Path]:
    """The paths in an argument value: one path, or a list/tuple of them (``None`` gives none)."""
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [p for item in value for p in paths_in(item)]
    raise TypeError(f"expected a path or a list of paths, got {type(value).__name__}")


_digest_cache: dict[tuple[str, int, int, int], str] = {}


def file_digest(path: Path) -> str:
    """Digest of a file's content (or of a directory's files, recursively).

    Cached by (path, size, mtime, inode) so an unchanged large input is read once per process.
    """
    path = Path(path)
    if path.is_dir():
        h = hashlib.blake2b(digest_size=16)
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(child.relative_to(path)).encode() + b"\0" + file_digest(child).encode())
        return h.hexdigest()
    st = path.stat()
    cache_key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    cached = _digest_cache.get(cache_key)
    if cached is not None:
        return cached
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    result = _digest_cache[cache_key] = h.hexdigest()
    return result
