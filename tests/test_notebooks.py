"""Every example notebook in nb/ runs top to bottom on a real kernel (nbclient).

Each runs in a copy in a temporary folder (its store `.nbpipe` and the files it writes go there)
against the session's LocalCluster; the `nbpipe` command is on the kernel's PATH, as in an
activated environment. quickstart.ipynb and slurm.ipynb have tests of their own.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from helpers import execute_notebook, notebook_text

NB_DIR = Path(__file__).resolve().parent.parent / "nb"
OWN_TESTS = {
    "quickstart.ipynb": "tests/test_quickstart_notebook.py",
    "slurm.ipynb": "tests/test_slurm.py (needs a Slurm)",
}
NOTEBOOKS = sorted(p.name for p in NB_DIR.glob("*.ipynb") if p.name not in OWN_TESTS)

# What each notebook must show, beyond running without an error (regular expressions).
EXPECTED: dict[str, list[str]] = {
    "pi.ipynb": [
        r"bash app says pi is ~ 3\.1\d{3}",        # python tasks feeding a bash task
        r"^22 executed, 0 already done",            # run() reports what .result() ran
        r"average\(fractions=.*SUCCEEDED",          # the nbpipe command lists the tasks
        r"│ pi\s+│ 22 ",                               # nbpipe pipelines: 22 tasks
        r"pipeline 'pi' paused",                    # nbpipe pause / resume from a terminal
        r"^0 executed, 22 already done",            # the second round computes nothing
        r"new task",                                # %pipeline why
    ],
    "files.ipynb": [
        r"^2 executed, 0 already done",             # producer and consumer, linked by a file
        r"^first: input file .*input\.txt changed",  # content of an In file
        r"^t1, t2 and t3 are one task: True",       # depio's merged tasks
        r"^3 executed, 2 already done",             # after= chain of three
        r"^1 executed, 1 already done",             # the script re-makes only a deleted product
        r"^output2: output file .*output2\.txt is missing \| final2: found done",
    ],
    "taskfile.ipynb": [
        r"^6 executed, 0 already done \(6 SUCCEEDED\)",  # one task per entry of the YAML file
        r"^frame-003 above threshold: False attempt: 2",  # retried after a transient error
        r"^entries that started before the previous one ended: 0",  # max_concurrent=1 held
        r"process\[frame-003\]",                           # labels in the nbpipe command
        r"│ 1\s+│ FAILED .*\n.*│ 2\s+│ SUCCEEDED",           # its two attempts
        r"^1 executed, 6 already done",                    # the JSON file: only the new entry
        r"failed: process\[frame-bad\]",
        r"KeyError: 'threshold'",                          # %pipeline logs
        r"^nbpipe: 100 entries of frames\.jsonl run \(100 executed",  # run_tasks: progress
        r"^300 executed, 0 already done \(300 SUCCEEDED\)",  # ... window by window
        r"^tasks held in the kernel: 0",                    # each window dropped once run
        r"^squares done in the store: 300",
        r"^0 executed, 300 already done \(300 SUCCEEDED\)",  # the same file again: nothing
        r"^square\[f0012\] 144",                            # a result read back, found done
    ],
    "policy.ipynb": [
        r"^stuck\(seconds=60\) FAILED attempts: 1",       # stopped by its timeout, not retried
        r"^flaky\(name='a'\) SUCCEEDED attempts: 2",      # the pipeline's default retries
        r"^fatal FAILED attempts: 1",                    # Permanent: never retried
        r"stuck\(seconds=60\)\s+FAILED \(timed out\)",    # nbpipe show
        r"│ 1\s+│ TIMED_OUT",                             # its attempt
        r"^WAITING - the code of `scale` changed",
        r"^0 executed, 1 already done \(1 SUCCEEDED\) 40",  # accepted: nothing ran
        r"^scale\(x=4\): accepted by hand on ",           # nbpipe why
        r"SUCCEEDED\s+│.*\n.*\(accepted\)",                # nbpipe tasks
    ],
    "workflow.ipynb": [
        r"^workflow process killed, exit status -9",
        r"^runme\.py 1 2 OMP_NUM_THREADS = 1",          # the PythonTask with its env
        r"│ 1\s+│ FAILED .*\n.*│ 2\s+│ SUCCEEDED",      # the flaky task, restarted
        r"^\[\('SUCCEEDED', 10\)\]",                     # the store, queried with SQL
        r"^0 executed, 10 already done",               # a finished workflow runs nothing
        r"^\['cpof_jobmon_qs\.txt', 'flaky-marker'\]",  # touch, cp, rm happened in order
    ],
}


def _check_resume(text: str) -> None:
    """workflow.ipynb: the run after the crash skips what had succeeded and runs the rest."""
    before = int(re.search(r"^(\d+) of 10 tasks had succeeded", text, re.M).group(1))
    executed, done = map(int, re.search(r"^(\d+) executed, (\d+) already done \(10 SUCCEEDED\)",
                                        text, re.M).groups())
    assert 2 <= before < 10 and executed + done == 10
    assert done >= before and executed >= 2  # steps 4 and 5 had not started when it died


CHECKS = {"workflow.ipynb": _check_resume}


@pytest.fixture
def kernel_env(kernel_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """conftest's kernel environment, and `nbpipe` on the kernel's PATH (`!nbpipe ...` cells)."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return dict(os.environ)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name: str, tmp_path: Path, kernel_env: None,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / name
    shutil.copy(NB_DIR / name, path)
    monkeypatch.setenv("JPY_SESSION_NAME", str(path))
    before = sorted(p.name for p in NB_DIR.iterdir())
    text = notebook_text(execute_notebook(path))
    for pattern in EXPECTED.get(name, []):
        assert re.search(pattern, text, re.M), f"{name}: no match for {pattern!r} in\n{text}"
    if name in CHECKS:
        CHECKS[name](text)
    assert sorted(p.name for p in NB_DIR.iterdir()) == before, "the notebook wrote into nb/"


@pytest.mark.parametrize("name", sorted(p.name for p in NB_DIR.glob("*.ipynb")))
def test_notebook_is_committed_without_outputs(name: str) -> None:
    nb = nbformat.read(NB_DIR / name, as_version=4)
    stale = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not stale, f"{name}: clear the outputs of cells {stale} before committing"


# Code in the migration guides captioned with a notebook is a cell of that notebook (after a
# `%%writefile` line), so the guides show code the tests above execute.
GUIDES = sorted((NB_DIR.parent / "docs" / "migration").glob("*.md"))
CAPTIONED = re.compile(r"```\{code-block\} python\n:caption: nb/([\w.]+)\n\n(.*?)\n```", re.S)


def _cells(name: str) -> list[str]:
    nb = nbformat.read(NB_DIR / name, as_version=4)
    cells = [c.source for c in nb.cells if c.cell_type == "code"]
    return [c.split("\n", 1)[1] if c.startswith("%%writefile") else c for c in cells]


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.name)
def test_migration_guide_shows_cells_of_an_executed_notebook(guide: Path) -> None:
    blocks = CAPTIONED.findall(guide.read_text())
    assert blocks, f"{guide.name} shows no nbpipe code taken from nb/"
    for name, code in blocks:
        assert name in NOTEBOOKS, f"{guide.name}: nb/{name} is not run by test_notebook_runs_top_to_bottom"
        assert code.strip() in [c.strip() for c in _cells(name)], (
            f"{guide.name}: a block captioned nb/{name} is not a cell of it; copy the cell again")
