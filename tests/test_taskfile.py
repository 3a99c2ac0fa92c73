"""Task files: JSON and YAML lists of {task_id, data}, mapped to one task per entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nbpipe import Pipeline, State, TaskFailed, TaskfileError, TaskItem, load_tasks

TIMEOUT = 120

ENTRIES = [
    {"task_id": "frame-001", "data": {"value": 2, "scale": 10}},
    {"task_id": "frame-002", "data": {"value": 3, "scale": 10}},
    {"task_id": 7, "data": {"value": 4, "scale": 1}},
]
YAML_TEXT = """\
# frames to process
- task_id: frame-001
  data: {value: 2, scale: 10}
- task_id: frame-002
  data:
    value: 3
    scale: 10
- task_id: 7
  data: {value: 4, scale: 1}
"""
EXPECTED = [
    TaskItem("frame-001", {"value": 2, "scale": 10}),
    TaskItem("frame-002", {"value": 3, "scale": 10}),
    TaskItem("7", {"value": 4, "scale": 1}),
]


def test_load_tasks_reads_a_json_list(tmp_path: Path) -> None:
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(ENTRIES))
    items = load_tasks(path)
    assert items == EXPECTED
    assert all(isinstance(i, TaskItem) for i in items)
    assert items[0].task_id == "frame-001" and items[0].data == {"value": 2, "scale": 10}


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".YAML"])
def test_load_tasks_reads_a_yaml_list(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"tasks{suffix}"
    path.write_text(YAML_TEXT)
    assert load_tasks(str(path)) == EXPECTED


def test_load_tasks_entry_without_data_has_none(tmp_path: Path) -> None:
    path = tmp_path / "tasks.yaml"
    path.write_text("- task_id: only-id\n")
    assert load_tasks(path) == [TaskItem("only-id", None)]


def test_load_tasks_empty_file_gives_no_items(tmp_path: Path) -> None:
    path = tmp_path / "tasks.yaml"
    path.write_text("")
    assert load_tasks(path) == []


def test_map_over_a_task_file_runs_one_task_per_entry(pipe: Pipeline, tmp_path: Path) -> None:
    path = tmp_path / "tasks.yaml"
    path.write_text(YAML_TEXT)

    @pipe.task
    def process(item: TaskItem) -> str:
        return f"{item.task_id}:{item.data['value'] * item.data['scale']}"

    refs = process.map(load_tasks(path))
    assert [r.label for r in refs] == ["process[frame-001]", "process[frame-002]", "process[7]"]
    assert sorted(t.label for t in pipe.tasks()) == sorted(r.label for r in refs)
    pipe.run(check=True, timeout=TIMEOUT)
    assert [r.result() for r in refs] == ["frame-001:20", "frame-002:30", "7:4"]
    assert all(r.state is State.SUCCEEDED for r in refs)
    rows = pipe.store.task_rows(pipe.pipeline_id)
    assert sorted(row["label"] for row in rows.values()) == sorted(r.label for r in refs)


def test_map_over_a_task_file_with_chunksize_keeps_labels_and_results(
    pipe: Pipeline, tmp_path: Path
) -> None:
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps([{"task_id": f"t{i}", "data": i} for i in range(5)]))

    @pipe.task
    def double(item: TaskItem) -> int:
        return item.data * 2

    refs = double.map(load_tasks(path), chunksize=2)
    pipe.run(check=True, timeout=TIMEOUT)
    assert [r.label for r in refs] == [f"double[t{i}]" for i in range(5)]
    assert [r.result() for r in refs] == [0, 2, 4, 6, 8]
    assert len({r.key for r in refs}) == 5


# -- malformed files: TaskfileError naming the file and the entry ------------------------------


def _expect_error(path: Path, *fragments: str) -> TaskfileError:
    with pytest.raises(TaskfileError) as info:
        load_tasks(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return info.value


def test_task_file_that_is_not_a_list_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"task_id": "a", "data": 1}))
    _expect_error(path, "list", "dict")


def test_task_file_entry_without_task_id_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "tasks.yaml"
    path.write_text("- task_id: a\n  data: 1\n- data: 2\n")
    _expect_error(path, "entry 2", "task_id")


def test_task_file_entry_that_is_not_a_mapping_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps([{"task_id": "a"}, "b"]))
    _expect_error(path, "entry 2", "task_id")


def test_task_file_duplicate_task_id_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps([{"task_id": "a"}, {"task_id": "b"}, {"task_id": "a"}]))
    _expect_error(path, "entry 3", "'a'", "twice")


def test_task_file_duplicate_id_as_number_and_string_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "tasks.yaml"
    path.write_text("- task_id: 1\n- task_id: '1'\n")
    _expect_error(path, "entry 2", "'1'")


def test_task_file_unknown_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "tasks.yaml"
    path.write_text("- task_id: a\n  data: 1\n  priority: high\n")
    _expect_error(path, "entry 1", "priority")


@pytest.mark.parametrize("task_id", ["", None, True, [1]])
def test_task_file_invalid_task_id_is_an_error(tmp_path: Path, task_id: object) -> None:
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps([{"task_id": task_id}]))
    _expect_error(path, "entry 1", "task_id")


def test_task_file_invalid_yaml_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "tasks.yaml"
    path.write_text("- task_id: a\n  data: [1, 2\n- task_id: b\n")
    _expect_error(path, "YAML")


def test_task_file_invalid_json_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "tasks.json"
    path.write_text('[{"task_id": "a",}]')
    _expect_error(path, "JSON")


def test_missing_task_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    _expect_error(path, "does not exist")


def test_task_file_with_an_unknown_suffix_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "tasks.txt"
    path.write_text("[]")
    _expect_error(path, ".json", ".yaml")


@pytest.mark.parametrize("kind", ["directory", "not utf-8"])
def test_unreadable_task_file_is_an_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "tasks.yaml"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"\xff\xfe- task_id: a\n")
    _expect_error(path)


def test_taskfile_error_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "tasks.json"
    path.write_text("3")
    with pytest.raises(ValueError):
        load_tasks(path)


# -- streaming: entries read one at a time, run window by window (run_tasks) ------------------


def _write(path: Path, entries: list[dict]) -> None:
    import yaml

    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    elif path.suffix == ".json":
        path.write_text(json.dumps(entries))
    else:
        path.write_text(yaml.safe_dump(entries))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".yaml"])
def test_iter_tasks_streams_every_format_with_the_same_entries_as_load_tasks(
        tmp_path: Path, suffix: str) -> None:
    from nbpipe import iter_tasks

    entries = [{"task_id": f"t{i}", "data": {"x": i, "f": i / 4, "tags": ["a", None, True]}}
               for i in range(50)] + [{"task_id": 99}]
    path = tmp_path / f"tasks{suffix}"
    _write(path, entries)
    streamed = iter_tasks(path)
    first = next(streamed)  # one entry at a time: a generator, not a list read whole
    assert first == TaskItem("t0", {"x": 0, "f": 0.0, "tags": ["a", None, True]})
    assert [first, *streamed] == load_tasks(path)
    assert [i.task_id for i in iter_tasks(path)] == [f"t{i}" for i in range(50)] + ["99"]
    assert type(next(iter_tasks(path)).data["f"]) is float  # not ijson's Decimal


@pytest.mark.parametrize(("suffix", "text", "fragment"), [
    (".json", '[{"task_id": "a"}, {"task_id": "a"}]', "entry 2: task_id 'a' appears twice"),
    (".json", '[{"task_id": "a"}, {"data": 1}]', "entry 2: each entry needs a task_id"),
    (".json", '{"task_id": "a"}', "must hold a list of entries"),
    (".json", '[{"task_id": "a"}, {"task_id": ', "is not valid JSON"),
    (".yaml", "- task_id: a\n- task_id: a\n", "entry 2: task_id 'a' appears twice"),
    (".yaml", "- task_id: a\n  extra: 1\n", "entry 1: unknown key(s) extra"),
    (".yaml", "task_id: a\n", "must hold a list of entries"),
    (".yaml", "- task_id: a\n- [unclosed\n", "is not valid YAML"),
    (".jsonl", '{"task_id": "a"}\n{"task_id": "a"}\n', "line 2: task_id 'a' appears twice"),
])
def test_iter_tasks_names_the_file_and_the_entry_of_a_mistake(
        tmp_path: Path, suffix: str, text: str, fragment: str) -> None:
    from nbpipe import iter_tasks

    path = tmp_path / f"tasks{suffix}"
    path.write_text(text)
    with pytest.raises(TaskfileError) as info:
        list(iter_tasks(path))
    assert str(path) in str(info.value) and fragment in str(info.value), str(info.value)


@pytest.mark.parametrize(("suffix", "text"), [
    (".json", "[]"), (".json", " [ ]\n"), (".json", "null"), (".yaml", ""), (".yaml", "[]\n"),
    (".yaml", "# nothing yet\n"), (".jsonl", ""), (".jsonl", "\n\n"),
])
def test_empty_task_files_stream_no_entries_as_load_tasks_reads_none(
        tmp_path: Path, suffix: str, text: str) -> None:
    from nbpipe import iter_tasks

    path = tmp_path / f"tasks{suffix}"
    path.write_text(text)
    assert list(iter_tasks(path)) == load_tasks(path) == []


def test_an_empty_json_file_is_invalid_json_streamed_or_not(tmp_path: Path) -> None:
    from nbpipe import iter_tasks

    path = tmp_path / "tasks.json"
    path.write_text("")
    for read in (load_tasks, lambda p: list(iter_tasks(p))):
        with pytest.raises(TaskfileError, match="is not valid JSON"):
            read(path)


STREAM_SCRIPT = """
import json, sys, tracemalloc
from nbpipe import Pipeline, TaskItem, iter_tasks, run_tasks

path, window = sys.argv[1], int(sys.argv[2])
pipe = Pipeline("stream", cluster={"kind": "local", "workers": 1})

@pipe.task
def process(item: TaskItem) -> int:
    return item.data["x"] * 2

@pipe.task
def warm() -> int:
    return 0

held = []  # the driver's live Python memory as each window starts (the one before dropped)

def sampled(items):
    for i, item in enumerate(items):
        if i % window == 0:
            held.append(tracemalloc.get_traced_memory()[0])
        yield item

warm().result()  # the cluster is up before memory is measured
tracemalloc.start()
summary = run_tasks(process, sampled(iter_tasks(path)), window=window, chunksize=250)
peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
print(json.dumps({"executed": summary.executed, "cached": summary.cached, "failed": summary.failed,
                  "counts": summary.counts, "refs": len(pipe.refs()), "held": held, "peak": peak}))
pipe.close()
"""

#: What the driver held per registered task when a whole file was mapped at once (measured
#: with ``map``: about 3,200 bytes); window by window it must hold a small part of it.
HELD_PER_TASK = 3_200


def _stream(folder: Path, path: Path, window: int) -> tuple[dict, str]:
    import subprocess
    import sys

    (folder / "stream.py").write_text(STREAM_SCRIPT)
    result = subprocess.run([sys.executable, "stream.py", str(path), str(window)], cwd=folder,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.mark.timeout(2400)
def test_run_tasks_memory_stays_flat_as_the_file_grows_and_a_rerun_runs_nothing(tmp_path: Path) -> None:
    """The driver's live memory at the start of each window does not grow with the entries
    run before it (they are dropped, the store keeps them): from the second window to the last
    of a 6,000-entry file it grows by less than an eighth of what holding each task would
    cost (the ids seen so far, to refuse duplicates, are what is left). Then the same file
    again runs nothing, window by window."""
    window, n = 500, 6_000
    path = tmp_path / "tasks.jsonl"
    _write(path, [{"task_id": f"t{i}", "data": {"x": i}} for i in range(n)])
    out, err = _stream(tmp_path, path, window)
    assert out["executed"] == n and out["counts"] == {"SUCCEEDED": n} and out["refs"] == 1
    assert f"{n:,} entries of the entries run ({n:,} executed" in err  # progress per window
    assert err.count("entries of") == n // window
    held = out["held"]
    assert len(held) == n // window
    assert _growth(held, window) < HELD_PER_TASK / 8, (_growth(held, window), held)

    again, _ = _stream(tmp_path, path, window)  # resume is exact: every entry found done
    assert again["executed"] == 0 and again["cached"] == n, again
    assert _growth(again["held"], window) < HELD_PER_TASK / 8, again["held"]


def _growth(held: list[int], window: int) -> float:
    """Bytes the driver keeps per entry run: the slope of its live memory over the windows
    from the second on (a fitted line, not the last sample less the first: when the garbage
    collector runs moves single samples by a window's worth)."""
    import statistics

    samples = held[1:]
    return statistics.linear_regression(range(len(samples)), samples).slope / window


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".jsonl"])
def test_run_tasks_runs_window_by_window_forgets_each_and_resumes_exactly(
        pipe: Pipeline, tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]) -> None:
    from nbpipe import iter_tasks, queries, run_tasks

    path = tmp_path / f"tasks{suffix}"
    _write(path, [{"task_id": f"t{i}", "data": {"x": i}} for i in range(7)])

    @pipe.task
    def process(item: TaskItem) -> int:
        if item.data["x"] == 5:
            raise ValueError("entry t5 is broken")
        return item.data["x"] * 2

    summary = run_tasks(process, path, window=3)
    assert (summary.executed, summary.cached) == (7, 0)
    assert summary.failed == ["process[t5]"] and summary.counts == {"SUCCEEDED": 6, "FAILED": 1}
    assert pipe.refs() == []  # every window dropped from the driver once it ended
    assert [line.split(" entries")[0] for line in capsys.readouterr().err.splitlines()
            if "entries of" in line] == ["nbpipe: 3", "nbpipe: 6", "nbpipe: 7"]
    rows = queries.tasks(pipe.store, pipe.name)
    assert sorted(r["label"] for r in rows) == sorted(f"process[t{i}]" for i in range(7))
    # the failed entry written back out as a task file, from the store and the file
    failed = [r for r in rows if r["state"] == "FAILED"]
    assert queries.taskfile_entries(pipe.store, failed, str(path)) == [TaskItem("t5", {"x": 5})]
    # the same file again: every entry found done but the failed one, which runs again
    again = run_tasks(process, path, window=3)
    assert (again.executed, again.cached, again.failed) == (1, 6, ["process[t5]"])
    with pytest.raises(TaskFailed, match=r"process\[t5\]"):
        run_tasks(process, iter_tasks(path), window=100, check=True)


@pytest.mark.parametrize("window", [0, -1, 2.5, True])
def test_run_tasks_window_must_be_a_whole_number(pipe: Pipeline, tmp_path: Path, window: object) -> None:
    from nbpipe import run_tasks

    @pipe.task
    def process(item: TaskItem) -> int:
        return 1

    with pytest.raises(TaskfileError, match="window=.* must be a whole number >= 1"):
        run_tasks(process, [TaskItem("a", 1)], window=window)  # type: ignore[arg-type]
