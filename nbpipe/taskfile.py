"""Task files (rms-cloud-tasks): a JSON or YAML list of ``{task_id, data}`` entries for ``map``.

>>> # tasks.yaml:
>>> #   - task_id: frame-001
>>> #     data: {path: raw/001.fits, threshold: 3}
>>> items = load_tasks("tasks.yaml")                       # doctest: +SKIP
>>> refs = process.map(items, chunksize=10)                # doctest: +SKIP

Each entry becomes one task labelled ``process[frame-001]`` that receives a :class:`TaskItem`.

A file of millions of entries is run window by window with :func:`run_tasks`: entries are read
one at a time (JSONL line by line, JSON with ``ijson``, YAML one list item at a time), each
window is registered, run and dropped from the driver, and the store keeps what finished, so
the driver's memory does not grow with the file and a rerun of the same file runs nothing.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import yaml

from .errors import TaskfileError

if TYPE_CHECKING:
    from .pipeline import RunSummary
    from .task import TaskFunction

__all__ = ["TaskItem", "dump_tasks", "iter_tasks", "load_tasks", "run_tasks", "task_id_of"]

#: Entries registered, run and dropped together by :func:`run_tasks` (about 3 KB each while
#: they are in the driver: 10,000 hold some 30 MB).
WINDOW = 10_000


class TaskItem(NamedTuple):
    """One entry of a task file: its id and its data."""

    task_id: str
    data: Any


def load_tasks(path: str | os.PathLike[str]) -> list[TaskItem]:
    """Read a ``.json``, ``.yaml``, ``.yml`` or ``.jsonl`` task file into a list of
    :class:`TaskItem`.

    Errors name the file and the entry: a missing ``task_id``, a duplicate id, extra keys.
    For very large files, :func:`iter_tasks` reads entries one at a time.
    """
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        return list(iter_tasks(path))
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise TaskfileError(f"task file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskfileError(f"task file {path} cannot be read: {exc}") from None
    try:
        if path.suffix.lower() == ".json":
            entries = json.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            entries = yaml.safe_load(text)
        else:
            raise TaskfileError(f"task file {path}: use a .json, .yaml, .yml or .jsonl file")
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise TaskfileError(f"task file {path} is not valid {path.suffix[1:].upper()}: {exc}") from None
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise TaskfileError(
            f"task file {path} must hold a list of entries with task_id and data, "
            f"not a {type(entries).__name__}"
        )
    seen: set[str] = set()
    return [_item(entry, f"task file {path}, entry {i + 1}", seen) for i, entry in enumerate(entries)]


def _item(entry: Any, where: str, seen: set[str]) -> TaskItem:
    """One entry checked: a dict with a unique ``task_id`` and optional ``data``."""
    if not isinstance(entry, dict) or "task_id" not in entry:
        raise TaskfileError(f"{where}: each entry needs a task_id (and optional data)")
    extra = set(entry) - {"task_id", "data"}
    if extra:
        raise TaskfileError(f"{where}: unknown key(s) {', '.join(sorted(extra))}; "
                            "only task_id and data are allowed")
    task_id = entry["task_id"]
    if not isinstance(task_id, (str, int)) or isinstance(task_id, bool) or str(task_id) == "":
        raise TaskfileError(f"{where}: task_id must be a non-empty string or number")
    task_id = str(task_id)
    if task_id in seen:
        raise TaskfileError(f"{where}: task_id {task_id!r} appears twice; ids must be unique")
    seen.add(task_id)
    return TaskItem(task_id, entry.get("data"))


def iter_tasks(path: str | os.PathLike[str]) -> Iterator[TaskItem]:
    """The entries of a task file one at a time, so a file of millions of entries never sits
    in memory whole: a ``.jsonl`` file (one ``{"task_id", "data"}`` object per line) is read
    line by line, a ``.json`` list item by item (``ijson``), a ``.yaml`` list one item at a
    time (PyYAML's composer). Errors are those of :func:`load_tasks`, raised when the entry
    is reached.

    >>> refs = process.map(iter_tasks("frames.jsonl"), chunksize=100)   # doctest: +SKIP
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".yaml", ".yml"):
        raise TaskfileError(f"task file {path}: use a .json, .yaml, .yml or .jsonl file")
    try:
        f = path.open("rb" if suffix == ".json" else "r", encoding=None if suffix == ".json" else "utf-8")
    except FileNotFoundError:
        raise TaskfileError(f"task file {path} does not exist") from None
    except OSError as exc:
        raise TaskfileError(f"task file {path} cannot be read: {exc}") from None
    seen: set[str] = set()
    with f:
        entries = {".jsonl": _jsonl_entries, ".json": _json_entries}.get(suffix, _yaml_entries)
        try:
            for where, entry in entries(f, f"task file {path}"):
                yield _item(entry, where, seen)
        except (OSError, UnicodeDecodeError) as exc:
            raise TaskfileError(f"task file {path} cannot be read: {exc}") from None


def _jsonl_entries(f: Any, name: str) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(f, 1):
        if not line.strip():
            continue
        where = f"{name}, line {number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskfileError(f"{where} is not valid JSON: {exc}") from None


def _not_a_list(name: str, kind: str) -> TaskfileError:
    return TaskfileError(f"{name} must hold a list of entries with task_id and data, not a {kind}")


def _json_entries(f: Any, name: str) -> Iterator[tuple[str, Any]]:
    """The items of a JSON file's top-level list, parsed one at a time by ijson."""
    import ijson

    kinds = {"start_map": "dict", "string": "str", "number": "int", "boolean": "bool"}
    try:
        events = ijson.parse(f, use_float=True)
        first = next(events, None)
        if first is None or first[1] == "null":  # an empty file, or null: no entries
            return
        if first[1] != "start_array":
            raise _not_a_list(name, kinds.get(first[1], first[1]))
        for number, entry in enumerate(ijson.items(_chained(first, events), "item", use_float=True), 1):
            yield f"{name}, entry {number}", entry
    except ijson.JSONError as exc:
        raise TaskfileError(f"{name} is not valid JSON: {exc}") from None


def _chained(first: Any, events: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from events


def _yaml_entries(f: Any, name: str) -> Iterator[tuple[str, Any]]:
    """The items of a YAML file's top-level list, each composed and built on its own (PyYAML's
    safe loader, one item's nodes at a time instead of the whole document's)."""
    loader = yaml.SafeLoader(f)
    try:
        loader.get_event()  # the stream starts
        if loader.check_event(yaml.StreamEndEvent):
            return
        loader.get_event()  # the document starts
        if not loader.check_event(yaml.SequenceStartEvent):
            node = loader.compose_node(None, None)
            value = loader.construct_document(node)
            if value is None:
                return
            raise _not_a_list(name, type(value).__name__)
        start = loader.get_event()
        number = 0
        while not loader.check_event(yaml.SequenceEndEvent):
            node = loader.compose_node(None, None)
            number += 1
            yield f"{name}, entry {number}", loader.construct_document(node)
        end = loader.get_event()
        loader.get_event()  # the document ends
        if not loader.check_event(yaml.StreamEndEvent):
            raise TaskfileError(f"{name} holds more than one YAML document; write one list")
        del start, end
    except yaml.YAMLError as exc:
        raise TaskfileError(f"{name} is not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def task_id_of(label: str) -> str | None:
    """The task id in a task-file task's label: ``process[frame-001]`` -> ``frame-001``."""
    if label.endswith("]") and "[" in label:
        return label[label.index("[") + 1:-1]
    return None


def dump_tasks(path: str | os.PathLike[str], items: Iterable[TaskItem]) -> int:
    """Write ``items`` as a task file (``.json``, ``.yaml``/``.yml`` or ``.jsonl`` by its
    suffix) that :func:`load_tasks` reads back; return how many entries were written."""
    path = Path(path)
    entries = [{"task_id": i.task_id, "data": i.data} for i in items]
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        text = "".join(json.dumps(e) + "\n" for e in entries)
    elif suffix == ".json":
        text = json.dumps(entries, indent=1) + "\n"
    elif suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(entries, sort_keys=False)
    else:
        raise TaskfileError(f"task file {path}: use a .json, .yaml, .yml or .jsonl file")
    path.write_text(text, encoding="utf-8")
    return len(entries)


def run_tasks(func: TaskFunction, tasks: str | os.PathLike[str] | Iterable[TaskItem], *,
              window: int = WINDOW, chunksize: int | None = None, check: bool = False,
              timeout: float | None = None, progress: bool = True) -> RunSummary:
    """Run ``func`` once per entry of a task file (or of an iterable of :class:`TaskItem`),
    ``window`` entries at a time, and return one summary of the whole file.

    Each window is registered, run to its end and dropped from the driver
    (:meth:`Pipeline.forget <nbpipe.Pipeline.forget>`): only one window's entries, refs and
    arguments are ever held, so a file of 1,000,000 entries runs in a bounded driver. The
    store keeps each task's identity and result, so running the same file again registers
    every entry, finds it done and runs nothing; ``nbpipe tasks P --as-taskfile`` writes
    entries back out as for :meth:`map`. With ``progress``, a line on stderr after each
    window says how far the file got.

    >>> summary = run_tasks(process, "frames.jsonl", window=10_000, chunksize=100)  # doctest: +SKIP
    >>> summary.executed                                                              # doctest: +SKIP
    1000000
    """
    from .pipeline import RunSummary, current_pipeline

    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise TaskfileError(f"run_tasks({func.name}, ...): window={window!r} must be a whole "
                            "number >= 1 (entries registered and run together), e.g. 10_000")
    name = str(tasks) if isinstance(tasks, (str, os.PathLike)) else "the entries"
    items = iter_tasks(tasks) if isinstance(tasks, (str, os.PathLike)) else iter(tasks)
    pipe = func.pipeline if func.pipeline is not None else current_pipeline()  # as map() does
    counts: Counter[str] = Counter()
    failed: list[str] = []
    executed = cached = done = 0
    paused = False
    start = time.monotonic()
    while batch := list(itertools.islice(items, window)):
        refs = func.map(batch, chunksize=chunksize)
        del batch
        summary = pipe.run(refs, timeout=timeout)
        counts.update(summary.counts)
        failed += summary.failed
        executed += summary.executed
        cached += summary.cached
        done += len(refs)
        if summary.paused:  # the rest waits for resume: later windows are not registered
            paused = True
        pipe.forget(refs)
        del refs
        if progress:
            print(f"nbpipe: {done:,} entries of {name} run ({executed:,} executed, "
                  f"{cached:,} already done, {len(failed):,} failed; "
                  f"{time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)
        if paused:
            break
    result = RunSummary(dict(counts), failed, executed, cached, paused)
    if check and failed:
        from .errors import TaskFailed

        raise TaskFailed(f"{func.name}: {len(failed)} task(s) of {name} failed: "
                         f"{', '.join(failed[:10])}; see pipe.tasks(state='FAILED')", failed)
    return result
