"""Exception types: one per kind of mistake, each message saying what to do."""

from __future__ import annotations

import sqlite3


class NbpipeError(Exception):
    """Base class of every error nbpipe raises on purpose."""


class TaskDefinitionError(NbpipeError, TypeError):
    """A task was declared or called with options or arguments that cannot work."""


class UnhashableValue(NbpipeError, TypeError):
    """A value that enters a task's identity cannot be hashed deterministically.

    The message names the task and the argument (or global) and how to fix it.
    """


class CycleError(NbpipeError):
    """The tasks' dependencies form a cycle."""


class MissingInputError(NbpipeError, FileNotFoundError):
    """A declared input file neither exists nor is produced by any task."""


class TaskFailed(NbpipeError):
    """One or more tasks failed; ``failed`` holds their labels."""

    def __init__(self, message: str, failed: list[str] | None = None):
        super().__init__(message)
        self.failed = list(failed or [])


class UpstreamFailed(TaskFailed):
    """A task did not run because a task it depends on failed or was killed."""


class TaskKilled(NbpipeError):
    """The task was killed on request (``pipe.kill``, ``nbpipe kill`` or the sidebar)."""


class TaskTimedOut(TaskKilled):
    """The task ran longer than its ``timeout=`` and was stopped (a distinct outcome: the
    attempt is recorded as ``TIMED_OUT``, and ``retry_on`` decides whether it runs again)."""


class Permanent(NbpipeError):
    """Raise it in a task for an error no retry can fix: the task fails at once, whatever its
    ``retries`` (jobmon's fatal errors, as opposed to retryable ones).

    >>> from nbpipe import Permanent
    >>> def fetch(url):
    ...     if not url.startswith("https://"):
    ...         raise Permanent(f"{url!r} is not an https URL; fix the task file")
    """


class BashTaskError(NbpipeError):
    """A bash task exited with a non-zero status; ``exit_code`` holds it."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self):
        return (type(self), (self.args[0], self.exit_code))


class ResultCorrupt(NbpipeError):
    """A result file is missing or does not match its recorded checksum."""


class UpstreamCorrupt(ResultCorrupt):
    """The result of an upstream task, read on a worker, is missing or damaged.

    The runner then computes that task again and runs the reader after it (without counting
    the reader's attempt against its retries).
    """

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key

    def __reduce__(self):
        return (type(self), (self.key, self.args[0]))


class ResultWriteError(NbpipeError, OSError):
    """A task's result could not be written: the disk is full, a quota or file-size limit."""


class StoreError(NbpipeError):
    """The pipeline store cannot be opened or used."""


class StoreNotWritable(StoreError, PermissionError):
    """The store directory cannot be created or written."""


class StoreOnNetworkFS(StoreError):
    """The store's SQLite database would lie on a network file system (NFS, Lustre, GPFS, ...),
    where SQLite's write-ahead log does not work across hosts; the message names the mount and
    how to place the database on a local disk."""


class StoreDamaged(StoreError):
    """The store's database file is damaged (not SQLite, truncated, malformed); the message
    says how to recover it."""


class StoreUnreachable(StoreError, sqlite3.OperationalError):
    """A PostgreSQL store's server cannot be reached or refused a statement (the message names
    the store's URL, never its password). Also a ``sqlite3.OperationalError``: code that keeps
    its writes while a store cannot be written (the runner) handles it as a busy SQLite store."""


class StoreVersionError(StoreError):
    """The store was written by a newer nbpipe whose schema this one does not know."""


class RunnerError(NbpipeError, RuntimeError):
    """The runner of a pipeline stopped on an error; the message names the cause."""


class PipelineBusy(NbpipeError):
    """Another process is already running this pipeline."""


class TaskfileError(NbpipeError, ValueError):
    """A task file (YAML or JSON) is malformed."""


class NotInTask(NbpipeError, RuntimeError):
    """``nbpipe.context()`` was called outside a running task."""


class UnknownTask(NbpipeError, KeyError):
    """A task name or key does not match any task of the pipeline."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class ConfigError(NbpipeError, ValueError):
    """A configuration file or setting (``nbpipe.yaml``, ``dask.config`` ``nbpipe.*``) is invalid."""


class ClusterError(NbpipeError, ValueError):
    """``cluster=`` names something nbpipe cannot start or connect to."""


class InvalidArgument(NbpipeError, ValueError):
    """An argument of an nbpipe call (not of a task) has a value nbpipe does not accept."""


class ResourceError(NbpipeError, ValueError):
    """A task asks for more than any worker pool of the cluster can give it."""


class CellInputError(NbpipeError, NameError):
    """A cell reads a name it cannot have: nothing defines it, it is a module another ``%%task``
    cell imports, or it is a name a task cell did not keep as an output.

    In IPython only the message is shown (the mistake is in the cell, not in nbpipe's frames).
    """

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class OutputNotStored(CellInputError):
    """A ``%%task`` cell's name that is not one of its stored outputs (it could not be pickled,
    it was bound by ``with ... as``, or the cell did not assign it on the branch that ran)."""
