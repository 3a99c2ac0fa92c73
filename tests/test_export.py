"""Exporting notebooks to scripts that share their results (real kernels, real scripts, real ruff)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import execute_notebook, new_notebook, notebook_text

from nbpipe.export import ExportError, export_notebook
from nbpipe.store import Store

NB = Path(__file__).resolve().parent.parent / "nb"

MIXED = [
    "%load_ext nbpipe",
    "import math\nSCALE = 3",
    "%%task numbers\nnumbers = [i * SCALE for i in range(5)]",
    "from nbpipe import task\n\n\n@task\ndef square(x: int) -> int:\n    return x * x\n\n\n"
    "squares = [square(n) for n in range(4)]",
    "print('count', len(numbers))",
    "%%task total\n# a comment\ntotal = sum(numbers) + math.floor(2.5)",
    "%%task greet --bash\necho \"total is {total}\"",
    "!echo shell escapes have no script meaning\n%timeit 1",
    "print('total', total, 'greet', getattr(greet, 'stdout', greet).strip(),\n"
    "      'squares', [s.result() for s in squares])",
    "from pathlib import Path\nfrom typing import Annotated\n\nfrom nbpipe import In, Out\n\n\n"
    "@task\ndef save(n: int, path: Annotated[Path, Out]) -> str:\n    path.write_text(str(n))\n"
    "    return str(path)\n\n\n@task\ndef load(path: Annotated[Path, In]) -> int:\n"
    "    return int(path.read_text())\n\n\nOUT = Path('saved.txt').resolve()\n"
    "saved = save(total, OUT)\nloaded = load(OUT)\nprint('loaded', loaded.result())",
]


def _notebook(path: Path, cells: list[str]) -> Path:
    new_notebook(path, cells)
    return path


@pytest.fixture
def env(kernel_env: dict[str, str]) -> dict[str, str]:
    """Kernels and scripts use the shared test cluster; no widgets in kernels."""
    return kernel_env


def execute(path: Path, monkeypatch) -> str:
    monkeypatch.setenv("JPY_SESSION_NAME", str(path))
    return notebook_text(execute_notebook(path))


def export(path: Path, env: dict[str, str]) -> tuple[Path, str]:
    out = subprocess.run([sys.executable, "-m", "nbpipe.cli", "export", str(path)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    script = path.with_suffix(".py")
    # ruff run where the script lives, as its user would: modules beside it are first party
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated", script.name],
                          capture_output=True, text=True, cwd=script.parent)
    assert lint.returncode == 0, lint.stdout + script.read_text()
    return script, out.stderr


def run_script(script: Path, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         cwd=script.parent, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def attempts(store: Path, pipeline: str) -> dict[str, tuple[str, int]]:
    s = Store(store)
    return {r["label"]: (r["key"], r["attempts"]) for r in s.task_rows(s.pipeline_id(pipeline)).values()}


def test_the_quickstart_script_reuses_everything_the_notebook_computed(tmp_path, env, monkeypatch) -> None:
    path = tmp_path / "quickstart.ipynb"
    shutil.copy(NB / "quickstart.ipynb", path)
    text = execute(path, monkeypatch)
    mean, pi = re.search(r"^(-?[\d.e-]+) ([\d.]+)$", text, re.M).groups()
    before = attempts(tmp_path / ".nbpipe", "quickstart")
    script, warnings = export(path, env)
    assert "%pipeline status" in warnings and "cell 7" in warnings
    source = script.read_text()
    assert "get_ipython" not in source
    assert not any(line.lstrip().startswith(("%", "!")) for line in source.splitlines())
    assert "@nbpipe.task(outputs=['mean', 'std'])\ndef stats(data):" in source
    out = run_script(script, env)
    assert f"{mean} {pi}" in out
    assert "0 executed, 23 already done" in out
    assert attempts(tmp_path / ".nbpipe", "quickstart") == before  # nothing ran again


def test_a_notebook_reuses_what_its_script_computed(tmp_path, env, monkeypatch) -> None:
    path = _notebook(tmp_path / "mixed.ipynb", MIXED)
    script, warnings = export(path, env)
    assert "cell 8: `!echo shell escapes" in warnings and "cell 8: `%timeit 1`" in warnings
    out = run_script(script, env)
    assert "count 5" in out and "total 32 greet total is 32 squares [0, 1, 4, 9]" in out
    first = attempts(tmp_path / ".nbpipe", "mixed")
    assert len(first) == 9 and {a for _, a in first.values()} == {1}
    assert "loaded 32" in out
    text = execute(path, monkeypatch)
    assert "total 32 greet total is 32 squares [0, 1, 4, 9]" in text
    assert attempts(tmp_path / ".nbpipe", "mixed") == first  # the notebook ran nothing


def test_changing_one_function_in_the_script_reruns_only_what_depends_on_it(tmp_path, env) -> None:
    path = _notebook(tmp_path / "mixed.ipynb", MIXED)
    script, _ = export(path, env)
    run_script(script, env)
    before = attempts(tmp_path / ".nbpipe", "mixed")
    source = script.read_text()
    assert "total = sum(numbers) + math.floor(2.5)" in source
    script.write_text(source.replace("total = sum(numbers) + math.floor(2.5)",
                                     "total = sum(numbers) + math.floor(3.5)"))
    out = run_script(script, env)
    assert "total 33 greet total is 33" in out
    after = attempts(tmp_path / ".nbpipe", "mixed")
    changed = {label.partition("(")[0] for label in after if after[label] != before.get(label)}
    assert changed == {"total", "greet", "save", "load"}  # total and what reads it, file included


def test_export_of_every_example_notebook_passes_ruff(tmp_path, env) -> None:
    for notebook in sorted(NB.glob("*.ipynb")):
        copy = tmp_path / notebook.name
        shutil.copy(notebook, copy)
        export(copy, env)


def test_bad_notebooks_are_refused_with_the_cell_named(tmp_path) -> None:
    (tmp_path / "broken.ipynb").write_text("{not json")
    with pytest.raises(ExportError, match="broken.ipynb: not a readable notebook"):
        export_notebook(tmp_path / "broken.ipynb")
    path = _notebook(tmp_path / "nameless.ipynb", ["%load_ext nbpipe", "%%task\nprint('hi')"])
    with pytest.raises(ExportError, match=r"cell 2 \(%%task\): the cell assigns nothing"):
        export_notebook(path)
    path = _notebook(tmp_path / "options.ipynb", ["%%task x --retries lots\nx = 1"])
    with pytest.raises(ExportError, match=r"cell 1 \(%%task x --retries lots\): cannot read"):
        export_notebook(path)
    data = json.loads(path.read_text())
    assert data["cells"]


def test_nbpipe_run_runs_a_notebooks_pipeline_headless(tmp_path, env, monkeypatch) -> None:
    path = _notebook(tmp_path / "mixed.ipynb", MIXED)
    out = subprocess.run([sys.executable, "-m", "nbpipe.cli", "run", str(path)], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "total 32 greet total is 32" in out.stdout and "all tasks succeeded" in out.stdout
    assert "cell 8" in out.stderr  # the warnings of the export
    first = attempts(tmp_path / ".nbpipe", "mixed")
    text = execute(path, monkeypatch)  # the notebook then finds everything done
    assert "total 32" in text and attempts(tmp_path / ".nbpipe", "mixed") == first
