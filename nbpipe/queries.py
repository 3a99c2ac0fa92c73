"""Read and maintain a store without running anything: what the command line and sidebar use.

The code and its SQL live in the store package (:mod:`nbpipe.store.queries` for what views
read, :mod:`nbpipe.store.maintenance` for doctor, gc and delete); this module gathers both
under the one name the command line, the magics and the server use.
"""

from __future__ import annotations

from .store.maintenance import PIPELINE_TABLES, STALE_TEMP, delete_pipeline, doctor, gc, live_runners
from .store.queries import (
    cell_changed,
    cluster_detail,
    events,
    find_store,
    graph,
    pipelines,
    related,
    runner,
    task_detail,
    taskfile_entries,
    tasks,
)

__all__ = [
    "PIPELINE_TABLES", "STALE_TEMP", "cell_changed", "cluster_detail", "delete_pipeline", "doctor",
    "events", "find_store", "gc", "graph", "live_runners", "pipelines", "related", "runner",
    "task_detail", "taskfile_entries", "tasks",
]
