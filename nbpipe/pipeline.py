"""Pipelines: a named graph of tasks, recorded in a store, run on Dask, resumed by content.

>>> import nbpipe
>>> pipe = nbpipe.Pipeline("pi", store=".nbpipe")      # doctest: +SKIP
>>> @pipe.task
... def fraction(seed: int) -> float: ...              # doctest: +SKIP
>>> refs = [fraction(seed=i) for i in range(20)]        # doctest: +SKIP
>>> pipe.run(check=True)                                # doctest: +SKIP

Running the same script again executes nothing that already succeeded.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import sys
import threading
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import cloudpickle

from . import runmodes
from .accept import accept_keys
from .cells import CellRunner
from .cluster import Connection, connect, validate
from .config import check_configured, setting
from .content import content_key
from .control import RETRY_REASON, Controller, local_runner_of
from .errors import (
    ClusterError,
    InvalidArgument,
    MissingInputError,
    NbpipeError,
    PipelineBusy,
    ResultCorrupt,
    StoreDamaged,
    TaskDefinitionError,
    TaskFailed,
    TaskKilled,
    UnhashableValue,
    UnknownTask,
    UpstreamFailed,
)
from .files import paths_in
from .freshness import Freshness
from .graph import order, reach
from .identity import CodeIdentity, Unencodable, is_immutable
from .naming import find_task, find_tasks, ref_fields
from .policy import check_defaults, run_mode, run_skip
from .results import INLINE, read_result
from .runner import Runner, record_jobs
from .shipping import by_value
from .specs import spawn  # noqa: F401  (lives in nbpipe.specs; imported from here before)
from .states import BAD, State
from .store import RunnerLock, Store
from .task import TaskFunction, TaskOutput, TaskRef, _label, bash_task, task
from .walk import holds_ref, map_refs

__all__ = ["Pipeline", "RunSummary", "TaskInfo", "current_pipeline", "open_pipelines", "use"]

_NONE: tuple[Any, ...] = ()  # shared by every task without upstream tasks or files
_NONE_BY_NAME: dict[Any, Any] = {}  # shared by every task without keywords or dependencies
_SCALARS = frozenset({int, float, str, bool, type(None), bytes})


PROGRESS_EVERY = 100_000  # map() over more entries than this reports its progress on stderr


class TaskInfo(NamedTuple):
    """One row of ``pipe.tasks()``."""

    name: str
    key: str
    label: str
    state: str
    attempts: int
    error: str | None
    reason: str | None = None


class RunSummary(NamedTuple):
    """What ``pipe.run()`` did: counts by state, failed task labels, how many ran.

    ``executed`` counts the tasks this process ran for the call -- also those a ``ref.result()``
    ran before it -- and ``cached`` the ones found done; a task is reported executed once.
    """

    counts: dict[str, int]
    failed: list[str]
    executed: int
    cached: int
    paused: bool = False

    @property
    def ok(self) -> bool:
        """True when every task of the run succeeded."""
        return not self.failed and set(self.counts) <= {State.SUCCEEDED.value}

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items()))
        text = f"{self.executed} executed, {self.cached} already done ({counts or 'no tasks'})"
        if self.failed:
            text += f"; failed: {', '.join(self.failed[:10])}"
            if len(self.failed) > 10:
                text += f" and {len(self.failed) - 10} more"
        if self.paused:
            text += "; the pipeline is paused (pipe.resume() to continue)"
        return text


class _Slot:
    """Stands for the i-th upstream TaskRef (or one output of it) inside encoded arguments."""

    __slots__ = ("index", "output")

    def __init__(self, index: int, output: str | None = None):
        self.index = index
        self.output = output

    def __nbpipe_token__(self) -> tuple[str, int, str | None]:
        return ("upstream", self.index, self.output)


def _redefines(old: TaskFunction, new: TaskFunction) -> bool:
    """Whether ``new`` is ``old`` defined again, as a notebook does when a cell runs again: the
    same ``%%task`` cell name, or a ``def`` of the same name compiled anew that took the old
    one's place. In a script, for ``with_options`` copies and for functions made in a loop, two
    calls are always two tasks."""
    if old is new or old.name != new.name:
        return False
    old_fn, new_fn = getattr(old, "function", old.fn), getattr(new, "function", new.fn)
    if isinstance(old_fn, CellRunner) or isinstance(new_fn, CellRunner):
        return isinstance(old_fn, CellRunner) and isinstance(new_fn, CellRunner)
    old_code, new_code = getattr(old_fn, "__code__", None), getattr(new_fn, "__code__", None)
    if old_code is None or new_code is None or old_code is new_code:
        return False
    if getattr(old_fn, "__qualname__", None) != getattr(new_fn, "__qualname__", None):
        return False
    bound = getattr(old_fn, "__globals__", {}).get(old_fn.__name__)
    return bound is not old and bound is not old_fn


class RemoteTraceback(Exception):
    """The traceback of a task's exception on its worker (set as the exception's cause)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _stopped(runner: Runner) -> NbpipeError:
    """What waiting on a runner that stopped on an error raises: a damaged store's own
    :class:`StoreDamaged` (every door tells a damaged store the same way), else the runner's
    :class:`RunnerError` naming the cause."""
    if isinstance(runner.error, StoreDamaged):
        return runner.error
    assert runner.fatal is not None
    return runner.fatal


def _default_name() -> str:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) or (sys.argv[0] if sys.argv else "")
    stem = Path(path).stem if path else ""
    if not stem or stem in ("-c", "ipykernel_launcher", "pytest", "__main__"):
        return "default"
    return stem


_stack: list[Pipeline] = []
_default: Pipeline | None = None
_stack_lock = threading.Lock()


def current_pipeline() -> Pipeline:
    """The pipeline that module-level ``@task`` functions register into.

    ``with pipe:`` or ``nbpipe.use(pipe)`` choose it; otherwise a default pipeline named after
    the script, in ``./.nbpipe``.
    """
    global _default
    with _stack_lock:
        if _stack:
            return _stack[-1]
        if _default is None:
            _default = Pipeline(_default_name())
        return _default


def use(pipeline: Pipeline) -> Pipeline:
    """Make ``pipeline`` the current pipeline for module-level ``@task`` functions."""
    global _default
    with _stack_lock:
        _default = pipeline
        _stack.clear()
    return pipeline


_open: weakref.WeakSet[Pipeline] = weakref.WeakSet()


def open_pipelines() -> list[Pipeline]:
    """The pipelines of this process not closed yet (what ``nbpipe run`` reports on)."""
    return list(_open)


@atexit.register
def _close_all() -> None:
    for pipe in list(_open):
        with contextlib.suppress(Exception):
            pipe.close()


def _is_url(store: Any) -> bool:
    from .store.postgres import is_url

    return isinstance(store, str) and is_url(store)


class Pipeline:
    """A named pipeline of tasks in a store, run on a Dask cluster.

    ``store`` is a directory (default ``$NBPIPE_STORE``, the ``store`` setting, else
    ``./.nbpipe``) or a PostgreSQL URL (``postgresql://user@host/db``, a store shared across
    hosts) with its result files in the folder ``results`` (default ``$NBPIPE_RESULTS``, the
    ``results-dir`` setting, else the folder the database recorded; see docs/store.md); ``cluster`` is
    ``None`` (the ``nbpipe.cluster`` setting, else local), ``"local"``, a batch scheduler kind
    (``"slurm"``, ``"pbs"``, ``"sge"``, ``"lsf"``, ``"htcondor"``) or a dict of its job options,
    a scheduler address, a dask Cluster or a Client (see :mod:`nbpipe.cluster`). The cluster
    starts when the first task runs. ``defaults={"retries": 2, "timeout": "1h"}`` applies to
    every task that does not set the option itself (see :mod:`nbpipe.policy`).
    ``max_concurrent`` caps how many of its tasks run at once (default: the
    ``nbpipe.max-concurrent`` setting, else no cap); detached runners keep it.
    """

    def __init__(self, name: str | None = None, store: str | os.PathLike[str] | Store | None = None,
                 cluster: Any = None, defaults: dict[str, Any] | None = None,
                 max_concurrent: int | None = None,
                 results: str | os.PathLike[str] | None = None):
        name = _default_name() if name is None else name
        if not isinstance(name, str) or not name.strip():
            raise TaskDefinitionError(f"a pipeline needs a non-empty name, got {name!r}")
        if max_concurrent is not None and (isinstance(max_concurrent, bool) or not isinstance(
                max_concurrent, int) or max_concurrent < 1):
            raise TaskDefinitionError(
                f"pipeline {name!r}: max_concurrent={max_concurrent!r} must be a whole number "
                ">= 1 (tasks running at once), or None for no cap")
        self.max_concurrent = max_concurrent
        self.name = name
        self.defaults = check_defaults(defaults, f"Pipeline({name!r}, defaults=...)")
        # (the database setting: a store folder on a network file system keeps it on a local disk)
        if not isinstance(store, Store):
            store = store or os.environ.get("NBPIPE_STORE") or setting("store")
            if _is_url(store):  # a PostgreSQL store: results-dir names its result files' folder
                results = results or os.environ.get("NBPIPE_RESULTS") or setting("results-dir")
            store = Store(store, database=setting("database"), results=results)
        self.store = store
        self.pipeline_id = self.store.pipeline_id(name, source=_default_name())
        self._fresh = Freshness(self.store, self.pipeline_id, name, lambda: self._by_label)
        # A mistake (in the argument or the configured nbpipe.cluster) shows now, not when
        # tasks first run.
        check_configured()
        validate(cluster, self.store.path)
        self.cluster = cluster
        self._refs: dict[str, TaskRef] = {}  # call id -> ref, the active tasks of this process
        self._by_label: dict[str, TaskRef] = {}
        # Tasks with an argument that can change in place (a list, a dict, an object): their
        # digests are checked again when they are handed to a runner.
        self._mutable_args: weakref.WeakSet[TaskRef] = weakref.WeakSet()
        self._lock = threading.RLock()
        self._runner: Runner | None = None
        self._connection: Connection | None = None
        # Tasks this process ran (or handed to its runner) that no summary has reported as
        # finished yet: what `run()` counts as executed, also when a `ref.result()` ran them
        # before it. The runner adds what it submits on its own (retries, retry commands).
        self.ran: set[TaskRef] = set()
        #: Labels of the tasks the last ``run(skip=...)`` left out (``nbpipe run --skip``
        #: does not count their old failures in its exit status).
        self.skipped: set[str] = set()
        #: Pause, resume, kill, retry: the same steering as ``nbpipe`` and the sidebar use.
        self.control = Controller(self.store, name, local=local_runner_of(self))
        _open.add(self)

    def __repr__(self) -> str:
        return f"<Pipeline {self.name!r} store={str(self.store.path)!r} tasks={len(self._refs)}>"

    # -- registration -------------------------------------------------------------------------

    def task(self, fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """``@pipe.task``: like :func:`nbpipe.task`, registering into this pipeline."""
        decorate = task(_pipeline=self, **options)
        return decorate(fn) if fn is not None else decorate

    def bash_task(self, fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """``@pipe.bash_task``: like :func:`nbpipe.bash_task`, registering into this pipeline."""
        decorate = bash_task(_pipeline=self, **options)
        return decorate(fn) if fn is not None else decorate

    def __enter__(self) -> Pipeline:
        with _stack_lock:
            _stack.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        with _stack_lock:
            if self in _stack:
                _stack.remove(self)

    def _slot(self, value: Any, upstream: list[TaskRef], func: TaskFunction) -> Any:
        """``value`` with each task result in it (see :mod:`nbpipe.walk`) replaced by a slot
        numbering it in ``upstream``."""
        if type(value) in _SCALARS:  # most arguments: no walk
            return value

        def slot(found: Any) -> _Slot:
            ref = found if isinstance(found, TaskRef) else found.ref
            if ref.pipeline is not self:
                raise TaskDefinitionError(
                    f"task {func.name!r} got {found!r} from pipeline {ref.pipeline.name!r}; "
                    f"tasks can only depend on tasks of the same pipeline ({self.name!r})"
                )
            upstream.append(ref)
            return _Slot(len(upstream) - 1, found.name if isinstance(found, TaskOutput) else None)

        def hidden(other: Any) -> Any:
            if isinstance(other, (tuple, set, frozenset, dict)) and holds_ref(other):
                raise TaskDefinitionError(
                    f"task {func.name!r}: an argument holds a task result inside a "
                    f"{type(other).__name__}; nbpipe finds task results only in lists, tuples "
                    "and dicts (the data dependencies): pass the result directly, or in one of "
                    "those"
                )
            return other

        return map_refs(value, slot, hidden)

    def _check_after(self, func: TaskFunction, after: Sequence[Any]) -> None:
        """Refuse ``after=`` a task of another pipeline, as data dependencies are refused."""
        for a in after:
            ref = a.ref if isinstance(a, TaskOutput) else a
            if isinstance(ref, TaskRef) and ref.pipeline is not self:
                raise TaskDefinitionError(
                    f"task {func.name!r} has after={ref.label!r} from pipeline "
                    f"{ref.pipeline.name!r}; tasks can only wait for tasks of the same pipeline "
                    f"({self.name!r}): run the other pipeline first, or define that task in "
                    "this one"
                )

    def _add(self, func: TaskFunction, args: Sequence[Any], kwargs: dict[str, Any], *,
             identity: CodeIdentity | None = None, label: str | None = None,
             group: str | None = None, chunksize: int | None = None) -> TaskRef:
        try:
            bound = func.bind(args, kwargs)
        except TypeError as exc:
            raise TaskDefinitionError(
                f"task {func.name!r}: {exc}; its signature is {func.name}{func.signature}"
            ) from None
        upstream: list[TaskRef] = []
        slotted = {p: self._slot(v, upstream, func) for p, v in bound.arguments.items()}
        identity = identity or func.identity(bound.arguments)
        if identity.user_modules:
            by_value(identity.user_modules)
        arg_digests = {}
        named: list[tuple[str, Any]] = []
        for param, value in slotted.items():
            if param == func.var_keyword:
                named += list(value.items())  # **kwargs: each keyword is an argument of its own
            else:
                named.append((param, value))
        argument_digest = func.argument_digest
        mutable = False
        for param, value in named:
            if not mutable and type(value) not in _SCALARS and type(value) is not _Slot \
                    and not is_immutable(value):
                mutable = True
            try:
                arg_digests[param] = argument_digest(value)
            except Unencodable as exc:
                raise UnhashableValue(
                    f"task {func.name!r}: argument {param!r}{exc.path} is a {exc.typename}, "
                    "which nbpipe cannot hash deterministically; pass a value of a type nbpipe "
                    "can hash (numbers, strings, paths, lists, dicts, numpy arrays, "
                    "dataclasses), give its class a __nbpipe_token__() method, or build the "
                    "object inside the task"
                ) from None
        label = label or _label(func.name, bound, func.signature)  # before paths turn absolute
        in_files: list[Path] = []
        out_files: list[Path] = []
        for param, role in func.file_roles.items():
            try:
                paths = [Path(os.path.abspath(p)) for p in paths_in(bound.arguments.get(param))]
            except TypeError as exc:
                raise TaskDefinitionError(
                    f"task {func.name!r}: argument {param!r} is declared "
                    f"{'In' if role == 'in' else 'Out'} file(s) but {exc}"
                ) from None
            (in_files if role == "in" else out_files).extend(paths)
            # Workers may run elsewhere (another cwd, another node): they get absolute paths.
            bound.arguments[param] = _absolute(bound.arguments.get(param))
        shape = func.key_shape(identity)
        after = func.opts.after
        self._check_after(func, after)
        # The call's identity in this process, before upstream keys are known: a digest of
        # the repr of strings (unambiguous, and much cheaper than the canonical encoding).
        call_id = hashlib.blake2b(repr((
            shape.fixed_digest, tuple(arg_digests.items()), tuple(u.call_id for u in upstream),
            tuple(a if isinstance(a, str) else a.call_id for a in after),
            tuple(str(p) for p in in_files),
        )).encode(), digest_size=16).hexdigest()
        with self._lock:
            existing = self._refs.get(call_id)
            if existing is not None:
                return existing
            previous = self._by_label.get(label)
            if previous is not None:
                if _redefines(previous.func, func):  # an edited cell run again replaces it
                    self._refs.pop(previous.call_id, None)
                else:  # another call whose label prints alike: a task of its own
                    n = 2
                    while f"{label}~{n}" in self._by_label:
                        n += 1
                    label = f"{label}~{n}"
            ref = TaskRef(self, func, func.name, label)
            # Most tasks have no keywords, upstream tasks or files: they share empty
            # containers (never changed in place) instead of holding ~300 bytes of their own.
            ref.args, ref.kwargs = bound.args, bound.kwargs or _NONE_BY_NAME
            ref.call_id = call_id
            ref.upstream = upstream or _NONE
            ref.after = after
            ref.in_files, ref.out_files = in_files or _NONE, out_files or _NONE
            ref.shape, ref.arg_digests = shape, arg_digests
            ref.group, ref.chunksize = group, chunksize
            self._refs[call_id] = ref
            self._by_label[label] = ref
            if mutable:
                self._mutable_args.add(ref)
        return ref

    def _add_many(self, func: TaskFunction, items: Iterable[Any], chunksize: int | None
                  ) -> list[TaskRef]:
        from .taskfile import TaskItem

        identity = func.identity()  # once for the whole map
        group = f"{func.name}-{uuid.uuid4().hex[:8]}"
        refs = []
        for item in items:
            label = f"{func.name}[{item.task_id}]" if isinstance(item, TaskItem) else None
            refs.append(self._add(func, (item,), {}, identity=identity, label=label,
                                  group=group if chunksize else None, chunksize=chunksize))
            if len(refs) % PROGRESS_EVERY == 0:  # a large task file: say how far it got
                print(f"nbpipe: registered {len(refs):,} tasks of {func.name!r}", file=sys.stderr,
                      flush=True)
        return refs

    # -- resolution: keys, dependencies, what is already done ---------------------------------

    def _task_by_name(self, name: str, owner: TaskRef) -> TaskRef:
        # the naming rule (nbpipe.naming); the newest task of a label is at hand: no scan
        found = self._by_label.get(name) or find_task(name, self._refs.values(), *ref_fields)
        if found is None:
            raise UnknownTask(
                f"task {owner.label!r} has after={name!r}, but no task of pipeline "
                f"{self.name!r} has that name; register it first or fix the name"
            )
        return found

    def _deps(self, ref: TaskRef) -> list[TaskRef]:
        return list(ref.deps)

    def _resolve(self, refs: Iterable[TaskRef] | None = None) -> None:
        """Compute keys and dependencies of new (and content-dependent) tasks; find what is done."""
        with self._lock:
            todo = [r for r in self._refs.values() if r.key_ is None or r.dynamic or r.late]
            if refs is not None:
                todo += [r for r in refs if r.key_ is None and r.call_id not in self._refs]
            if not todo:
                return
            producers: dict[Path, TaskRef] = {}
            for r in self._refs.values():
                for p in r.out_files:
                    other = producers.get(p)
                    if other is not None and other is not r:
                        raise TaskDefinitionError(
                            f"tasks {other.label!r} and {r.label!r} both declare {p} as their "
                            "output; give each task its own output path"
                        )
                    producers[p] = r
            todo_set = set(todo)
            for r in todo:
                deps: dict[TaskRef, str] = dict.fromkeys(r.upstream, "data")
                for a in r.after:
                    deps.setdefault(self._task_by_name(a, r) if isinstance(a, str) else a, "after")
                for p in r.in_files:
                    producer = producers.get(p)
                    if producer is not None and producer is not r:
                        deps.setdefault(producer, "file")
                    elif not p.exists():
                        raise MissingInputError(
                            f"task {r.label!r} reads {p}, which does not exist and which no "
                            "task of the pipeline declares as an Out file; create the file, "
                            "fix the path, or register the task that writes it"
                        )
                    # Read by content every run: an external file, or one its producer wrote
                    # and a hand may have changed since.
                    r.dynamic = True
                r.deps = deps or _NONE_BY_NAME
            graph = {r: [d for d in r.deps if d in todo_set] for r in todo}
            ordered = order(graph, lambda r: r.label, fix="remove one of these dependencies "
                            "(an after= or an In/Out file)")
            changed = []
            retired: dict[str, str] = {}  # provisional key -> the key that replaces it
            runner = self._runner
            held = runner.blockers if runner is not None and runner.alive else _NONE_BY_NAME
            for r in ordered:
                if any(d.dynamic for d in r.deps):
                    r.dynamic = True
                if r.key_ is not None and (r.state in (State.PENDING, State.RUNNING)
                                           or r in held):
                    # In the runner's hands (it settles a late key itself): its key stays until
                    # it ends, or the runner would not know the task by it.
                    continue
                late, old = r.late, r.key_
                key = content_key(r)
                if key == old and not (r.late and r.state is State.WAITING):
                    continue
                if late and old is not None and key != old:
                    retired[old] = key
                r.key_ = key  # (a late task is looked at again: its upstream may be found done)
                r.state, r.result_file = State.WAITING, None  # not final for readers until found
                changed.append(r)
            if changed:
                self._fresh.find_done(changed, retired)

    def _rekey_changed(self) -> None:
        """Keys are made with the values a task runs with. A task not yet handed to a runner
        whose function now reads a changed global (``CFG["k"] = 2`` after the call), or whose
        argument changed in place, is keyed again now, with its dependents, and says why."""
        with self._lock:
            identities: dict[TaskFunction, Any] = {}
            stale = False
            for r in self._refs.values():
                if r.state is not State.WAITING or r.queued or r.shape is None:
                    continue
                func = r.func
                if getattr(func, "source", None) is None:  # a cell's code cannot change
                    shape = identities.get(func)
                    if shape is None:
                        shape = identities[func] = func.key_shape(func.identity())
                    if shape is not r.shape:
                        r.shape = shape
                        stale = True
                if r in self._mutable_args and self._arguments_changed(r):
                    stale = True
            if stale:  # their dependents' keys change too: make every waiting key again
                for r in self._refs.values():
                    if r.state is State.WAITING and not r.queued:
                        r.key_ = None

    def _arguments_changed(self, ref: TaskRef) -> bool:
        """Whether an argument of ``ref`` (a list, a dict, an object) changed since the call;
        its digest is made again then."""
        named = list(zip(ref.func.signature.parameters, ref.args, strict=False)) + list(ref.kwargs.items())
        changed = False
        for param, value in named:
            if param == ref.func.var_keyword or is_immutable(value) or isinstance(value, TaskRef):
                continue
            old = ref.arg_digests.get(param)
            if old is None:
                continue
            try:
                new = ref.func.argument_digest(self._slot(value, [], ref.func))
            except Unencodable:
                continue
            if new != old:
                if ref.arg_digests is not _NONE_BY_NAME:
                    ref.arg_digests = {**ref.arg_digests, param: new}
                changed = True
        return changed

    def _settle_late(self, refs: list[TaskRef]) -> list[tuple[TaskRef, str]] | None:
        """Final keys for late tasks the runner found ready (see :meth:`Freshness.settle`);
        None when this pipeline is busy resolving in another thread (the runner tries again at
        its next tick)."""
        if not self._lock.acquire(timeout=0.05):
            return None
        try:
            return self._fresh.settle(refs)
        finally:
            self._lock.release()
    def _closure(self, targets: Iterable[TaskRef]) -> list[TaskRef]:
        return reach(targets, lambda r: r.deps)

    def _as_refs(self, tasks: Any) -> list[TaskRef]:
        if isinstance(tasks, (TaskRef, str)):
            tasks = [tasks]
        refs = []
        for t in tasks:
            if isinstance(t, TaskRef):
                refs.append(t)
                continue
            matches = find_tasks(str(t), self._refs.values(), *ref_fields)
            if not matches:
                raise UnknownTask(
                    f"no task {t!r} in pipeline {self.name!r}; see pipe.tasks() for names"
                )
            refs.extend(matches)
        return refs

    def _ensure_runner(self, wait_for_runner: bool = False, timeout: float | None = None) -> Runner:
        if self._runner is not None and self._runner.alive:
            return self._runner
        lock = RunnerLock(self.store, self.name)
        self._take(lock, wait_for_runner, timeout)  # before starting a cluster: fails fast
        try:
            from .runner import RunnerHost
            from .specs import write_specs

            host = RunnerHost(deps=self.deps, refs=self.refs, executed=self.ran.update,
                              settle_late=self._settle_late,
                              write_specs=lambda refs: write_specs(self, refs))
            self._runner = Runner(self.store, self.pipeline_id, self.name, host, self.connection,
                                  lock, max_concurrent=self.max_concurrent)
        except BaseException:
            lock.release()
            raise
        return self._runner

    def _take(self, lock: RunnerLock, wait_for_runner: bool, timeout: float | None) -> None:
        """Take the pipeline's runner lock; with ``wait_for_runner``, wait while another
        process (a script, `nbpipe spawn` started by `nbpipe retry`) runs the pipeline."""
        deadline = None if timeout is None else time.monotonic() + timeout
        told = False
        while True:
            try:
                lock.acquire()
                return
            except PipelineBusy as exc:
                if not wait_for_runner:
                    raise PipelineBusy(
                        f"{exc}; to wait for that runner and then run what it left, use "
                        "pipe.run(wait_for_runner=True)"
                    ) from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise PipelineBusy(
                        f"{exc}; still so after waiting {timeout} s (wait_for_runner=True)"
                    ) from None
                if not told:  # a script that seems to hang says why
                    print(f"nbpipe: {str(exc).split(';')[0]}; waiting for it to finish "
                          "(wait_for_runner=True)", file=sys.stderr, flush=True)
                    told = True
                time.sleep(0.5)

    def run(self, targets: Iterable[TaskRef] | TaskRef | None = None, *, wait: bool = True,
            check: bool = False, timeout: float | None = None,
            wait_for_runner: bool = False, stop_on_failure: bool | None = None,
            skip: str | Sequence[str] | None = None, keep_succeeded: bool | None = None,
            trust_existing: bool | None = None) -> RunSummary:
        """Run what is not done: every task, or ``targets`` and what they need.

        ``wait=False`` returns at once while the tasks run in the background. ``check=True``
        raises :class:`~nbpipe.TaskFailed` naming the tasks that failed.

        When another process runs the pipeline (a script, or the runner `nbpipe retry`
        started), this raises :class:`~nbpipe.PipelineBusy`; ``wait_for_runner=True`` waits
        for that process to finish instead (up to ``timeout`` seconds), takes what it computed
        and runs what is left::

            pipe.run(wait_for_runner=True)   # 0 executed when the other runner did it all

        Run modes (each also set for a whole script by ``nbpipe run --stop-on-failure``,
        ``--keep-succeeded``, ``--trust-existing``, ``--skip PATTERN``): ``stop_on_failure=True``
        starts nothing new after the first failure; ``skip=["FAILED", "fit*"]`` leaves tasks
        out by state, name or label glob (and what depends on them); ``keep_succeeded=True``
        keeps the last successful result of tasks whose key changed (recorded as accepted, see
        :meth:`accept`);
        ``trust_existing=True`` adopts tasks whose declared ``Out`` files exist.
        """
        return self._run(targets, wait=wait, check=check, timeout=timeout,
                         wait_for_runner=wait_for_runner, report=True,
                         modes={"stop_on_failure": stop_on_failure, "skip": run_skip(skip),
                                "keep_succeeded": keep_succeeded, "trust_existing": trust_existing})

    def _run(self, targets: Iterable[TaskRef] | TaskRef | None, *, wait: bool, check: bool = False,
             timeout: float | None = None, wait_for_runner: bool = False,
             report: bool = False, modes: dict[str, Any] | None = None) -> RunSummary:
        """:meth:`run`; ``report=False`` for the runs nbpipe makes itself (``ref.result()``,
        ``retry()``): what they execute is counted by the user's next ``run()``."""
        if isinstance(targets, TaskRef):
            targets = [targets]
        self._rekey_changed()
        self._resolve(targets)
        refs = self._closure(targets if targets is not None else list(self._refs.values()))
        modes = modes or {}
        left_out = runmodes.skipped(refs, modes.get("skip"))  # i20: run modes (nbpipe.runmodes)
        if left_out:
            refs = [r for r in refs if r not in left_out]
        if report:
            self.skipped = {r.label for r in left_out}
        for r in refs:  # what failed or was killed before runs again
            if r.state in BAD:
                r.queued = False
                r.state, r.budget = State.WAITING, r.attempts
        gone = [r for r in refs if r.state is State.SUCCEEDED and r.out_files
                and not all(p.exists() for p in r.out_files)]
        if gone:  # an output file was deleted since the task ran here: it runs again, saying so
            with self._lock:
                self._fresh.find_done(gone)
        with self._lock:
            if run_mode("keep-succeeded", modes.get("keep_succeeded")):
                runmodes.keep_succeeded(self, refs)
            runmodes.adopt_existing(self, refs, run_mode("trust-existing", modes.get("trust_existing")))
        todo = [r for r in refs if r.state is State.WAITING]
        live = self._runner is not None and self._runner.alive
        paused = self._runner.paused if live else self.store.is_paused(self.pipeline_id)
        if todo and (live or not paused):  # a paused pipeline starts no cluster for nothing
            runner = self._ensure_runner(wait_for_runner, timeout)
            if not live:  # a new runner: another process may have run some since they resolved
                todo = self._fresh.found_since(todo)
            runner.check(todo)  # a task no worker pool can hold fails here, before any runs
            runner.stop_on_failure = run_mode("stop-on-failure", modes.get("stop_on_failure"))
            for r in todo:
                r.queued = True
            self.ran.update(todo)
            runner.add(todo)
            paused = runner.paused
        live = self._runner is not None and self._runner.alive
        if wait and live and not paused and any(not r.state.final for r in refs):
            self._wait(refs, timeout)
        if wait and todo and self._runner is not None and self._runner.fatal is not None:
            raise _stopped(self._runner)  # it stopped before the wait began
        summary = self._summary(refs, report)
        if check and summary.failed:
            raise TaskFailed(
                f"pipeline {self.name!r}: {len(summary.failed)} task(s) failed: "
                f"{', '.join(summary.failed[:10])}; see pipe.tasks(state='FAILED') and "
                "ref.result() for their errors",
                summary.failed,
            )
        return summary

    def _summary(self, refs: list[TaskRef], report: bool = True) -> RunSummary:
        """Counts of ``refs``; *executed* are those this process ran since a summary last
        reported them finished (a task run by ``ref.result()`` before ``run()`` included),
        *already done* the others that succeeded."""
        counts = Counter(r.state.value for r in refs)
        failed = [r.label for r in refs if r.state in (State.FAILED, State.KILLED)]
        runner = self._runner
        paused = runner.paused if runner is not None else self.store.is_paused(self.pipeline_id)
        ran = self.ran
        # (held back by a pause before it started, or a late task found done once its upstream
        # content was known: it did not run)
        executed = [r for r in refs if r in ran and not (paused and r.state is State.WAITING)
                    and r.reason != "found done"]
        cached = sum(r.state is State.SUCCEEDED for r in refs) - sum(
            r.state is State.SUCCEEDED for r in executed)
        if report:  # each execution is reported once
            ran.difference_update([r for r in executed if r.state.final])
        return RunSummary(dict(counts), failed, len(executed), cached, paused)

    def _wait(self, refs: list[TaskRef], timeout: float | None) -> None:
        runner = self._runner
        assert runner is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        cursor = 0  # tasks end roughly in order: skip what ended, look at the rest later
        with runner.changed:
            while True:
                while cursor < len(refs) and refs[cursor].state.final:
                    cursor += 1
                if runner.fatal is not None:
                    raise _stopped(runner)
                # (ended, but not yet recorded while the store fails: wait for it, or its end)
                if (cursor == len(refs) and runner.error is None) or not runner.alive:
                    return
                if runner.paused and not any(r.state in (State.PENDING, State.RUNNING)
                                             for r in refs[cursor:]):
                    return
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    unfinished = sum(not r.state.final for r in refs)
                    raise TimeoutError(
                        f"{unfinished} task(s) of pipeline {self.name!r} not finished after "
                        f"{timeout} s (e.g. {refs[cursor].label}); they keep running"
                    )
                runner.changed.wait(0.5 if left is None else min(0.5, left))

    def wait(self, timeout: float | None = None) -> RunSummary:
        """Wait until every task handed to the runner reached a final state.

        Tasks only registered (called, never run nor needed) are not waited for: see
        :meth:`unsubmitted`.
        """
        waiting = set(self.unsubmitted())
        refs = [r for r in self._refs.values() if r not in waiting]
        if self._runner is not None:
            self._wait(refs, timeout)
        return self._summary(refs)

    def unsubmitted(self) -> list[TaskRef]:
        """Tasks registered in this process that no runner has: ``pipe.run()`` (or reading their
        values) runs them."""
        runner = self._runner
        live = runner is not None and runner.alive
        return [r for r in self._refs.values()
                if r.state is State.WAITING and not (live and runner.was_handed(r))]

    def reopen(self, name: str, store: str | os.PathLike[str] | Store | None = None) -> Pipeline:
        """Another pipeline on this one's cluster: this pipeline's runner stops and the new one
        takes the cluster over (closing the new one closes it). Refused while tasks of this one
        run.

        >>> other = pipe.reopen("other")     # doctest: +SKIP
        """
        runner = self._runner
        if runner is not None and runner.alive and runner.in_flight():
            raise PipelineBusy(
                f"pipeline {self.name!r}: {runner.in_flight()} task(s) are running; wait for them "
                f"(pipe.wait(), %pipeline wait) or kill them before switching to pipeline {name!r}"
            )
        new = Pipeline(name, store=store if store is not None else self.store, cluster=self.cluster)
        with self._lock:
            connection, self._connection = self._connection, None
        self.close()  # the runner (its lock given back); the cluster now belongs to `new`
        new._connection = connection
        return new

    def _load(self, ref: TaskRef) -> Any:
        assert ref.result_file is not None
        path, checksum = ref.result_file
        data = None
        if path == INLINE:
            data = (self._runner.inline_data(ref.key) if self._runner is not None
                    else self.store.result_data(ref.key))
        return read_result(path, checksum, data)

    def _result(self, ref: TaskRef, timeout: float | None) -> Any:
        if not ref.state.final or ref.state in BAD and ref.exception is None and ref.error is None:
            self._run([ref], wait=True, timeout=timeout)
        if ref.state is State.SUCCEEDED:
            assert ref.result_file is not None
            try:
                return self._load(ref)
            except ResultCorrupt:
                self.store.forget_result(ref.key)
                ref.state, ref.result_file, ref.key_ = State.WAITING, None, None
                self._resolve([ref])
                self._run([ref], wait=True, timeout=timeout)
                if ref.state is State.SUCCEEDED and ref.result_file is not None:
                    return self._load(ref)
        if ref.state is State.FAILED:
            if ref.exception is not None:
                try:
                    exc = cloudpickle.loads(ref.exception)
                except Exception:
                    exc = None
                if isinstance(exc, BaseException):
                    if ref.traceback:
                        exc.__cause__ = RemoteTraceback(
                            f"\nTraceback of task {ref.label!r} on its worker:\n{ref.traceback}")
                    raise exc
            raise TaskFailed(f"task {ref.label!r} failed: {ref.error}\n{ref.traceback or ''}",
                             [ref.label])
        if ref.state is State.UPSTREAM_FAILED:
            raise UpstreamFailed(f"task {ref.label!r} did not run: {ref.error}", [ref.label])
        if ref.state is State.KILLED:
            raise TaskKilled(f"task {ref.label!r} was killed")
        raise NbpipeError(f"task {ref.label!r} is {ref.state.value} (the pipeline is paused?)")

    # -- inspection ---------------------------------------------------------------------------

    def tasks(self, state: str | State | None = None) -> list[TaskInfo]:
        """The pipeline's tasks: those registered in this process, else those in the store."""
        try:
            wanted = State(state).value if state is not None else None
        except ValueError:
            raise InvalidArgument(
                f"pipeline {self.name!r}: tasks(state={state!r}) is not a state; use one of "
                f"{', '.join(s.value for s in State)}"
            ) from None
        if self._refs:
            self._resolve()
            infos = [TaskInfo(r.name, r.key, r.label, r.state.value, r.attempts, r.error, r.reason)
                     for r in self._refs.values()]
        else:
            rows = self.store.task_rows(self.pipeline_id).values()
            infos = [TaskInfo(r["name"], r["key"], r["label"], r["state"], r["attempts"],
                              r["error"], r["reason"]) for r in rows]
        return [i for i in infos if wanted is None or i.state == wanted]

    def why(self, task: TaskRef | str) -> str:
        """Why the task ran (or will run) in this pipeline's latest run."""
        ref = self._as_refs(task)[0]
        self._resolve([ref])
        if ref.reason == "found done":  # accepted or adopted earlier: the store says so
            row = self.store.task_rows(self.pipeline_id, [ref.key]).get(ref.key)
            if row is not None and row["reason"] and row["reason"].startswith(("accepted", "adopted")):
                return row["reason"]
        return ref.reason or "found done"

    def accept(self, tasks: Any) -> dict[str, str]:
        """Let the current definition of ``tasks`` (refs, names or labels) adopt the result of
        their last successful run, without running them (an edit you call cosmetic): they
        become SUCCEEDED and ``why`` says "accepted by hand on DATE". Undo with :meth:`retry`.
        Returns ``{label: reason}``."""
        refs = self._as_refs(tasks)
        with self._lock:
            self._resolve(refs)
            reasons = accept_keys(self.store, self.pipeline_id, [r.key for r in refs],
                                  pipeline=self.name)
            runmodes.mark_done(self, [r for r in refs if r.key in reasons], reasons)
        return {r.label: reasons[r.key] for r in refs if r.key in reasons}

    # -- control (works from any process, through the store's command table) ------------------

    # -- the public core: what the notebook layer, the CLI, specs and the runner use ------------

    def refs(self) -> list[TaskRef]:
        """The tasks registered in this process, in the order they were defined."""
        with self._lock:
            return list(self._refs.values())

    def add(self, func: TaskFunction, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
            *, label: str | None = None) -> TaskRef:
        """Register a call of ``func`` (a task function, a ``%%task`` cell) and return its ref;
        the same call again returns the same ref."""
        return self._add(func, args, kwargs or {}, label=label)

    def add_many(self, func: TaskFunction, items: Iterable[Any], chunksize: int | None = None
                 ) -> list[TaskRef]:
        """Register one call of ``func`` per item (``func.map``); ``chunksize`` groups them."""
        return self._add_many(func, items, chunksize)

    def forget(self, refs: Iterable[TaskRef]) -> None:
        """Drop finished tasks from this process (their refs, arguments and the runner's
        bookkeeping); the store keeps their identity and results, so a later run finds them
        done. What :func:`nbpipe.run_tasks` does after each window of a large task file."""
        refs = [r for r in refs if r.state.final]
        with self._lock:
            for r in refs:
                if self._refs.get(r.call_id) is r:
                    del self._refs[r.call_id]
                if self._by_label.get(r.label) is r:
                    del self._by_label[r.label]
                self._mutable_args.discard(r)
            self.ran.difference_update(refs)
        if self._runner is not None:
            self._runner.forget(refs)

    def adopt(self, refs: Iterable[TaskRef]) -> None:
        """Register refs made elsewhere (revived from specs by a detached runner) as they are."""
        with self._lock:
            for ref in refs:
                self._refs[ref.call_id] = ref
                self._by_label[ref.label] = ref

    def resolve(self, refs: Iterable[TaskRef] | None = None) -> None:
        """Key new tasks (and ``refs``), find what is already done, record them in the store."""
        self._resolve(refs)

    def find(self, tasks: Any) -> list[TaskRef]:
        """Refs of tasks given as refs or names (:mod:`nbpipe.naming`'s rule);
        :class:`~nbpipe.UnknownTask` for a name no task has."""
        return self._as_refs(tasks)

    def closure(self, targets: Iterable[TaskRef]) -> list[TaskRef]:
        """``targets`` and every task they need, transitively."""
        return self._closure(targets)

    def deps(self, ref: TaskRef) -> list[TaskRef]:
        """The tasks ``ref`` waits for (data, ``after=`` and file dependencies)."""
        return list(ref.deps)

    def result_of(self, ref: TaskRef, timeout: float | None = None) -> Any:
        """The value of ``ref`` (running what it needs first): what ``ref.result()`` returns."""
        return self._result(ref, timeout)

    @property
    def started_connection(self) -> Connection | None:
        """The cluster connection when one was started (None: nothing started it yet)."""
        return self._connection

    @property
    def runner(self) -> Runner | None:
        """The runner of this process for this pipeline, when one was started."""
        return self._runner

    def _keys(self, tasks: Any) -> list[str]:
        """Keys of tasks given as refs, or named (tasks of this process first, else the store)."""
        if tasks is None:
            return []
        if isinstance(tasks, (TaskRef, str)):
            tasks = [tasks]
        keys = []
        for t in tasks:
            if isinstance(t, TaskRef):
                keys.append(t.key)
                continue
            matches = [r.key for r in find_tasks(t, self._refs.values(), *ref_fields)]
            keys.extend(matches or self.control.keys([t]))
        return keys

    def _offline(self) -> bool:
        """True when no runner (here or in another process) will pick commands up."""
        return not self.control.attached()

    def retry(self, tasks: Any = None, *, failed: bool = False, wait: bool = False) -> None:
        """Run tasks again, with everything they block; ``failed=True`` for every failed one.

        The same rules hold from every door (here, ``nbpipe retry``, the sidebar): see
        :class:`nbpipe.control.Controller`.
        """
        if tasks is None and not failed:
            raise TaskDefinitionError("pipe.retry() needs tasks to retry, or failed=True")
        keys = self._keys(tasks)
        if self.control.attached():
            self.control.command("retry", keys=keys, failed=failed)
            return
        reset = set(self.control.reset_for_retry(keys, failed=failed))
        refs = [r for r in self._refs.values() if r.key_ in reset]
        for r in refs:  # as the runner resets them: the old result is not taken for them
            r.state, r.result_file, r.queued = State.WAITING, None, False
            r.budget = r.attempts
            r.error = r.traceback = r.exception = None
            r.reason = RETRY_REASON
        if refs:
            self._run([r for r in self._refs.values() if r.state is not State.SUCCEEDED], wait=wait)

    def kill(self, tasks: Any = None, *, all: bool = False) -> None:
        """Stop tasks (running ones within seconds, CPU-bound Python loops included).

        Waiting tasks downstream of a killed one become UPSTREAM_FAILED; finished tasks are left
        as they are (the same from every door: see :class:`nbpipe.control.Controller`).
        """
        if all and self._refs:
            keys = [r.key for r in self._refs.values() if not r.state.final]
        else:
            keys = self._keys(tasks)
        if all and not self._refs:
            self.control.kill(all=True)
            return
        if self.control.attached():
            self.control.command("kill", keys=keys)
            return
        changed = self.control.kill_offline(keys)
        for r in self._refs.values():
            if r.key_ in changed:
                r.state, r.error = changed[r.key_]

    def pause(self) -> None:
        """Start no new task; running tasks finish."""
        self.control.pause()

    def resume(self) -> None:
        """Start tasks again after :meth:`pause`."""
        self.control.resume()

    def detach(self) -> int:
        """Hand the unfinished tasks to a detached runner (``nbpipe spawn``); return its pid.

        The runner survives this process (a kernel, a terminal) and exits when the pipeline is
        done or paused. Its output goes to ``<store>/logs/spawn-<pipeline>.log``.
        """
        from .specs import write_specs

        if self._runner is not None and self._runner.alive:
            raise PipelineBusy(f"pipeline {self.name!r} is running in this process already; "
                               "wait for it (or pause it) before detaching")
        self._resolve()
        todo = [r for r in self._closure(list(self._refs.values())) if r.state is not State.SUCCEEDED]
        write_specs(self, todo)
        return spawn(self.store, self.name)

    @property
    def paused(self) -> bool:
        """Whether the pipeline is paused."""
        return self.store.is_paused(self.pipeline_id)

    def set_cluster(self, cluster: Any) -> None:
        """Run on another cluster from now on (see :mod:`nbpipe.cluster` for the forms).

        The cluster nbpipe started before is closed (its batch jobs cancelled); refused while
        tasks run on it.
        """
        validate(cluster, self.store.path)
        if self._runner is not None and self._runner.alive and self._runner.in_flight():
            raise ClusterError(
                f"pipeline {self.name!r}: {self._runner.in_flight()} task(s) are running on the "
                "current cluster; wait for them (pipe.wait()) or kill them before changing it"
            )
        with self._lock:
            self._stop()
            self.cluster = cluster

    @property
    def connection(self) -> Connection:
        """The running cluster connection (started on first use)."""
        if self._connection is None:
            self._connection = connect(self.cluster, store_dir=self.store.path)
        return self._connection

    @property
    def client(self) -> Any:
        """The Dask client (connecting on first use)."""
        return self.connection.client

    def close(self) -> None:
        """Stop the runner and close the cluster nbpipe started."""
        self._stop()
        _open.discard(self)

    def _stop(self) -> None:
        """Close the runner, then the cluster nbpipe started (recording the jobs it cancelled)."""
        runner, connection = self._runner, self._connection
        self._runner = self._connection = None
        if runner is not None:
            runner.close()
        if connection is not None:
            connection.close()
            if connection.pools is not None:
                with contextlib.suppress(Exception):
                    record_jobs(self.store, self.pipeline_id, connection.pools)


def _absolute(value: Any) -> Any:
    """Paths made absolute against the current directory, keeping str/Path and list shapes."""
    if isinstance(value, Path):
        return Path(os.path.abspath(value))
    if isinstance(value, str):
        return os.path.abspath(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_absolute(v) for v in value)
    return value
