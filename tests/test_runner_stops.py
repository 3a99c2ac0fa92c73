"""A runner whose every tick fails does not leave ``run()`` waiting forever: past
``nbpipe.store-patience`` seconds it stops and ``run()`` raises :class:`~nbpipe.RunnerError`."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

SCRIPT = '''
import sys, time
from pathlib import Path
from nbpipe import Pipeline, RunnerError

gate = Path(sys.argv[1])
pipe = Pipeline("stuck")


def held() -> int:
    while not gate.exists():
        time.sleep(0.05)
    return 1


if __name__ == "__main__":
    ref = pipe.task(held)()
    pipe.run(wait=False)
    while ref.state.value != "RUNNING":
        time.sleep(0.05)
    print("RUNNING", flush=True)
    try:
        pipe.run()
    except RunnerError as exc:
        print("RAISED", exc, flush=True)
        sys.exit(3)
    print("RETURNED", ref.state.value, flush=True)
'''


def test_a_store_that_stays_locked_makes_run_raise(tmp_path: Path, cluster) -> None:
    script, gate = tmp_path / "stuck.py", tmp_path / "gate"
    script.write_text(SCRIPT)
    env = {**os.environ, "DASK_NBPIPE__CLUSTER": cluster.scheduler_address,
           "DASK_NBPIPE__STORE_PATIENCE": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(gate)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    holder = None
    try:
        assert proc.stdout.readline().startswith("RUNNING")
        # Another process takes the store's write lock and keeps it: every write of the
        # runner waits for SQLite's busy timeout (60 s), then fails.
        holder = sqlite3.connect(tmp_path / ".nbpipe" / "nbpipe.sqlite", isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        gate.touch()  # the task ends: its outcome cannot be recorded
        line = proc.stdout.readline()
        holder.rollback()
        holder.close()
        holder = None
        out, err = proc.communicate(timeout=300)
    finally:
        if holder is not None:
            holder.close()
        if proc.poll() is None:
            proc.kill()
    assert line.startswith("RAISED"), (line, err[-3000:])
    assert "could not be written" in line and "database is locked" in line
    assert proc.returncode == 3
