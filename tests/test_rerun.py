"""What re-runs after an edit, each run in a fresh process, as a user re-running a script would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import pytest

from nbpipe import Out, Pipeline

SCRIPT = '''
import json
import os
import sys
from pathlib import Path
from typing import Annotated

from nbpipe import In, Out, Pipeline

SCALE = {scale}


def helper(x):
    {helper_body}


def run():
    pipe = Pipeline("rerun", store=sys.argv[1], cluster=sys.argv[2])

    @pipe.task(cores={cores}, memory="{memory}", retries={retries})
    def step(x: int) -> int:
        """Docstring: not part of the identity."""
        {step_comment}
        return helper(x) * SCALE

    @pipe.task
    def unrelated(x: int) -> bytes:
        return bytes(8192 + x)  # large enough to be a result file (small ones are inline)

    @pipe.task
    def total(values: list) -> int:
        return sum(values)

    @pipe.task
    def read(path: Annotated[Path, In]) -> str:
        return path.read_text()

    @pipe.task
    def write(text: str, out: Annotated[Path, Out]) -> int:
        out.write_text(text)
        return len(text)

    steps = [step(i) for i in range(3)]
    final = total(steps)
    other = unrelated(1)
    content = read(Path("input.txt"))
    written = write("hello", Path("output.txt"))
    summary = pipe.run()
    refs = [*steps, final, other, content, written]
    print("RESULT " + json.dumps({{
        "executed": summary.executed,
        "reasons": {{r.label: r.reason for r in refs}},
        "states": {{r.label: r.state.value for r in refs}},
        "total": final.result(),
    }}))

if __name__ == "__main__":
    run()
'''

DEFAULTS = {
    "scale": "1", "helper_body": "return x * 2", "cores": "1", "memory": "1GB", "retries": "0",
    "step_comment": "# a comment",
}


def _run(tmp_path: Path, address: str, **changes: str) -> dict:
    source = SCRIPT.format(**{**DEFAULTS, **changes})
    script = tmp_path / "pipeline.py"
    script.write_text(source)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / ".nbpipe"), address],
        cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _rerun(result: dict) -> set[str]:
    return {label for label, reason in result["reasons"].items() if reason != "found done"}


@pytest.fixture
def first_run(tmp_path: Path, cluster) -> tuple[Path, str, dict]:
    (tmp_path / "input.txt").write_text("one")
    address = cluster.scheduler_address
    result = _run(tmp_path, address)
    assert result["executed"] == 7
    assert set(result["states"].values()) == {"SUCCEEDED"}
    return tmp_path, address, result


def test_unchanged_script_executes_nothing(first_run) -> None:
    tmp_path, address, _ = first_run
    result = _run(tmp_path, address)
    assert result["executed"] == 0
    assert _rerun(result) == set()


def test_comment_docstring_and_formatting_edits_rerun_nothing(first_run) -> None:
    tmp_path, address, _ = first_run
    result = _run(tmp_path, address, step_comment="# another comment entirely",
                  helper_body="return (x   *   2)  # spaced out")
    assert result["executed"] == 0


def test_helper_edit_reruns_its_users_and_their_downstream_only(first_run) -> None:
    tmp_path, address, _ = first_run
    result = _run(tmp_path, address, helper_body="return x * 3")
    assert result["executed"] == 4
    assert _rerun(result) == {"step(x=0)", "step(x=1)", "step(x=2)", "total(values=[3 tasks])"}
    assert "the code of helper `helper` changed" in result["reasons"]["step(x=1)"]
    assert "upstream task" in result["reasons"]["total(values=[3 tasks])"]
    assert result["total"] == 9


def test_global_constant_edit_reruns_its_users(first_run) -> None:
    tmp_path, address, _ = first_run
    result = _run(tmp_path, address, scale="10")
    assert _rerun(result) == {"step(x=0)", "step(x=1)", "step(x=2)", "total(values=[3 tasks])"}
    assert "global `SCALE` changed" in result["reasons"]["step(x=0)"]
    assert result["total"] == 60


def test_input_file_content_edit_reruns_its_reader(first_run) -> None:
    tmp_path, address, _ = first_run
    (tmp_path / "input.txt").write_text("two")
    result = _run(tmp_path, address)
    assert _rerun(result) == {"read(path=input.txt)"}
    assert "input file" in result["reasons"]["read(path=input.txt)"]
    assert "changed" in result["reasons"]["read(path=input.txt)"]


def test_resource_only_edit_reruns_nothing(first_run) -> None:
    tmp_path, address, _ = first_run
    result = _run(tmp_path, address, cores="4", memory="8GB", retries="3")
    assert result["executed"] == 0


def test_deleted_output_file_reruns_its_writer(first_run) -> None:
    tmp_path, address, _ = first_run
    (tmp_path / "output.txt").unlink()
    result = _run(tmp_path, address)
    label = "write(text='hello', out=output.txt)"
    assert _rerun(result) == {label}
    assert "output file" in result["reasons"][label]
    assert (tmp_path / "output.txt").read_text() == "hello"


@pytest.mark.parametrize("label", ["unrelated(x=1)", "step(x=0)"])
def test_damaged_result_reruns_the_task(first_run, label: str) -> None:
    """A truncated result file, or an inline result (kept in the database) cut short."""
    tmp_path, address, _ = first_run
    import sqlite3

    db = sqlite3.connect(tmp_path / ".nbpipe" / "nbpipe.sqlite")
    key, path = db.execute(
        "SELECT t.key, r.path FROM tasks t JOIN results r USING (key) WHERE t.label = ?", (label,)
    ).fetchone()
    if path:  # (recorded relative to the store root)
        (tmp_path / ".nbpipe" / path).write_bytes(b"truncated")
    else:  # an inline result
        db.execute("UPDATE results SET data = ? WHERE key = ?", (b"truncated", key))
        db.commit()
    db.close()
    result = _run(tmp_path, address)
    assert _rerun(result) == {label}
    assert bool(path) == (label == "unrelated(x=1)")


def test_pi_demo_runs_and_a_second_run_executes_nothing(tmp_path: Path, cluster) -> None:
    script = tmp_path / "pi.py"
    script.write_text((Path(__file__).resolve().parent.parent / "nb" / "pi.py").read_text())
    env = {**os.environ, "DASK_NBPIPE__CLUSTER": cluster.scheduler_address}
    runs = [subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=180) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
        assert "pi ≈ 3.1" in run.stdout
    assert "this run: 22 executed, 0 already done" in runs[0].stdout
    assert "this run: 0 executed, 22 already done" in runs[1].stdout


def test_task_left_running_by_a_dead_runner_whose_result_exists_is_recorded_succeeded(first_run) -> None:
    tmp_path, address, _ = first_run
    import sqlite3

    db = sqlite3.connect(tmp_path / ".nbpipe" / "nbpipe.sqlite")
    # As if the runner was killed while the task ran on a cluster that outlived it: the worker
    # finished and wrote the result file, nobody recorded it, and the row still says RUNNING.
    label = "unrelated(x=1)"
    db.execute("UPDATE tasks SET state = 'RUNNING' WHERE label = ?", (label,))
    db.execute("DELETE FROM results WHERE key IN (SELECT key FROM tasks WHERE label = ?)", (label,))
    db.commit()
    result = _run(tmp_path, address)
    assert result["executed"] == 0
    state = db.execute("SELECT state FROM tasks WHERE label = ? AND active", (label,)).fetchone()[0]
    db.close()
    assert state == "SUCCEEDED"


def test_result_file_the_store_never_recorded_is_adopted_not_recomputed(first_run) -> None:
    tmp_path, address, _ = first_run
    import sqlite3

    db = sqlite3.connect(tmp_path / ".nbpipe" / "nbpipe.sqlite")
    # As if the runner died after the worker wrote the file but before the store recorded it.
    db.execute("DELETE FROM results WHERE key IN (SELECT key FROM tasks WHERE label = 'unrelated(x=1)')")
    db.commit()
    db.close()
    result = _run(tmp_path, address)
    assert result["executed"] == 0


def test_deleted_output_file_reruns_its_writer_in_the_same_process(tmp_path: Path, client) -> None:
    """A kernel keeps its pipeline: deleting an Out file between two runs re-runs its writer."""
    pipe = Pipeline("kernel", store=tmp_path / ".nbpipe", cluster=client)

    @pipe.task
    def write(text: str, path: Annotated[Path, Out]) -> str:
        path.write_text(text)
        return text

    ref = write("hello", tmp_path / "out.txt")
    assert pipe.run(check=True).executed == 1
    assert pipe.run(check=True).executed == 0
    (tmp_path / "out.txt").unlink()
    assert pipe.run(check=True).executed == 1
    assert "out.txt is missing" in (ref.reason or "")
    assert (tmp_path / "out.txt").read_text() == "hello"
    pipe.close()


@pytest.mark.timeout(600)
def test_a_new_call_is_explained_against_the_earlier_call_with_most_arguments_alike(
        pipe: Pipeline) -> None:
    """A call with a label never seen is compared with the earlier call of its function that
    has the most arguments alike (then the newest), however many earlier calls there are."""

    @pipe.task
    def g(a: int, b: int, c: int) -> int:
        return a + b + c

    for i in range(1, 4):  # g(1,1,1), g(2,2,2), then g(3,3,3), the newest
        g(i, i, i)
    pipe.run(timeout=300)
    pipe.forget(pipe.refs())  # their labels free: earlier calls, as for a new process

    closest = g(1, 1, 9)  # two arguments as g(1,1,1)
    tie = g(2, 3, 9)  # one as g(2,2,2), one as g(3,3,3): the newest
    none_alike = g(7, 8, 9)
    assert pipe.why(closest) == "argument `c` changed"
    assert pipe.why(tie) == "argument `a` changed; argument `c` changed"
    assert pipe.why(none_alike) == "argument `a` changed; argument `b` changed; argument `c` changed"
