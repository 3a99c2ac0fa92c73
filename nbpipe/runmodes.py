"""Run modes that decide, before anything is submitted, what a run leaves out or takes as done.

- ``skip=``: tasks left out of a run by name, label, glob or state (``"FAILED"``: what failed
  before is not tried again); what depends on a skipped unfinished task is left out too.
- ``keep_succeeded=True``: a task whose key changed keeps the result of its last successful run
  (recorded as accepted, see :mod:`nbpipe.accept`); only failed and new tasks run.
- ``trust_existing=True`` (on a task, or for a whole run): a task whose declared ``Out`` files
  all exist is adopted instead of run (depio's ``IF_MISSING``); its result is ``None`` and the
  store records the files' checksums.

``stop_on_failure`` is applied while the run goes on, by the runner (``Runner._stop_submitting``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from . import policy
from .accept import accept_keys
from .results import locate, write_result
from .states import State
from .store import Batch

if TYPE_CHECKING:
    from .pipeline import Pipeline
    from .task import TaskRef

__all__ = ["accept", "adopt_existing", "keep_succeeded", "skipped"]


#: How the reason of a task that failed (or was killed) in an earlier process starts, followed
#: by that state: such a task is WAITING to run again, and ``skip="FAILED"`` still names it.
PREVIOUS_RUN = "the previous run was "


def _matches(ref: TaskRef, patterns: list[str]) -> bool:
    before = ref.reason[len(PREVIOUS_RUN):].split(" ")[0] \
        if ref.state is State.WAITING and (ref.reason or "").startswith(PREVIOUS_RUN) else None
    return any(p in (ref.state.value, before) or fnmatch.fnmatchcase(ref.label, p)
               or fnmatch.fnmatchcase(ref.name, p) for p in patterns)


def skipped(refs: list[TaskRef], skip: Any) -> set[TaskRef]:
    """The refs a run leaves out: those ``skip`` names (name, label, glob, or a state such as
    ``"FAILED"``) that are not done, and everything downstream of them."""
    if not skip:
        return set()
    patterns = [skip] if isinstance(skip, str) else [str(s) for s in skip]
    out = {r for r in refs if r.state is not State.SUCCEEDED and _matches(r, patterns)}
    changed = True
    while changed:  # downstream of a skipped task cannot run either
        changed = False
        for r in refs:
            if r not in out and r.state is not State.SUCCEEDED and any(d in out for d in r.deps):
                out.add(r)
                changed = True
    return out


def keep_succeeded(pipe: Pipeline, refs: Iterable[TaskRef]) -> list[TaskRef]:
    """Accept the last successful result for each waiting task that has one (its key changed:
    an edit the user calls cosmetic); return the refs accepted."""
    store = pipe.store
    chosen = [r for r in refs if r.state is State.WAITING and not r.late
              and store.last_success(pipe.pipeline_id, r.label, exclude=r.key) is not None]
    if not chosen:
        return []
    reasons = accept_keys(store, pipe.pipeline_id, [r.key for r in chosen], pipeline=pipe.name,
                          how="accepted by hand (keep_succeeded)")
    mark_done(pipe, chosen, reasons)
    return chosen


def accept(pipe: Pipeline, refs: list[TaskRef]) -> dict[str, str]:
    """What ``pipe.accept`` does: each of ``refs`` that has a successful earlier run adopts its
    result (see :mod:`nbpipe.accept`); returns ``{label: reason}`` of those accepted."""
    with pipe.graph.lock:
        pipe.resolve(refs)
        reasons = accept_keys(pipe.store, pipe.pipeline_id, [r.key for r in refs],
                              pipeline=pipe.name)
        mark_done(pipe, [r for r in refs if r.key in reasons], reasons)
    return {r.label: reasons[r.key] for r in refs if r.key in reasons}


def _checksum(path: Any) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def adopt_existing(pipe: Pipeline, refs: Iterable[TaskRef], whole_run: bool) -> list[TaskRef]:
    """Adopt waiting tasks whose declared ``Out`` files all exist (their own
    ``trust_existing=True``, or ``whole_run``); return those adopted."""
    chosen = [r for r in refs if r.state is State.WAITING and r.out_files and not r.late
              and (whole_run or policy.effective(r.func, pipe).trust_existing)
              and all(p.exists() for p in r.out_files)]
    if not chosen:
        return []
    batch = Batch()
    reasons = {}
    date = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    for r in chosen:
        (path, checksum, size), data = write_result(pipe.store.path, r.key, None, inline=1024)
        batch.results.append((r.key, path, checksum, size, time.time(), data))
        files = ", ".join(f"{p} (blake2b {_checksum(p)})" for p in r.out_files)
        reasons[r.key] = reason = f"adopted existing output file(s) on {date}: {files}"
        batch.state(pipe.pipeline_id, r.key, State.SUCCEEDED.value, attempts=r.attempts,
                    reason=reason, message=reason)
    pipe.store.write(batch)
    mark_done(pipe, chosen, reasons)
    return chosen


def mark_done(pipe: Pipeline, refs: list[TaskRef], reasons: dict[str, str]) -> None:
    results = pipe.store.results([r.key for r in refs])
    for r in refs:
        res = results[r.key]
        r.run_state = r.run_state.succeeded(
            (locate(pipe.store.path, res["path"]), res["checksum"]), reason=reasons[r.key])
