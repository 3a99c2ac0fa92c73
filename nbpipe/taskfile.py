"""Task files (rms-cloud-tasks): a JSON or YAML list of ``{task_id, data}`` entries for ``map``.

>>> # tasks.yaml:
>>> #   - task_id: frame-001
>>> #     data: {path: raw/001.fits, threshold: 3}
>>> items = load_tasks("tasks.yaml")                       # doctest: +SKIP
>>> refs = process.map(items, chunksize=10)                # doctest: +SKIP

Each entry becomes one task labelled ``process[frame-001]`` that receives a :class:`TaskItem`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from .errors import TaskfileError

__all__ = ["TaskItem", "dump_tasks", "iter_tasks", "load_tasks", "task_id_of"]


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
    """The entries of a task file one at a time: a ``.jsonl`` file (one ``{"task_id", "data"}``
    object per line) is read line by line, so a file of millions of entries never sits in
    memory whole; ``.json`` and ``.yaml`` files are read whole, then yielded.

    >>> refs = process.map(iter_tasks("frames.jsonl"), chunksize=100)   # doctest: +SKIP
    """
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        yield from load_tasks(path)
        return
    seen: set[str] = set()
    try:
        f = path.open(encoding="utf-8")
    except FileNotFoundError:
        raise TaskfileError(f"task file {path} does not exist") from None
    except OSError as exc:
        raise TaskfileError(f"task file {path} cannot be read: {exc}") from None
    with f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"task file {path}, line {number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskfileError(f"{where} is not valid JSON: {exc}") from None
            yield _item(entry, where, seen)


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
