"""nbpipe: notebook pipelines on Dask with content-addressed resume.

>>> from nbpipe import Pipeline, task
>>> pipe = Pipeline("demo")                       # doctest: +SKIP
>>> @pipe.task
... def square(x: int) -> int:
...     return x * x                              # doctest: +SKIP
>>> refs = [square(i) for i in range(10)]         # doctest: +SKIP
>>> pipe.run(check=True)                          # doctest: +SKIP
"""

from __future__ import annotations

from .bash import BashResult
from .context import TaskContext, context
from .errors import (
    BashTaskError,
    CellInputError,
    ClusterError,
    ConfigError,
    CycleError,
    InvalidArgument,
    MissingInputError,
    NbpipeError,
    OutputNotStored,
    Permanent,
    PipelineBusy,
    ResourceError,
    ResultCorrupt,
    ResultWriteError,
    RunnerError,
    StoreDamaged,
    StoreError,
    StoreNotWritable,
    StoreOnNetworkFS,
    StoreUnreachable,
    StoreVersionError,
    TaskDefinitionError,
    TaskFailed,
    TaskfileError,
    TaskKilled,
    TaskTimedOut,
    UnhashableValue,
    UnknownTask,
    UpstreamCorrupt,
    UpstreamFailed,
)
from .files import In, Out
from .pipeline import Pipeline, RunSummary, TaskInfo, current_pipeline, use
from .states import State
from .task import TaskFunction, TaskRef, bash_task, task
from .taskfile import TaskItem, dump_tasks, iter_tasks, load_tasks, run_tasks

__version__ = "0.1.0"

# The project's nbpipe.yaml joins dask.config now, so that a later dask.config.set (a script's,
# `nbpipe run --cluster`'s) takes precedence over it. A broken file is reported when a setting
# is first read, not at import.
try:
    from .config import load_project_config as _load_project_config

    _load_project_config()
except ConfigError:
    pass

__all__ = [
    "BashResult", "BashTaskError", "CellInputError", "ClusterError", "ConfigError", "CycleError", "In",
    "InvalidArgument", "MissingInputError", "NbpipeError", "Out", "OutputNotStored", "Pipeline",
    "Permanent", "PipelineBusy", "ResourceError",
    "ResultCorrupt", "ResultWriteError", "RunSummary", "RunnerError", "State", "StoreDamaged",
    "StoreError", "StoreNotWritable", "StoreOnNetworkFS", "StoreUnreachable",
    "StoreVersionError",
    "TaskContext", "TaskDefinitionError", "TaskFailed", "TaskFunction", "TaskInfo", "TaskItem",
    "TaskKilled", "TaskRef", "TaskTimedOut", "TaskfileError", "UnhashableValue", "UnknownTask",
    "UpstreamCorrupt", "UpstreamFailed",
    "bash_task", "context", "current_pipeline", "dump_tasks", "iter_tasks", "load_tasks", "run_tasks", "task",
    "use",
]


def load_ipython_extension(shell: object) -> None:
    """``%load_ext nbpipe`` (the notebook layer is imported only here)."""
    from .magics import load_ipython_extension as load

    load(shell)


def unload_ipython_extension(shell: object) -> None:
    """``%unload_ext nbpipe``."""
    from .magics import unload_ipython_extension as unload

    unload(shell)
