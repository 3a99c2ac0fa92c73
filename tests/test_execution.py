"""Running tasks for real on the shared LocalCluster: graph building, values, failures, bash,
environment, limits, captured output, the task context, bookkeeping and file dependencies."""

from __future__ import annotations

import os
import platform
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Annotated

import pytest
from conftest import wait_for
from distributed import Client, LocalCluster

import nbpipe
from nbpipe import (
    BashTaskError,
    CycleError,
    In,
    MissingInputError,
    Out,
    Pipeline,
    State,
    TaskDefinitionError,
    TaskFailed,
    TaskRef,
    UpstreamFailed,
)
from nbpipe.errors import NotInTask

TIMEOUT = 120  # seconds any single run may take before the test fails instead of hanging



def _edges(pipe: Pipeline) -> set[tuple[str, str, str]]:
    rows = pipe.store.connect().execute(
        "SELECT parent, child, kind FROM edges WHERE pipeline_id = ?", (pipe.pipeline_id,)
    ).fetchall()
    return {(r[0], r[1], r[2]) for r in rows}


# -- registration and the graph ---------------------------------------------------------------


def test_calling_a_task_returns_a_taskref_without_running_it(pipe: Pipeline, tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    @pipe.task
    def touch(path: str) -> str:
        Path(path).write_text("ran")
        return "done"

    ref = touch(str(marker))
    assert isinstance(ref, TaskRef)
    assert ref.state is State.WAITING
    time.sleep(1.0)
    assert not marker.exists(), "the task ran before run() or result() was called"
    assert pipe.tasks()[0].state == "WAITING"
    assert not marker.exists()
    assert ref.result(timeout=TIMEOUT) == "done"
    assert marker.read_text() == "ran"


def test_taskref_arguments_become_dependencies_and_arrive_as_values(pipe: Pipeline) -> None:
    @pipe.task
    def number(x: int) -> int:
        return x * 10

    @pipe.task
    def collect(single: int, items: list, pair: tuple, mapping: dict) -> dict:
        return {"single": single, "items": items, "pair": pair, "mapping": mapping,
                "types": [type(items).__name__, type(pair).__name__, type(mapping).__name__]}

    a, b, c, d = number(1), number(2), number(3), number(4)
    out = collect(a, [b, 5], (c, "x"), {"k": d, "plain": 7})
    pipe.run(check=True, timeout=TIMEOUT)
    assert out.result() == {
        "single": 10, "items": [20, 5], "pair": (30, "x"), "mapping": {"k": 40, "plain": 7},
        "types": ["list", "tuple", "dict"],
    }
    data_edges = {(p, k) for p, c_, k in _edges(pipe) if c_ == out.key}
    assert data_edges == {(r.key, "data") for r in (a, b, c, d)}


def test_after_orders_tasks_without_passing_data(pipe: Pipeline) -> None:
    @pipe.task
    def first() -> tuple:
        start = time.time()
        time.sleep(1.0)
        return start, time.time()

    def second() -> tuple:
        return time.time(), time.time()

    a = first()
    b = pipe.task(second, after=[a])()
    pipe.run(check=True, timeout=TIMEOUT)
    a_start, a_end = a.result()
    b_start, _ = b.result()
    assert b_start >= a_end, "the task with after= started before its predecessor ended"
    assert (a.key, b.key, "after") in _edges(pipe)


def test_options_given_when_rewrapping_a_task_function_apply(pipe: Pipeline) -> None:
    @pipe.task
    def first() -> tuple:
        start = time.time()
        time.sleep(1.0)
        return start, time.time()

    @pipe.task
    def second() -> tuple:
        return time.time(), time.time()

    a = first()
    ordered = pipe.task(second, after=[a])
    assert ordered.opts.after == (a,)
    b = ordered()
    pipe.run(check=True, timeout=TIMEOUT)
    assert b.result()[0] >= a.result()[1]


def test_identical_calls_are_one_task_and_run_once(pipe: Pipeline, tmp_path: Path) -> None:
    log = tmp_path / "calls.log"

    @pipe.task
    def record(x: int, path: str) -> int:
        with open(path, "a") as f:
            f.write(f"{x}\n")
        return x + 1

    first = record(1, str(log))
    again = record(1, str(log))
    assert again is first
    assert len(pipe.tasks()) == 1
    summary = pipe.run(check=True, timeout=TIMEOUT)
    assert summary.executed == 1
    assert first.result() == again.result() == 2
    assert log.read_text().splitlines() == ["1"]
    assert len(pipe.store.attempts(pipe.pipeline_id, first.key)) == 1


def test_map_registers_one_task_per_item(pipe: Pipeline) -> None:
    @pipe.task
    def square(x: int) -> int:
        return x * x

    refs = square.map(range(5))
    assert len(refs) == 5 and len({r.key for r in refs}) == 5
    assert len(pipe.tasks()) == 5
    pipe.run(check=True, timeout=TIMEOUT)
    assert [r.result() for r in refs] == [0, 1, 4, 9, 16]


def test_map_with_chunksize_runs_items_in_batches_keeping_each_items_identity(pipe: Pipeline) -> None:
    @pipe.task
    def where(x: int) -> tuple:
        from distributed import get_worker

        return x * 2, str(get_worker().get_current_task())

    refs = where.map(range(6), chunksize=3)
    pipe.run(check=True, timeout=TIMEOUT)
    values = [r.result() for r in refs]
    assert [v for v, _ in values] == [0, 2, 4, 6, 8, 10]
    dask_keys = [k for _, k in values]
    assert len(set(dask_keys)) == 2, f"expected 2 Dask tasks of 3 items, got {dask_keys}"
    assert all(dask_keys.count(k) == 3 for k in dask_keys)
    assert len({r.key for r in refs}) == 6
    assert all(r.state is State.SUCCEEDED for r in refs)
    rows = pipe.store.task_rows(pipe.pipeline_id)
    assert {k for k in rows} == {r.key for r in refs}
    assert all(rows[r.key]["state"] == "SUCCEEDED" for r in refs)
    assert set(pipe.store.results([r.key for r in refs])) == {r.key for r in refs}
    assert all(len(pipe.store.attempts(pipe.pipeline_id, r.key)) == 1 for r in refs)


def test_map_without_chunksize_runs_each_item_as_its_own_dask_task(pipe: Pipeline) -> None:
    @pipe.task
    def where(x: int) -> str:
        from distributed import get_worker

        return str(get_worker().get_current_task())

    refs = where.map(range(4))
    pipe.run(check=True, timeout=TIMEOUT)
    assert len({r.result() for r in refs}) == 4


# -- failures ---------------------------------------------------------------------------------


def _failing_graph(pipe: Pipeline) -> tuple[TaskRef, TaskRef, TaskRef]:
    @pipe.task
    def explode(x: int) -> int:
        raise ValueError(f"boom {x}")

    @pipe.task
    def downstream(value: int) -> int:
        return value + 1

    @pipe.task
    def unrelated(x: int) -> int:
        return x * 3

    bad = explode(1)
    return bad, downstream(bad), unrelated(2)


def test_failing_task_is_failed_and_result_reraises_with_remote_traceback(pipe: Pipeline) -> None:
    bad, _, _ = _failing_graph(pipe)
    pipe.run(timeout=TIMEOUT)
    assert bad.state is State.FAILED
    assert pipe.store.task_rows(pipe.pipeline_id, [bad.key])[bad.key]["state"] == "FAILED"
    with pytest.raises(ValueError, match="boom 1") as info:
        bad.result()
    cause = info.value.__cause__
    assert cause is not None
    assert "Traceback" in str(cause) and "explode" in str(cause) and "boom 1" in str(cause)


def test_downstream_of_a_failed_task_is_upstream_failed(pipe: Pipeline) -> None:
    bad, child, _ = _failing_graph(pipe)
    pipe.run(timeout=TIMEOUT)
    assert child.state is State.UPSTREAM_FAILED
    assert pipe.store.task_rows(pipe.pipeline_id, [child.key])[child.key]["state"] == "UPSTREAM_FAILED"
    assert pipe.store.attempts(pipe.pipeline_id, child.key) == []
    with pytest.raises(UpstreamFailed, match="downstream"):
        child.result()


def test_unrelated_branch_succeeds_when_another_task_fails(pipe: Pipeline) -> None:
    _, _, other = _failing_graph(pipe)
    summary = pipe.run(timeout=TIMEOUT)
    assert other.state is State.SUCCEEDED
    assert other.result() == 6
    assert summary.counts == {"FAILED": 1, "UPSTREAM_FAILED": 1, "SUCCEEDED": 1}


def test_run_check_raises_task_failed_naming_the_failed_task(pipe: Pipeline) -> None:
    bad, _, _ = _failing_graph(pipe)
    with pytest.raises(TaskFailed) as info:
        pipe.run(check=True, timeout=TIMEOUT)
    assert bad.label in str(info.value)
    assert info.value.failed == [bad.label]


def test_retries_rerun_a_failing_task_until_it_succeeds(pipe: Pipeline, tmp_path: Path) -> None:
    counter = tmp_path / "count"
    counter.write_text("0")

    @pipe.task(retries=2)
    def flaky(path: str) -> int:
        n = int(Path(path).read_text()) + 1
        Path(path).write_text(str(n))
        if n < 3:
            raise RuntimeError(f"attempt {n} fails")
        return n

    ref = flaky(str(counter))
    pipe.run(check=True, timeout=TIMEOUT)
    assert ref.state is State.SUCCEEDED
    assert ref.result() == 3
    attempts = pipe.store.attempts(pipe.pipeline_id, ref.key)
    assert [a["number"] for a in attempts] == [1, 2, 3]
    assert [a["state"] for a in attempts] == ["FAILED", "FAILED", "SUCCEEDED"]
    assert "attempt 1 fails" in attempts[0]["error"]
    assert pipe.tasks()[0].attempts == 3


def test_retries_are_exhausted_then_the_task_fails(pipe: Pipeline) -> None:
    @pipe.task(retries=1)
    def always() -> None:
        raise RuntimeError("never works")

    ref = always()
    pipe.run(timeout=TIMEOUT)
    assert ref.state is State.FAILED
    assert len(pipe.store.attempts(pipe.pipeline_id, ref.key)) == 2


# -- bash tasks -------------------------------------------------------------------------------


def test_bash_task_command_string_stdout_is_the_value(pipe: Pipeline) -> None:
    @pipe.bash_task
    def greet(name: str) -> str:
        return f"echo hello {name} && echo second line"

    assert greet("world").result(timeout=TIMEOUT) == "hello world\nsecond line\n"


def test_bash_task_argv_list_is_run_without_a_shell(pipe: Pipeline) -> None:
    @pipe.bash_task
    def show(a: str, b: str) -> list:
        return ["printf", "%s|%s", a, b]

    assert show("x y", "$HOME;").result(timeout=TIMEOUT) == "x y|$HOME;"


def test_bash_task_stderr_is_captured_in_its_attempt(pipe: Pipeline) -> None:
    @pipe.bash_task
    def noisy() -> str:
        return "echo to-stdout; echo to-stderr >&2"

    ref = noisy()
    assert ref.result(timeout=TIMEOUT) == "to-stdout\n"
    (attempt,) = pipe.store.attempts(pipe.pipeline_id, ref.key)
    assert "to-stderr" in attempt["stderr"]
    assert "to-stderr" not in ref.result()


def test_bash_task_nonzero_exit_fails_with_its_exit_code(pipe: Pipeline) -> None:
    @pipe.bash_task
    def bad() -> str:
        return "echo partial; echo went wrong >&2; exit 3"

    ref = bad()
    pipe.run(timeout=TIMEOUT)
    assert ref.state is State.FAILED
    with pytest.raises(BashTaskError, match="went wrong") as info:
        ref.result()
    assert info.value.exit_code == 3
    (attempt,) = pipe.store.attempts(pipe.pipeline_id, ref.key)
    assert attempt["exit_code"] == 3


def test_bash_task_unknown_command_in_a_string_exits_127_command_not_found(pipe: Pipeline) -> None:
    @pipe.bash_task
    def typo() -> str:
        return "no_such_command_nbpipe_xyz --flag"

    ref = typo()
    pipe.run(timeout=TIMEOUT)
    with pytest.raises(BashTaskError, match="command not found") as info:
        ref.result()
    assert info.value.exit_code == 127


def test_bash_task_unknown_program_in_an_argv_exits_127_command_not_found(pipe: Pipeline) -> None:
    @pipe.bash_task
    def typo() -> list:
        return ["no_such_program_nbpipe_xyz", "arg"]

    ref = typo()
    pipe.run(timeout=TIMEOUT)
    with pytest.raises(BashTaskError, match="command not found") as info:
        ref.result()
    assert info.value.exit_code == 127
    assert "no_such_program_nbpipe_xyz" in str(info.value)
    assert pipe.store.attempts(pipe.pipeline_id, ref.key)[0]["exit_code"] == 127


def test_bash_task_large_stdout_and_stderr_do_not_deadlock(pipe: Pipeline) -> None:
    script = (
        "import sys\n"
        "line = 'x' * 1023 + '\\n'\n"
        "for i in range(5 * 1024):\n"
        "    sys.stderr.write(line)\n"
        "    sys.stdout.write(line)\n"
    )

    @pipe.bash_task
    def flood(python: str, code: str) -> list:
        return [python, "-c", code]

    ref = flood(sys.executable, script)
    out = ref.result(timeout=TIMEOUT)
    assert len(out) == 5 * 1024 * 1024
    (attempt,) = pipe.store.attempts(pipe.pipeline_id, ref.key)
    assert attempt["stderr"].endswith("x\n")


# -- environment variables --------------------------------------------------------------------


def test_env_option_sets_the_variable_for_a_python_task(pipe: Pipeline, client: Client) -> None:
    assert "NBPIPE_TEST_FOO" not in os.environ

    @pipe.task(env={"NBPIPE_TEST_FOO": "bar"})
    def with_env() -> str | None:
        return os.environ.get("NBPIPE_TEST_FOO")

    assert with_env().result(timeout=TIMEOUT) == "bar"


def test_env_option_sets_the_variable_for_a_bash_task(pipe: Pipeline) -> None:
    @pipe.bash_task(env={"NBPIPE_TEST_FOO": "bar"})
    def echo_env() -> str:
        return "echo $NBPIPE_TEST_FOO"

    assert echo_env().result(timeout=TIMEOUT) == "bar\n"


def test_env_option_does_not_leak_to_other_tasks(pipe: Pipeline, client: Client) -> None:
    @pipe.task(env={"NBPIPE_TEST_FOO": "bar"})
    def with_env() -> str | None:
        return os.environ.get("NBPIPE_TEST_FOO")

    @pipe.bash_task(env={"NBPIPE_TEST_FOO": "bar"})
    def bash_env() -> str:
        return "echo $NBPIPE_TEST_FOO"

    def without_env(x: int) -> str | None:
        return os.environ.get("NBPIPE_TEST_FOO")

    a, b = with_env(), bash_env()
    plain = pipe.task(without_env, after=[a, b])
    others = plain.map(range(4))
    pipe.run(check=True, timeout=TIMEOUT)
    assert a.result() == "bar" and b.result() == "bar\n"
    assert [r.result() for r in others] == [None] * 4
    seen = client.run(lambda: os.environ.get("NBPIPE_TEST_FOO"))
    assert set(seen.values()) == {None}, f"a worker kept the variable: {seen}"


# -- scheduling limits ------------------------------------------------------------------------


def test_max_concurrent_caps_simultaneous_tasks_of_a_function(pipe: Pipeline, client: Client) -> None:
    assert len(client.scheduler_info()["workers"]) >= 2

    @pipe.task(max_concurrent=1)
    def busy(x: int) -> tuple:
        start = time.time()
        time.sleep(0.4)
        return start, time.time()

    refs = busy.map(range(4))
    pipe.run(check=True, timeout=TIMEOUT)
    spans = sorted(r.result() for r in refs)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end, f"two tasks of busy() overlapped: {spans}"


def test_without_max_concurrent_tasks_run_in_parallel_on_two_workers(pipe: Pipeline) -> None:
    @pipe.task
    def busy(x: int) -> tuple:
        start = time.time()
        time.sleep(1.0)
        return start, time.time()

    refs = busy.map(range(2))
    pipe.run(check=True, timeout=TIMEOUT)
    (s1, e1), (s2, e2) = sorted(r.result() for r in refs)
    assert s2 < e1, "the control case did not overlap: the max_concurrent test proves nothing"


# -- captured output and the task context -----------------------------------------------------


def test_python_task_stdout_and_stderr_are_captured_in_the_attempt(pipe: Pipeline) -> None:
    @pipe.task
    def chatty(x: int) -> int:
        print(f"hello from the task {x}")
        print("a warning", file=sys.stderr)
        return x

    ref = chatty(5)
    assert ref.result(timeout=TIMEOUT) == 5
    (attempt,) = pipe.store.attempts(pipe.pipeline_id, ref.key)
    assert "hello from the task 5" in attempt["stdout"]
    assert "a warning" in attempt["stderr"]
    assert "a warning" not in attempt["stdout"]


def test_context_inside_a_task_describes_that_task(pipe: Pipeline, client: Client) -> None:
    @pipe.task
    def introspect(x: int) -> dict:
        ctx = nbpipe.context()
        return {"name": ctx.name, "key": ctx.key, "label": ctx.label, "attempt": ctx.attempt,
                "worker": ctx.worker, "pipeline": ctx.pipeline}

    ref = introspect(3)
    info = ref.result(timeout=TIMEOUT)
    assert info["name"] == "introspect"
    assert info["key"] == ref.key
    assert info["label"] == ref.label
    assert info["attempt"] == 1
    assert info["pipeline"] == pipe.name
    assert info["worker"] in client.scheduler_info()["workers"]
    (attempt,) = pipe.store.attempts(pipe.pipeline_id, ref.key)
    assert attempt["worker"] == info["worker"]


def test_context_attempt_counts_retries(pipe: Pipeline) -> None:
    @pipe.task(retries=1)
    def second_time_lucky() -> int:
        attempt = nbpipe.context().attempt
        if attempt == 1:
            raise RuntimeError("first attempt fails")
        return attempt

    assert second_time_lucky().result(timeout=TIMEOUT) == 2


def test_context_outside_a_task_raises_not_in_task() -> None:
    with pytest.raises(NotInTask):
        nbpipe.context()


def test_should_stop_becomes_true_when_the_worker_gets_sigterm(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as lc, Client(lc) as own_client:
        pipe = Pipeline("should-stop", store=tmp_path / ".nbpipe", cluster=own_client)
        try:
            @pipe.task
            def patient(path: str) -> str:
                Path(path).write_text(str(os.getpid()))
                ctx = nbpipe.context()
                deadline = time.time() + 60
                while not ctx.should_stop():
                    if time.time() > deadline:
                        return "never told to stop"
                    time.sleep(0.05)
                return "stopped cleanly"

            ref = patient(str(pid_file))
            pipe.run(wait=False)
            wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=60)
            pid = int(pid_file.read_text())
            assert pid != os.getpid()
            os.kill(pid, signal.SIGTERM)
            assert ref.result(timeout=TIMEOUT) == "stopped cleanly"
            assert ref.state is State.SUCCEEDED
        finally:
            pipe.close()


# -- bookkeeping ------------------------------------------------------------------------------


def test_attempt_records_hostname_and_environment(pipe: Pipeline) -> None:
    @pipe.task
    def uses_numpy() -> float:
        import numpy as np

        return float(np.arange(4).sum())

    ref = uses_numpy()
    assert ref.result(timeout=TIMEOUT) == 6.0
    (attempt,) = pipe.store.attempts(pipe.pipeline_id, ref.key)
    assert attempt["hostname"] == socket.gethostname()
    assert attempt["pid"] and attempt["pid"] != os.getpid()
    assert attempt["start"] <= attempt["end"]
    assert attempt["env_id"]
    env = pipe.store.environment(attempt["env_id"])
    assert env is not None
    assert env["python"] == platform.python_version()
    assert env["hostname"] == socket.gethostname()
    assert "git_commit" in env
    assert {"cloudpickle", "distributed", "dask"} <= set(env["packages"])
    import cloudpickle

    assert env["packages"]["cloudpickle"] == cloudpickle.__version__


def test_environment_lists_a_package_the_task_itself_imported(pipe: Pipeline, client: Client) -> None:
    # rich is a dependency of nbpipe that tasks do not need: forget it on the workers (another
    # test may have imported it there), so that this task's own import is what brings it in.
    def forget_rich() -> bool:
        for name in [m for m in sys.modules if m == "rich" or m.startswith("rich.")]:
            del sys.modules[name]
        return "rich" in sys.modules

    assert not any(client.run(forget_rich).values())

    @pipe.task
    def uses_rich() -> str:
        import rich.markup

        return rich.markup.escape("[a]")

    ref = uses_rich()
    assert ref.result(timeout=TIMEOUT) == "\\[a]"
    (attempt,) = pipe.store.attempts(pipe.pipeline_id, ref.key)
    env = pipe.store.environment(attempt["env_id"])
    assert "rich" in env["packages"], "the attempt's environment misses what the task imported"


# -- file dependencies ------------------------------------------------------------------------


def test_reader_of_an_out_file_depends_on_its_writer_registered_later(
    pipe: Pipeline, tmp_path: Path
) -> None:
    data = tmp_path / "data.txt"

    @pipe.task
    def read(path: Annotated[Path, In]) -> str:
        return path.read_text().upper()

    @pipe.task
    def write(text: str, path: Annotated[Path, Out]) -> int:
        time.sleep(0.5)  # a reader that did not wait would find no file
        path.write_text(text)
        return len(text)

    reader = read(data)  # registered first: the file does not exist yet
    writer = write("hello", data)
    pipe.run(check=True, timeout=TIMEOUT)
    assert reader.result() == "HELLO"
    assert writer.result() == 5
    assert (writer.key, reader.key, "file") in _edges(pipe)


def test_missing_input_file_raises_before_anything_runs(pipe: Pipeline, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    missing = tmp_path / "nowhere.txt"

    @pipe.task
    def side_effect(path: str) -> None:
        Path(path).write_text("ran")

    @pipe.task
    def consume(path: Annotated[Path, In]) -> str:
        return path.read_text()

    side_effect(str(marker))
    consume(missing)
    with pytest.raises(MissingInputError) as info:
        pipe.run(timeout=TIMEOUT)
    assert "consume" in str(info.value)
    assert str(missing) in str(info.value)
    time.sleep(0.5)
    assert not marker.exists()


def test_task_that_does_not_write_its_out_file_fails_naming_it(pipe: Pipeline, tmp_path: Path) -> None:
    target = tmp_path / "promised.txt"

    @pipe.task
    def forgetful(path: Annotated[Path, Out]) -> int:
        return 1

    ref = forgetful(target)
    pipe.run(timeout=TIMEOUT)
    assert ref.state is State.FAILED
    assert str(target) in (ref.error or "")
    with pytest.raises(FileNotFoundError, match="promised.txt"):
        ref.result()


# -- definition errors ------------------------------------------------------------------------


def test_cycle_through_after_names_raises_cycle_error(pipe: Pipeline) -> None:
    def a() -> int:
        return 1

    def b() -> int:
        return 2

    pipe.task(a, after=["b"])()
    pipe.task(b, after=["a"])()
    with pytest.raises(CycleError) as info:
        pipe.run(timeout=TIMEOUT)
    message = str(info.value)
    assert "a" in message.split("cycle")[1] and "b" in message.split("cycle")[1]
    assert "a -> b" in message or "b -> a" in message


def test_unknown_option_raises_task_definition_error(pipe: Pipeline) -> None:
    with pytest.raises(TaskDefinitionError, match="retrys") as info:
        @pipe.task(retrys=1)
        def misspelt() -> None:
            pass
    assert "misspelt" in str(info.value)
    assert "retries" in str(info.value)  # the valid options are listed


@pytest.mark.parametrize("option, value", [("memory", "lots"), ("walltime", "soon")])
def test_bad_resource_string_raises_task_definition_error(pipe: Pipeline, option: str, value: str) -> None:
    def job() -> None:
        pass

    with pytest.raises(TaskDefinitionError) as info:
        pipe.task(job, **{option: value})
    message = str(info.value)
    assert "'job'" in message and option in message and repr(value) in message


@pytest.mark.parametrize("args, kwargs", [((1, 2, 3), {}), ((), {}), ((1,), {"nope": 2})])
def test_wrong_arguments_raise_task_definition_error(pipe: Pipeline, args: tuple, kwargs: dict) -> None:
    @pipe.task
    def takes_two(x: int, y: int = 0) -> int:
        return x + y

    with pytest.raises(TaskDefinitionError, match="takes_two"):
        takes_two(*args, **kwargs)
    assert pipe.tasks() == []


def test_running_twice_before_the_runner_picks_up_runs_a_task_once(pipe: Pipeline, tmp_path: Path) -> None:
    runs = tmp_path / "runs"

    @pipe.task
    def count() -> int:
        with open(runs, "a") as f:
            f.write("x")
        return 1

    ref = count()
    for _ in range(3):
        pipe.run(wait=False)
    assert ref.result(timeout=TIMEOUT) == 1
    pipe.run()
    assert runs.read_text() == "x"
    assert ref.attempts == 1
