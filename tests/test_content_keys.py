"""What tasks read counts by content: the value of a ``cache=False`` upstream task, and an ``In``
file whoever wrote it. Each run is a fresh process, as a user re-running a script (or a
notebook on a fresh kernel).

The script's pipeline: ``fetch`` (cache=False) reads a number from a file the test edits;
``double`` uses its value. ``produce`` writes ``a.txt``, ``upper`` reads it and writes
``b.txt``, ``count`` reads ``b.txt`` (a chain A -> file -> B -> file -> C).
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import pytest
from helpers import execute_notebook, new_notebook, notebook_text

from nbpipe import In, Out, Pipeline
from nbpipe.content import PENDING

SCRIPT = '''
import json
import sys
import time
from pathlib import Path
from typing import Annotated

from nbpipe import In, Out, Pipeline


def run():
    pipe = Pipeline("content", store=sys.argv[1], cluster=sys.argv[2])

    @pipe.task(cache=False)
    def fetch(path: str) -> int:
        return int(Path(path).read_text())

    @pipe.task
    def double(x: int) -> int:
        return 2 * x

    @pipe.task
    def produce(out: Annotated[Path, Out]) -> None:
        out.write_text(PRODUCED)

    @pipe.task
    def upper(src: Annotated[Path, In], out: Annotated[Path, Out]) -> str:
        while (src.parent / "hold-upper").exists():  # the test holds it to kill the run
            time.sleep(0.05)
        text = src.read_text().upper()
        out.write_text(text)
        return text

    @pipe.task
    def count(src: Annotated[Path, In]) -> str:
        return f"{len(src.read_text())} {src.read_text()}"

    refs = {
        "fetch": (fetched := fetch(str(Path("source.txt").absolute()))),
        "double": double(fetched),
        "produce": produce(Path("a.txt")),
        "upper": upper(Path("a.txt"), Path("b.txt")),
        "count": count(Path("b.txt")),
    }
    summary = pipe.run()
    print("RESULT " + json.dumps({
        "executed": summary.executed,
        "reasons": {name: r.reason for name, r in refs.items()},
        "states": {name: r.state.value for name, r in refs.items()},
        "values": {name: refs[name].result() for name in ("double", "upper", "count")},
    }))
    pipe.close()


if __name__ == "__main__":
    run()
'''

LABELS = {"upper": "upper(src=a.txt, out=b.txt)", "count": "count(src=b.txt)",
          "produce": "produce(out=a.txt)"}


def _script(tmp_path: Path, produced: str) -> Path:
    script = tmp_path / "pipeline.py"
    script.write_text(SCRIPT.replace("PRODUCED", produced))
    return script


def _run(tmp_path: Path, address: str, produced: str = '"hello"') -> dict:
    proc = subprocess.run(
        [sys.executable, str(_script(tmp_path, produced)), str(tmp_path / ".nbpipe"), address],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _ran(result: dict) -> set[str]:
    return {name for name, reason in result["reasons"].items() if reason != "found done"}


def _db(tmp_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / ".nbpipe" / "nbpipe.sqlite")


def _assert_store_consistent(tmp_path: Path, tasks: int = 5) -> None:
    """No provisional key is left, and every edge and event names a task of the store."""
    db = _db(tmp_path)
    try:
        keys = {k for (k,) in db.execute("SELECT key FROM tasks")}
        pending = [label for label, comps in db.execute("SELECT label, components FROM tasks")
                   if PENDING in comps]
        assert pending == [], f"provisional rows left: {pending}"
        for parent, child in db.execute("SELECT parent, child FROM edges"):
            assert parent in keys and child in keys
        for (key,) in db.execute("SELECT DISTINCT key FROM events WHERE key IS NOT NULL"):
            assert key in keys
        active = [label for (label,) in db.execute("SELECT label FROM tasks WHERE active")]
        assert len(active) == len(set(active)) == tasks
    finally:
        db.close()


def _attempts(tmp_path: Path) -> dict[str, int]:
    db = _db(tmp_path)
    try:
        return dict(db.execute(
            "SELECT t.name, COUNT(a.id) FROM tasks t LEFT JOIN attempts a USING (key) GROUP BY t.name"))
    finally:
        db.close()


def _nbpipe(tmp_path: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "nbpipe.cli", "--store", str(tmp_path / ".nbpipe"),
                           *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def first_run(tmp_path: Path, cluster) -> tuple[Path, str]:
    (tmp_path / "source.txt").write_text("1")
    address = cluster.scheduler_address
    result = _run(tmp_path, address)
    assert result["executed"] == 5
    assert result["values"] == {"double": 2, "upper": "HELLO", "count": "5 HELLO"}
    _assert_store_consistent(tmp_path)
    return tmp_path, address


def test_unchanged_script_runs_only_the_cache_false_task(first_run) -> None:
    tmp_path, address = first_run
    result = _run(tmp_path, address)
    assert _ran(result) == {"fetch"}
    assert result["executed"] == 1  # double was late, then found done: not counted as executed
    assert result["values"]["double"] == 2
    _assert_store_consistent(tmp_path)


def test_consumer_of_a_cache_false_task_reruns_when_its_value_changes(first_run) -> None:
    tmp_path, address = first_run
    (tmp_path / "source.txt").write_text("21")
    result = _run(tmp_path, address)
    assert _ran(result) == {"fetch", "double"}
    assert result["values"]["double"] == 42
    assert "upstream task `fetch" in result["reasons"]["double"]
    # and back: the first value's result is still recorded, so it is found done
    (tmp_path / "source.txt").write_text("1")
    result = _run(tmp_path, address)
    assert _ran(result) == {"fetch"}
    assert result["values"]["double"] == 2
    _assert_store_consistent(tmp_path)


def test_hand_edited_intermediate_file_reruns_its_readers_naming_the_file(first_run) -> None:
    tmp_path, address = first_run
    (tmp_path / "a.txt").write_text("edited by hand")
    result = _run(tmp_path, address)
    assert _ran(result) == {"fetch", "upper", "count"}  # not produce: its output is there
    assert result["values"]["upper"] == "EDITED BY HAND"
    assert result["values"]["count"] == "14 EDITED BY HAND"
    assert f"input file {tmp_path / 'a.txt'} changed" in result["reasons"]["upper"]
    assert f"input file {tmp_path / 'b.txt'} changed" in result["reasons"]["count"]
    why = _nbpipe(tmp_path, "why", "content", LABELS["upper"])
    assert f"input file {tmp_path / 'a.txt'} changed" in why
    _assert_store_consistent(tmp_path)


def test_hand_edited_last_file_reruns_only_its_reader(first_run) -> None:
    tmp_path, address = first_run
    (tmp_path / "b.txt").write_text("B")
    result = _run(tmp_path, address)
    assert _ran(result) == {"fetch", "count"}
    assert result["values"]["count"] == "1 B"


def test_rewriting_identical_bytes_reruns_nothing(first_run) -> None:
    tmp_path, address = first_run
    time.sleep(0.01)  # a new mtime: the content, not the timestamp, decides
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_bytes((tmp_path / name).read_bytes())
    result = _run(tmp_path, address)
    assert _ran(result) == {"fetch"}


def test_producer_rerun_writing_the_same_content_leaves_its_readers_done(first_run) -> None:
    """Early cut-off: produce's code changed (so it runs), its file did not."""
    tmp_path, address = first_run
    result = _run(tmp_path, address, produced='"hel" + "lo"')
    assert _ran(result) == {"fetch", "produce"}
    assert "the code of `produce` changed" in result["reasons"]["produce"]
    assert result["values"]["count"] == "5 HELLO"
    _assert_store_consistent(tmp_path)


def test_producer_rerun_writing_new_content_reruns_the_chain(first_run) -> None:
    tmp_path, address = first_run
    result = _run(tmp_path, address, produced='"bye"')
    assert _ran(result) == {"fetch", "produce", "upper", "count"}
    assert result["values"] == {"double": 2, "upper": "BYE", "count": "3 BYE"}
    assert f"input file {tmp_path / 'a.txt'} changed" in result["reasons"]["upper"]
    tasks = json.loads(_nbpipe(tmp_path, "tasks", "content", "--json"))
    assert {t["label"]: t["state"] for t in tasks}[LABELS["count"]] == "SUCCEEDED"
    _assert_store_consistent(tmp_path)


def test_resume_after_a_kill_recomputes_only_what_it_must(first_run) -> None:
    """Killed while upper runs (count waits for its file, under a provisional key); the next run
    finds produce done, and runs count under its final key."""
    tmp_path, address = first_run
    (tmp_path / "a.txt").write_text("edited")  # upper and count must run again
    hold = tmp_path / "hold-upper"
    hold.touch()
    proc = subprocess.Popen(
        [sys.executable, str(_script(tmp_path, '"hello"')), str(tmp_path / ".nbpipe"), address],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    db = _db(tmp_path)
    try:
        deadline = time.monotonic() + 120
        while db.execute("SELECT state FROM tasks WHERE label = ? AND active",
                         (LABELS["upper"],)).fetchone() != ("RUNNING",):
            assert time.monotonic() < deadline, "upper never started"
            assert proc.poll() is None
            time.sleep(0.1)
        # count waits for upper's file: recorded WAITING, under a provisional key
        rows = db.execute("SELECT state, components, reason FROM tasks WHERE label = ? AND active",
                          (LABELS["count"],)).fetchall()
        assert [(state, PENDING in components) for state, components, _ in rows] == [
            ("WAITING", True)]
        assert f"decided once `{LABELS['upper']}` ran" in rows[0][2]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        db.close()
    before = _attempts(tmp_path)
    hold.unlink()  # (the killed run's attempt may still finish on its worker: then it is adopted)
    result = _run(tmp_path, address)
    assert _ran(result) - {"upper"} == {"fetch", "count"}  # produce is done
    assert result["values"] == {"double": 2, "upper": "EDITED", "count": "6 EDITED"}
    after = _attempts(tmp_path)
    assert after["produce"] == before["produce"] == 1
    assert after["count"] == before["count"] + 1
    assert after["upper"] <= before["upper"] + 1
    _assert_store_consistent(tmp_path)


def test_file_edited_by_hand_between_two_runs_of_one_process(pipe: Pipeline, tmp_path: Path) -> None:
    """A kernel keeps its pipeline: an edited intermediate file re-runs its reader at the next
    run, and rewriting the same bytes does not."""

    @pipe.task
    def write(text: str, out: Annotated[Path, Out]) -> None:
        out.write_text(text)

    @pipe.task
    def read(src: Annotated[Path, In]) -> str:
        return src.read_text()

    path = tmp_path / "mid.txt"
    write("first", path)
    reader = read(path)
    assert pipe.run(check=True).executed == 2
    path.write_text("by hand")
    assert pipe.run(check=True).executed == 1
    assert reader.result() == "by hand"
    assert pipe.why(reader) == f"input file {path} changed"
    path.write_bytes(path.read_bytes())
    assert pipe.run(check=True).executed == 0


def test_reader_of_a_failed_producer_shows_upstream_failed_and_runs_after_a_retry(
        pipe: Pipeline, tmp_path: Path) -> None:
    """A late task whose producer failed stays UPSTREAM_FAILED (under its provisional key) until
    the producer is retried; then it gets its final key and runs."""
    fixed = tmp_path / "fixed"

    @pipe.task
    def write(out: Annotated[Path, Out], flag: str) -> None:
        if not Path(flag).exists():
            raise RuntimeError("not fixed yet")
        out.write_text("made")

    @pipe.task
    def read(src: Annotated[Path, In]) -> str:
        return src.read_text()

    path = tmp_path / "made.txt"
    write(path, str(fixed))
    reader = read(path)
    assert len(pipe.run().failed) == 1
    assert {t.name: t.state for t in pipe.tasks()} == {"write": "FAILED", "read": "UPSTREAM_FAILED"}
    fixed.touch()
    pipe.retry(failed=True)
    assert reader.result(timeout=120) == "made"
    assert {t.name: t.state for t in pipe.tasks()} == {"write": "SUCCEEDED", "read": "SUCCEEDED"}
    pipe.close()
    _assert_store_consistent(tmp_path, tasks=2)


NOTEBOOK = [
    "%load_ext nbpipe",
    "from pathlib import Path\nSOURCE = str(Path('source.txt').resolve())",
    "%%task reading --no-cache\nreading = int(open(SOURCE).read())",
    "%%task doubled\ndoubled = 2 * reading",
    "print('doubled', doubled)",
    "%pipeline why doubled",
]


def _notebook_run(path: Path) -> str:
    """Run the notebook on a fresh kernel; its outputs' text."""
    return notebook_text(execute_notebook(path, new_notebook(path, NOTEBOOK)))


def test_notebook_cell_reading_a_no_cache_cell_follows_its_value(tmp_path: Path,
                                                                  kernel_env: dict[str, str]) -> None:
    path = tmp_path / "content.ipynb"
    (tmp_path / "source.txt").write_text("1")
    assert "doubled 2" in _notebook_run(path)
    (tmp_path / "source.txt").write_text("21")
    text = _notebook_run(path)
    assert "doubled 42" in text
    assert "doubled: the value of upstream task `reading` (cache=False) changed" in text
    text = _notebook_run(path)  # the same value: doubled is found done
    assert "doubled 42" in text
    assert "doubled: found done" in text


HANDOVER = '''
import sys
from pathlib import Path
from typing import Annotated

from nbpipe import In, Out, Pipeline

pipe = Pipeline("handover", store=sys.argv[1], cluster=sys.argv[2])


def fetch(path: str) -> int:
    return int(Path(path).read_text())


def double(x: int) -> int:
    return 2 * x


def produce(out: Annotated[Path, Out]) -> None:
    out.write_text("hello")


def count(src: Annotated[Path, In]) -> int:
    return len(src.read_text())


if __name__ == "__main__":
    doubled = pipe.task(double)(pipe.task(fetch, cache=False)(str(Path("source.txt").absolute())))
    pipe.task(produce)(Path("a.txt"))
    counted = pipe.task(count)(Path("a.txt"))
    if sys.argv[3] == "detach":
        pipe.detach()
    else:
        summary = pipe.run()
        print("RESULT", summary.executed, doubled.reason, doubled.result(), counted.reason,
              counted.result())
'''


def test_detached_runner_settles_late_tasks(tmp_path: Path, cluster, monkeypatch) -> None:
    """Late tasks handed over to `nbpipe spawn` (specs on disk) get their final keys there: a
    run afterwards finds them done."""
    from conftest import wait_for

    monkeypatch.setenv("DASK_NBPIPE__CLUSTER", cluster.scheduler_address)  # for the spawned runner
    (tmp_path / "source.txt").write_text("4")
    script = tmp_path / "handover.py"
    script.write_text(HANDOVER)
    args = [sys.executable, str(script), str(tmp_path / ".nbpipe"), cluster.scheduler_address]
    subprocess.run([*args, "detach"], cwd=tmp_path, check=True, timeout=120)

    def states() -> set[str]:
        return {t["state"] for t in json.loads(_nbpipe(tmp_path, "tasks", "handover", "--json"))}

    wait_for(lambda: states() == {"SUCCEEDED"}, timeout=120)
    wait_for(lambda: not _nbpipe(tmp_path, "pipelines", "--json").count('"pid"'), timeout=60)
    _assert_store_consistent(tmp_path, tasks=4)
    out = subprocess.run([*args, "run"], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RESULT 1 found done 8 found done 5" in out.stdout


KINDS = '''
import json
import sys
from pathlib import Path
from typing import Annotated

from nbpipe import In, Out, Pipeline

pipe = Pipeline("kinds", store=sys.argv[1], cluster=sys.argv[2])
SOURCE = str(Path("source.txt").absolute())


@pipe.task(cache=False)
def stamp(out: Annotated[Path, Out]) -> None:  # a cache=False task that writes a file
    out.write_text(Path(SOURCE).read_text())


@pipe.task
def read(src: Annotated[Path, In]) -> str:
    return src.read_text()


@pipe.task(cache=False)
def part(i: int) -> int:
    return int(Path(SOURCE).read_text()) + i


@pipe.task
def total(values: list) -> int:  # cache=False upstream tasks inside a list
    return sum(values)


@pipe.bash_task(cache=False)
def shout() -> str:  # a cache=False bash task: its value is what it printed
    return f"cat {SOURCE}"


@pipe.task
def echo(result) -> str:
    return result.strip() + "!"


@pipe.task
def tail(text: str) -> str:  # downstream of a late task: late too
    return text * 2


if __name__ == "__main__":
    refs = {"read": read(stamp(Path("stamp.txt")) and Path("stamp.txt")),
            "total": total([part(i) for i in range(3)])}
    refs["tail"] = tail(echo(shout()))
    summary = pipe.run()
    print("RESULT " + json.dumps({
        "ran": sorted(t.label for t in pipe.tasks() if t.reason != "found done"),
        "executed": summary.executed,
        "values": {name: r.result() for name, r in refs.items()},
    }))
'''


def test_every_kind_of_cache_false_upstream_counts_by_content(tmp_path: Path, cluster) -> None:
    """A cache=False task writing an In file, several in a list, a bash one; and what is
    downstream of their consumers."""
    script = tmp_path / "kinds.py"
    script.write_text(KINDS)

    def run() -> dict:
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / ".nbpipe"),
                               cluster.scheduler_address], cwd=tmp_path, capture_output=True,
                              text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
        return json.loads(line[len("RESULT "):])

    always = ["part(i=0)", "part(i=1)", "part(i=2)", "shout", "stamp(out=stamp.txt)"]
    (tmp_path / "source.txt").write_text("1")
    first = run()
    assert first["values"] == {"read": "1", "total": 6, "tail": "1!1!"}
    assert first["executed"] == 9
    same = run()
    assert same["ran"] == always and same["executed"] == 5
    assert same["values"] == first["values"]
    (tmp_path / "source.txt").write_text("2")
    changed = run()
    assert changed["ran"] == sorted([*always, "echo(result=<shout>)", "read(src=stamp.txt)",
                                     "tail(text=<echo>)", "total(values=[3 tasks])"])
    assert changed["values"] == {"read": "2", "total": 9, "tail": "2!2!"}
