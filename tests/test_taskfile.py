"""Task files: JSON and YAML lists of {task_id, data}, mapped to one task per entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nbpipe import Pipeline, State, TaskfileError, TaskItem, load_tasks

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
