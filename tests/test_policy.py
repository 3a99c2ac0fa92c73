"""Time and retry policy (rms-cloud-tasks' --max-runtime and --retry-on-*, jobmon's
max_runtime_seconds, max_attempts and fatal errors): ``timeout=``, ``retry_on=``,
``nbpipe.Permanent`` and task defaults from the pipeline and the configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import run_script, wait_for

from nbpipe import ConfigError, Permanent, Pipeline, State, TaskDefinitionError, TaskTimedOut, queries
from nbpipe.policy import parse_retry_on

TIMEOUT = 180


def _attempt_states(pipe: Pipeline, ref) -> list[str]:
    return [a["state"] for a in pipe.store.attempts(pipe.pipeline_id, ref.key)]


def test_a_python_loop_past_its_timeout_is_stopped_and_recorded_as_timed_out(pipe: Pipeline) -> None:
    @pipe.task(timeout=2)
    def spin() -> int:
        total = 0
        while True:  # pure Python: the timeout's exception reaches it
            total += 1

    ref = spin()
    start = time.monotonic()
    pipe.run(timeout=TIMEOUT)
    assert time.monotonic() - start < 2 + 30  # stopped within seconds, not left to run
    assert ref.state is State.FAILED
    assert _attempt_states(pipe, ref) == ["TIMED_OUT"]
    assert ref.error.startswith("timed out after 2 s")
    detail = queries.task_detail(pipe.store, pipe.name, ref.label)
    assert detail["outcome"] == "timed out"
    assert detail["attempts"][0]["state"] == "TIMED_OUT"
    nodes = queries.graph(pipe.store, pipe.name)["nodes"]  # the sidebar's state payload
    assert nodes[0]["outcome"] == "timed out"
    with pytest.raises(Exception, match="timed out after 2 s"):
        ref.result()


def test_a_task_sleeping_in_c_past_its_timeout_is_stopped_by_ending_its_worker(pipe: Pipeline) -> None:
    # The case: a task slept 10 s past a 2 s walltime and succeeded.
    @pipe.task(timeout="2s")
    def nap(seconds: float) -> float:
        time.sleep(seconds)  # blocked in C: only ending the process stops it
        return seconds

    ref = nap(120.0)
    start = time.monotonic()
    pipe.run(timeout=TIMEOUT)
    assert time.monotonic() - start < 60
    assert ref.state is State.FAILED
    assert _attempt_states(pipe, ref) == ["TIMED_OUT"]
    assert "timed out after 2 s" in ref.error and "worker process was ended" in ref.error


def _group_alive(group: int) -> bool:
    """Whether a process of process group ``group`` still runs (a zombie has ended)."""
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == group and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def test_a_bash_task_past_its_timeout_is_stopped_with_its_command(pipe: Pipeline, tmp_path: Path) -> None:
    marker, group = tmp_path / "finished", tmp_path / "group"

    @pipe.bash_task(timeout=2)
    def slow() -> str:
        # $$: the shell, the leader of the command's own process group
        return f"echo $$ > {group}; sleep 20 && touch {marker}"

    ref = slow()
    pipe.run(timeout=TIMEOUT)
    assert ref.state is State.FAILED and _attempt_states(pipe, ref) == ["TIMED_OUT"]
    # the command's whole process group is stopped (the sleep too), not only the shell: waited
    # for as an event, not by sleeping out the 20 s the command would have taken
    wait_for(lambda: not _group_alive(int(group.read_text())), timeout=60)
    assert not marker.exists()


def test_a_task_within_its_timeout_succeeds(pipe: Pipeline) -> None:
    @pipe.task(timeout="1m")
    def quick(x: int) -> int:
        time.sleep(0.2)
        return x + 1

    ref = quick(1)
    pipe.run(check=True, timeout=TIMEOUT)
    assert ref.result() == 2 and _attempt_states(pipe, ref) == ["SUCCEEDED"]


def test_timeouts_are_retried_unless_retry_on_leaves_them_out(pipe: Pipeline) -> None:
    @pipe.task(timeout=1, retries=2)
    def spin_retried(n: int) -> int:
        while True:
            n += 1

    # (the same body would be the same task: version= keeps the two apart)
    @pipe.task(timeout=1, retries=2, retry_on=["exception"], version="once")
    def spin_once(n: int) -> int:
        while True:
            n += 1

    again, once = spin_retried(0), spin_once(0)
    pipe.run(timeout=TIMEOUT)
    assert _attempt_states(pipe, again) == ["TIMED_OUT"] * 3
    assert _attempt_states(pipe, once) == ["TIMED_OUT"]


def test_retry_on_chooses_the_kinds_of_failure_that_are_retried(pipe: Pipeline) -> None:
    @pipe.task(retries=2, retry_on={"exception": False})
    def raises() -> None:
        raise ValueError("bad input")

    @pipe.task(retries=2, retry_on=["exception"])
    def exits() -> None:
        sys.exit(3)

    @pipe.bash_task(retries=2, retry_on="exception,timeout")
    def bash_exits() -> str:
        return "exit 4"

    @pipe.task(retries=1, retry_on=["exit"])
    def exits_retried() -> None:
        sys.exit(5)

    refs = [raises(), exits(), bash_exits(), exits_retried()]
    pipe.run(timeout=TIMEOUT)
    assert [len(_attempt_states(pipe, r)) for r in refs] == [1, 1, 1, 2]
    assert all(r.state is State.FAILED for r in refs)


def test_a_permanent_error_is_never_retried(pipe: Pipeline, tmp_path: Path) -> None:
    # jobmon: a fatal error ends the task at once; a retryable one uses its attempts.
    counter = tmp_path / "count"

    @pipe.task(retries=3)
    def fatal() -> None:
        raise Permanent("the input file is malformed; fix it, then retry")

    @pipe.task(retries=3)
    def flaky() -> int:
        n = int(counter.read_text()) if counter.exists() else 0
        counter.write_text(str(n + 1))
        if n < 2:
            raise RuntimeError(f"transient failure {n}")
        return n

    bad, good = fatal(), flaky()
    pipe.run(timeout=TIMEOUT)
    assert bad.state is State.FAILED and _attempt_states(pipe, bad) == ["FAILED"]
    assert "Permanent: the input file is malformed" in bad.error
    with pytest.raises(Permanent):
        bad.result()
    assert good.result() == 2 and _attempt_states(pipe, good) == ["FAILED", "FAILED", "SUCCEEDED"]


def test_pipeline_defaults_apply_to_tasks_that_do_not_set_the_option(store: Path, client, tmp_path: Path
                                                                     ) -> None:
    counter = tmp_path / "count"
    pipe = Pipeline("defaults", store=store, cluster=client, defaults={"retries": 2, "timeout": "1h"})
    try:
        @pipe.task
        def flaky() -> int:
            n = int(counter.read_text()) if counter.exists() else 0
            counter.write_text(str(n + 1))
            if n < 2:
                raise RuntimeError("transient")
            return n

        @pipe.task(retries=0)
        def strict() -> None:
            raise RuntimeError("no second chance")

        a, b = flaky(), strict()
        pipe.run(timeout=TIMEOUT)
        assert a.result() == 2 and len(_attempt_states(pipe, a)) == 3
        assert b.state is State.FAILED and len(_attempt_states(pipe, b)) == 1  # its own 0 wins
    finally:
        pipe.close()


@pytest.mark.parametrize("defaults, fragment", [
    ({"retries": -1}, "retries=-1 must be an integer >= 0"),
    ({"timeout": "soon"}, "timeout='soon' is not a duration"),
    ({"retry_on": ["exeption"]}, "did you mean 'exception'"),
    ({"retires": 2}, "did you mean 'retries'"),
    ({"cores": 2}, "defaults can set retries, timeout, retry_on, trust_existing"),
])
def test_bad_pipeline_defaults_name_the_option_and_the_fix(store: Path, defaults: dict, fragment: str
                                                           ) -> None:
    with pytest.raises(TaskDefinitionError, match="defaults") as info:
        Pipeline("bad", store=store, defaults=defaults)
    assert fragment in str(info.value)


@pytest.mark.parametrize("options, fragment", [
    ({"timeout": 0}, "timeout=0 is not a duration longer than 0 s"),
    ({"timeout": "10 parsecs"}, "is not a duration"),
    ({"retry_on": ["segfault"]}, "unknown kind 'segfault'"),
    ({"retry_on": 3}, "must list kinds of failure"),
    ({"retry_on": {"exit": "no"}}, "each kind maps to True or False"),
    ({"trust_existing": "yes"}, "trust_existing='yes' must be True or False"),
])
def test_bad_policy_options_name_the_task_and_the_fix(pipe: Pipeline, options: dict, fragment: str
                                                      ) -> None:
    with pytest.raises(TaskDefinitionError, match="task 'f'") as info:
        @pipe.task(**options)
        def f() -> None:
            pass
    assert fragment in str(info.value)


def test_retry_on_accepts_lists_strings_and_mappings() -> None:
    assert parse_retry_on("exception, timeout", "t") == {"exception", "timeout"}
    assert parse_retry_on({"lost": False, "exit": False}, "t") == {"exception", "timeout"}
    assert parse_retry_on([], "t") == frozenset()


def test_the_nbpipe_yaml_task_section_sets_defaults_for_a_script(tmp_path: Path) -> None:
    # A migrated jobmon workflow keeps its 3 attempts without editing every task.
    (tmp_path / "nbpipe.yaml").write_text("cluster: local\ntask:\n  retries: 2\n  timeout: 30s\n")
    result = run_script(tmp_path / "flow.py", """
        from pathlib import Path
        from nbpipe import Pipeline

        pipe = Pipeline("flow")
        counter = Path("count")

        @pipe.task
        def flaky() -> int:
            n = int(counter.read_text()) if counter.exists() else 0
            counter.write_text(str(n + 1))
            if n < 2:
                raise RuntimeError("transient")
            return n

        ref = flaky()
        pipe.run(check=True)
        print("attempts", len(pipe.store.attempts(pipe.pipeline_id, ref.key)))
        pipe.close()
    """, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "attempts 3" in result.stdout


def test_a_bad_task_section_in_nbpipe_yaml_names_the_file_and_the_setting(tmp_path: Path) -> None:
    (tmp_path / "nbpipe.yaml").write_text("task:\n  retry_on: [exeption]\n")
    result = run_script(tmp_path / "flow.py", """
        from nbpipe import Pipeline
        Pipeline("flow")
    """, timeout=TIMEOUT)
    assert result.returncode != 0
    assert "nbpipe.yaml" in result.stderr and "did you mean 'exception'" in result.stderr
    assert "ConfigError" in result.stderr


def test_task_defaults_from_an_environment_variable_are_checked(tmp_path: Path) -> None:
    env_ok = {"DASK_NBPIPE__TASK": json.dumps({"retries": 1})}
    script = tmp_path / "check.py"
    script.write_text("from nbpipe.config import setting\nprint(setting('task'))\n")
    import os

    ok = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                        env={**os.environ, **env_ok}, timeout=TIMEOUT)
    assert ok.returncode == 0, ok.stderr
    assert "'retries': 1" in ok.stdout
    bad = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "DASK_NBPIPE__TASK": json.dumps({"timeout": -5})},
                         timeout=TIMEOUT)
    assert bad.returncode != 0 and "DASK_NBPIPE__TASK" in bad.stderr
    assert ConfigError.__name__ in bad.stderr


def test_the_task_line_takes_timeout_and_retry_on() -> None:
    from nbpipe.taskline import parse_task_line

    line = parse_task_line("fit --timeout 10m --retries 2 --retry-on exception timeout")
    assert line.options == {"timeout": "10m", "retries": 2, "retry_on": ["exception", "timeout"]}


def test_timed_out_is_its_own_exception_type() -> None:
    assert issubclass(TaskTimedOut, Exception)
