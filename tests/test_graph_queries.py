"""Querying a pipeline from the command line as the seeds' users do: jobmon's sub-DAG
(``nbpipe tasks P --upstream/--downstream TASK``), cloud_tasks' event stream (``nbpipe events
P --follow --json``) and re-running the entries that failed (``--as-taskfile``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest
import yaml
from conftest import run_script

from nbpipe import TaskItem, dump_tasks, iter_tasks, load_tasks

TIMEOUT = 240

DIAMOND = """
    from nbpipe import Pipeline
    pipe = Pipeline("dag", cluster={"kind": "local", "workers": 1})

    @pipe.task
    def load(i: int) -> int:
        return i

    @pipe.task
    def clean(x: int) -> int:
        return x + 1

    @pipe.task
    def fit(a: int, b: int) -> int:
        return a + b

    @pipe.task
    def report(model: int) -> str:
        return str(model)

    @pipe.task
    def unrelated() -> int:
        return 0

    a, b = clean(load(1)), clean(load(2))
    model = fit(a, b)
    report(model)
    unrelated()
    pipe.run()
    pipe.close()
"""


@pytest.fixture(scope="module")
def dag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dag")
    result = run_script(folder / "dag.py", DIAMOND, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    return folder / ".nbpipe"


def nbpipe(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return helpers.nbpipe(*args, "--store", str(store), timeout=TIMEOUT)


def labels(store: Path, *args: str) -> set[str]:
    result = nbpipe(store, "tasks", "dag", *args, "--json")
    assert result.returncode == 0, result.stderr
    return {t["label"] for t in json.loads(result.stdout)}


def test_downstream_lists_the_task_and_everything_that_needs_it(dag: Path) -> None:
    assert labels(dag, "--downstream", "load(i=1)") == {
        "load(i=1)", "clean(x=<load>)", "fit(a=<clean>, b=<clean>)", "report(model=<fit>)"}
    assert labels(dag, "--downstream", "fit") == {"fit(a=<clean>, b=<clean>)", "report(model=<fit>)"}
    assert labels(dag, "--downstream", "unrelated") == {"unrelated"}


def test_upstream_lists_the_task_and_everything_it_needs(dag: Path) -> None:
    up = labels(dag, "--upstream", "report")
    assert {t.split("(")[0] for t in up} == {"load", "clean", "fit", "report"}
    assert len(up) == 6  # two loads, two cleans, fit, report
    assert not any(t.startswith("unrelated") for t in up)
    load_up = labels(dag, "--upstream", "load(i=2)")
    assert load_up == {"load(i=2)"}


def test_a_name_matches_all_its_tasks_and_filters_combine(dag: Path) -> None:
    down = labels(dag, "--downstream", "load")  # both loads
    assert {t.split("(")[0] for t in down} == {"load", "clean", "fit", "report"}
    assert len(down) == 6
    both = labels(dag, "--downstream", "clean", "--upstream", "report", "--name", "fit*")
    assert {t.split("(")[0] for t in both} == {"fit"}


def test_the_sub_graph_of_an_unknown_task_is_an_error_naming_it(dag: Path) -> None:
    result = nbpipe(dag, "tasks", "dag", "--downstream", "nosuch")
    assert result.returncode != 0
    assert "no task 'nosuch' in pipeline 'dag'" in result.stderr


def test_the_sub_graph_in_the_table_view(dag: Path) -> None:
    result = nbpipe(dag, "tasks", "dag", "--upstream", "fit")
    assert result.returncode == 0, result.stderr
    assert "report" not in result.stdout and "fit" in result.stdout and "load" in result.stdout


def test_events_lists_every_state_change_and_json_gives_one_object_per_line(dag: Path) -> None:
    text = nbpipe(dag, "events", "dag")
    assert text.returncode == 0, text.stderr
    assert "SUCCEEDED" in text.stdout and "report(model=<fit>)" in text.stdout
    lines = nbpipe(dag, "events", "dag", "--json").stdout.splitlines()
    events = [json.loads(line) for line in lines]
    assert {e["state"] for e in events} >= {"SUCCEEDED"}
    assert all({"id", "time", "key", "state", "message", "task"} <= set(e) for e in events)
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    since = nbpipe(dag, "events", "dag", "--json", "--since", str(events[-2]["id"])).stdout
    assert [json.loads(line)["id"] for line in since.splitlines()] == [events[-1]["id"]]


def test_events_follow_prints_new_events_as_they_happen(tmp_path: Path) -> None:
    script = tmp_path / "slow.py"
    script.write_text(
        "import time\nfrom nbpipe import Pipeline\n"
        "pipe = Pipeline('slow', cluster={'kind': 'local', 'workers': 1})\n"
        "@pipe.task\ndef step(i):\n    time.sleep(1)\n    return i\n"
        "[step(i) for i in range(3)]\npipe.run()\npipe.close()\n")
    store = tmp_path / ".nbpipe"
    follower = None
    try:
        driver = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + TIMEOUT
        while not (store / "nbpipe.sqlite").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        follower = subprocess.Popen(
            [sys.executable, "-m", "nbpipe.cli", "events", "slow", "--follow", "--json",
             "--store", str(store)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert driver.wait(timeout=TIMEOUT) == 0, driver.stderr.read() if driver.stderr else ""
        seen: list[dict] = []
        assert follower.stdout is not None
        while sum(e["state"] == "SUCCEEDED" for e in seen) < 3:  # streamed, though still running
            line = follower.stdout.readline()
            assert line, "events --follow ended or printed nothing"
            seen.append(json.loads(line))
        assert follower.poll() is None  # it keeps following
        assert {e["task"] for e in seen if e["state"] == "SUCCEEDED"} == {
            "step(i=0)", "step(i=1)", "step(i=2)"}
    finally:
        if follower is not None:
            follower.kill()
            follower.wait()


TASKFILE_SCRIPT = """
    import sys
    from nbpipe import Pipeline, TaskItem, iter_tasks
    pipe = Pipeline("frames", cluster={"kind": "local", "workers": 1})

    @pipe.task
    def process(item: TaskItem) -> int:
        if item.data["x"] % 3 == 0:
            raise ValueError(f"{item.task_id}: bad frame")
        return item.data["x"]

    refs = process.map(iter_tasks(sys.argv[1]))
    print(pipe.run())
    pipe.close()
"""


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".jsonl"])
def test_failed_entries_are_written_back_as_a_task_file_that_feeds_a_later_run(
        tmp_path: Path, suffix: str) -> None:
    source = tmp_path / "frames.jsonl"
    dump_tasks(source, [TaskItem(f"f{i}", {"x": i}) for i in range(7)])
    result = run_script(tmp_path / "frames.py", TASKFILE_SCRIPT, str(source), timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    store = tmp_path / ".nbpipe"
    failed_file = tmp_path / f"failed{suffix}"
    for extra in ([], ["--from", str(source)]):  # from the store's specs, or the task file
        failed_file.unlink(missing_ok=True)
        dump = nbpipe(store, "tasks", "frames", "--state", "FAILED", "--as-taskfile",
                      str(failed_file), *extra)
        assert dump.returncode == 0, dump.stderr
        assert "wrote 3 task-file entries" in dump.stdout
        assert load_tasks(failed_file) == [TaskItem("f0", {"x": 0}), TaskItem("f3", {"x": 3}),
                                           TaskItem("f6", {"x": 6})]
    if suffix == ".yaml":
        assert yaml.safe_load(failed_file.read_text())[0] == {"task_id": "f0", "data": {"x": 0}}
    again = run_script(tmp_path / "frames.py", TASKFILE_SCRIPT, str(failed_file), timeout=TIMEOUT)
    assert "3 FAILED" in again.stdout or "FAILED" in again.stdout, again.stdout + again.stderr


def test_as_taskfile_without_a_source_for_done_tasks_names_them_and_the_fix(tmp_path: Path) -> None:
    source = tmp_path / "frames.jsonl"
    dump_tasks(source, [TaskItem("f1", {"x": 1})])
    assert run_script(tmp_path / "frames.py", TASKFILE_SCRIPT, str(source),
                      timeout=TIMEOUT).returncode == 0
    dump = nbpipe(tmp_path / ".nbpipe", "tasks", "frames", "--state", "SUCCEEDED",
                  "--as-taskfile", str(tmp_path / "done.yaml"))
    assert dump.returncode != 0
    assert "process[f1]" in dump.stderr and "--from TASKFILE" in dump.stderr


def test_jsonl_task_files_are_read_one_entry_at_a_time_with_errors_naming_the_line(tmp_path: Path
                                                                                 ) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"task_id": "a", "data": 1}\n\n{"task_id": "b"}\n{"task_id": "a"}\n')
    entries = iter_tasks(path)
    assert next(entries) == TaskItem("a", 1)
    assert next(entries) == TaskItem("b", None)
    with pytest.raises(Exception, match=r"t.jsonl, line 4: task_id 'a' appears twice"):
        next(entries)
    path.write_text('{"task_id": "a"\n')
    with pytest.raises(Exception, match=r"line 1 is not valid JSON"):
        load_tasks(path)


def test_mapping_a_large_task_file_reports_progress_while_registering(tmp_path: Path) -> None:
    dump_tasks(tmp_path / "many.jsonl", [TaskItem(f"e{i}", i) for i in range(5)])
    result = run_script(tmp_path / "register.py", """
        import nbpipe.resolution
        from nbpipe import Pipeline, TaskItem, iter_tasks

        nbpipe.resolution.PROGRESS_EVERY = 2  # (100,000 entries by default)
        pipe = Pipeline("many")

        @pipe.task
        def process(item: TaskItem) -> int:
            return item.data

        print(len(process.map(iter_tasks("many.jsonl"))))
    """, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "5"
    assert "nbpipe: registered 2 tasks of 'process'" in result.stderr
    assert "nbpipe: registered 4 tasks of 'process'" in result.stderr
