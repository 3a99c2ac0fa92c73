"""Freshness: which of a pipeline's tasks are done, and why each of the others runs.

A task is done when the store holds an intact result under its key (or a worker left a verified
result file there before its runner died: the file is adopted), its declared output files exist,
and no retry was asked for. Every other task gets the reason it runs: what changed since the
previous run of the same label (or of the closest earlier call of the same function), a previous
failure, a missing result or output file. Knows the store and the task records, nothing of
Dask or Jupyter.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .content import content_key, pending_reason
from .control import RETRY_REASON
from .identity import IDENTITY_VERSION
from .results import INLINE, locate
from .runmodes import PREVIOUS_RUN
from .states import BAD, State
from .store import Batch
from .why import explain

if TYPE_CHECKING:
    from .store import Store
    from .task import TaskFunction, TaskRef

__all__ = ["Freshness", "intact"]

_told_identity: set[str] = set()  # pipelines told that their keys came from older rules


class _EarlierCalls:
    """The earlier calls of one function or cell (store rows, newest first, at most 200) with
    their arguments read once and indexed by value, so that finding the closest one for each
    of a window of 10,000 new tasks (a task file) is a look-up per argument, not 200 JSON
    parses per task (which was most of the driver's time per entry of a task file)."""

    def __init__(self, rows: list[Any]):
        self.rows: list[Any] = []
        self.by_arg: dict[tuple[str, Any], list[int]] = {}
        for row in rows[:200]:
            try:
                old_args = json.loads(row["components"]).get("args") or {}
            except ValueError:
                continue
            for param, digest in old_args.items():
                if isinstance(digest, str):  # (argument digests are strings)
                    self.by_arg.setdefault((param, digest), []).append(len(self.rows))
            self.rows.append(row)

    def closest(self, ref: TaskRef) -> Any:
        """The earlier call most like ``ref``: most arguments alike, then newest."""
        if not self.rows:
            return None
        score: Counter[int] = Counter()
        for param, digest in ref.arg_digests.items():
            for i in self.by_arg.get((param, digest), ()) if isinstance(digest, str) else ():
                score[i] += 1
        if not score:  # nothing alike: the newest
            return self.rows[0]
        best = max(score.values())
        return self.rows[min(i for i, s in score.items() if s == best)]


class Freshness:
    """Finds which tasks of one pipeline are done and records them all, with the reason each
    of the others runs.

    ``labels`` gives the labels the pipeline's tasks have now (an earlier call whose label a
    task has is not taken as the "previous run" of another).
    """

    def __init__(self, store: Store, pipeline_id: int, name: str,
                 labels: Callable[[], Collection[str]]):
        self.store = store
        self.pipeline_id = pipeline_id
        self.name = name
        self._labels = labels

    def settle(self, refs: list[TaskRef]) -> list[tuple[TaskRef, str]]:
        """Final keys for late tasks the runner found ready (every upstream task succeeded, so
        the content they read is there): each is found done (SUCCEEDED) or stays WAITING to run
        under its final key. Returns (task, provisional key) pairs. The caller holds the
        pipeline's lock."""
        retired, settled = {}, []
        for r in refs:
            old = r.key_
            assert old is not None
            key = content_key(r)
            if key != old:
                retired[old] = r.key_ = key
                settled.append((r, old))
        if settled:
            self.find_done([r for r, _ in settled], retired)
        return settled

    def find_done(self, refs: list[TaskRef], retired: dict[str, str] | None = None) -> None:
        """Find which of ``refs`` (just keyed) are done, and record them all in the store.

        A late task whose upstream content became known because its upstream tasks were found
        done here is keyed again first (one store lookup per level of such tasks); ``retired``
        provisional keys give way to the keys that replace them.
        """
        retired = dict(retired or {})
        rows = self._decide(refs, retired)
        followers: dict[TaskRef, list[TaskRef]] = {}
        for r in refs:
            if r.late:
                for d in r.deps:
                    followers.setdefault(d, []).append(r)
        found = [r for r in refs if r.state is State.SUCCEEDED]
        while followers and found:
            again = []
            for r in dict.fromkeys(c for d in found for c in followers.get(d, ()) if c.late):
                old = r.key_
                assert old is not None
                key = content_key(r)
                if key != old:
                    retired[old] = r.key_ = key
                    again.append(r)
            if not again:
                break
            rows.update(self._decide(again, retired))
            found = [r for r in again if r.state is State.SUCCEEDED]
        self._record(refs, rows)

    def _decide(self, refs: list[TaskRef], retired: dict[str, str]) -> dict[str, Any]:
        """Set each task's state: SUCCEEDED when its result is recorded and intact, else
        WAITING with the reason it runs. Returns the store rows of their keys."""
        if retired:  # before anything is explained by the latest row of a label
            self.store.retire_keys(self.pipeline_id, retired)
            retired.clear()
        keys = [r.key for r in refs]
        rows = self.store.task_rows(self.pipeline_id, keys, active_only=False)
        # A retry asked for (from any door) and not yet run: no result is taken for it, neither
        # a recorded one nor a file on disk.
        retrying = {k for k, row in rows.items()
                    if row["state"] == State.WAITING.value and row["reason"] == RETRY_REASON}
        results = {k: v for k, v in self.store.results(keys).items() if k not in retrying}
        adopted = self._adopt_results([k for k in keys if k not in results and k not in retrying])
        results.update(adopted)
        unexplained = []
        for r in refs:
            res = results.get(r.key_)
            whole = res is not None and intact(res, self.store.path)
            if res is not None and not whole:
                self.store.forget_result(r.key)
            missing_out = [p for p in r.out_files if not p.exists()]
            row = rows.get(r.key_)
            # (one update of its run state per task: a reader sees it before or after)
            changes: dict[str, Any] = {}
            if row is not None and not r.attempts:
                changes["attempts"] = changes["budget"] = row["attempts"]
            if r.key_ in retrying:
                changes.update(state=State.WAITING, result_file=None, reason=RETRY_REASON)
            elif r.func.opts.cache and whole and not missing_out:
                changes.update(state=State.SUCCEEDED, reason="found done",
                               result_file=(locate(self.store.path, res["path"]), res["checksum"]))
            else:
                changes.update(state=State.WAITING, result_file=None)
                if r.late:
                    changes["reason"] = pending_reason(r)
                elif not r.func.opts.cache:
                    changes["reason"] = "cache=False: runs every time"
                elif row is not None and row["state"] == State.SUCCEEDED.value:
                    changes["reason"] = (f"output file {missing_out[0]} is missing" if missing_out
                                         else "its result file is missing or damaged")
                elif row is not None and row["state"] in {s.value for s in BAD}:
                    changes["reason"] = f"{PREVIOUS_RUN}{row['state']}" + (
                        f" ({row['error']})" if row["error"] else "")
                elif row is not None and row["state"] == State.WAITING.value and \
                        (row["reason"] or "").startswith(PREVIOUS_RUN):
                    changes["reason"] = row["reason"]  # registered again since, never run: still so
                elif row is not None:
                    changes["reason"] = "the previous run did not finish"
                else:
                    unexplained.append(r)
            r.update(**changes)
        if unexplained:
            self._explain(unexplained)
        return rows

    def _record(self, refs: list[TaskRef], rows: dict[str, Any]) -> None:
        """Write the rows and edges of ``refs`` (those recorded exactly so already are kept)."""
        resources: dict[TaskFunction, str] = {}  # one JSON text per function, not per task
        register, edges = [], []
        for r in refs:
            text = resources.get(r.func)
            if text is None:
                text = resources[r.func] = json.dumps(r.func.opts.resources(), sort_keys=True)
            cell = getattr(r.func, "cell_id", None)
            row = rows.get(r.key_)
            if (row is not None and r.state is State.SUCCEEDED and row["active"]
                    and row["state"] == State.SUCCEEDED.value and row["label"] == r.label
                    and row["name"] == r.name and row["resources"] == text
                    and (cell is None or row["cell"] == cell)):
                continue  # recorded exactly so already (a resumed run): nothing to write
            register.append({
                "key": r.key_, "name": r.name, "label": r.label, "kind": r.func.kind,
                "state": r.state.value, "components": r.components,
                "reason": None if r.state is State.SUCCEEDED else r.reason,  # keep why it ran
                "resources": text, "cell": cell,
            })
            edges += [(d.key_, r.key_, kind) for d, kind in r.deps.items()]
        self.store.register(self.pipeline_id, register, edges)

    def _explain(self, refs: list[TaskRef]) -> None:
        """Say what changed since the previous run of each new task: the last task with the same
        label, else the previous call of the same function or cell whose label no task of this
        run has (an argument changed: ``f(x=5)`` became ``f(x=6)``)."""
        latest = self.store.latest_by_label(self.pipeline_id, [r.label for r in refs])
        orphans = [r for r in refs if r.label not in latest]
        by_name = self.store.latest_by_name(self.pipeline_id, [r.name for r in orphans]) \
            if orphans else {}
        taken = set(self._labels())
        earlier = {name: _EarlierCalls([row for row in rows if row["label"] not in taken])
                   for name, rows in by_name.items()}
        parsed: dict[int, Any] = {}  # a row's components, read once (many tasks share one)
        old_version = False
        for r in refs:
            prev = latest.get(r.label)
            if prev is None and r.name in earlier:
                prev = earlier[r.name].closest(r)
            old = None
            if prev is not None:
                old = parsed.get(id(prev))
                if old is None:
                    old = parsed[id(prev)] = json.loads(prev["components"])
            r.update(reason=explain(r.components, old, r.name))
            old_version = old_version or (old is not None and old.get("identity")
                                          != r.components.get("identity"))
        if old_version and self.name not in _told_identity:
            _told_identity.add(self.name)
            warnings.warn(
                f"pipeline {self.name!r}: this store's tasks were keyed by an older nbpipe "
                f"(identity rules version < {IDENTITY_VERSION}); their results are kept, and "
                "tasks run once under the new rules, which follow more of your code and data "
                "(see 'Identity' in docs/concepts.md)", stacklevel=4)

    def _adopt_results(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        """Result files on disk that the store does not list: written by a worker whose runner
        died before recording them. Files are renamed into place whole, and each carries the
        checksum of its contents: a file that verifies is recorded instead of computing the task
        again; one that does not (altered, or written before files carried checksums) is not."""
        from .results import read_verified, relative_path, result_path

        found: dict[str, dict[str, Any]] = {}
        batch = Batch()
        for key in keys:
            verified = read_verified(result_path(self.store.path, key))
            if verified is None:
                continue
            checksum, size = verified
            found[key] = {"path": relative_path(key), "checksum": checksum, "size": size}
            batch.results.append((key, relative_path(key), checksum, size, time.time(), None))
        self.store.write(batch)
        return found

    def found_since(self, todo: list[TaskRef]) -> list[TaskRef]:
        """``todo`` without the tasks whose results were recorded since they were resolved (by
        another process that ran the pipeline meanwhile: this one was refused with
        PipelineBusy, then ran again); one lookup, and more work only for those found."""
        found = self.store.results([r.key for r in todo])
        done = [r for r in todo if r.key in found and r.func.opts.cache
                and intact(found[r.key], self.store.path)
                and all(p.exists() for p in r.out_files)]
        if done:  # (only those: the others keep the reason they were given)
            self.find_done(done)
        return [r for r in todo if r.state is State.WAITING]

    def why(self, ref: TaskRef) -> str:
        """Why ``ref`` (resolved) runs, or was found done: a result accepted or adopted earlier
        says so, as the store recorded it."""
        if ref.reason == "found done":
            row = self.store.task_rows(self.pipeline_id, [ref.key]).get(ref.key)
            if row is not None and row["reason"] and row["reason"].startswith(("accepted", "adopted")):
                return row["reason"]
        return ref.reason or "found done"


def intact(result: Any, store_dir: Path) -> bool:
    """Whether a recorded result is there with its size (checksums are verified on reading)."""
    if result["path"] == INLINE:
        return result["data"] is not None and len(result["data"]) == result["size"]
    try:
        return os.stat(locate(store_dir, result["path"])).st_size == result["size"]
    except OSError:
        return False
