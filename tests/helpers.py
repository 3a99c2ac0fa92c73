"""What many test modules do the same way: run a notebook on a real kernel and read what it
printed, run the `nbpipe` command in a fresh process, start a script as a process tree of its
own and clean it up, and give a test a PostgreSQL schema of its own.

One copy of each, so a fix reaches every test (a print that reached the kernel's stream in two
pieces was once joined with a newline in the middle in one module and not in the others).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import nbformat
import psutil
import pytest
from nbclient import NotebookClient

from nbpipe.store.postgres import scratch_schema

ANSI = re.compile(r"\x1b\[[0-9;]*m")  # `!nbpipe ...` and tracebacks colour their text
KERNEL_TIMEOUT = 300  # seconds one cell may take on a loaded 2-core CI machine
NBPIPE = [sys.executable, "-m", "nbpipe.cli"]


def new_notebook(path: Path, cells: Sequence[str]) -> nbformat.NotebookNode:
    """Write a notebook of code ``cells`` (Python 3 kernel) at ``path`` and return it.

    >>> nb = new_notebook(tmp_path / "a.ipynb", ["%load_ext nbpipe", "print(1)"])  # doctest: +SKIP
    """
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return nb


def execute_notebook(path: Path, nb: nbformat.NotebookNode | None = None, *,
                     allow_errors: bool = False, save: bool = False) -> nbformat.NotebookNode:
    """Run ``nb`` (default: the notebook read from ``path``) top to bottom on a fresh kernel whose
    working folder is ``path``'s folder and which knows its notebook is ``path``.

    ``save`` writes the executed notebook back, as JupyterLab does after a run.
    """
    if nb is None:
        nb = nbformat.read(path, as_version=4)
    # the kernel's notebook name (JupyterLab sets it): it names the notebook's pipeline
    env = {**os.environ, "JPY_SESSION_NAME": str(path)}
    NotebookClient(nb, timeout=KERNEL_TIMEOUT, kernel_name="python3", allow_errors=allow_errors,
                   resources={"metadata": {"path": str(path.parent)}}).execute(env=env)
    if save:
        nbformat.write(nb, path)
    return nb


def notebook_text(nb: nbformat.NotebookNode) -> str:
    """Everything the notebook's cells showed, colours stripped; fails on an error output.

    Printed text is kept as written (one print can reach the kernel's stream in several pieces);
    each displayed value and each cell's end starts a new line.
    """
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.output_type != "error", f"{out.get('ename')}: {out.get('evalue')}"
            if out.output_type == "stream":
                parts.append(out.get("text", ""))
            else:
                parts.append("\n" + out.get("data", {}).get("text/plain", "") + "\n")
        parts.append("\n")
    return ANSI.sub("", "".join(parts))


def cell_results(nb: nbformat.NotebookNode) -> list[dict[str, str]]:
    """Per cell: its ``text`` (as :func:`notebook_text` joins it), its ``error`` ("Name: value")
    and its ``traceback``, colours stripped; for notebooks run with ``allow_errors``."""
    results = []
    for cell in nb.cells:
        text, error, traceback = [], "", []
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                error = f"{out.ename}: {out.evalue}"
                traceback = [ANSI.sub("", line) for line in out.traceback]
            elif out.output_type == "stream":
                text.append(out.get("text", ""))
            else:
                text.append(out.get("data", {}).get("text/plain", ""))
        results.append({"text": ANSI.sub("", "".join(text)), "error": error,
                        "traceback": "\n".join(traceback)})
    return results


def nbpipe(*args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None,
           timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run ``nbpipe ARGS`` in a fresh process, as a user types it; its output as text.

    >>> nbpipe("status", "flow", "--store", str(store)).returncode  # doctest: +SKIP
    0
    """
    return subprocess.run([*NBPIPE, *args], cwd=cwd, env=None if env is None else dict(env),
                          capture_output=True, text=True, timeout=timeout)


def write(path: Path, source: str) -> Path:
    """Write ``source`` (dedented) to ``path``; return ``path``."""
    path.write_text(textwrap.dedent(source))
    return path


def start(script: Path, *args: str, env: Mapping[str, str]) -> subprocess.Popen[str]:
    """Start ``python script ARGS`` in ``script``'s folder, in a session of its own (so its
    whole process tree -- workers, a detached runner -- can be cleaned up by :func:`reap`);
    its output as text pipes."""
    return subprocess.Popen([sys.executable, str(script), *args], cwd=script.parent,
                            env=dict(env), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def reap(proc: subprocess.Popen[str], timeout: float = 60) -> None:
    """Kill what is left of a process tree a test started (its workers, a detached runner's)."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # orphans re-parented away from the tree
    proc.wait(timeout=timeout)


#: A pipeline whose first task spins until the file ``sys.argv[1]`` exists, then a dependent:
#: a driver that stays live while a test pauses, kills, retries or kills the driver itself.
#: Prints STARTED once the run is under way and DONE when both tasks succeeded.
LONG = """
import os, sys, time
from nbpipe import Pipeline

pipe = Pipeline("long")
GATE = sys.argv[1]  # (a global: the task takes its value along to the worker)


@pipe.task
def spin(n: int) -> int:
    while not os.path.exists(GATE):
        time.sleep(0.02)
    return n


@pipe.task
def later(x: int) -> int:
    return x + 1


if __name__ == "__main__":
    later(spin(1))
    pipe.run(wait=False)
    print("STARTED", flush=True)
    while True:
        time.sleep(0.1)
        if all(t.state == "SUCCEEDED" for t in pipe.tasks()):
            print("DONE", flush=True)
            break
"""


def postgres_url() -> str:
    """The test server's URL, or a skip saying why there is none (a failure in CI)."""
    url = os.environ.get("NBPIPE_TEST_POSTGRES")
    if not url:
        pytest.skip("NBPIPE_TEST_POSTGRES is not set: start a server with `bash .ci/postgres-up` "
                    "and export the URL it prints")
    import psycopg

    try:
        psycopg.connect(url, connect_timeout=10).close()
    except psycopg.Error as exc:
        pytest.skip(f"the PostgreSQL server of NBPIPE_TEST_POSTGRES is unreachable: {exc}")
    return url


@contextlib.contextmanager
def fresh_schema(url: str) -> Iterator[str]:
    """A schema of the test's own in the test database (its URL), dropped afterwards: tests
    never see each other's pipelines or locks."""
    with scratch_schema(url, prefix="t") as scoped:
        yield scoped


def nbpipe_as_of(into: Path, path: str, marker: str, commits: int, missing: str) -> Path:
    """Extract into ``into`` the ``nbpipe`` package of the newest of the last ``commits``
    commits touching ``path`` whose ``path`` contains ``marker`` (an older nbpipe, from git,
    for tests of what a store made by it becomes); skip the test with ``missing`` when none."""
    root = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    try:
        log = subprocess.run([*git, "log", "--format=%H", "-n", str(commits), "--", path],
                             capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs the git history of nbpipe")
    for commit in log.stdout.split():
        source = subprocess.run([*git, "show", f"{commit}:{path}"], capture_output=True,
                                text=True).stdout
        if marker in source:
            into.mkdir(parents=True, exist_ok=True)
            archive = into / "old.tar"
            subprocess.run([*git, "archive", "-o", str(archive), commit, "nbpipe"], check=True)
            with tarfile.open(archive) as tar:
                tar.extractall(into, filter="data")
            return into
    pytest.skip(missing)
