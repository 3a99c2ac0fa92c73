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
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from .errors import TaskfileError

__all__ = ["TaskItem", "load_tasks"]


class TaskItem(NamedTuple):
    """One entry of a task file: its id and its data."""

    task_id: str
    data: Any


def load_tasks(path: str | os.PathLike[str]) -> list[TaskItem]:
    """Read a ``.json``, ``.yaml`` or ``.yml`` task file into a list of :class:`TaskItem`.

    Errors name the file and the entry: a missing ``task_id``, a duplicate id, extra keys.
    """
    path = Path(path)
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
            raise TaskfileError(f"task file {path}: use a .json, .yaml or .yml file")
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise TaskfileError(f"task file {path} is not valid {path.suffix[1:].upper()}: {exc}") from None
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise TaskfileError(
            f"task file {path} must hold a list of entries with task_id and data, "
            f"not a {type(entries).__name__}"
        )
    items: list[TaskItem] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"task file {path}, entry {i + 1}"
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
        items.append(TaskItem(task_id, entry.get("data")))
    return items
