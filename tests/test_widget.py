"""`%pipeline graph`'s live widget (anywidget) outside a browser: what it sends to the frontend."""

from __future__ import annotations

import pytest
from conftest import wait_for

from nbpipe.widget import GraphWidget, available

pytestmark = pytest.mark.skipif(not available(), reason="the widget's JavaScript is not built (make)")


def test_the_widget_carries_tasks_edges_and_follows_states(pipe) -> None:
    @pipe.task
    def part(i: int) -> int:
        return i

    @pipe.task
    def whole(parts: list[int]) -> int:
        return sum(parts)

    total = whole([part(i) for i in range(5)])
    pipe.resolve()
    widget = GraphWidget(pipe, follow=False)
    assert {t["state"] for t in widget.tasks} == {"WAITING"}
    assert len(widget.edges) == 5 and all(e["child"] == total.key for e in widget.edges)
    assert "nbpipe-node" in str(widget._esm)  # the built module (sharing graph.ts) is attached
    pipe.run(check=True)
    widget.refresh()
    assert {t["state"] for t in widget.tasks} == {"SUCCEEDED"}
    assert {t["name"] for t in widget.tasks} == {"part", "whole"}


def test_the_widget_refreshes_itself_while_tasks_run(pipe) -> None:
    import time

    @pipe.task
    def nap(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    ref = nap(0.5)
    pipe.resolve()
    widget = GraphWidget(pipe, poll=0.1)
    pipe.run(wait=False)
    wait_for(lambda: widget.tasks[0]["state"] == "SUCCEEDED")
    assert ref.result() == 0.5


def test_the_widget_keeps_following_after_every_task_finished(pipe) -> None:
    """A task added or re-run after the graph went quiet still shows (it never stops silently)."""
    @pipe.task
    def one(i: int) -> int:
        return i

    pipe.run([one(0)], check=True)
    widget = GraphWidget(pipe, poll=0.05)
    wait_for(lambda: [t["state"] for t in widget.tasks] == ["SUCCEEDED"])
    import time

    time.sleep(0.5)  # quiet for several polls: every task is final
    later = one(1)
    pipe.run([later], check=True)
    wait_for(lambda: {t["label"]: t["state"] for t in widget.tasks}.get(later.label) == "SUCCEEDED")
    assert widget.following


def test_the_widget_says_when_it_stopped_following(pipe) -> None:
    @pipe.task
    def one(i: int) -> int:
        return i

    pipe.run([one(0)], check=True)
    widget = GraphWidget(pipe, poll=0.05)
    widget._pipe = None  # the pipeline is gone under it (closed, replaced)
    wait_for(lambda: widget.following is False)


def test_the_cells_status_line_and_the_task_panel_give_the_same_duration(pipe) -> None:
    """The status line's run time is the attempt's, as the sidebar's panel shows it (one decimal)."""
    import time

    from nbpipe import queries
    from nbpipe.display import _status_text

    @pipe.task
    def nap(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    ref = nap(0.4)
    started = time.monotonic()
    pipe.run([ref], check=True)
    time.sleep(0.3)  # wall time since the cell ran grows; the run time does not
    line = _status_text(ref, started)
    panel = queries.task_detail(pipe.store, pipe.name, ref.key)["attempts"][-1]["seconds"]
    assert f"SUCCEEDED on {ref.worker} in {panel:.1f} s (" in line, (line, panel)
    assert panel >= 0.4
