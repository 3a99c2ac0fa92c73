"""What a notebook shows while tasks run: a live status line per ``%%task`` cell, tables.

In a Jupyter kernel the status line is an ipywidgets box updated from a background thread, so
the cell returns at once; where widgets cannot render (terminal IPython, ``NBPIPE_WIDGETS=0``)
it is one plain line printed when the cell runs.
"""

from __future__ import annotations

import html
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from .states import State
from .task import TaskRef

__all__ = ["ClusterView", "Progress", "StatusLine", "TaskTable", "counts_line", "task_graph",
           "widgets_enabled"]

COLOURS = {
    "WAITING": "#9e9e9e", "PENDING": "#90caf9", "RUNNING": "#1e88e5", "SUCCEEDED": "#43a047",
    "FAILED": "#e53935", "UPSTREAM_FAILED": "#fb8c00", "KILLED": "#6d4c41",
}


def widgets_enabled() -> bool:
    """True inside a Jupyter kernel with ipywidgets installed (unless NBPIPE_WIDGETS=0)."""
    if os.environ.get("NBPIPE_WIDGETS", "1") == "0" or "ipykernel" not in sys.modules:
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython

        return getattr(get_ipython(), "kernel", None) is not None
    except Exception:
        return False


def run_seconds(ref: TaskRef) -> float | None:
    """How long the task's last attempt ran (end - start, as recorded): the figure the sidebar's
    task panel shows, so the cell and the panel agree. None before an attempt ended."""
    try:
        pipe = ref.pipeline
        rows = pipe.store.attempts(pipe.pipeline_id, ref.key)
    except Exception:  # noqa: BLE001 - a status line never fails a cell
        return None
    last = rows[-1] if rows else None
    if last is None or last["start"] is None or last["end"] is None:
        return None
    return max(0.0, last["end"] - last["start"])


def _status_text(ref: TaskRef, started: float) -> str:
    elapsed = time.monotonic() - started
    run = ref.run_state  # (read once: the runner thread may move the task on meanwhile)
    worker = f" on {run.worker}" if run.worker else ""
    note = f" ({run.reason})" if run.state is State.WAITING and run.reason else ""
    if run.state is State.SUCCEEDED and run.reason == "found done":
        return f"task {ref.label}: {run.state.value}, {elapsed:.1f} s (found done: nothing to run)"
    ran = run_seconds(ref) if run.state.final else None
    if ran is not None:  # the attempt's own time (as the task panel), then the wall time
        return (f"task {ref.label}: {run.state.value}{worker} in {ran:.1f} s "
                f"({elapsed:.1f} s since the cell ran)")
    return f"task {ref.label}: {run.state.value}{worker}, {elapsed:.1f} s{note}"


class StatusLine:
    """A live line (state, elapsed, worker) for one task, then its output or its error."""

    def __init__(self, ref: TaskRef, poll: float = 0.25):
        self.ref = ref
        self.poll = poll
        self.started = time.monotonic()
        self._widget: Any = None
        if widgets_enabled():
            import ipywidgets as w
            from IPython.display import display

            self._html = w.HTML(value=self._html_value())
            self._out = w.Output()
            self._widget = w.VBox([self._html, self._out])
            display(self._widget)
            threading.Thread(target=self._follow, daemon=True, name=f"nbpipe-status-{ref.name}").start()
        else:
            print(_status_text(ref, self.started))

    def _html_value(self) -> str:
        colour = COLOURS.get(self.ref.state.value, "#000")
        text = html.escape(_status_text(self.ref, self.started))
        return f'<span style="color:{colour}">&#9679;</span> <code>{text}</code>'

    def _follow(self) -> None:
        while not self.ref.state.final:
            self._html.value = self._html_value()
            time.sleep(self.poll)
        self._html.value = self._html_value()
        self._show_output()

    def _show_output(self) -> None:
        ref = self.ref
        try:
            attempts = ref.pipeline.store.attempts(ref.pipeline.pipeline_id, ref.key)
        except Exception:
            attempts = []
        last = attempts[-1] if attempts else None
        if last is not None and last["stdout"]:
            self._out.append_stdout(last["stdout"])
        if last is not None and last["stderr"]:
            self._out.append_stderr(last["stderr"])
        run = ref.run_state
        if run.state is not State.SUCCEEDED:
            text = run.traceback or run.error or run.state.value
            self._out.append_stderr(f"{text}\n")
            return
        if getattr(ref.func, "outputs", None) is not None:  # a cell: show its rich output
            from .cells import DISPLAY

            try:
                displays = ref.result().get(DISPLAY, [])
            except Exception:
                displays = []
            for data, metadata in displays:
                self._out.outputs += ({"output_type": "display_data", "data": data,
                                       "metadata": metadata},)


def _cell(value: object) -> str:
    text = str(value)
    if text in COLOURS:
        return f'<td style="color:{COLOURS[text]}">{text}</td>'
    return f"<td>{html.escape(text)}</td>"


class TaskTable:
    """Rows of tasks shown as an HTML table in notebooks and as text elsewhere."""

    def __init__(self, title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]):
        self.title = title
        self.rows = rows
        self.header = header

    def __repr__(self) -> str:
        widths = [max(len(str(c)) for c in col) for col in zip(self.header, *self.rows, strict=True)]
        lines = [self.title, "  ".join(h.ljust(w) for h, w in zip(self.header, widths, strict=True))]
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in self.rows]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join(
            "<tr>" + "".join(_cell(c) for c in row) + "</tr>"
            for row in self.rows
        )
        return f"<b>{html.escape(self.title)}</b><table><tr>{head}</tr>{body}</table>"


class ClusterView:
    """A pipeline's cluster: description, worker pools with their job scripts, batch jobs."""

    HEADER = ("pool", "job", "worker", "state", "submitted")

    def __init__(self, title: str, pools: list[dict[str, str]], jobs: list[dict[str, Any]]):
        self.title = title
        self.pools = pools
        self.rows = [
            (j["pool"], j["job_id"], j["name"], j["state"] or "",
             time.strftime("%H:%M:%S", time.localtime(j["submitted"])))
            for j in jobs
        ]

    def __repr__(self) -> str:
        parts = [self.title]
        for pool in self.pools:
            parts += [f"pool {pool['description']}", "job script:", pool["job_script"].rstrip()]
        parts.append(repr(TaskTable(f"{len(self.rows)} batch job(s)", self.rows, self.HEADER))
                     if self.rows else "no batch jobs yet")
        return "\n".join(parts)

    def _repr_html_(self) -> str:
        parts = [f"<b>{html.escape(self.title)}</b>"]
        for pool in self.pools:
            parts.append(
                f"<details><summary>pool {html.escape(pool['description'])}</summary>"
                f"<pre>{html.escape(pool['job_script'])}</pre></details>"
            )
        if self.rows:
            parts.append(TaskTable(f"{len(self.rows)} batch job(s)", self.rows, self.HEADER)._repr_html_())
        return "".join(parts)


class Progress:
    """A progress bar over some tasks while the kernel waits for them (text: one line)."""

    def __init__(self, refs: list[TaskRef], description: str):
        self.refs = refs
        self.description = description
        self._done = threading.Event()
        self._bar: Any = None

    def __enter__(self) -> Progress:
        if widgets_enabled():
            import ipywidgets as w
            from IPython.display import display

            self._bar = w.IntProgress(value=self._count(), max=len(self.refs),
                                      description=self.description)
            display(self._bar)
            threading.Thread(target=self._follow, daemon=True).start()
        else:
            print(f"{self.description}: {self._count()}/{len(self.refs)} tasks done…", flush=True)
        return self

    def _count(self) -> int:
        return sum(r.state.final for r in self.refs)

    def _follow(self) -> None:
        while not self._done.wait(0.2):
            self._bar.value = self._count()

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        if self._bar is not None:
            self._bar.value = self._count()
            self._bar.bar_style = "success" if self._count() == len(self.refs) else "warning"


#: Neutral grey for edges and text outside nodes: readable on light and dark backgrounds alike.
NEUTRAL = "#8a8a8a"
#: The state a group node shows: what most needs attention among its tasks (as the sidebar).
ATTENTION = ("FAILED", "RUNNING", "PENDING", "KILLED", "UPSTREAM_FAILED", "WAITING", "SUCCEEDED")
#: How a group node counts its tasks (as the sidebar's countsLine), attention first.
COUNT_WORDS = (("FAILED", "failed"), ("KILLED", "killed"), ("UPSTREAM_FAILED", "blocked"),
               ("RUNNING", "running"), ("PENDING", "queued"), ("WAITING", "waiting"),
               ("SUCCEEDED", "done"))


def counts_line(states: Iterable[str]) -> str:
    """A group's tasks counted by state, attention first.

    >>> counts_line(["SUCCEEDED", "FAILED", "SUCCEEDED"])
    '1 failed · 2 done'
    """
    counts = Counter(states)
    return " · ".join(f"{counts[s]} {word}" for s, word in COUNT_WORDS if counts[s])


def task_graph(name: str, nodes: Sequence[tuple[str, ...]], edges: Sequence[tuple[str, str]]) -> Any:
    """A Graphviz graph of tasks: ``nodes`` are (key, label, state[, name]), ``edges`` (parent, child).

    Tasks of one name that has several (a map, a loop of calls) are drawn as one group node
    with their counts by state, as in the sidebar. The background is transparent and edges are
    a neutral grey, so the picture reads in JupyterLab's light and dark themes.
    """
    import graphviz

    dot = graphviz.Digraph(name, graph_attr={"rankdir": "LR", "bgcolor": "transparent",
                                             "fontcolor": NEUTRAL},
                           node_attr={"shape": "box", "style": "rounded,filled", "fontcolor": "white",
                                      "color": NEUTRAL, "fontname": "sans-serif"},
                           edge_attr={"color": NEUTRAL, "arrowsize": "0.7"})
    by_name: dict[str, list[tuple[str, str]]] = {}
    for node in nodes:
        key, _label, state = node[:3]
        by_name.setdefault(node[3] if len(node) > 3 else key, []).append((key, state))
    node_of: dict[str, str] = {}
    for key, label, state, *rest in nodes:
        members = by_name[rest[0]] if rest else [(key, state)]
        if len(members) > 1:
            group = f"group:{rest[0]}"
            node_of[key] = group
            if members[0][0] == key:  # draw the group once, where its first task is
                states = [s for _, s in members]
                shown = next(s for s in ATTENTION if s in states)
                dot.node(group, f"{rest[0]} ×{len(members)}\n{counts_line(states)}",
                         fillcolor=COLOURS.get(shown, "#000"))
        else:
            node_of[key] = key
            dot.node(key, label, fillcolor=COLOURS.get(state, "#000"))
    seen: set[tuple[str, str]] = set()
    for parent, child in edges:
        pair = (node_of.get(parent, parent), node_of.get(child, child))
        if pair[0] != pair[1] and pair not in seen:
            seen.add(pair)
            dot.edge(*pair)
    return dot
