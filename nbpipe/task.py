"""Tasks: the ``@task`` and ``@bash_task`` decorators, their options, and ``TaskRef`` handles.

>>> from nbpipe import task
>>> @task(retries=2, cores=1, memory="1GB")
... def fraction(seed: int, size: int = 100_000) -> float:
...     import numpy as np
...     xy = np.random.default_rng(seed).uniform(-1, 1, (2, size))
...     return float(((xy ** 2).sum(0) < 1).mean())

Calling ``fraction(seed=1)`` registers a task in the current pipeline and returns a
:class:`TaskRef` at once; nothing runs until the pipeline runs or a value is needed.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import math
import operator
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from dask.utils import parse_bytes, parse_timedelta

from .content import upstream_token
from .errors import TaskDefinitionError
from .files import file_params
from .identity import IDENTITY_VERSION, CodeIdentity, DictShape, code_identity, digest
from .runstate import FIELD_DOCS, RunState
from .states import State

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["TaskFunction", "TaskOptions", "TaskOutput", "TaskRef", "bash_task", "task"]


@dataclass(frozen=True)
class TaskOptions:
    """Options of a task. ``version``, ``env`` and ``env_inputs`` (and ``cache``) affect its
    identity; resources and the name do not.

    ``memory`` is in bytes and ``walltime`` in seconds once parsed.
    """

    name: str | None = None
    retries: int | None = None  # None: the pipeline's or configured default (nbpipe.policy), else 0
    cores: int = 1
    memory: int | None = None
    walltime: float | None = None
    gpus: int = 0
    pool: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    version: str | int | None = None
    cache: bool = True
    after: tuple[Any, ...] = ()
    max_concurrent: int | None = None
    retry_memory_factor: float | None = None
    env_inputs: tuple[str, ...] = ()
    timeout: float | None = None  # seconds; None: the default (nbpipe.policy), else no limit
    retry_on: frozenset[str] | None = None  # kinds of failure retried; None: the default
    trust_existing: bool | None = None  # adopt existing declared Out files instead of running

    def resources(self) -> dict[str, Any]:
        """The options a scheduler needs, for the store and the command line."""
        return {
            "retries": self.retries, "cores": self.cores, "memory": self.memory,
            "walltime": self.walltime, "gpus": self.gpus, "pool": self.pool,
            "max_concurrent": self.max_concurrent, "retry_memory_factor": self.retry_memory_factor,
            "timeout": self.timeout,
            "retry_on": sorted(self.retry_on) if self.retry_on is not None else None,
        }


_OPTION_NAMES = {f for f in TaskOptions.__dataclass_fields__}


def seconds_of(value: Any) -> float | None:
    """Seconds from a duration as schedulers and people write it: ``"HH:MM:SS"``,
    ``"D-HH:MM:SS"``, ``"2h"``/``"30min"`` (Dask's ``parse_timedelta``) or a number; None when
    ``value`` is none of these (the caller says what it expected)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", value.strip())
        if m:
            days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
            return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)
        with contextlib.suppress(ValueError, KeyError, TypeError, OverflowError):
            return float(parse_timedelta(value))
    return None


def parse_walltime(value: Any, task: str) -> float | None:
    """Seconds from ``"HH:MM:SS"``, ``"D-HH:MM:SS"``, ``"2h"``/``"30min"`` or a number."""
    if value is None:
        return None
    seconds = seconds_of(value)
    # Zero, negative, infinite or NaN: no scheduler can give that (Slurm reads 0 as no limit).
    if seconds is not None and math.isfinite(seconds) and seconds > 0:
        return seconds
    if seconds is not None:
        raise TaskDefinitionError(
            f"task {task!r}: walltime={value!r} must be a finite duration longer than 0 s "
            "(no scheduler gives a job more, or less); e.g. '01:30:00', or leave it out for no "
            "limit of nbpipe's"
        )
    raise TaskDefinitionError(
        f"task {task!r}: walltime={value!r} is not a duration; use 'HH:MM:SS', "
        "'D-HH:MM:SS', '2h', '30min' or a number of seconds"
    )


def _positive_int(value: Any, option: str, task: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TaskDefinitionError(
            f"task {task!r}: {option}={value!r} must be an integer >= {minimum}"
        )
    return value


def make_options(task: str, **kw: Any) -> TaskOptions:
    """Validate decorator options; every mistake names the task, the option and the fix."""
    unknown = set(kw) - _OPTION_NAMES
    if unknown:
        guesses = [g for u in sorted(unknown) for g in difflib.get_close_matches(u, _OPTION_NAMES, 1)]
        hint = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
        raise TaskDefinitionError(
            f"task {task!r}: unknown option(s) {', '.join(sorted(unknown))}{hint}; "
            f"valid options are {', '.join(sorted(_OPTION_NAMES))}"
        )
    out: dict[str, Any] = {}
    if kw.get("name") is not None:
        if not isinstance(kw["name"], str) or not kw["name"].strip():
            raise TaskDefinitionError(f"task {task!r}: name={kw['name']!r} must be a non-empty string")
        out["name"] = kw["name"]
    for option, minimum in (("retries", 0), ("cores", 1), ("gpus", 0)):
        if kw.get(option) is not None:
            out[option] = _positive_int(kw[option], option, task, minimum)
    if kw.get("timeout") is not None:
        from .policy import parse_timeout

        out["timeout"] = parse_timeout(kw["timeout"], task)
    if kw.get("retry_on") is not None:
        from .policy import parse_retry_on

        out["retry_on"] = parse_retry_on(kw["retry_on"], task)
    if kw.get("trust_existing") is not None:
        if not isinstance(kw["trust_existing"], bool):
            raise TaskDefinitionError(
                f"task {task!r}: trust_existing={kw['trust_existing']!r} must be True or False")
        out["trust_existing"] = kw["trust_existing"]
    if kw.get("max_concurrent") is not None:
        out["max_concurrent"] = _positive_int(kw["max_concurrent"], "max_concurrent", task, 1)
    factor = kw.get("retry_memory_factor")
    if factor is not None:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1:
            raise TaskDefinitionError(
                f"task {task!r}: retry_memory_factor={factor!r} must be a number >= 1, e.g. 1.5 "
                "(the memory request grows by that factor on each retry after its worker died)"
            )
        out["retry_memory_factor"] = float(factor)
    if kw.get("memory") is not None:
        memory = kw["memory"]
        try:
            out["memory"] = int(parse_bytes(memory)) if isinstance(memory, str) else int(memory)
            if isinstance(memory, bool) or out["memory"] <= 0:
                raise ValueError
        except (ValueError, TypeError, OverflowError):  # (int(inf) overflows)
            raise TaskDefinitionError(
                f"task {task!r}: memory={memory!r} is not a size; use e.g. '4GB', '500MiB' "
                "or a number of bytes"
            ) from None
    if "walltime" in kw:
        out["walltime"] = parse_walltime(kw["walltime"], task)
    if kw.get("pool") is not None:
        if not isinstance(kw["pool"], str):
            raise TaskDefinitionError(f"task {task!r}: pool={kw['pool']!r} must be a pool name")
        out["pool"] = kw["pool"]
    if kw.get("env") is not None:
        env = kw["env"]
        if not isinstance(env, Mapping) or not all(
            isinstance(k, str) and isinstance(v, (str, int, float)) for k, v in env.items()
        ):
            raise TaskDefinitionError(
                f"task {task!r}: env={env!r} must be a dict of variable names to strings"
            )
        for k in env:
            if not k or "=" in k or "\0" in k:
                raise TaskDefinitionError(
                    f"task {task!r}: env has the variable name {k!r}; a name cannot be empty "
                    "or contain '=' or a NUL byte: write env={'NAME': 'value'}"
                )
            if "\0" in str(env[k]):
                raise TaskDefinitionError(
                    f"task {task!r}: env[{k!r}] contains a NUL byte, which no environment "
                    "variable can hold"
                )
        out["env"] = {k: str(v) for k, v in env.items()}
    if kw.get("env_inputs"):
        names = kw["env_inputs"]
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, (list, tuple, set, frozenset)) or not all(
                isinstance(n, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n) for n in names):
            raise TaskDefinitionError(
                f"task {task!r}: env_inputs={kw['env_inputs']!r} must be a list of environment "
                "variable names, e.g. env_inputs=['OUTPUT_DIR']"
            )
        out["env_inputs"] = tuple(sorted(set(names)))
    if kw.get("version") is not None:
        if not isinstance(kw["version"], (str, int)) or isinstance(kw["version"], bool):
            raise TaskDefinitionError(f"task {task!r}: version={kw['version']!r} must be a str or int")
        out["version"] = kw["version"]
    if "cache" in kw:
        if not isinstance(kw["cache"], bool):
            raise TaskDefinitionError(f"task {task!r}: cache={kw['cache']!r} must be True or False")
        out["cache"] = kw["cache"]
    if kw.get("after"):
        after = kw["after"]
        after = list(after) if isinstance(after, (list, tuple, set)) else [after]
        for a in after:
            if not isinstance(a, (TaskRef, str)):
                raise TaskDefinitionError(
                    f"task {task!r}: after= takes task references or task names, "
                    f"not {type(a).__name__}"
                )
        out["after"] = tuple(after)
    return TaskOptions(**out)


_FRESH = RunState()  # every task starts so (records are immutable: one is shared)
_NO_DEPS: dict[Any, str] = {}  # shared until a task's dependencies are resolved (never changed)


def _run_field(name: str) -> property:
    """A read-only view of one field of ``TaskRef.run_state``."""

    def refuse(ref: TaskRef, value: Any) -> None:
        # Set alone, one field would disagree with the others (and with the store) for readers.
        raise AttributeError(
            f"task {ref.label!r}: ref.{name} is read-only (nbpipe records where a task is in its "
            "run); run, retry or kill the task instead: pipe.run(), pipe.retry(ref), pipe.kill(ref)")

    return property(operator.attrgetter(f"run_state.{name}"), refuse, doc=FIELD_DOCS[name])


class TaskRef:
    """A handle on a registered task, returned at once by calling a task function.

    Pass it to other tasks (also inside lists, tuples and dicts) to make them depend on it;
    ``ref.result()`` waits for the value.

    Where the task is in its run is one immutable record, ``ref.run_state``
    (:class:`~nbpipe.runstate.RunState`), which the runner replaces whole: ``ref.state``,
    ``ref.error``, ``ref.result_file``... read its fields. Each read looks at the record of
    that moment; take ``run = ref.run_state`` once to read several fields of the same moment
    (the runner may move on between two reads).
    """

    __slots__ = (
        "pipeline", "func", "name", "label", "args", "kwargs", "call_id", "upstream",
        "after", "in_files", "out_files", "shape", "arg_digests", "file_digests", "key_",
        "components_", "run_state",
        "group", "chunksize", "dynamic", "late", "deps", "queued",
        "__weakref__",
    )

    def __init__(self, pipeline: Pipeline, func: TaskFunction, name: str, label: str):
        self.pipeline = pipeline
        self.func = func
        self.name = name
        self.label = label
        self.key_: str | None = None
        self.shape: DictShape | None = None  # the fixed part of the key, shared by the function
        self.arg_digests: dict[str, str] = {}
        self.file_digests: dict[str, str] | None = None  # input files, when the task reads any
        self.components_: dict[str, Any] | None = None  # as recorded, for a revived task
        self.run_state = _FRESH
        self.group: str | None = None
        self.chunksize: int | None = None
        self.dynamic = False
        self.queued = False  # handed to a runner: its key no longer changes
        self.late = False  # its key is provisional: it reads upstream content not known yet
        self.deps: dict[TaskRef, str] = _NO_DEPS  # upstream task -> data | after | file

    run_state: RunState
    """Where the task is in its run, as one record (read it once; see the class docstring)."""

    state = _run_field("state")
    attempts = _run_field("attempts")
    budget = _run_field("budget")
    error = _run_field("error")
    exception = _run_field("exception")
    traceback = _run_field("traceback")
    result_file = _run_field("result_file")
    reason = _run_field("reason")
    worker = _run_field("worker")

    def update(self, **changes: Any) -> RunState:
        """Change fields of the run state in one step (``ref.update(state=State.RUNNING,
        worker=address)``) and return the new record; readers see all the changes or none.

        Only the thread that owns the task's run changes it (the runner, or the pipeline's
        thread while no runner holds the task): updates are not merged.
        """
        run = self.run_state = self.run_state.but(**changes)
        return run

    @property
    def key(self) -> str:
        """The task's content key (computed when the graph is resolved)."""
        if self.key_ is None:
            self.pipeline.resolve([self])
        assert self.key_ is not None
        return self.key_

    def __nbpipe_key__(self) -> str:
        return self.key

    @property
    def components(self) -> dict[str, Any]:
        """The parts of the task's key, as recorded in the store and compared by ``why``."""
        if self.components_ is not None or self.shape is None:
            return self.components_ or {}
        return {**self.shape.fixed, **self.key_extras()}

    @components.setter
    def components(self, value: dict[str, Any]) -> None:
        self.components_ = value

    def key_extras(self) -> dict[str, Any]:
        """The per-task parts of the key: arguments, upstream keys (a ``cache=False`` upstream
        task's result by content), after= keys, input files (by content)."""
        return {
            "args": self.arg_digests,
            "upstream": [[u.label, upstream_token(u)] for u in dict.fromkeys(self.upstream)],
            "after": sorted(d.key_ for d, kind in self.deps.items() if kind == "after" and d.key_),
            "files": self.file_digests or {},
        }

    def done(self) -> bool:
        """Whether the task reached a final state."""
        return self.state.final

    def result(self, timeout: float | None = None) -> Any:
        """The task's value; runs it (and what it needs) if it has not run.

        Re-raises the task's own exception, with its remote traceback attached, if it failed.
        """
        return self.pipeline.result_of(self, timeout)

    def output(self, name: str) -> TaskOutput:
        """One entry of a task whose value is a dict (a ``%%task`` cell's outputs)."""
        return TaskOutput(self, name)

    def __repr__(self) -> str:
        return f"<TaskRef {self.label} {self.state.value}>"

    # -- a Dask collection: dask.compute(ref), dask.delayed(f)(ref), ref.visualize() ----------

    def _dask_name(self) -> str:
        return f"nbpipe-{self.name}-{self.key}"

    def __dask_graph__(self) -> dict[str, Any]:
        """A graph of one Dask task that loads this task's value from its result.

        Building it runs the task first if it has not run (as ``result()`` does, on nbpipe's
        cluster, recorded in the store; a failed task raises its error here)."""
        from .results import INLINE

        run = self.run_state
        if run.state is not State.SUCCEEDED or run.result_file is None:
            self.result()
            run = self.run_state
        assert run.result_file is not None
        path, checksum = run.result_file
        data = self.pipeline.store.result_data(self.key) if path == INLINE else None
        return {self._dask_name(): (_load_value, path, checksum, data)}

    def __dask_keys__(self) -> list[str]:
        return [self._dask_name()]

    def __dask_layers__(self) -> tuple[str, ...]:
        return (self._dask_name(),)

    def __dask_tokenize__(self) -> tuple[str, str]:
        return ("nbpipe-task", self.key)  # its content key: the same work, the same token

    def __dask_postcompute__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return _first, ()

    def __dask_postpersist__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return _persisted, (self._dask_name(),)

    @staticmethod
    def __dask_optimize__(dsk: Any, keys: Any, **kwargs: Any) -> Any:
        return dsk

    @staticmethod
    def __dask_scheduler__(dsk: Any, keys: Any, **kwargs: Any) -> Any:
        import dask.threaded

        return dask.threaded.get(dsk, keys, **kwargs)

    def visualize(self, filename: str | None = "nbpipe", format: str | None = None,
                  **kwargs: Any) -> Any:
        """Draw this task and everything upstream of it with graphviz (nothing runs), as
        ``dask.visualize`` draws a Dask graph: ``ref.visualize("graph", format="svg")``."""
        from dask.dot import dot_graph

        graph: dict[str, Any] = {}
        todo, seen = [self], set()
        while todo:
            ref = todo.pop()
            if ref in seen:
                continue
            seen.add(ref)
            ups = list(dict.fromkeys([*ref.upstream, *(ref.deps or ())]))
            graph[f"{ref.name}-{ref.call_id[:12]}"] = (
                _Step(ref.name), *[f"{u.name}-{u.call_id[:12]}" for u in ups])
            todo.extend(ups)
        return dot_graph(graph, filename=filename, format=format, **kwargs)


def _load_value(path: str, checksum: str, data: bytes | None) -> Any:
    from .results import read_result

    return read_result(path, checksum, data)


def _first(results: Any) -> Any:
    return results[0]


def _persisted(dsk: Any, name: str, rename: Any = None) -> Any:
    from dask.delayed import Delayed

    return Delayed(name, dsk)


class _Step:
    """A graph node standing for a task in ``TaskRef.visualize`` (named after it)."""

    def __init__(self, name: str):
        self.__name__ = name

    def __call__(self, *args: Any) -> None:  # pragma: no cover - drawn, never run
        raise NotImplementedError


class TaskOutput:
    """``ref.output(name)``: the entry ``name`` of the dict a task returns, as a dependency."""

    __slots__ = ("name", "ref")

    def __init__(self, ref: TaskRef, name: str):
        self.ref = ref
        self.name = name

    def result(self, timeout: float | None = None) -> Any:
        """The entry's value (waits for the task); :class:`~nbpipe.OutputNotStored` when the
        task did not store it (a cell's value that cannot be pickled, say)."""
        from .cells import cell_output

        return cell_output(self.ref.result(timeout), self.name, repr(self.ref.label))

    def __repr__(self) -> str:
        return f"<TaskOutput {self.ref.label}.{self.name} {self.ref.state.value}>"


def _label(name: str, bound: inspect.BoundArguments, sig: inspect.Signature) -> str:
    parts = []
    for param, value in bound.arguments.items():
        default = sig.parameters[param].default
        if default is not inspect.Parameter.empty:
            try:
                if value is default or (type(value) is type(default) and value == default):
                    continue
            except Exception:  # numpy arrays and other odd equality
                pass
        text = (f"<{value.name}>" if isinstance(value, TaskRef)
                else str(value) if isinstance(value, PurePath) else repr(value))
        if isinstance(value, (list, tuple)) and any(isinstance(v, TaskRef) for v in value):
            text = f"[{len(value)} tasks]"
        if len(text) > 24:
            text = text[:21] + "..."
        parts.append(f"{param}={text}")
    return f"{name}({', '.join(parts)})" if parts else name


class TaskFunction:
    """A function registered as a task. Call it to register a task; ``.map`` for many."""

    def __init__(
        self, fn: Callable[..., Any], kind: str, options: TaskOptions, pipeline: Pipeline | None
    ):
        if isinstance(fn, TaskFunction):  # re-decorating: the new options apply
            fn = fn.fn
        if not callable(fn) or isinstance(fn, type):
            decorator = "@task" if kind == "python" else "@bash_task"
            raise TaskDefinitionError(
                f"{decorator} needs a function, got {fn!r}; put {decorator} on a def (or call "
                f"{decorator[1:]}(fn) with a function)"
            )
        if inspect.iscoroutinefunction(fn) or inspect.isgeneratorfunction(fn):
            raise TaskDefinitionError(
                f"task {fn.__name__!r}: async and generator functions cannot be tasks; "
                "return a value instead"
            )
        self.fn = fn
        self.kind = kind
        self.opts = options
        self.pipeline = pipeline
        self.name = options.name or getattr(fn, "__name__", "task")
        self.signature = inspect.signature(fn)
        params = self.signature.parameters
        self.var_keyword = next(
            (p.name for p in params.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        # Plain parameters (no *args, **kwargs, keyword-only): calls bind without inspect's loop.
        self._plain = tuple(params) if all(
            p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params.values()) else None
        self._defaults = {n: p.default for n, p in params.items()
                          if p.default is not inspect.Parameter.empty}
        self.file_roles = file_params(fn)
        self._lock = threading.Lock()
        self._shape: tuple[CodeIdentity, DictShape] | None = None
        functools.update_wrapper(self, fn, updated=())

    @property
    def __nbpipe_function__(self) -> Callable[..., Any]:
        return self.fn

    @property
    def shape_identity(self) -> CodeIdentity | None:
        """The identity the function's latest task keys were made with."""
        return self._shape[0] if self._shape is not None else None

    def identity(self, arguments: Mapping[str, Any] | None = None) -> CodeIdentity:
        """The content identity of the function's code and everything it reads (a function's
        does not depend on the ``arguments`` of a call; a cell's may, see ``CellTask``)."""
        return code_identity(self.fn, owner=self.name)

    def argument_digest(self, value: Any) -> str:
        """The digest of one argument value in a task's key."""
        return digest(value)

    def env_input_values(self) -> dict[str, str | None]:
        """The values of the ``env_inputs`` variables in this process (``None``: unset)."""
        return {name: os.environ.get(name) for name in self.opts.env_inputs}

    def run_env(self, shape: DictShape | None = None) -> dict[str, str]:
        """The environment variables a task of this function runs with: ``env``, and the
        ``env_inputs`` values its key was made with (so the task sees what was hashed)."""
        env = dict(self.opts.env)
        if self.opts.env_inputs:
            hashed = shape.fixed.get("env_inputs") if shape is not None else None
            values = hashed if hashed is not None else self.env_input_values()
            env.update({k: v for k, v in values.items() if v is not None})
        return env

    def bind(self, args: Sequence[Any], kwargs: dict[str, Any]) -> inspect.BoundArguments:
        """Arguments by parameter, defaults applied; a TypeError as ``inspect`` raises it."""
        names = self._plain
        if names is not None and len(args) <= len(names) and all(k in names for k in kwargs):
            arguments: dict[str, Any] = {}
            for i, name in enumerate(names):
                if i < len(args):
                    if name in kwargs:
                        break  # given twice: inspect says so below
                    arguments[name] = args[i]
                elif name in kwargs:
                    arguments[name] = kwargs[name]
                elif name in self._defaults:
                    arguments[name] = self._defaults[name]
                else:
                    break  # missing: inspect says so below
            else:
                return inspect.BoundArguments(self.signature, arguments)  # type: ignore[arg-type]
        bound = self.signature.bind(*args, **kwargs)  # the general case, and its errors
        bound.apply_defaults()
        return bound

    def key_shape(self, identity: CodeIdentity) -> DictShape:
        """The part of this function's task keys that its calls share: kind, code identity,
        version and (for cells) outputs. Made once per identity."""
        env_inputs = self.env_input_values() if self.opts.env_inputs else None
        cached = self._shape
        if cached is not None and cached[0] is identity and (
                env_inputs is None or cached[1].fixed.get("env_inputs") == env_inputs):
            return cached[1]
        fixed: dict[str, Any] = {
            "identity": IDENTITY_VERSION, "kind": self.kind, "code": identity.code,
            "helpers": identity.helpers, "globals": identity.globals, "modules": identity.modules,
            "closure": identity.closure, "defaults": identity.defaults,
            "version": self.opts.version,
            "env": dict(self.opts.env),
        }
        if env_inputs is not None:
            fixed["env_inputs"] = env_inputs
        outputs = getattr(self, "outputs", None)
        if outputs is not None:  # a %%task cell: its value is a dict of these names
            fixed["outputs"] = list(outputs)
        shape = DictShape(fixed, ("args", "upstream", "after", "files"))
        self._shape = (identity, shape)
        return shape

    def with_options(self, **options: Any) -> TaskFunction:
        """A copy of this task function with some options changed."""
        merged = {**self.opts.__dict__, **options}
        return TaskFunction(self.fn, self.kind, make_options(self.name, **merged), self.pipeline)

    def _target(self) -> Pipeline:
        if self.pipeline is not None:
            return self.pipeline
        from .pipeline import current_pipeline

        return current_pipeline()

    def __call__(self, *args: Any, **kwargs: Any) -> TaskRef:
        return self._target().add(self, args, kwargs)

    def map(self, items: Iterable[Any], chunksize: int | None = None) -> list[TaskRef]:
        """Register one task per item (``fn(item)``); return their refs in order.

        With ``chunksize``, items run in batches of that size on the workers, while each item
        keeps its own identity, state and result.
        """
        if chunksize is not None:
            _positive_int(chunksize, "chunksize", self.name, 1)
        if not isinstance(items, Iterable):
            raise TaskDefinitionError(
                f"task {self.name!r}: map() takes an iterable of items (a list, a range, ...), "
                f"not {type(items).__name__} {items!r:.40}; e.g. {self.name}.map(range(5))"
            )
        return self._target().add_many(self, items, chunksize)

    def __repr__(self) -> str:
        return f"<{self.kind} task {self.name}>"


def _decorator(kind: str) -> Callable[..., Any]:
    def decorate(fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        pipeline = options.pop("_pipeline", None)

        def wrap(f: Callable[..., Any]) -> TaskFunction:
            opts = dict(options)
            outputs = opts.pop("outputs", None) if kind == "python" else None
            template = opts.pop("template", False) if kind == "bash" else False
            name = opts.get("name") or getattr(f, "__name__", "task")
            if outputs is not None or template:  # the function is a notebook cell, written out
                from .cells import cell_function

                return cell_function(f, kind, make_options(name, **opts), pipeline, outputs)
            return TaskFunction(f, kind, make_options(name, **opts), pipeline)

        if fn is None:
            return wrap
        if options:
            decorator = "@task" if kind == "python" else "@bash_task"
            raise TaskDefinitionError(
                f"{decorator} on {getattr(fn, '__name__', fn)!r}: pass options with the decorator, "
                f"{decorator}({', '.join(f'{k}=...' for k in options)}), not with the function"
            )
        return wrap(fn)

    return decorate


task = _decorator("python")
task.__doc__ = """Make a function a task: ``@task`` or ``@task(retries=2, memory="4GB", ...)``.

Options: ``name, retries, cores, memory, walltime, gpus, pool, env, env_inputs, version, cache,
after, max_concurrent, retry_memory_factor, timeout, retry_on, trust_existing``.
``timeout="10m"`` stops a task that runs longer (its attempt is recorded ``TIMED_OUT``);
``retry_on=["exception", "timeout"]`` picks the kinds of failure ``retries`` apply to (see
:mod:`nbpipe.policy`); ``trust_existing=True`` adopts declared ``Out`` files that already exist.
``env={"MODE": "fast"}`` sets variables for the task and counts in its identity;
``env_inputs=["OUTPUT_DIR"]`` makes variables the task inherits count
(their values here, which the task then runs with). ``cores``, ``memory``, ``gpus`` and ``walltime`` send the
task only to workers that have them (on a batch cluster, to a worker pool large enough).

``@task(outputs=["mean", "std"])`` makes the function a *cell* (what ``nbpipe export`` writes
for a ``%%task`` cell): its body, less a final ``return``, is the cell's code, its parameters
are the cell's inputs, and its identity is the cell's, so the notebook and the script share
results. Calling it returns a ref whose ``.output("mean")`` is one output.
Calling the decorated function registers a task in the current pipeline
(``with pipe:`` or ``nbpipe.use(pipe)``; else a default pipeline named after the script).
"""

bash_task = _decorator("bash")
bash_task.__doc__ = """Make a function that returns a bash command (a string, or an argv list) a task.

The command's stdout is the task's value; a non-zero exit fails the task with its exit code.
``@bash_task(template=True)`` on a function whose body is ``return "...{name}..."`` is a
``%%task NAME --bash`` cell written out: its parameters fill the ``{placeholders}``.

>>> @bash_task
... def greet(name: str) -> str:
...     return f"echo hello {name}"
"""
