"""Content keys: what upstream tasks and input files actually produced enters a task's key.

A task names its upstream tasks in its key by their keys, which is enough when an upstream
task's key fixes its result. Two kinds of upstream content do not follow from a key:

- the value of a ``cache=False`` task, which runs every time and may return something else;
- an ``In`` file that another task writes, which anyone may overwrite by hand.

Both count by content: the result's checksum, the file's digest. When that content is not
known yet as keys are resolved (the upstream task has to run first), the task gets a
*provisional* key, whose component reads ``pending:<upstream key>`` so it never equals a final
key, and it is *late*; so is everything downstream of it, since their keys contain its key.
The runner settles a late task when it is ready (every upstream task succeeded): its final key
comes from what was produced, and it is found done under that key or runs under it.

One consequence is wanted: a producer that runs again (its code changed) and writes the same
bytes leaves its readers found done.

>>> token_is_pending(PENDING + "0123abcd")
True
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import file_digest
from .identity import key_digest
from .states import State

if TYPE_CHECKING:
    from .task import TaskRef

__all__ = ["PENDING", "RESULT", "content_key", "file_token", "pending_reason", "token_is_pending",
           "upstream_token"]

PENDING = "pending:"  # an upstream task's content, not known yet: its key follows
RESULT = "result:"  # a cache=False upstream task's value: its result checksum follows


def token_is_pending(token: Any) -> bool:
    """Whether a key component stands for content not known yet."""
    return isinstance(token, str) and token.startswith(PENDING)


def upstream_token(upstream: TaskRef) -> str | None:
    """What stands for ``upstream`` in its consumers' keys: its key, or for a ``cache=False``
    task (whose key does not fix its value) the checksum of the value it returned."""
    func = upstream.func
    if func is None or func.opts.cache:  # (a revived finished task has no function)
        return upstream.key_
    if upstream.state is State.SUCCEEDED and upstream.result_file is not None:
        return RESULT + upstream.result_file[1]
    return PENDING + str(upstream.key_)


def file_token(path: Path, producer: TaskRef | None) -> str:
    """What stands for input file ``path`` in its readers' keys: its content digest, once the
    task that writes it (if any) has finished."""
    if producer is None:
        return file_digest(path)
    if producer.state is State.SUCCEEDED and not producer.late:
        try:
            return file_digest(path)
        except OSError:  # deleted since it was written: its producer runs again first
            pass
    return PENDING + str(producer.key_)


def _producers(ref: TaskRef) -> dict[Path, TaskRef]:
    wanted = set(ref.in_files)
    return {p: d for d in ref.deps for p in d.out_files if p in wanted and d is not ref}


def content_key(ref: TaskRef) -> str:
    """The key of ``ref`` from what its upstream tasks and input files hold now.

    Sets ``ref.file_digests`` and ``ref.late`` (whether the key is provisional). ``ref.deps``
    must be resolved and its upstream tasks keyed.
    """
    if ref.in_files:
        producers = _producers(ref)
        ref.file_digests = {str(p): file_token(p, producers.get(p)) for p in ref.in_files}
    if ref.shape is not None:
        extras = ref.key_extras()
        key = ref.shape.digest(extras)
    else:  # revived from a spec in another process: its recorded components, content renewed
        extras = {
            "upstream": [[u.label, upstream_token(u)] for u in dict.fromkeys(ref.upstream)],
            "after": sorted(d.key_ for d, kind in ref.deps.items() if kind == "after" and d.key_),
            "files": ref.file_digests or {},
        }
        ref.components = {**ref.components, **extras}
        key = key_digest(ref.components)
    ref.late = (any(d.late for d in ref.deps)
                or any(token_is_pending(token) for _, token in extras["upstream"])
                or any(token_is_pending(token) for token in extras["files"].values()))
    return key


def pending_reason(ref: TaskRef) -> str:
    """Why a late task has no final key yet, naming what it waits for."""
    waits = [d for d in ref.deps if d.late or not d.state.final]
    names = ", ".join(f"`{d.label}`" for d in waits[:3]) + (" and more" if len(waits) > 3 else "")
    return (f"decided once {names or 'its upstream tasks'} ran: it reads what they produce "
            "(cache=False results and In files count by content)")
