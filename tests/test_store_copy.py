"""`nbpipe store copy SRC DST`: a store moved with its database and result files, verified, and
nothing computed again from the copy."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from nbpipe.store import RunnerLock, Store

NBPIPE = [sys.executable, "-m", "nbpipe.cli"]

# Inline results (`small`: quick and small) and file results (`big`), both copied.
SCRIPT = """
import sys
from nbpipe import Pipeline

pipe = Pipeline("survey", store=sys.argv[1], cluster={"kind": "local", "workers": 2})


@pipe.task
def small(i: int) -> int:
    return i * 3


@pipe.task
def big(i: int) -> bytes:
    return bytes([i]) * 20_000


if __name__ == "__main__":  # worker processes import this file too
    smalls = [small(i) for i in range(4)]
    bigs = [big(i) for i in range(4)]
    summary = pipe.run()
    right = all(r.result() == i * 3 for i, r in enumerate(smalls))
    right &= all(r.result() == bytes([i]) * 20_000 for i, r in enumerate(bigs))
    print("SUMMARY", summary.executed, summary.cached, right, flush=True)
"""


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("NBPIPE_", "DASK_"))}


def _run(script: Path, store: Path) -> tuple[int, int]:
    """Run the pipeline script on ``store``: (tasks executed, tasks found done)."""
    proc = subprocess.run([sys.executable, str(script), str(store)], cwd=script.parent, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    executed, cached, right = proc.stdout.split("SUMMARY")[1].split()
    assert right == "True", proc.stdout
    return int(executed), int(cached)


def _nbpipe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NBPIPE, *args], capture_output=True, text=True, timeout=180, env=_env())


def _rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def test_a_copied_store_has_every_record_and_result_and_runs_nothing_again(tmp_path: Path) -> None:
    script = tmp_path / "survey.py"
    script.write_text(SCRIPT)
    source, target = tmp_path / "project" / ".nbpipe", tmp_path / "elsewhere" / ".nbpipe"
    assert _run(script, source) == (8, 0)
    out = _nbpipe("store", "copy", str(source), str(target))
    assert out.returncode == 0, out.stderr
    assert "files; verified" in out.stdout
    for sql in ("SELECT key, state, label FROM tasks ORDER BY key",
                "SELECT key, path, checksum, size, data FROM results ORDER BY key",
                "SELECT id, key, state, message FROM events ORDER BY id"):
        assert _rows(target / "nbpipe.sqlite", sql) == _rows(source / "nbpipe.sqlite", sql)
    files = sorted(p.relative_to(source) for p in (source / "results").rglob("*.pkl"))
    assert len(files) == 4 and files == sorted(p.relative_to(target) for p in
                                                (target / "results").rglob("*.pkl"))
    assert all((target / f).read_bytes() == (source / f).read_bytes() for f in files)
    assert _run(script, target) == (0, 8)  # switching stores computes nothing again


def test_the_copy_can_keep_its_database_elsewhere(tmp_path: Path) -> None:
    source = tmp_path / "src"
    Store(source).pipeline_id("kept")
    local = tmp_path / "local" / "copy.sqlite"
    out = _nbpipe("store", "copy", str(source), str(tmp_path / "shared"), "--database", str(local))
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "shared" / "database.json").read_text())["path"] == str(local)
    assert _rows(local, "SELECT name FROM pipelines") == [("kept",)]
    listing = _nbpipe("--store", str(tmp_path / "shared"), "pipelines")
    assert listing.returncode == 0 and "kept" in listing.stdout


def test_a_damaged_result_fails_the_verification(tmp_path: Path) -> None:
    script = tmp_path / "survey.py"
    script.write_text(SCRIPT)
    source = tmp_path / "project" / ".nbpipe"
    _run(script, source)
    victim = next((source / "results").rglob("*.pkl"))
    victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")  # same size, other bytes
    out = _nbpipe("store", "copy", str(source), str(tmp_path / "copy"))
    assert out.returncode != 0
    assert "differs from" in out.stderr and "checksum mismatch" in out.stderr
    assert victim.stem in out.stderr


def test_copy_is_refused_into_a_store_and_while_a_runner_is_live(tmp_path: Path) -> None:
    source, other = Store(tmp_path / "a"), Store(tmp_path / "b")
    source.pipeline_id("p")
    other.pipeline_id("q")
    out = _nbpipe("store", "copy", str(source.path), str(other.path))
    assert out.returncode != 0 and "holds a store already" in out.stderr
    assert _rows(other.db_path, "SELECT name FROM pipelines") == [("q",)]  # untouched
    lock = RunnerLock(source, "p")
    lock.acquire()
    try:
        out = _nbpipe("store", "copy", str(source.path), str(tmp_path / "c"))
    finally:
        lock.release()
    assert out.returncode != 0 and "while a runner is live" in out.stderr
    assert f"pid {os.getpid()}" in out.stderr
    assert not (tmp_path / "c").exists()


# -- between engines: SQLite <-> PostgreSQL ------------------------------------------------------

ROWS = ("SELECT key, state, label, attempts FROM tasks ORDER BY key",
        "SELECT key, path, checksum, size, data FROM results ORDER BY key",
        "SELECT id, key, state, message FROM events ORDER BY id",
        "SELECT parent, child, kind FROM edges ORDER BY rowid",
        "SELECT id, name, paused FROM pipelines ORDER BY id")


def _same_rows(a: Store, b: Store) -> None:
    for sql in ROWS:
        left = [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r)
                for r in a.connect().execute(sql).fetchall()]
        right = [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r)
                 for r in b.connect().execute(sql).fetchall()]
        assert left == right, sql


@pytest.mark.ci_required
def test_a_store_copied_to_postgresql_and_back_runs_nothing_again(tmp_path: Path) -> None:
    from test_store_engines import fresh_schema, postgres_url

    script = tmp_path / "survey.py"
    script.write_text(SCRIPT)
    source = tmp_path / "project" / ".nbpipe"
    assert _run(script, source) == (8, 0)
    with fresh_schema(postgres_url()) as url:
        results = tmp_path / "shared" / "results"
        out = _nbpipe("store", "copy", str(source), url, "--results", str(results))
        assert out.returncode == 0, out.stderr
        assert "files; verified" in out.stdout and "nbpipe:" not in out.stdout  # no password shown
        pg = Store(url)  # the database recorded its results folder
        assert pg.engine == "postgresql" and pg.path == results
        _same_rows(Store(source), pg)
        files = sorted(p.relative_to(source) for p in (source / "results").rglob("*.pkl"))
        assert len(files) == 4
        assert all((results / f).read_bytes() == (source / f).read_bytes() for f in files)
        assert _run(script, url) == (0, 8)  # switching engines computes nothing again
        # ...and back into a new folder: the records the PostgreSQL run added come along
        back = tmp_path / "back" / ".nbpipe"
        out = _nbpipe("store", "copy", url, str(back))
        assert out.returncode == 0, out.stderr
        _same_rows(pg, Store(back))
        assert _run(script, back) == (0, 8)
        # a copy into a database that holds pipelines already is refused, naming it, having
        # made nothing: no results folder, no record of one in the database
        again = _nbpipe("store", "copy", str(source), url, "--results", str(tmp_path / "r2"))
        assert again.returncode != 0 and "holds pipelines already" in again.stderr
        assert not (tmp_path / "r2").exists()
        assert Store(url).path == results


@pytest.mark.ci_required
def test_copy_to_postgresql_needs_a_results_folder_other_than_the_source(tmp_path: Path) -> None:
    from test_store_engines import fresh_schema, postgres_url

    source = tmp_path / ".nbpipe"
    Store(source).pipeline_id("kept")
    with fresh_schema(postgres_url()) as url:
        missing = _nbpipe("store", "copy", str(source), url)
        assert missing.returncode != 0 and "--results DIR" in missing.stderr
        same = _nbpipe("store", "copy", str(source), url, "--results", str(source))
        assert same.returncode != 0 and "holds an SQLite store" in same.stderr
        # refused before anything was made: no tables in the database, no pointer to it
        import psycopg

        with psycopg.connect(url) as conn:
            tables = conn.execute("SELECT COUNT(*) FROM information_schema.tables WHERE "
                                  "table_schema = current_schema()").fetchone()[0]
        assert tables == 0 and not (source / "database.json").exists()
