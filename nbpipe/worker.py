"""The worker-side wrapper: runs task items, captures their output, writes their results.

The runner submits :func:`run_items` to Dask with the task function and a list of
:class:`WorkItem` (one item, or a chunk of a ``map``). For every item the wrapper loads upstream
values from their result files, sets the task's environment variables, runs the function (or its
bash command) with stdout and stderr captured, writes the result atomically and returns a small
:class:`Outcome`. It never raises for a task's own failure: outcomes are explicit states.

Kills: threads cannot be stopped from outside, so :func:`interrupt` raises ``TaskKilled``
asynchronously in the thread running the item; that stops pure-Python code at once. Code blocked
in C does not see it, and the runner then restarts the worker process (a real kill).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import io
import os
import pickle
import queue
import signal
import socket
import stat
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import cloudpickle

from .bash import run_command
from .bookkeeping import environment
from .cells import cell_output
from .context import TaskContext, batch_job_id, stop_requested
from .context import _set as _set_context
from .crashes import Crash, Recorder, describe, read_crash, record_path
from .errors import (
    BashTaskError,
    OutputNotStored,
    Permanent,
    ResultCorrupt,
    ResultWriteError,
    TaskKilled,
    TaskTimedOut,
    UpstreamCorrupt,
)
from .policy import TIMED_OUT, TIMEOUT_GRACE, timeout_error
from .results import INLINE_SECONDS, Unwritten, prepare_result, read_result
from .shipping import carrying
from .walk import map_leaves

__all__ = ["NOT_RUN", "Done", "Outcome", "Unsettled", "Upstream", "WorkItem", "interrupt",
           "outcomes_of", "run_items"]

TAIL = 64 * 1024  # characters of stdout/stderr kept with an attempt
EVENT_LIMIT = 16 * 1024  # outcomes larger than this are gathered, not pushed as events
#: A chunk's finished item is pushed to the runner at most this long after it ends, whatever
#: the next items take (what a runner killed mid-chunk can lose: docs/reliability.md).
STREAM_SECONDS = 0.25
#: A Dask task of one item whose result file takes at least this many bytes returns its value
#: before the file is written: consumers start at once (on this worker or, with a copy of the
#: value, on another), and the item's outcome (success only once the file is written) follows
#: from this process's writer thread (:class:`_Writer`).
DEFER_BYTES = 16 << 20


NOT_RUN = "NOT_RUN"  # an outcome's state: a handed-ahead item whose upstream did not succeed


@dataclass(frozen=True)
class Upstream:
    """Placeholder in an item's arguments for the value of an upstream task.

    ``ahead`` marks an upstream task that was still running when the item was submitted
    (handed ahead): its value arrives in memory with the Dask task's inputs.
    """

    key: str
    path: str
    checksum: str
    output: str | None = None  # one entry of a dict result (a cell's output)
    data: bytes | None = None  # an inline result's bytes, sent along with the item
    ahead: bool = False


class Done:
    """What one Dask task of nbpipe returns: the outcomes of its items, and the values of those
    that succeeded.

    The values stay in the worker's memory while the runner holds the future (it releases it
    once the outcomes are recorded) or while handed-ahead consumers still need them: Dask then
    places those consumers next to the data and moves it worker to worker, and no consumer
    reads back a result file that was just written. The runner itself only ever fetches the
    outcomes (:func:`outcomes_of`).

    A Dask task whose result file is written after it returned (:data:`DEFER_BYTES`) returns a
    ``Done`` whose outcomes are not final until ``pending`` is set; ``origin`` is the address
    of the worker that ran it, whose writer thread pushes the final outcomes to the runner.
    """

    __slots__ = ("origin", "outcomes", "pending", "values")

    def __init__(self, outcomes: list[Outcome] | None, values: dict[str, Any],
                 pending: threading.Event | None = None, origin: str | None = None):
        self.outcomes = outcomes  # None: a copy made before they were final (see __reduce__)
        self.values = values
        self.pending = pending  # set once a deferred result file is written (outcomes final)
        self.origin = origin

    @property
    def final(self) -> bool:
        """Whether the outcomes held here are final (none held: a copy made before)."""
        return self.outcomes is not None and (self.pending is None or self.pending.is_set())

    def __reduce__(self) -> Any:
        # A copy (a consumer's input on another worker, a value spilled to disk) is made at
        # once, never waiting for a result file being written: its consumer starts while the
        # file is written. It carries the outcomes only when they are final already; otherwise
        # only the values, and the outcomes reach the runner from the producing worker alone
        # (its writer thread's event), so no copy can tell a success before the file exists.
        # (with the user modules this worker was given: the receiver may not know mylib.Point)
        return carrying(Done, (self.outcomes if self.final else None, self.values, None,
                               self.origin))


class Unsettled(NamedTuple):
    """What :func:`outcomes_of` gives for a Dask task whose outcomes are not final where it ran:
    its result file is still being written on ``origin`` (the worker that ran it), which pushes
    them when it is, or it read a copy made before that."""

    origin: str | None


def _sizeof_done(done: Done) -> int:
    from dask.sizeof import sizeof

    return 64 + sizeof(done.values)


def _register_sizeof() -> None:
    # Dask places a consumer on the worker that holds the most bytes of its inputs: it must
    # see the values' size, not the few bytes of the object that holds them.
    from dask.sizeof import sizeof

    sizeof.register(Done)(_sizeof_done)


_register_sizeof()


def as_done(key: str, value: Any) -> Done:
    """A computed Dask collection, as the input of the task it is an argument of."""
    return Done([], {key: value})


def outcomes_of(done: Done | list[Outcome]) -> list[Outcome] | Unsettled:
    """The outcomes of a finished Dask task, without its values (run where the task's result
    is held); :class:`Unsettled` when they are not final there. Never waits: a worker thread
    is not held while a result file is written."""
    if isinstance(done, Done):
        return done.outcomes if done.final else Unsettled(done.origin)  # type: ignore[return-value]
    return done


class _NotRun(Exception):
    """A handed-ahead item's upstream value is not among its inputs: the upstream failed."""


@dataclass
class WorkItem:
    """One task attempt to run."""

    key: str
    name: str
    label: str
    attempt: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    kind: str = "python"
    env: dict[str, str] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    inline: int = 0  # the largest result kept inline, if the task is quick (nbpipe.results)
    timeout: float | None = None  # seconds it may run (nbpipe.policy); enforced here
    # Fused into a chain with the next item of its Dask task, which alone reads its value: the
    # value leaves the worker's memory once that item ran (its result file stays).
    fused: bool = False


@dataclass
class Outcome:
    """What happened to one item. ``state`` is ``SUCCEEDED``, ``FAILED`` or ``KILLED``."""

    key: str
    attempt: int
    state: str
    start: float
    end: float
    worker: str | None
    hostname: str
    pid: int
    env_id: str
    env: dict[str, Any] | None = None
    result: tuple[str, str, int] | None = None
    data: bytes | None = None  # an inline result (see nbpipe.results)
    stdout: str = ""
    stderr: str = ""
    error: str | None = None
    traceback: str | None = None
    exception: bytes | None = None
    exit_code: int | None = None
    job_id: str | None = None
    failure: str | None = None  # kind of failure: exception, permanent, timeout, exit (policy)

    def fields(self) -> list[Any]:
        """The field values in order (compact to send; ``Outcome(*values)`` rebuilds it)."""
        return list(self.__dict__.values())


# ---------------------------------------------------------------------------------------------
# Output capture: one router per worker process sends each thread's writes to its own buffer.


def to_bytes(text: str) -> bytes:
    """``text`` as UTF-8 bytes, never failing: lone surrogates that stand for undecodable bytes
    (what ``os.listdir`` returns for a Latin-1 file name) become those bytes again, and any
    other lone surrogate is escaped (``\\ud800``)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace")


def shown(data: bytes) -> str:
    """Captured output as text to show and store: valid UTF-8 as is, other bytes escaped
    (``\\xe9``). The result encodes to UTF-8 without error, so it can travel to the runner
    (msgpack) and into SQLite."""
    return data.decode("utf-8", "backslashreplace")


def safe_text(text: str | None) -> str | None:
    """``text`` (an error message, a traceback) with lone surrogates escaped."""
    return None if text is None else shown(to_bytes(text))


class _Capture(io.BytesIO):
    """One task's output: bytes until shown (see :func:`shown`)."""


class _Router(io.TextIOBase):
    def __init__(self, fallback: Any):
        self._fallback = fallback
        self._local = threading.local()
        self.buffer = _ByteRouter(self)  # sys.stdout.buffer.write(b"...") is captured too

    def capture(self, buffer: _Capture | None, spill: Any = None) -> None:
        self._local.buffer = buffer
        self._local.spill = spill  # a copy on disk that outlives the process (nbpipe.crashes)

    def current(self) -> _Capture | None:
        return getattr(self._local, "buffer", None)

    def write(self, text: str) -> int:
        buffer = self.current()
        if buffer is None:
            try:
                return self._fallback.write(text)
            except UnicodeEncodeError:  # the worker's own stream cannot take it: escape it
                return self._fallback.write(safe_text(text))
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        data = to_bytes(text)
        spill = self._local.spill
        if spill is not None:
            with contextlib.suppress(OSError):  # a full disk must not fail the task
                spill.write(data, buffer)
        buffer.write(data)
        return len(text)

    def flush(self) -> None:
        if self.current() is None:
            self._fallback.flush()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return "surrogateescape"


class _ByteRouter(io.RawIOBase):
    """``sys.stdout.buffer`` while tasks run: bytes go to the task's capture unchanged."""

    def __init__(self, router: _Router):
        self._router = router

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        buffer = self._router.current()
        if buffer is None:
            fallback = getattr(self._router._fallback, "buffer", None)
            if fallback is None:
                return self._router._fallback.write(shown(bytes(data)))
            return fallback.write(data)
        return buffer.write(bytes(data))

    def flush(self) -> None:
        if self._router.current() is None:
            with contextlib.suppress(Exception):
                self._router._fallback.flush()


_install_lock = threading.Lock()


def _routers() -> tuple[_Router, _Router]:
    with _install_lock:
        if not isinstance(sys.stdout, _Router):
            sys.stdout = _Router(sys.stdout)
        if not isinstance(sys.stderr, _Router):
            sys.stderr = _Router(sys.stderr)
    return sys.stdout, sys.stderr  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Kills and termination notices


_running: dict[str, int] = {}  # key -> thread id of the thread running it
_killed: set[str] = set()
_env_lock = threading.Lock()
_sent_envs: set[tuple[str, str]] = set()


def interrupt(key: str, within: str | None = None) -> bool:
    """Stop task ``key`` on this worker: raise TaskKilled in its thread. True if it was running.

    With ``within`` (a Dask key), only its run inside that Dask task is stopped or skipped: the
    task sent again later (in another Dask task) runs.
    """
    _killed.add(key if within is None else f"{key}@{within}")
    thread_id = _running.get(key)
    if thread_id is None:
        return False
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(TaskKilled)
    )
    return True


def skip_attempts(attempts: list[tuple[str, str]]) -> None:
    """Skip (or stop, when running) these (task key, Dask key) on this worker (:func:`interrupt`)."""
    for key, within in attempts:
        interrupt(key, within)


class _Watchdog:
    """The timeout of one item: at the deadline, raise TaskTimedOut in its thread; if the item
    is still running :data:`~nbpipe.policy.TIMEOUT_GRACE` seconds later (blocked in C code,
    a sleep in a C library), note the timeout in the worker's crash record and end the process:
    Dask starts a new worker, and the item's outcome is read from the record
    (:mod:`nbpipe.crashes`): a timed-out attempt, not a lost worker."""

    def __init__(self, item: WorkItem, thread_id: int, recorder: Recorder | None):
        self.item, self.thread_id, self.recorder = item, thread_id, recorder
        self.fired = False
        self.done = threading.Event()
        self.lock = threading.Lock()  # after stop() returns, nothing fires any more
        self.thread = threading.Thread(target=self._watch, daemon=True,
                                       name=f"nbpipe-timeout-{item.key[:8]}")
        self.thread.start()

    def _watch(self) -> None:
        assert self.item.timeout is not None
        if self.done.wait(self.item.timeout):
            return
        with self.lock:
            if self.done.is_set():
                return
            self.fired = True
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(self.thread_id), ctypes.py_object(TaskTimedOut))
        if self.done.wait(TIMEOUT_GRACE):
            return
        with self.lock:
            if self.done.is_set():
                return
            if self.recorder is not None:  # only this record says why: the rest is lost work
                self.recorder.line(f"timeout {self.item.key} {self.item.attempt} "
                                   f"{self.item.timeout!r}")
            from .crashes import real_exit

            real_exit(124)  # (the code `timeout` uses) the only way to stop C code in a thread

    def stop(self) -> None:
        with self.lock:
            self.done.set()


def install_termination_notice() -> None:
    """Set ``context().should_stop()`` when this process gets SIGTERM; keep the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if getattr(previous, "__nbpipe__", False):
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        stop_requested().set()
        if callable(previous):
            previous(signum, frame)

    on_sigterm.__nbpipe__ = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, on_sigterm)


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except Exception:
        return None


def _dask_key() -> str | None:
    try:
        from distributed import get_worker

        key = get_worker().get_current_task()
        return key if isinstance(key, str) else str(key)
    except Exception:  # not on a Dask worker
        return None


def _notify_start(topic: str | None, keys: list[str], address: str | None) -> None:
    if not topic:
        return
    try:
        from distributed import get_worker

        worker = get_worker()
        memory = getattr(getattr(worker, "memory_manager", None), "memory_limit", None)
        worker.log_event(topic, {"keys": keys, "worker": address, "time": time.time(),
                                 "memory_limit": memory, "job_id": batch_job_id(),
                                 "name": str(worker.name)})
    except Exception:  # not on a Dask worker (tests calling run_items directly)
        pass


# ---------------------------------------------------------------------------------------------


_OWN_FILES = (__file__, __file__.replace("worker.py", "cells.py"), __file__.replace("worker.py", "bash.py"),
              __file__.replace("worker.py", "shipping.py"))  # (its folder hint wraps tasks)


def _user_frames(tb: Any) -> Any:
    """Skip nbpipe's own frames at the top of a traceback: users see their code first."""
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename in _OWN_FILES:
        tb = tb.tb_next
    return tb


def _resolve(value: Any, cache: dict[str, Any]) -> Any:
    def read(up: Upstream) -> Any:
        if up.key not in cache:
            if up.ahead:  # handed ahead, and its upstream did not succeed
                raise _NotRun(up.key)
            try:
                cache[up.key] = read_result(up.path, up.checksum, up.data)
            except ResultCorrupt as exc:  # the runner computes it again, then runs this again
                raise UpstreamCorrupt(up.key, f"upstream task {up.key[:12]}: {exc}") from None
        return cache[up.key] if up.output is None else cell_output(cache[up.key], up.output)

    # upstream values sit where the task results were (the one walk of nbpipe.walk)
    return map_leaves(value, lambda v: isinstance(v, Upstream), read)


def _call(fn: Any, item: WorkItem, values: dict[str, Any]) -> Any:
    try:
        args = _resolve(item.args, values)
        kwargs = _resolve(item.kwargs, values)
    except OutputNotStored as exc:  # say which task needed it: the message is all users see
        raise OutputNotStored(f"task {item.label!r} cannot run: {exc}") from None
    if item.kind == "bash":
        command = fn(*args, **kwargs)
        result = run_command(command, task=item.label, env=item.env)
        sys.stdout.write(result.stdout)  # (undecodable bytes arrive escaped)
        sys.stderr.write(result.stderr)
        return result.stdout
    if not item.env:
        return fn(*args, **kwargs)
    with _env_lock:  # os.environ is per process: tasks with env= take turns on a worker
        saved = {k: os.environ.get(k) for k in item.env}
        os.environ.update(item.env)
        try:
            return fn(*args, **kwargs)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


class _Where(NamedTuple):
    """Where a chunk of items runs (looked up once per chunk, not per item)."""

    address: str | None
    hostname: str
    pid: int
    job_id: str | None
    task: str | None = None  # the Dask key (an item taken back from it is skipped: interrupt)


_DISK_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
              errno.EFBIG: "the file-size limit (ulimit -f) is exceeded"}


def _write(store_dir: str, item: WorkItem, value: Any, inline: int,
           defer: list[Unwritten] | None = None) -> Any:
    """Write a task's result (file or inline bytes); a full disk fails the task with a message
    that says so. With ``defer``, a file of at least :data:`DEFER_BYTES` is not written but
    appended to it, and the record is None (the caller writes it: :class:`_Writer`)."""
    try:
        prepared = prepare_result(store_dir, item.key, value, inline=inline)
    except (TypeError, AttributeError, pickle.PicklingError, RecursionError) as exc:
        raise TypeError(
            f"the return value of task {item.label!r} (a {type(value).__name__}) cannot be "
            f"pickled ({exc}); return plain data (numbers, strings, lists, dicts, arrays) and "
            "build such objects where they are used"
        ) from None
    if not isinstance(prepared, Unwritten):
        return prepared
    if defer is not None and prepared.result.size >= DEFER_BYTES:
        defer.append(prepared)
        return None, None
    try:
        return prepared.write(), None
    except OSError as exc:
        raise _write_failed(store_dir, item, exc) from None


def _write_failed(store_dir: str, item: WorkItem, exc: OSError) -> ResultWriteError:
    why = _DISK_FULL.get(exc.errno or 0, exc.strerror or str(exc))
    return ResultWriteError(
        f"task {item.label!r} finished but its result could not be written to "
        f"{store_dir}/results: {why} ([Errno {exc.errno}] {exc.strerror}); free space (or "
        "raise the limit), then retry the task; the store is unchanged"
    )


def _run_one(
    fn: Any, item: WorkItem, store_dir: str, pipeline: str, topic: str | None,
    where: _Where, values: dict[str, Any], recorder: Recorder | None = None,
    defer: list[Unwritten] | None = None,
) -> Outcome:
    out_router, err_router = _routers()
    out, err = _Capture(), _Capture()
    address = where.address
    outcome = Outcome(
        key=item.key, attempt=item.attempt, state="FAILED", start=time.time(), end=0.0,
        worker=address, hostname=where.hostname, pid=where.pid, env_id="", job_id=where.job_id,
    )
    ctx = TaskContext(item.name, item.key, item.label, item.attempt, pipeline, address,
                      where.job_id)
    out_router.capture(out, recorder.stdout if recorder is not None else None)
    err_router.capture(err, recorder.stderr if recorder is not None else None)
    _set_context(ctx)
    try:
        try:
            if item.key in _killed or f"{item.key}@{where.task}" in _killed:
                raise TaskKilled(f"task {item.label!r} was killed")
            before = _stats(item.outputs)  # outputs there already: each must be rewritten
            _running[item.key] = threading.get_ident()
            watchdog = (_Watchdog(item, threading.get_ident(), recorder)
                        if item.timeout is not None else None)
            try:
                value = _call(fn, item, values)
            finally:
                _running.pop(item.key, None)
                if watchdog is not None:
                    watchdog.stop()
            values[item.key] = value  # later items of the chunk and handed-ahead consumers
            missing = [p for p in item.outputs if not os.path.exists(p)]
            if missing:
                raise FileNotFoundError(
                    f"task {item.label!r} finished without writing its declared output "
                    f"file(s) {', '.join(missing)}"
                )
            stale = [p for p, seen in before.items() if _stats([p]).get(p) == seen]
            if stale:  # depio's check: an Out that existed before and is untouched is stale
                raise FileExistsError(
                    f"task {item.label!r} finished without updating its declared output "
                    f"file(s) {', '.join(stale)}, which existed before it ran; write them in the "
                    "task (or remove them first), or set trust_existing=True to adopt existing "
                    "files instead of running"
                )
            quick = time.time() - outcome.start < INLINE_SECONDS
            result, outcome.data = _write(store_dir, item, value, item.inline if quick else 0,
                                          defer)
            outcome.result = None if result is None else tuple(result)  # type: ignore[assignment]
            outcome.state = "SUCCEEDED"  # (a deferred file: once written, see _Writer)
        except TaskTimedOut:
            _timed_out(outcome, item)
        except TaskKilled:
            outcome.state = "KILLED"
            outcome.error = f"task {item.label!r} was killed on request"
        except _NotRun as exc:
            outcome.state = NOT_RUN
            outcome.error = f"task {item.label!r} did not run: upstream {exc.args[0][:12]} failed"
        except SystemExit as exc:  # sys.exit() in a worker thread ends the task, not the process
            code = exc.code
            outcome.exit_code = code if isinstance(code, int) else (0 if code is None else 1)
            outcome.error = (f"task {item.label!r} exited with code {outcome.exit_code} "
                             f"(sys.exit({code!r}) in the task)")
            outcome.failure = "exit"
            outcome.traceback = "".join(
                traceback.format_exception(type(exc), exc, _user_frames(exc.__traceback__)))
        except BaseException as exc:  # noqa: BLE001 - every failure becomes an outcome
            _failed(outcome, exc)
    except TaskTimedOut:  # the async exception arrived just after the task returned
        _timed_out(outcome, item)
    except TaskKilled:  # the async exception arrived just after the task returned
        outcome.state = "KILLED"
        outcome.error = f"task {item.label!r} was killed on request"
    finally:
        _set_context(None)
        out_router.capture(None)
        err_router.capture(None)
        _killed.discard(item.key)
        _killed.discard(f"{item.key}@{where.task}")
    outcome.end = time.time()
    # After the task: the packages it imported itself are part of what ran.
    outcome.env_id, env = environment()
    if (topic, outcome.env_id) not in _sent_envs:
        _sent_envs.add((topic, outcome.env_id))
        outcome.env = env
    outcome.stdout = shown(out.getvalue())[-TAIL:]
    outcome.stderr = shown(err.getvalue())[-TAIL:]
    # Messages can carry lone surrogates too (a file name in an exception): escaped, or the
    # outcome could not travel to the runner nor be stored.
    outcome.error, outcome.traceback = safe_text(outcome.error), safe_text(outcome.traceback)
    return outcome


def _failed(outcome: Outcome, exc: BaseException) -> None:
    """Make ``outcome`` the failure ``exc``."""
    outcome.state = "FAILED"
    outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.traceback = "".join(
        traceback.format_exception(type(exc), exc, _user_frames(exc.__traceback__))
    )
    outcome.failure = "permanent" if isinstance(exc, Permanent) else "exception"
    if isinstance(exc, BashTaskError):
        outcome.exit_code = exc.exit_code
        outcome.failure = "exit"
    try:
        outcome.exception = cloudpickle.dumps(exc)
    except Exception:
        outcome.exception = None


def _stats(paths: Any) -> dict[str, tuple[int, int, int]]:
    """(inode, size, modification time in ns) of the regular files among ``paths`` (a folder's
    own times do not change when the files in it are rewritten: folders are not checked)."""
    out = {}
    for p in paths:
        with contextlib.suppress(OSError):
            st = os.stat(p)
            if stat.S_ISREG(st.st_mode):
                out[p] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def _timed_out(outcome: Outcome, item: WorkItem) -> None:
    outcome.state, outcome.failure = TIMED_OUT, "timeout"
    outcome.error = timeout_error(item.label, item.timeout or 0.0)
    outcome.result = outcome.data = None


def _memory_limit() -> int | None:
    try:
        from distributed import get_worker

        return getattr(get_worker().memory_manager, "memory_limit", None)
    except Exception:  # not on a Dask worker
        return None


def _crashed(item: WorkItem, crash: Crash) -> Outcome:
    """The failed attempt of an item whose worker process died while running it."""
    header = crash.header
    env_id, env = environment()
    if crash.timeout is not None:  # ended by its watchdog: blocked past its timeout
        return Outcome(
            key=item.key, attempt=item.attempt, state=TIMED_OUT, start=header.get("start", 0.0),
            end=time.time(), worker=header.get("worker"), hostname=header.get("host", ""),
            pid=header.get("pid", 0), env_id=env_id, env=env, stdout=crash.stdout[-TAIL:],
            stderr=crash.stderr[-TAIL:],
            error=timeout_error(item.label, crash.timeout) + " (its worker process was ended: "
                  "the task did not stop on its own, e.g. blocked in C code)",
            exit_code=None, job_id=batch_job_id(), failure="timeout")
    return Outcome(
        key=item.key, attempt=item.attempt, state="FAILED", start=header.get("start", 0.0),
        end=time.time(), worker=header.get("worker"), hostname=header.get("host", ""),
        pid=header.get("pid", 0), env_id=env_id, env=env, stdout=crash.stdout[-TAIL:],
        stderr=crash.stderr[-TAIL:], error=describe(item.label, crash),
        traceback=crash.fault or None, exit_code=crash.exit_code, job_id=batch_job_id(),
        failure="exit",
    )


@functools.lru_cache(maxsize=64)
def _function(blob: bytes) -> Any:
    """A pickled task function, unpickled once per worker process."""
    return cloudpickle.loads(blob)


def run_items(
    items: list[WorkItem] | bytes, inputs: list[Done] | None = None, *, fn: Any,
    store_dir: str, pipeline: str, topic: str | None = None,
) -> Done:
    """Run ``items`` (or their pickle) one after another with ``fn``; return one
    :class:`Outcome` per item, and the values of those that succeeded (:class:`Done`).

    ``inputs`` are the results of upstream Dask tasks the items were handed ahead of: their
    values are used as they are, in memory (see :class:`Upstream`).

    Outcomes are pushed to the runner as they come, each at most :data:`STREAM_SECONDS` after
    its item ended (not only when the whole chunk of a ``map`` ends, and not only when the next
    item ends): a runner killed in the middle of a long chunk has recorded all but the last
    fraction of a second of it.
    """
    if isinstance(items, bytes):
        items = cloudpickle.loads(items)
    assert isinstance(items, list)
    if isinstance(fn, bytes):
        fn = _function(fn)
    address = _worker_address()
    values: dict[str, Any] = {}
    for done in inputs or ():
        values.update(done.values)
    _notify_start(topic, [item.key for item in items], address)
    where = _Where(address, socket.gethostname(), os.getpid(), batch_job_id(), _dask_key())
    first = items[0]
    # Dask runs a task again when the worker process running it died: the record that process
    # left tells which item ended it, and that item becomes a failed attempt instead of
    # killing this worker too (nbpipe.crashes).
    crash = read_crash(store_dir, first.key, first.attempt)
    try:
        recorder: Recorder | None = Recorder(
            record_path(store_dir, first.key, first.attempt),
            {"pid": where.pid, "host": where.hostname, "worker": address,
             "memory_limit": _memory_limit(), "start": time.time()})
    except OSError:  # (the result write says what is wrong with the store; tasks still run)
        recorder = None
    # The first snapshot of a worker's environment (packages, a git call) can take a while:
    # taken before the first item ends, not between its end and the push of its outcome.
    environment()
    outcomes: list[Outcome] = []
    stream = _Stream.start(topic, outcomes) if topic and len(items) > 1 else None
    # One item on a Dask worker: a large result file is written after the value is returned
    # (its consumers need not wait for the disk); a chunk or a fused chain writes in turn.
    defer: list[Unwritten] | None = [] if len(items) == 1 and where.task is not None else None
    try:
        for number, item in enumerate(items, 1):
            if crash is not None and (item.key, item.attempt) == (crash.key, crash.attempt):
                outcomes.append(_crashed(item, crash))
            else:
                if recorder is not None:
                    recorder.start(item.key, item.attempt)
                outcomes.append(_run_one(fn, item, store_dir, pipeline, topic, where, values,
                                         recorder, defer))
                if recorder is not None:
                    recorder.end(item.key, item.attempt)
            if number > 1 and items[number - 2].fused:  # read by this item only: let it go
                values.pop(items[number - 2].key, None)
            if stream is not None and number < len(items):
                stream.item_done()
    finally:
        if recorder is not None:
            recorder.close()
    own = {o.key for o in outcomes if o.state == "SUCCEEDED"}
    done = Done(outcomes, {k: v for k, v in values.items() if k in own})
    if defer and outcomes[0].state == "SUCCEEDED":
        done.pending, done.origin = threading.Event(), address
        _Writer.queue(_Deferred(defer[0], items[0], outcomes[0], store_dir, topic, done.pending,
                                _current_worker() if topic else None, where.task))
    elif topic:  # pushed to the runner at once: no gather round trip per task
        _push(topic, stream.finish() if stream is not None else outcomes, partial=False)
    return done


class _Deferred(NamedTuple):
    """A result file to write after its Dask task returned the value, and whom to tell."""

    file: Unwritten
    item: WorkItem
    outcome: Outcome
    store_dir: str
    topic: str | None
    written: threading.Event
    worker: Any  # the Dask worker (its event loop pushes the outcome), None: no push
    dask_key: str | None


class _Writer:
    """The thread of a worker process that writes deferred result files, one after another (one
    stream to the disk), then completes each outcome and pushes it to the runner.

    The task counts as done only when its outcome arrives, after the file is written: a worker
    that dies in between loses the attempt (it runs again; the runner sees that worker gone,
    :class:`Unsettled`); a runner that dies in between finds the file on its next run and adopts
    it once its checksum verifies. Copies of the value sent to consumers meanwhile carry no
    outcome (:meth:`Done.__reduce__`)."""

    _jobs: queue.SimpleQueue[_Deferred] | None = None
    _lock = threading.Lock()

    @classmethod
    def queue(cls, job: _Deferred) -> None:
        """Write ``job``'s file in the writer thread (started on first use)."""
        with cls._lock:
            if cls._jobs is None:
                cls._jobs = queue.SimpleQueue()
                threading.Thread(target=cls._run, args=(cls._jobs,), daemon=True,
                                 name="nbpipe-result-writer").start()
        cls._jobs.put(job)

    @staticmethod
    def _run(jobs: queue.SimpleQueue[_Deferred]) -> None:
        _lower_priority()
        while True:
            job = jobs.get()
            with contextlib.suppress(Exception):  # (the outcome says what failed; go on)
                _write_deferred(job)


#: The niceness added to the writer thread: the tasks' own work (and the worker's transfers of
#: values to consumers) comes first, the copy into the page cache fills the CPU they leave.
WRITER_NICENESS = 10


def _lower_priority() -> None:
    """Lower this thread's CPU priority by :data:`WRITER_NICENESS` (Linux schedules threads
    each with its own niceness; elsewhere, or when not allowed, it stays as it is)."""
    with contextlib.suppress(AttributeError, OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + WRITER_NICENESS)


def _write_deferred(job: _Deferred) -> None:
    """Write a deferred result file; complete its outcome (FAILED when the write fails); tell
    the waiters and the runner."""
    outcome = job.outcome
    try:
        try:
            outcome.result = tuple(job.file.write())  # type: ignore[assignment]
        except OSError as exc:
            raise _write_failed(job.store_dir, job.item, exc) from None
    except BaseException as exc:  # noqa: BLE001 - every failure becomes an outcome
        _failed(outcome, exc)
        outcome.error, outcome.traceback = safe_text(outcome.error), safe_text(outcome.traceback)
    finally:
        outcome.end = time.time()
        job.written.set()  # (whatever happened: nothing waits forever)
    if job.topic and job.worker is not None:  # through the worker's event loop, as _Stream does
        with contextlib.suppress(Exception):  # (a closed worker: the task is lost, runs again)
            job.worker.loop.add_callback(_push, job.topic, [outcome], partial=False,
                                         worker=job.worker, dask_key=job.dask_key, whole=True)


def _current_worker() -> Any:
    """The Dask worker running this task (None off a worker)."""
    try:
        from distributed import get_worker

        return get_worker()
    except Exception:
        return None


class _Stream:
    """Pushes a chunk's finished outcomes to the runner from the worker's event loop while the
    chunk goes on: each at most :data:`STREAM_SECONDS` after its item ended, also when the next
    item runs long (the item's thread is busy then; the event loop is not).

    Every push goes through the event loop, in order: partial ones from a timer, the last one
    (``finish``) queued behind them by ``log_event`` from the item's thread."""

    def __init__(self, worker: Any, topic: str, dask_key: Any, outcomes: list[Outcome]):
        self.worker, self.topic, self.dask_key, self.outcomes = worker, topic, dask_key, outcomes
        self.lock = threading.Lock()
        self.sent = 0  # outcomes[:sent] were pushed
        self.last = time.monotonic()  # of the last push
        self.scheduled = self.closed = False

    @classmethod
    def start(cls, topic: str, outcomes: list[Outcome]) -> _Stream | None:
        """A stream for the current Dask task, or None off a Dask worker (nothing to push to)."""
        try:
            from distributed import get_worker

            worker = get_worker()
            return cls(worker, topic, worker.get_current_task(), outcomes)
        except Exception:
            return None

    def item_done(self) -> None:
        """An item ended (the item's thread): push it, and any before it, within the bound."""
        with self.lock:
            if self.scheduled or self.closed:
                return
            self.scheduled = True
            delay = max(0.0, self.last + STREAM_SECONDS - time.monotonic())
        loop = self.worker.loop
        loop.add_callback(loop.call_later, delay, self._flush)  # call_later: the loop's thread

    def _flush(self) -> None:
        with self.lock:
            self.scheduled = False
            if self.closed or self.sent == len(self.outcomes):
                return
            if _push(self.topic, self.outcomes[self.sent:], partial=True, worker=self.worker,
                     dask_key=self.dask_key):
                self.sent = len(self.outcomes)
            self.last = time.monotonic()

    def finish(self) -> list[Outcome]:
        """The outcomes not pushed yet; no partial push follows."""
        with self.lock:
            self.closed = True
            return self.outcomes[self.sent:]


def _push(topic: str, outcomes: list[Outcome], *, partial: bool, worker: Any = None,
          dask_key: Any = None, whole: bool = False) -> bool:
    """Send outcomes to the runner as an event; False when they were not sent (too large for an
    event while the chunk goes on, or not on a Dask worker: the runner gathers the return value).
    ``worker`` and ``dask_key`` are given off the item's thread (the event loop's). ``whole``:
    the outcomes travel in the event whatever their size (a deferred write's: copies of its
    value made before the file was written do not hold them, so a gather could not read them)."""
    if worker is None:
        try:
            from distributed import get_worker

            worker = get_worker()
            dask_key = worker.get_current_task()
        except Exception:
            return False
    size = sum(len(o.stdout) + len(o.stderr) + len(o.traceback or "")
               + len(o.exception or b"") + len(o.data or b"") for o in outcomes)
    if size > EVENT_LIMIT and partial:
        return False  # sent with the rest of the chunk (or gathered at its end)
    # Large outcomes are fetched by the runner (the scheduler keeps a log of events).
    payload = [o.fields() for o in outcomes] if size <= EVENT_LIMIT or whole else None
    try:
        worker.log_event(topic, {"dask_key": dask_key, "outcomes": payload,
                                 "partial": partial})
    except Exception:
        return False
    return True
