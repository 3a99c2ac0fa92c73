"""Graph resolution: the tasks one process registered, their dependencies and their keys.

Pure: no store, no Dask, no Jupyter. A :class:`TaskGraph` holds the calls a pipeline's tasks
received in this process (``fit(x=1)`` called twice is one task), finds their dependencies
(task results in the arguments, ``after=``, ``In``/``Out`` files), orders them (naming a
cycle), makes their content keys, and keys again the tasks whose globals or arguments changed
in place before they ran. Which of the keyed tasks are already done is :mod:`nbpipe.freshness`'s
job; the :class:`~nbpipe.Pipeline` hands it what :meth:`TaskGraph.resolve` changed.

>>> graph = TaskGraph(owner=None, name="demo")
>>> graph.resolve()
([], {})
>>> TaskGraph.closure([])
[]
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import uuid
import weakref
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

from .cells import CellRunner
from .content import content_key
from .errors import MissingInputError, TaskDefinitionError, UnhashableValue, UnknownTask
from .files import paths_in
from .graph import order, reach
from .identity import CodeIdentity, Unencodable, is_immutable
from .naming import find_task, find_tasks, ref_fields
from .shipping import by_value
from .states import State
from .task import TaskFunction, TaskOutput, TaskRef, _label
from .walk import holds_ref, map_refs

__all__ = ["PROGRESS_EVERY", "Slot", "TaskGraph", "absolute", "redefines"]

_NONE: tuple[Any, ...] = ()  # shared by every task without upstream tasks or files
_NONE_BY_NAME: dict[Any, Any] = {}  # shared by every task without keywords or dependencies
_SCALARS = frozenset({int, float, str, bool, type(None), bytes})

PROGRESS_EVERY = 100_000  # map() over more entries than this reports its progress on stderr


class Slot:
    """Stands for the i-th upstream TaskRef (or one output of it) inside encoded arguments.

    >>> Slot(0, "mean").__nbpipe_token__()
    ('upstream', 0, 'mean')
    """

    __slots__ = ("index", "output")
    # Keys encode the class's qualified name with its token: the slot was
    # nbpipe.pipeline._Slot when the keys of existing stores were made, and keeps that name
    # so that they stay the same (else every task with an upstream task would run again).
    __module__ = "nbpipe.pipeline"
    __qualname__ = "_Slot"

    def __init__(self, index: int, output: str | None = None):
        self.index = index
        self.output = output

    def __nbpipe_token__(self) -> tuple[str, int, str | None]:
        return ("upstream", self.index, self.output)


def redefines(old: TaskFunction, new: TaskFunction) -> bool:
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


def absolute(value: Any) -> Any:
    """Paths made absolute against the current directory, keeping str/Path and list shapes.

    >>> absolute(["a", 1]) == [os.path.abspath("a"), 1]
    True
    """
    if isinstance(value, Path):
        return Path(os.path.abspath(value))
    if isinstance(value, str):
        return os.path.abspath(value)
    if isinstance(value, (list, tuple)):
        return type(value)(absolute(v) for v in value)
    return value


class TaskGraph:
    """The tasks of one pipeline registered in this process, and how they depend on each other.

    ``owner`` is the pipeline whose refs these are (a task result of another pipeline is
    refused as an argument or ``after=``), ``name`` its name for messages. ``refs`` maps a
    call's identity in this process to its ref, in the order of registration; ``by_label``
    holds the newest ref of each label. Every method takes :attr:`lock` (re-entrant), which the
    pipeline shares for what it does with the same refs.
    """

    def __init__(self, owner: Any, name: str):
        # (weakly: the pipeline holds its graph, and a pipeline without tasks is freed as soon
        # as it is dropped, as before the graph was its own object; its refs hold it strongly)
        self._owner = weakref.ref(owner) if owner is not None else lambda: None
        self.name = name
        self.refs: dict[str, TaskRef] = {}  # call id -> ref, the active tasks of this process
        self.by_label: dict[str, TaskRef] = {}
        # Tasks with an argument that can change in place (a list, a dict, an object): their
        # digests are checked again when they are handed to a runner.
        self.mutable_args: weakref.WeakSet[TaskRef] = weakref.WeakSet()
        self.lock = threading.RLock()

    @property
    def owner(self) -> Any:
        """The pipeline these tasks belong to."""
        return self._owner()

    # -- registration -------------------------------------------------------------------------

    def slot(self, value: Any, upstream: list[TaskRef], func: TaskFunction) -> Any:
        """``value`` with each task result in it (see :mod:`nbpipe.walk`) replaced by a
        :class:`Slot` numbering it in ``upstream``."""
        if type(value) in _SCALARS:  # most arguments: no walk
            return value

        def slot(found: Any) -> Slot:
            ref = found if isinstance(found, TaskRef) else found.ref
            if ref.pipeline is not self.owner:
                raise TaskDefinitionError(
                    f"task {func.name!r} got {found!r} from pipeline {ref.pipeline.name!r}; "
                    f"tasks can only depend on tasks of the same pipeline ({self.name!r})"
                )
            upstream.append(ref)
            return Slot(len(upstream) - 1, found.name if isinstance(found, TaskOutput) else None)

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

    def check_after(self, func: TaskFunction, after: Sequence[Any]) -> None:
        """Refuse ``after=`` a task of another pipeline, as data dependencies are refused."""
        for a in after:
            ref = a.ref if isinstance(a, TaskOutput) else a
            if isinstance(ref, TaskRef) and ref.pipeline is not self.owner:
                raise TaskDefinitionError(
                    f"task {func.name!r} has after={ref.label!r} from pipeline "
                    f"{ref.pipeline.name!r}; tasks can only wait for tasks of the same pipeline "
                    f"({self.name!r}): run the other pipeline first, or define that task in "
                    "this one"
                )

    def add(self, func: TaskFunction, args: Sequence[Any], kwargs: dict[str, Any], *,
            identity: CodeIdentity | None = None, label: str | None = None,
            group: str | None = None, chunksize: int | None = None) -> TaskRef:
        """Register a call of ``func``; the same call again returns the same ref, and a cell
        (or a ``def``) defined again replaces the ref of its label."""
        try:
            bound = func.bind(args, kwargs)
        except TypeError as exc:
            raise TaskDefinitionError(
                f"task {func.name!r}: {exc}; its signature is {func.name}{func.signature}"
            ) from None
        upstream: list[TaskRef] = []
        slotted = {p: self.slot(v, upstream, func) for p, v in bound.arguments.items()}
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
            if not mutable and type(value) not in _SCALARS and type(value) is not Slot \
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
            bound.arguments[param] = absolute(bound.arguments.get(param))
        shape = func.key_shape(identity)
        after = func.opts.after
        self.check_after(func, after)
        # The call's identity in this process, before upstream keys are known: a digest of
        # the repr of strings (unambiguous, and much cheaper than the canonical encoding).
        call_id = hashlib.blake2b(repr((
            shape.fixed_digest, tuple(arg_digests.items()), tuple(u.call_id for u in upstream),
            tuple(a if isinstance(a, str) else a.call_id for a in after),
            tuple(str(p) for p in in_files),
        )).encode(), digest_size=16).hexdigest()
        with self.lock:
            existing = self.refs.get(call_id)
            if existing is not None:
                return existing
            previous = self.by_label.get(label)
            if previous is not None:
                if redefines(previous.func, func):  # an edited cell run again replaces it
                    self.refs.pop(previous.call_id, None)
                else:  # another call whose label prints alike: a task of its own
                    n = 2
                    while f"{label}~{n}" in self.by_label:
                        n += 1
                    label = f"{label}~{n}"
            ref = TaskRef(self.owner, func, func.name, label)
            # Most tasks have no keywords, upstream tasks or files: they share empty
            # containers (never changed in place) instead of holding ~300 bytes of their own.
            ref.args, ref.kwargs = bound.args, bound.kwargs or _NONE_BY_NAME
            ref.call_id = call_id
            ref.upstream = upstream or _NONE
            ref.after = after
            ref.in_files, ref.out_files = in_files or _NONE, out_files or _NONE
            ref.shape, ref.arg_digests = shape, arg_digests
            ref.group, ref.chunksize = group, chunksize
            self.refs[call_id] = ref
            self.by_label[label] = ref
            if mutable:
                self.mutable_args.add(ref)
        return ref

    def add_many(self, func: TaskFunction, items: Iterable[Any], chunksize: int | None
                 ) -> list[TaskRef]:
        """One call of ``func`` per item (``func.map``), its code identified once for all;
        ``chunksize`` groups them."""
        from .taskfile import TaskItem

        identity = func.identity()  # once for the whole map
        group = f"{func.name}-{uuid.uuid4().hex[:8]}"
        refs = []
        for item in items:
            label = f"{func.name}[{item.task_id}]" if isinstance(item, TaskItem) else None
            refs.append(self.add(func, (item,), {}, identity=identity, label=label,
                                 group=group if chunksize else None, chunksize=chunksize))
            if len(refs) % PROGRESS_EVERY == 0:  # a large task file: say how far it got
                print(f"nbpipe: registered {len(refs):,} tasks of {func.name!r}", file=sys.stderr,
                      flush=True)
        return refs

    def adopt(self, refs: Iterable[TaskRef]) -> None:
        """Register refs made elsewhere (revived from specs) as they are."""
        with self.lock:
            for ref in refs:
                self.refs[ref.call_id] = ref
                self.by_label[ref.label] = ref

    def forget(self, refs: Iterable[TaskRef]) -> None:
        """Drop ``refs`` from the graph (their dependents keep them as upstream)."""
        with self.lock:
            for r in refs:
                if self.refs.get(r.call_id) is r:
                    del self.refs[r.call_id]
                if self.by_label.get(r.label) is r:
                    del self.by_label[r.label]
                self.mutable_args.discard(r)

    # -- finding tasks ------------------------------------------------------------------------

    def task_by_name(self, name: str, owner: TaskRef) -> TaskRef:
        """The task ``after=name`` of ``owner`` names (:mod:`nbpipe.naming`'s rule)."""
        # the newest task of a label is at hand: no scan
        found = self.by_label.get(name) or find_task(name, self.refs.values(), *ref_fields)
        if found is None:
            raise UnknownTask(
                f"task {owner.label!r} has after={name!r}, but no task of pipeline "
                f"{self.name!r} has that name; register it first or fix the name"
            )
        return found

    def find(self, tasks: Any) -> list[TaskRef]:
        """Refs of tasks given as refs or names; :class:`~nbpipe.UnknownTask` for a name no
        task has."""
        if isinstance(tasks, (TaskRef, str)):
            tasks = [tasks]
        refs = []
        for t in tasks:
            if isinstance(t, TaskRef):
                refs.append(t)
                continue
            matches = find_tasks(str(t), self.refs.values(), *ref_fields)
            if not matches:
                raise UnknownTask(
                    f"no task {t!r} in pipeline {self.name!r}; see pipe.tasks() for names"
                )
            refs.extend(matches)
        return refs

    def keys(self, tasks: Any, elsewhere: Callable[[list[str]], list[str]]) -> list[str]:
        """Keys of tasks given as refs or names; a name none of these tasks has is looked up
        by ``elsewhere`` (the store's tasks, through the same naming rule)."""
        if tasks is None:
            return []
        if isinstance(tasks, (TaskRef, str)):
            tasks = [tasks]
        keys = []
        for t in tasks:
            if isinstance(t, TaskRef):
                keys.append(t.key)
                continue
            matches = [r.key for r in find_tasks(t, self.refs.values(), *ref_fields)]
            keys.extend(matches or elsewhere([t]))
        return keys

    @staticmethod
    def closure(targets: Iterable[TaskRef]) -> list[TaskRef]:
        """``targets`` and every task they need, transitively (after :meth:`resolve`)."""
        return reach(targets, lambda r: r.deps)

    # -- keys ---------------------------------------------------------------------------------

    def resolve(self, refs: Iterable[TaskRef] | None = None,
                held: Collection[TaskRef] = _NONE) -> tuple[list[TaskRef], dict[str, str]]:
        """Compute dependencies and keys of new (and content-dependent) tasks, and of ``refs``.

        ``held`` are tasks a runner has (their keys stay until they end). Returns the tasks
        whose key is new -- they are WAITING until found done -- and the provisional keys of
        late tasks with the key replacing each. The caller holds :attr:`lock` across this and
        what it does with the answer.
        """
        with self.lock:
            todo = [r for r in self.refs.values() if r.key_ is None or r.dynamic or r.late]
            if refs is not None:
                todo += [r for r in refs if r.key_ is None and r.call_id not in self.refs]
            if not todo:
                return [], {}
            producers: dict[Path, TaskRef] = {}
            for r in self.refs.values():
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
                    deps.setdefault(self.task_by_name(a, r) if isinstance(a, str) else a, "after")
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
                r.update(state=State.WAITING, result_file=None)  # not final for readers until found
                changed.append(r)
            return changed, retired

    def rekey_changed(self) -> None:
        """Keys are made with the values a task runs with. A task not yet handed to a runner
        whose function now reads a changed global (``CFG["k"] = 2`` after the call), or whose
        argument changed in place, is keyed again at the next :meth:`resolve`, with its
        dependents."""
        with self.lock:
            identities: dict[TaskFunction, Any] = {}
            stale = False
            for r in self.refs.values():
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
                if r in self.mutable_args and self.arguments_changed(r):
                    stale = True
            if stale:  # their dependents' keys change too: make every waiting key again
                for r in self.refs.values():
                    if r.state is State.WAITING and not r.queued:
                        r.key_ = None

    def arguments_changed(self, ref: TaskRef) -> bool:
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
                new = ref.func.argument_digest(self.slot(value, [], ref.func))
            except Unencodable:
                continue
            if new != old:
                if ref.arg_digests is not _NONE_BY_NAME:
                    ref.arg_digests = {**ref.arg_digests, param: new}
                changed = True
        return changed
