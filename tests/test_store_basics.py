"""The store: privacy, WAL, schema versions, bad directories, one runner per pipeline."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nbpipe import Pipeline, PipelineBusy, StoreNotWritable, StoreVersionError
from nbpipe.store import SCHEMA_VERSION, Batch, Store


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_store_directory_and_files_are_private_to_the_user(pipe: Pipeline) -> None:
    @pipe.task
    def one() -> bytes:
        return bytes(10_000)  # large enough to be a result file (small ones are inline)

    ref = one()
    assert ref.result() == bytes(10_000)
    root = pipe.store.path
    assert _mode(root) == 0o700
    assert _mode(root / "results") == 0o700
    assert _mode(root / "nbpipe.sqlite") == 0o600
    path, _ = ref.result_file
    assert _mode(Path(path)) == 0o600
    assert _mode(Path(path).parent) == 0o700


def test_store_uses_wal_and_records_its_schema_version(store: Path) -> None:
    Store(store)
    db = sqlite3.connect(store / "nbpipe.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_store_from_a_newer_nbpipe_is_refused_and_left_intact(store: Path) -> None:
    Store(store).pipeline_id("kept")
    db = sqlite3.connect(store / "nbpipe.sqlite")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreVersionError, match="newer nbpipe.*upgrade nbpipe"):
        Store(store)
    db = sqlite3.connect(store / "nbpipe.sqlite")
    assert db.execute("SELECT name FROM pipelines").fetchall() == [("kept",)]


def test_store_that_cannot_be_created_names_the_path_and_the_fix(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreNotWritable, match=r"a-file/\.nbpipe.*NBPIPE_STORE"):
        Store(blocker / ".nbpipe")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_store_directory_without_write_permission_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(StoreNotWritable, match="not writable"):
        Store(locked)


def test_second_process_running_the_same_pipeline_gets_a_clear_error(tmp_path: Path) -> None:
    store = tmp_path / ".nbpipe"
    script = tmp_path / "holder.py"
    script.write_text(
        "import sys, time\n"
        "from nbpipe import Pipeline\n"
        "if __name__ == '__main__':\n"
        f"    pipe = Pipeline('shared', store={str(store)!r})\n"
        "    @pipe.task\n"
        "    def slow() -> int:\n"
        "        time.sleep(6)\n"
        "        return 6\n"
        "    ref = slow()\n"
        "    pipe.run(wait=False)\n"
        "    print('RUNNING', flush=True)\n"
        "    print('RESULT', ref.result(), flush=True)\n"
    )
    holder = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "RUNNING"
        second = Pipeline("shared", store=store)

        @second.task
        def other() -> int:
            return 1

        other()
        with pytest.raises(PipelineBusy, match=r"'shared' is already being run by pid \d+"):
            second.run()
        out, _ = holder.communicate(timeout=60)
    finally:
        holder.kill()
    assert "RESULT 6" in out
    rows = Store(store).task_rows(Store(store).pipeline_id("shared"))
    assert {r["label"]: r["state"] for r in rows.values()}["slow"] == "SUCCEEDED"


def test_transitions_attempts_events_and_edges_are_recorded(pipe: Pipeline) -> None:
    @pipe.task
    def base() -> int:
        print("hello from base")
        return 2

    @pipe.task
    def square(x: int) -> int:
        return x * x

    result = square(base())
    assert result.result() == 4
    time.sleep(0.1)
    db = sqlite3.connect(pipe.store.db_path)
    states = [s for (s,) in db.execute(
        "SELECT state FROM events WHERE key = ? ORDER BY id", (result.key,))]
    assert states[-1] == "SUCCEEDED" and "PENDING" in states
    (kind,) = db.execute("SELECT kind FROM edges WHERE child = ?", (result.key,)).fetchone()
    assert kind == "data"
    stdout, env_id = db.execute(
        "SELECT stdout, env_id FROM attempts a JOIN tasks t USING (key) WHERE t.label = 'base'"
    ).fetchone()
    assert "hello from base" in stdout
    assert pipe.store.environment(env_id)["python"]


def test_a_batch_writes_one_row_update_per_task_and_keeps_the_events_that_matter(
        store: Path) -> None:
    """PENDING -> RUNNING -> SUCCEEDED within one batch: the row gets the last state; the
    SUCCEEDED event keeps the RUNNING event's message (the worker); a failed attempt's event
    and its retry stay."""
    s = Store(store)
    pid = s.pipeline_id("coalesce")
    s.register(pid, [{"key": k, "name": "t", "label": k, "kind": "python", "state": "WAITING",
                      "components": {}} for k in ("quick", "flaky")], [])
    batch = Batch()
    batch.state(pid, "quick", "PENDING", attempts=1, reason="new task")
    batch.state(pid, "quick", "RUNNING", attempts=1, message="tcp://worker:1")
    batch.state(pid, "quick", "SUCCEEDED", attempts=1)
    batch.state(pid, "flaky", "RUNNING", attempts=1)
    batch.state(pid, "flaky", "WAITING", attempts=1, error="boom", message="attempt 1 failed")
    batch.state(pid, "flaky", "PENDING", attempts=2)
    assert len(batch.states) == 2
    s.write(batch)
    rows = s.task_rows(pid)
    assert (rows["quick"]["state"], rows["quick"]["reason"]) == ("SUCCEEDED", "new task")
    assert rows["flaky"]["state"] == "PENDING" and rows["flaky"]["attempts"] == 2
    events = [(e["key"], e["state"], e["message"]) for e in s.events(pid, 0, 100)]
    assert events == [("quick", "SUCCEEDED", "tcp://worker:1"),
                      ("flaky", "WAITING", "attempt 1 failed"), ("flaky", "PENDING", None)]
