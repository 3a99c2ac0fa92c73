"""Version bookkeeping (desipipe): what ran each attempt, recorded with the attempt.

The snapshot holds the Python version, the versions of the imported top-level packages, the
hostname and the git commit of the working directory. It is computed once per worker process
(and again when new packages are imported) and stored once per distinct content.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from typing import Any

from .identity import digest, module_version

__all__ = ["environment", "git_commit"]

_cache: dict[str, Any] = {}


def git_commit(path: str | None = None) -> str | None:
    """The commit checked out in ``path`` (default: the working directory), with ``+dirty``."""
    cwd = path or os.getcwd()
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=5,
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _top_level_packages() -> dict[str, str]:
    tops = {name.partition(".")[0] for name in list(sys.modules)}
    found = {}
    for top in sorted(tops):
        if top.startswith("_") or top in sys.stdlib_module_names:
            continue
        version = module_version(top)
        if version != "unknown":
            found[top] = version
    return found


def environment() -> tuple[str, dict[str, Any]]:
    """(id, snapshot) of this process's environment; the id is the snapshot's digest."""
    n_modules = len(sys.modules)
    if _cache.get("n_modules") != n_modules or _cache.get("cwd") != os.getcwd():
        snapshot = {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "packages": _top_level_packages(),
            "git_commit": git_commit(),
            "cwd": os.getcwd(),
        }
        _cache.update(n_modules=n_modules, cwd=os.getcwd(), snapshot=snapshot, id=digest(snapshot))
    return _cache["id"], _cache["snapshot"]
