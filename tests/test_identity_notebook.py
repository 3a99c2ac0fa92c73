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


HELPERS = (
    "import functools\nfrom dataclasses import dataclass\n\nfrom nbpipe import task\n\nN = 3\n\n\n"
    "def times_n(x, n=N):\n    return x * n\n\n\n"
    "def logged(fn):\n    @functools.wraps(fn)\n    def wrapper(*args):\n        return fn(*args) + 100\n"
    "    return wrapper\n\n\n"
    "@dataclass\nclass Model:\n    w: float\n\n    def predict(self, x):\n        return self.w * x\n\n\n"
    "MODEL = Model(2.0)\n\n\n@logged\ndef helper(x):\n    return x\n"
)
TASKS = (
    "@task\ndef predict(x):\n    return MODEL.predict(x)\n\n\n@task\ndef wrapped(x):\n"
    "    return helper(x)\n\n\n@task\ndef scaled(x):\n    return times_n(x)\n\n\n"
    "refs = [predict(1), wrapped(1), scaled(1)]\nprint('values', [r.result() for r in refs])"
)


def test_methods_decorators_and_defaults_defined_in_a_notebook_count(tmp_path: Path, env,  # noqa: F811
                                                                   monkeypatch) -> None:
    """Classes 2-4 in a notebook: a method of an object, a decorator's wrapper and a helper's
    default value, edited in their cell and run again in a fresh kernel, re-run exactly the
    tasks that use them."""
    import nbformat

    path = _notebook(tmp_path / "helpers.ipynb", ["%load_ext nbpipe", HELPERS, TASKS])
    assert "values [2.0, 101, 3]" in execute(path, monkeypatch)
    first = attempts(tmp_path / ".nbpipe", "helpers")

    def edit(old: str, new: str) -> dict[str, tuple[str, int]]:
        nb = nbformat.read(path, as_version=4)
        assert old in nb.cells[1].source
        nb.cells[1].source = nb.cells[1].source.replace(old, new)
        nbformat.write(nb, path)
        return attempts(tmp_path / ".nbpipe", "helpers")

    before = edit("return self.w * x", "return self.w * x  # a comment")
    execute(path, monkeypatch)
    assert attempts(tmp_path / ".nbpipe", "helpers") == before == first
    edit("return self.w * x", "return self.w * x + 1")
    edit("N = 3", "N = 4")
    assert "values [3.0, 101, 4]" in execute(path, monkeypatch)
    after = attempts(tmp_path / ".nbpipe", "helpers")
    assert {label for label in after if after[label] != first.get(label)} == {"predict(x=1)",
                                                                             "scaled(x=1)"}
    edit("+ 100", "+ 200")
    assert "values [3.0, 201, 4]" in execute(path, monkeypatch)
    last = attempts(tmp_path / ".nbpipe", "helpers")
    assert {label for label in last if last[label] != after.get(label)} == {"wrapped(x=1)"}
