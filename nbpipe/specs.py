"""Task specs on disk: what another process needs to run tasks registered here.

A detached runner (``nbpipe spawn``) has none of the notebook's or script's objects, so when a
pipeline is handed over, the specs of its unfinished tasks are written next to the results:
``<store>/specs/<key[:2]>/<key>.pkl`` (cloudpickle of the function, its arguments with upstream
tasks replaced by their keys, options, dependencies). :func:`revive` rebuilds the graph from them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cloudpickle

from .errors import NbpipeError
from .results import append_private, locate, write_private
from .states import State
from .task import TaskFunction, TaskRef, make_options
from .walk import map_leaves, map_refs

if TYPE_CHECKING:
    from .pipeline import Pipeline
    from .store import Store

__all__ = ["revive", "spawn", "write_specs"]


class _KeyRef:
    """An upstream task inside pickled arguments, by key (and output name for cells)."""

    def __init__(self, key: str, output: str | None = None):
        self.key = key
        self.output = output


def _spec_path(store_dir: Path, key: str) -> Path:
    return store_dir / "specs" / key[:2] / f"{key}.pkl"


def _keyed(value: Any) -> Any:
    return map_refs(value, lambda v: _KeyRef(v.key) if isinstance(v, TaskRef)
                    else _KeyRef(v.ref.key, v.name))


def write_specs(pipe: Pipeline, refs: list[TaskRef]) -> int:
    """Write the specs of ``refs`` (atomically, private to the user); return how many."""
    written = 0
    for ref in refs:
        opts = {k: v for k, v in ref.func.opts.__dict__.items() if k != "after"}
        spec = {
            "name": ref.name, "label": ref.label, "kind": ref.func.kind, "fn": ref.func.fn,
            "options": opts, "outputs": getattr(ref.func, "outputs", None),
            "args": _keyed(ref.args), "kwargs": _keyed(ref.kwargs),
            "upstream": [u.key for u in ref.upstream],
            "deps": {d.key: kind for d, kind in ref.deps.items()},
            "in_files": [str(p) for p in ref.in_files], "out_files": [str(p) for p in ref.out_files],
            "group": ref.group, "chunksize": ref.chunksize, "components": ref.components,
            "reason": ref.reason, "late": ref.late,
            "pipeline_max_concurrent": pipe.max_concurrent,  # a detached runner keeps the cap
        }
        write_private(_spec_path(pipe.store.path, ref.key), cloudpickle.dumps(spec))
        written += 1
    return written


def _done_ref(pipe: Pipeline, row: Any, result: Any) -> TaskRef:
    ref = TaskRef.__new__(TaskRef)
    TaskRef.__init__(ref, pipe, None, row["name"], row["label"])  # type: ignore[arg-type]
    ref.key_ = row["key"]
    ref.update(state=State.SUCCEEDED, attempts=row["attempts"], reason="found done",
               result_file=(locate(pipe.store.path, result["path"]), result["checksum"]))
    ref.args, ref.kwargs, ref.upstream, ref.after = (), {}, [], ()
    ref.in_files, ref.out_files, ref.call_id = [], [], row["key"]
    return ref


def revive(pipe: Pipeline) -> list[TaskRef]:
    """Rebuild the active tasks of ``pipe`` from the store and their specs; return the refs.

    Done tasks come back as finished refs (their results are on disk); unfinished ones need a
    spec, and a missing spec is an error naming the task.
    """
    store = pipe.store
    rows = store.task_rows(pipe.pipeline_id)
    results = store.results(list(rows))
    refs: dict[str, TaskRef] = {}
    specs: dict[str, dict[str, Any]] = {}
    for key, row in rows.items():
        if row["state"] == State.SUCCEEDED.value and key in results:
            refs[key] = _done_ref(pipe, row, results[key])
            continue
        path = _spec_path(store.path, key)
        if not path.exists():
            raise NbpipeError(
                f"task {row['label']!r} of pipeline {pipe.name!r} has no spec in the store, so "
                "no other process can run it; run it from where it was defined, or hand the "
                "pipeline over with `%pipeline run --detach` / `nbpipe run --detach`"
            )
        specs[key] = cloudpickle.loads(path.read_bytes())

    def by_key(value: _KeyRef) -> Any:
        ref = refs[value.key]
        return ref.output(value.output) if value.output else ref

    def revived(value: Any) -> Any:
        return map_leaves(value, lambda v: isinstance(v, _KeyRef), by_key)

    caps = [s["pipeline_max_concurrent"] for s in specs.values() if s.get("pipeline_max_concurrent")]
    if caps and pipe.max_concurrent is None:
        pipe.max_concurrent = min(caps)
    for key, spec in specs.items():
        func = TaskFunction(spec["fn"], spec["kind"], make_options(spec["name"], **spec["options"]), pipe)
        if spec["outputs"] is not None:
            func.outputs = spec["outputs"]  # type: ignore[attr-defined]
        ref = TaskRef(pipe, func, spec["name"], spec["label"])
        ref.key_, ref.components = key, spec["components"]
        ref.update(reason=spec["reason"], attempts=rows[key]["attempts"],
                   budget=rows[key]["attempts"])
        ref.call_id, ref.after = key, ()
        ref.in_files = [Path(p) for p in spec["in_files"]]
        ref.out_files = [Path(p) for p in spec["out_files"]]
        ref.group, ref.chunksize = spec["group"], spec["chunksize"]
        ref.late = spec.get("late", False)  # its key is settled when it is ready
        refs[key] = ref
    for key, spec in specs.items():
        ref = refs[key]
        missing = [k for k in spec["deps"] if k not in refs]
        if missing:
            raise NbpipeError(f"task {ref.label!r} depends on tasks missing from the store "
                              f"({', '.join(k[:12] for k in missing)}); run it where it was defined")
        ref.args, ref.kwargs = revived(spec["args"]), revived(spec["kwargs"])
        ref.upstream = [refs[k] for k in spec["upstream"]]
        ref.deps = {refs[k]: kind for k, kind in spec["deps"].items()}
    pipe.adopt(refs.values())
    return list(refs.values())


def spawn(store: Store, pipeline: str) -> int:
    """Start ``nbpipe spawn`` for a pipeline in a new session (it outlives us); return its pid."""
    import subprocess

    logs = store.path / "logs"
    logs.mkdir(mode=0o700, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in pipeline)
    with append_private(logs / f"spawn-{safe}.log") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbpipe.cli", "--store", str(store.path), "spawn", pipeline],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    return proc.pid
