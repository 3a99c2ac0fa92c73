"""What many test modules do the same way: run a notebook on a real kernel and read what it
printed, and run the `nbpipe` command in a fresh process.

One copy of each, so a fix reaches every test (a print that reached the kernel's stream in two
pieces was once joined with a newline in the middle in one module and not in the others).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import nbformat
from nbclient import NotebookClient

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
