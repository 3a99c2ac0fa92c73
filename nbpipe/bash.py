"""Running the command of a ``@bash_task``: bash or an argv list, both streams captured.

``Popen.communicate`` reads stdout and stderr concurrently, so a command that writes megabytes
to stderr before its stdout never deadlocks. It is called with a short timeout in a loop so a
kill request (an exception raised in this thread) is noticed and the child process stopped.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from .errors import BashTaskError, TaskDefinitionError

__all__ = ["BashResult", "run_command"]


class BashResult(NamedTuple):
    """What a bash command printed and how it exited."""

    returncode: int
    stdout: str
    stderr: str


def _argv(command: str | Sequence[str], task: str) -> list[str]:
    if isinstance(command, str):
        return ["bash", "-c", command]
    if isinstance(command, Sequence) and command and all(
        isinstance(a, (str, os.PathLike)) for a in command
    ):
        return [os.fspath(a) for a in command]
    raise TaskDefinitionError(
        f"bash task {task!r} must return a command string or a non-empty list of strings "
        f"(an argv), not {type(command).__name__}"
    )


def run_command(
    command: str | Sequence[str],
    *,
    task: str,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> BashResult:
    """Run ``command``; return its output, or raise :class:`BashTaskError` on a non-zero exit."""
    argv = _argv(command, task)
    full_env = {**os.environ, **(env or {})}
    try:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, cwd=cwd,
            stdin=subprocess.DEVNULL, text=True, errors="backslashreplace", start_new_session=True,
        )
    except FileNotFoundError:
        raise BashTaskError(
            f"bash task {task!r}: command not found: {argv[0]!r}; check the spelling, or add "
            "its directory to PATH (env=) or load its module", 127
        ) from None
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        if proc.poll() is None:  # interrupted (killed task): stop the whole process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()
    if proc.returncode != 0:
        tail = err.strip().splitlines()[-5:]
        hint = ""
        if proc.returncode == 127:
            hint = " (command not found: check the spelling, PATH, or load its module)"
        raise BashTaskError(
            f"bash task {task!r} exited with status {proc.returncode}{hint}"
            + (": " + " | ".join(tail) if tail else ""),
            proc.returncode,
        )
    return BashResult(proc.returncode, out, err)
