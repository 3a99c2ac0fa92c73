"""Identity in notebooks: names IPython injects count as the builtins they stand for, so a
notebook and its exported script share every key; the user's own modules count by content in
cells and in functions (real kernels via nbclient, real scripts)."""

from __future__ import annotations

from pathlib import Path

from test_export import _notebook, attempts, env, execute, export, run_script  # noqa: F401

CELLS = [
    "%load_ext nbpipe",
    "import mylib\nfrom pathlib import Path\n\nDATA = str(Path('data.txt').resolve())\n"
    "Path(DATA).write_text('1 2 3')",
    "%%task numbers\nwith open(DATA) as handle:\n    numbers = [int(x) for x in handle.read().split()]\n"
    "print('read', numbers)",
    "from nbpipe import task\n\n\n@task\ndef size(path: str) -> int:\n"
    "    with open(path) as handle:\n        return len(handle.read())\n\n\nsized = size(DATA)",
    "%%task total\ndisplay(sum(numbers))\nprint('numbers', numbers)\ntotal = mylib.f(sum(numbers))",
    "def via(x):\n    return mylib.f(x) + 1",
    "%%task helped\nhelped = via(2)",
    "print('total', total, 'size', sized.result(), 'helped', helped)",
]


def test_a_notebook_using_open_display_and_print_exports_to_a_script_that_runs_nothing(
        tmp_path: Path, env, monkeypatch) -> None:  # noqa: F811
    (tmp_path / "mylib.py").write_text("def f(x):\n    return x * 3\n\n\ndef g():\n    return 0\n")
    path = _notebook(tmp_path / "names.ipynb", CELLS)
    text = execute(path, monkeypatch)
    assert "total 18 size 5 helped 7" in text
    first = attempts(tmp_path / ".nbpipe", "names")
    assert len(first) == 4
    script, _ = export(path, env)
    out = run_script(script, env)
    assert "0 executed" in out or attempts(tmp_path / ".nbpipe", "names") == first
    assert attempts(tmp_path / ".nbpipe", "names") == first  # the script ran nothing
    text = execute(path, monkeypatch)  # and back again, in a fresh kernel
    assert "total 18 size 5 helped 7" in text
    assert attempts(tmp_path / ".nbpipe", "names") == first

    # The user's own module counts by content in a cell and in a plain-cell helper: an unrelated
    # edit re-runs nothing, editing the function they use re-runs those two cells only.
    (tmp_path / "mylib.py").write_text("def f(x):\n    return x * 3\n\n\ndef g():\n    return 1\n")
    execute(path, monkeypatch)
    assert attempts(tmp_path / ".nbpipe", "names") == first
    (tmp_path / "mylib.py").write_text("def f(x):\n    return x * 4\n\n\ndef g():\n    return 1\n")
    text = execute(path, monkeypatch)
    assert "total 24 size 5 helped 9" in text
    after = attempts(tmp_path / ".nbpipe", "names")
    assert {label for label in after if after[label] != first.get(label)} == {"total", "helped"}
