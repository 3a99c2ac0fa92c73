"""Tasks that end their own process: what the worker leaves behind, and the attempt it becomes.

A task can end the worker process running it: ``os._exit(3)``, a segfault in C code. The
process is gone, and with it the task's captured output; Dask would then run the task again
on another worker, which it kills too, and so on until Dask gives up
(``distributed.scheduler.allowed-failures``) with a ``KilledWorker`` that says nothing of why.

So while a Dask task of nbpipe runs, its worker keeps a small *record* on disk, in
``<store>/running/``: who runs it (pid, host, memory limit), a line when each of its items
starts and ends, the exit code given to ``os._exit``, the traceback Python's ``faulthandler``
writes on a fatal signal, and (in files beside it) what the item printed so far. A normal end
removes the record. When Dask runs the same task again after the process died, the worker
finds the record and, instead of running the item that was running, returns its outcome: one
failed attempt with the exit code, the output and the reason -- so one worker dies, not four,
and nbpipe's own ``retries`` decide whether it runs again.

Only evidence makes a crash: an exit code given to ``os._exit``, or a fatal signal's report. A
worker killed without a word (``kill -9``, the out-of-memory killer, a node lost) or shut down in
order (its records are removed at a normal exit) is a lost worker, as before: Dask runs its tasks
again elsewhere at no attempt's cost, and a task that keeps killing its workers ends with
Dask's ``KilledWorker``, which the runner explains (memory).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

__all__ = ["Crash", "Recorder", "alive_here", "describe", "discard", "read_crash", "record_path"]

SPILL_LIMIT = 256 * 1024  # bytes of output kept on disk per stream before it is cut to its tail
_SIGNALS = {signal.SIGSEGV: "a crash in C code (segmentation fault)",
            signal.SIGBUS: "a crash in C code (bus error)", signal.SIGABRT: "C code aborted"}
_FAULTS = {"Segmentation fault": signal.SIGSEGV, "Bus error": signal.SIGBUS,
           "Floating-point exception": signal.SIGFPE, "Illegal instruction": signal.SIGILL,
           "Aborted": signal.SIGABRT}


def record_path(store_dir: str | os.PathLike[str], key: str, attempt: int) -> Path:
    """The record of the Dask task whose first item is attempt ``attempt`` of task ``key``."""
    return Path(store_dir) / "running" / f"{key}-{attempt}"


# -- the worker side ---------------------------------------------------------------------------

_live: dict[int, Recorder] = {}  # open records of this process, by id
_live_lock = threading.Lock()
real_exit = os._exit
_installed = False


def _exit_recording(code: int) -> None:
    """``os._exit`` on a worker: note the code in the open records, then exit."""
    for recorder in list(_live.values()):
        if recorder.pid == os.getpid():  # not in a child forked by the task (multiprocessing)
            recorder.line(f"exit {int(code)}")
    real_exit(code)


def _clean_exit() -> None:
    """The process ends normally (a worker shut down): the tasks it ran move elsewhere."""
    for recorder in list(_live.values()):
        if recorder.pid == os.getpid():
            recorder.close(remove=True)


def _install() -> None:
    global _installed
    if _installed:
        return
    import atexit

    # The only way to learn the code a task passes to os._exit; Python runs nothing else then.
    os._exit = _exit_recording
    atexit.register(_clean_exit)
    _installed = True


def _close(fd: int | None, path: Path, remove: bool) -> None:
    """Close ``fd``, a file of a record, and with ``remove`` delete ``path`` too (the one way a
    record and its output files end). A file never opened was never created: nothing to do."""
    if fd is not None:
        os.close(fd)
        if remove:
            with contextlib.suppress(OSError):
                path.unlink()


class _Spill:
    """One output stream of the running item, on disk as it is written (created on the first
    write: most tasks print nothing)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None
        self.size = 0

    def write(self, data: bytes, written: Any) -> None:
        """Append ``data``; ``written`` (bytes, a BytesIO) holds what the item wrote before."""
        if self.fd is None:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        if self.size + len(data) > SPILL_LIMIT:  # keep the tail only, like the attempt's record
            data = (written.getvalue() + data)[-SPILL_LIMIT // 2:]
            os.ftruncate(self.fd, 0)
            os.lseek(self.fd, 0, os.SEEK_SET)
            self.size = 0
        os.write(self.fd, data)
        self.size += len(data)

    def reset(self) -> None:
        if self.fd is not None and self.size:
            os.ftruncate(self.fd, 0)
            os.lseek(self.fd, 0, os.SEEK_SET)
            self.size = 0

    def close(self, remove: bool) -> None:
        _close(self.fd, self.path, remove)
        self.fd = None


class Recorder:
    """The record of one Dask task of nbpipe while it runs on this worker (see the module)."""

    def __init__(self, path: Path, header: dict[str, Any]):
        _install()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        self.pid = os.getpid()
        self.fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND,
                                      0o600)
        self.stdout = _Spill(path.with_name(path.name + ".out"))
        self.stderr = _Spill(path.with_name(path.name + ".err"))
        self.line(json.dumps(header))
        self._faults = not faulthandler.is_enabled()
        if self._faults:  # a fatal signal writes the Python traceback into the record
            faulthandler.enable(file=self.fd, all_threads=False)
        with _live_lock:
            _live[id(self)] = self

    def line(self, text: str) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.fd, (text + "\n").encode())

    def start(self, key: str, attempt: int) -> None:
        self.stdout.reset()
        self.stderr.reset()
        self.line(f"start {key} {attempt}")

    def end(self, key: str, attempt: int) -> None:
        self.line(f"end {key} {attempt}")

    def close(self, remove: bool = True) -> None:
        with _live_lock:
            if _live.pop(id(self), None) is None:
                return
        if self._faults:
            faulthandler.disable()
        self.stdout.close(remove)
        self.stderr.close(remove)
        _close(self.fd, self.path, remove)
        self.fd = None


# -- reading a record left behind --------------------------------------------------------------


def discard(store_dir: str | os.PathLike[str], key: str, attempt: int) -> None:
    """Remove a record and its output files (a task killed on request: no crash to tell)."""
    path = record_path(store_dir, key, attempt)
    for p in (path, path.with_name(path.name + ".out"), path.with_name(path.name + ".err")):
        with contextlib.suppress(OSError):
            p.unlink()


@dataclass
class Crash:
    """What a record left by a dead worker process says about the item that was running."""

    key: str
    attempt: int
    exit_code: int | None  # os._exit's code; -N for signal N; None when nothing said
    fault: str  # faulthandler's report (the traceback at the fatal signal), or ""
    stdout: str
    stderr: str
    header: dict[str, Any]
    timeout: float | None = None  # the item's timeout, when its watchdog ended the process


def alive_here(header: dict[str, Any]) -> bool:
    """Whether the process that wrote a record still runs (on this host): not a crash.

    A killed process whose parent died too can stay a zombie for a while (re-parented to an init
    that reaps late): it runs no more. A process started after the record is another one that
    got the same pid."""
    if header.get("host") != socket.gethostname():
        return False
    try:
        pid = int(header.get("pid", 0))
        if pid <= 0:
            return False
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        start = header.get("start")
        return not (isinstance(start, (int, float)) and proc.create_time() > start + 1)
    except (psutil.NoSuchProcess, ValueError, TypeError):
        return False
    except psutil.AccessDenied:  # another user's process: it runs
        return True


def read_crash(store_dir: str | os.PathLike[str], key: str, attempt: int, *,
               remove: bool = True) -> Crash | None:
    """The crash a record shows, or None (no record, its process alive, or no item running)."""
    path = record_path(store_dir, key, attempt)
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    lines = text.splitlines()
    try:
        header = json.loads(lines[0])
    except (IndexError, ValueError):
        header = {}
    if alive_here(header):
        return None
    running: tuple[str, int] | None = None
    exit_code: int | None = None
    timeout: float | None = None
    fault: list[str] = []
    for line in lines[1:]:
        word, _, rest = line.partition(" ")
        if word == "start" and rest.rpartition(" ")[2].isdigit():
            name, _, number = rest.rpartition(" ")
            running = (name, int(number))
        elif word == "end":
            running = None
        elif word == "exit" and rest.lstrip("-").isdigit():
            exit_code = int(rest)
        elif word == "timeout" and running is not None and rest.startswith(running[0] + " "):
            with contextlib.suppress(ValueError):
                timeout = float(rest.rpartition(" ")[2])
        else:
            fault.append(line)
    outputs = []
    for suffix in (".out", ".err"):
        spill = path.with_name(path.name + suffix)
        try:
            outputs.append(spill.read_text(errors="replace"))
        except OSError:
            outputs.append("")
    if remove:
        discard(store_dir, key, attempt)
    if running is None:
        return None
    report = "\n".join(fault).strip()
    if exit_code is None:
        for name, number in _FAULTS.items():
            if f"Fatal Python error: {name}" in report:
                exit_code = -int(number)
                break
    if timeout is not None:  # its timeout's watchdog ended the process (nbpipe.worker)
        return Crash(running[0], running[1], 124, report, outputs[0], outputs[1], header, timeout)
    if exit_code is None:
        # Killed without a word (SIGKILL: `kill -9`, the out-of-memory killer, a node lost):
        # nothing says the task did it, so Dask runs it again elsewhere, as it always has.
        return None
    return Crash(running[0], running[1], exit_code, report, outputs[0], outputs[1], header)


def describe(label: str, crash: Crash) -> str:
    """The error of a task that ended its worker process (``crash.exit_code`` is known)."""
    code = crash.exit_code
    if code is not None and code >= 0:
        return (f"task {label!r} ended its worker process: the process exited with code {code} "
                "(os._exit() or exit() in the task or in C code it called)")
    number = -(code or 0)
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = "unknown signal"
    return (f"task {label!r} ended its worker process: the process was killed by signal "
            f"{number} ({name}, {_SIGNALS.get(number, 'a crash in C code')}); its traceback is "
            "in `nbpipe logs`")
