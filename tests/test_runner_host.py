"""The runner is built from what it needs (store, pipeline id, name, connection, lock and a
RunnerHost), not from a Pipeline: any host giving the five callables gets its tasks run."""

from __future__ import annotations

from pathlib import Path

from distributed import Client, LocalCluster

from nbpipe import Pipeline, State
from nbpipe.cluster import Connection
from nbpipe.runner import Runner, RunnerHost
from nbpipe.store import RunnerLock


def test_a_runner_runs_the_graph_of_any_host_and_reports_to_it(tmp_path: Path) -> None:
    with LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        pipe = Pipeline("hosted", store=tmp_path / ".nbpipe", cluster=client)

        @pipe.task
        def inc(x: int) -> int:
            return x + 1

        @pipe.task
        def boom(x: int) -> int:
            raise ValueError(f"no {x}")

        a = inc(1)
        b = inc(a)
        c = inc(b)
        bad = boom(a)
        after = inc(bad)
        refs = [a, b, c, bad, after]
        pipe.resolve()
        executed: list = []
        specs: list = []
        host = RunnerHost(deps=lambda r: list(r.deps), refs=lambda: list(refs),
                          executed=executed.extend, settle_late=lambda late: None,
                          write_specs=specs.extend)
        lock = RunnerLock(pipe.store, "hosted")
        lock.acquire()
        runner = Runner(pipe.store, pipe.pipeline_id, "hosted", host,
                        Connection(client, owns_client=False, description="test client"), lock)
        try:
            runner.add(refs)
            with runner.changed:
                assert runner.changed.wait_for(
                    lambda: all(r.state.final for r in refs) or not runner.alive, timeout=300)
        finally:
            runner.close()
        assert [r.state for r in refs] == [State.SUCCEEDED] * 3 + [State.FAILED,
                                                                    State.UPSTREAM_FAILED]
        assert set(executed) == {a, b, c, bad}  # what run() would report as executed
        assert set(specs) == {bad, after}  # written so `nbpipe retry` can run them elsewhere
        rows = pipe.store.task_rows(pipe.pipeline_id, [r.key for r in refs])
        assert [rows[r.key]["state"] for r in refs] == [r.state.value for r in refs]
        assert c.result() == 4
        pipe.close()


def test_closing_the_runner_while_tasks_run_puts_them_back_to_waiting(tmp_path: Path) -> None:
    """What was running or handed ahead when the runner closed waits again, in memory and in the
    store, saying why; the next run runs it."""
    import time

    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        store = tmp_path / ".nbpipe"
        pipe = Pipeline("closed", store=store, cluster=client)

        @pipe.task
        def slow(x: int) -> int:
            import time

            time.sleep(x)
            return x

        first = slow(30)
        second = slow(first)  # handed ahead while the first runs
        pipe.run(wait=False)
        deadline = time.monotonic() + 120
        while first.state is not State.RUNNING and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.state is State.RUNNING
        pipe.close()
        assert (first.state, second.state) == (State.WAITING, State.WAITING)
        rows = pipe.store.task_rows(pipe.pipeline_id, [first.key, second.key])
        assert [rows[r.key]["state"] for r in (first, second)] == ["WAITING", "WAITING"]
        messages = [e["message"] for e in pipe.store.events(pipe.pipeline_id)
                    if e["key"] == first.key]
        assert messages[-1] == "runner closed before the task finished"
        assert second.attempts == 0  # taken back: its attempt is not counted
