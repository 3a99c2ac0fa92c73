"""Deciding by hand: a task's current definition adopts the result of its last successful run.

After a cosmetic edit (a renamed variable, a log line) a task's key changes and it would run
again. ``nbpipe accept P TASK`` / ``pipe.accept(TASK)`` says "the old result is still right":
the task's current key gets a copy of the result of the last run of the same label that
succeeded, its state becomes SUCCEEDED and ``why`` says ``accepted by hand on DATE``. Nothing is
silent: the store keeps the reason and an event, the sidebar's payload marks the task
``accepted``, and ``nbpipe retry`` undoes it (the copy is forgotten, the task runs).
``run(keep_succeeded=True)`` (``nbpipe run --keep-succeeded``) accepts every task whose key
changed and that has such a result, and runs only what failed or is new (desipipe's habit of
re-running only FAILED tasks after a fix).

jobmon's ``update_task_status -s D`` and desipipe's state pinning map here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import NbpipeError
from .results import INLINE, locate, relative_path, result_path
from .states import State
from .store import Batch, Store

__all__ = ["ACCEPTED", "accept_keys"]

ACCEPTED = "accepted by hand"  # how a reason starts (nbpipe.policy.outcome recognises it)


def _copy_result(store: Store, old: Any, new_key: str) -> tuple[str, str, int, bytes | None]:
    """The old result, recorded under the new key: a hard link to its file (a copy across
    devices), so removing the old task never takes the accepted result with it."""
    if old["path"] == INLINE:
        return INLINE, old["checksum"], old["size"], old["data"]
    source = Path(locate(store.path, old["path"]))
    target = result_path(store.path, new_key)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.accept")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    return relative_path(new_key), old["checksum"], old["size"], None


def accept_keys(store: Store, pipeline_id: int, keys: Sequence[str], *, pipeline: str,
                how: str = ACCEPTED) -> dict[str, str]:
    """Give each task key the result of the last successful run of its label; return
    ``{key: reason}`` for those accepted. A task with no earlier success, or one running now,
    is an error naming it (nothing is changed then)."""
    rows = store.task_rows(pipeline_id, list(keys), active_only=False)
    plan: list[tuple[str, Any, Any]] = []
    for key in keys:
        row = rows.get(key)
        if row is None:
            raise NbpipeError(f"no task with key {key[:12]} in pipeline {pipeline!r}")
        if row["state"] in (State.PENDING.value, State.RUNNING.value):
            raise NbpipeError(f"task {row['label']!r} of pipeline {pipeline!r} is {row['state']}: "
                              "kill it first, or let it finish")
        if row["state"] == State.SUCCEEDED.value and store.results([key]):
            continue  # done already: nothing to accept
        old = store.last_success(pipeline_id, row["label"], exclude=key)
        if old is None:
            raise NbpipeError(
                f"task {row['label']!r} of pipeline {pipeline!r} has no earlier successful run "
                "whose result is kept, so there is nothing to accept; run it instead")
        plan.append((key, row, old))
    date = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    batch = Batch()
    accepted = {}
    for key, row, old in plan:
        path, checksum, size, data = _copy_result(store, old, key)
        batch.results.append((key, path, checksum, size, time.time(), data))
        reason = (f"{how} on {date}: kept the result of {old['key'][:12]} "
                  f"(its run of {time.strftime('%Y-%m-%d %H:%M', time.localtime(old['updated']))})")
        batch.state(pipeline_id, key, State.SUCCEEDED.value, attempts=row["attempts"],
                    reason=reason, message=reason)
        accepted[key] = reason
    store.write(batch)
    return accepted
