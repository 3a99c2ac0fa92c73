"""The registry of stores this user opened (``nbpipe pipelines --all`` lists them)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["known_stores", "registry_path", "remember"]


def registry_path() -> Path:
    """The file listing every store this user opened (for ``nbpipe pipelines --all``)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "nbpipe" / "stores.txt"


def remember(path: Path) -> None:
    """Add a store to the registry of known stores (best effort: never fails the caller)."""
    registry = registry_path()
    try:
        known = registry.read_text().splitlines() if registry.exists() else []
        if str(path) in known:
            return
        registry.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(registry, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # private: where
        with os.fdopen(fd, "a") as f:                                        # the user works
            f.write(f"{path}\n")
    except OSError:
        pass


def known_stores() -> list[Path]:
    """Registered stores that still exist."""
    registry = registry_path()
    if not registry.exists():
        return []
    paths = dict.fromkeys(Path(p) for p in registry.read_text().splitlines() if p.strip())
    from .sqlite import is_store  # (the registry is imported by the store itself)

    return [p for p in paths if is_store(p)]
