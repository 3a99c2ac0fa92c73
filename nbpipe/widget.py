"""``%pipeline graph`` as a live widget for frontends without the sidebar (VS Code, Notebook 7).

An anywidget whose JavaScript (``nbpipe/static/graph-widget.js``, built from
``labextension/src/widget.ts``) shares the sidebar's graph model and layout: mapped tasks as one
group node (click for its items in order), nodes coloured by state. A thread keeps it live for as
long as it is shown, also after every task finished (a task re-run later shows).

>>> from nbpipe.widget import GraphWidget
>>> GraphWidget(pipe)                                  # doctest: +SKIP
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anywidget
import traitlets

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["GraphWidget", "available"]

STATIC = Path(__file__).parent / "static"
FINAL = ("SUCCEEDED", "FAILED", "UPSTREAM_FAILED", "KILLED")
IDLE_FACTOR = 4  # polls are this much slower while every task is final


def available() -> bool:
    """Whether the widget's JavaScript was built (``make`` builds it with the sidebar)."""
    return (STATIC / "graph-widget.js").is_file()


class GraphWidget(anywidget.AnyWidget):
    """The graph of a pipeline's tasks in this process, kept live while they run."""

    _esm = STATIC / "graph-widget.js"
    _css = STATIC / "graph-widget.css"
    pipeline = traitlets.Unicode().tag(sync=True)
    tasks = traitlets.List().tag(sync=True)
    edges = traitlets.List().tag(sync=True)
    #: False once the widget no longer follows the pipeline (it then says so under the graph).
    following = traitlets.Bool(True).tag(sync=True)

    def __init__(self, pipe: Pipeline, *, follow: bool = True, poll: float = 0.5, **kwargs: Any):
        super().__init__(pipeline=pipe.name, following=follow, **kwargs)
        self._pipe = pipe
        self.refresh()
        if follow:
            threading.Thread(target=self._follow, args=(poll,), daemon=True,
                             name=f"nbpipe-graph-{pipe.name}").start()

    def refresh(self) -> None:
        """Take the tasks' current states (and any new tasks) from the pipeline."""
        refs = self._pipe.refs()
        # (each task's run state read once: its fields are of one moment, see nbpipe.runstate)
        tasks = [{"key": r.key, "name": r.name, "label": r.label, "kind": r.func.kind,
                  "state": s.state.value, "attempts": s.attempts, "reason": s.reason,
                  "error": s.error, "cell": getattr(r.func, "cell_id", None)}
                 for r in refs for s in (r.run_state,)]
        edges = [{"parent": d.key, "child": r.key, "kind": kind} for r in refs for d, kind in r.deps.items()]
        if tasks != self.tasks:
            self.tasks = tasks
        if edges != self.edges:
            self.edges = edges

    def _follow(self, poll: float) -> None:
        """Refresh for as long as the widget is shown: quickly while tasks run, slower when all
        are final (a task re-run later, or added by another cell, still shows)."""
        while self.comm is not None:
            final = all(t["state"] in FINAL for t in self.tasks)
            time.sleep(poll * IDLE_FACTOR if final else poll)
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the pipeline closed under it: say so and stop
                self.following = False
                return
