"""Notebooks as people write them (issue 16, items 6-12), each in a real kernel (nbclient).

Throwaway values in %%task cells, one parser for the %%task line, outputs named like builtins,
Python's scoping block by block, `%pipeline wait` with tasks only registered, imports used from
another task cell, and `%pipeline use` keeping the cluster. Where the exported script must agree
with the kernel, the test exports the notebook and runs the script in a fresh process.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from helpers import cell_results, execute_notebook, new_notebook

from nbpipe.cellscope import analyze
from nbpipe.taskline import OPTIONS, TaskLineError, markdown_table, parse_task_line, synopsis

ROOT = Path(__file__).resolve().parent.parent
def execute(path: Path, cells: list[str], monkeypatch: pytest.MonkeyPatch) -> list[dict[str, str]]:
    """Run ``cells`` as a notebook at ``path``; per cell its text and its error (if any)."""
    nb = new_notebook(path, cells)
    monkeypatch.setenv("JPY_SESSION_NAME", str(path))
    return cell_results(execute_notebook(path, nb, allow_errors=True))


def last(result: dict[str, str]) -> str:
    """The cell's last line of output (after any "waiting for ..." progress line)."""
    return result["text"].strip().splitlines()[-1]


def no_errors(results: list[dict[str, str]], *cells: int) -> None:
    for i in cells:
        assert not results[i]["error"], (i, results[i])


def short(result: dict[str, str]) -> None:
    """The error is its message only: no traceback through nbpipe's code."""
    assert result["error"], result
    assert "magics.py" not in result["traceback"] and "site-packages" not in result["traceback"]
    assert len(result["traceback"].splitlines()) <= 3, result["traceback"]


def export_and_run(notebook: Path, env: dict[str, str]) -> tuple[str, str]:
    """``nbpipe export`` the notebook, then run the script; its text and its output."""
    out = subprocess.run([sys.executable, "-m", "nbpipe.cli", "export", str(notebook)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    script = notebook.with_suffix(".py")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         cwd=script.parent, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr + script.read_text()
    return script.read_text(), run.stdout


# -- 6. throwaway values ------------------------------------------------------------------------

THROWAWAY = [
    "%load_ext nbpipe",
    "from pathlib import Path\nPath('words.txt').write_text('3 1 2')\n"
    "path = str(Path('words.txt').resolve())",  # the workers run elsewhere
    # (Path.open, not open: how IPython's own `open` enters a task's key is issue 15's)
    "%%task read\nimport threading\nfrom pathlib import Path\n"
    "with Path(path).open() as f:\n    text = f.read()\n"
    "words = iter(text.split())\n"                       # an iterator that pickles: kept
    "numbers = (int(w) for w in text.split())\n"         # a generator: not an output
    "lock = threading.Lock()\n"                          # a lock: not stored
    "handle = Path(path).open()\n"                       # a file: not stored
    "handle.close()\n"
    "total = sum(int(w) for w in text.split())",
    "print(total, sorted(words))",
    "%pipeline logs read",
]


def test_throwaway_values_are_skipped_and_readers_are_told_why(tmp_path, kernel_env, monkeypatch) -> None:
    readers = [
        "lock",                                              # a plain cell, a value not pickled
        "f.read()",                                          # a plain cell, a `with ... as` name
        "%%task uses_f\nsize = len(f.read())",               # a task cell, a `with ... as` name
        "list(numbers)",                                     # a plain cell, a generator
        "%%task uses_lock\nwith lock:\n    locked = 1",      # a task cell, a value not pickled
        "print(locked)",
    ]
    r = execute(tmp_path / "throwaway.ipynb", THROWAWAY + readers, monkeypatch)
    no_errors(r, 0, 1, 2, 3, 4)
    assert "6 ['1', '2', '3']" in r[3]["text"]  # the task succeeded
    assert "SUCCEEDED" in r[4]["text"]
    skipped = [line for line in r[4]["text"].splitlines() if "did not store" in line]
    assert skipped == ["nbpipe: %%task read did not store lock, handle (cannot be pickled: "
                       "_thread.lock, _io.TextIOWrapper); a cell that reads them gets an error"]
    lock, f_plain, f_task, numbers, uses_lock, locked = r[5:]
    assert lock["error"].startswith("OutputNotStored: 'lock' is not an output of %%task read: it "
                                    "holds a _thread.lock, which cannot be stored")
    for error in (f_plain, f_task):
        assert error["error"].startswith("OutputNotStored: 'f' is not an output of %%task read: it is "
                                         "bound by `with ... as f`")
    assert numbers["error"].startswith("OutputNotStored: 'numbers' is not an output of %%task read: "
                                       "it is a generator expression")
    assert not uses_lock["error"]  # registered; it fails on its worker, where `lock` is missing
    assert locked["error"].startswith("OutputNotStored: task 'uses_lock' cannot run: 'lock' is not "
                                      "an output of %%task read: it holds a _thread.lock")
    for error in (lock, f_plain, f_task, numbers, locked):
        short(error)


def test_export_of_throwaway_values_runs_and_lists_no_with_names(tmp_path, kernel_env, monkeypatch) -> None:
    notebook = tmp_path / "throwaway.ipynb"
    r = execute(notebook, THROWAWAY[:4], monkeypatch)
    no_errors(r, 0, 1, 2, 3)
    script, output = export_and_run(notebook, kernel_env)
    outputs = re.search(r"@nbpipe\.task\(outputs=(\[.*?\])", script).group(1)
    assert eval(outputs) == ["text", "words", "lock", "handle", "total"]  # no `f`, no `numbers`
    assert "6 ['1', '2', '3']" in output
    assert "0 executed, 1 already done" in output  # the script found the notebook's result


# -- 7. one parser for the %%task line -----------------------------------------------------------


def test_the_task_line_is_read_alike_by_the_magic_and_by_export(tmp_path, kernel_env, monkeypatch) -> None:
    line = ('%%task shout --retries 2 --cores 1 --memory 1GB --walltime 00:10:00 --version 3 '
            '--retry-memory-factor 1.5 --no-cache --after quiet --env "MSG=hello world" K=V')
    cells = [
        "%load_ext nbpipe",
        "%%task quiet\nquiet = 1",
        f"{line}\nimport os\nshout = os.environ['MSG'] + ' ' + os.environ['K']",
        "print(shout)",
        "import dataclasses\n"
        "opts = get_ipython()._nbpipe_session.pipe._by_label['shout'].func.opts\n"
        "print(repr(dataclasses.replace(opts, name=None)))",
    ]
    notebook = tmp_path / "line.ipynb"
    r = execute(notebook, cells, monkeypatch)
    no_errors(r, 0, 1, 2, 3, 4)
    assert last(r[3]) == "hello world V"
    kernel_opts = r[4]["text"].strip()
    nb = nbformat.read(notebook, as_version=4)
    nb.cells = nb.cells[:4]  # without the kernel-only look at the options
    nbformat.write(nb, notebook)
    script, _ = export_and_run(notebook, kernel_env)
    assert "env={'MSG': 'hello world', 'K': 'V'}" in script
    probe = subprocess.run(
        [sys.executable, "-c", "import dataclasses, line\n"
         "print(repr(dataclasses.replace(line.shout_cell.opts, name=None)))"], cwd=tmp_path,
        capture_output=True, text=True, env=kernel_env, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == kernel_opts  # every option, the same in both


def test_the_option_table_is_the_docs_table_and_the_magics_help() -> None:
    doc = (ROOT / "docs" / "magics.md").read_text()
    assert markdown_table() in doc, "docs/magics.md: paste nbpipe.taskline.markdown_table() in"
    assert synopsis() in doc, "docs/magics.md: paste nbpipe.taskline.synopsis() in"
    from nbpipe.magics import NbpipeMagics

    help_text = NbpipeMagics.task.__doc__
    for option in OPTIONS:
        if option.flag != "name":
            assert option.flag in help_text, option.flag


@pytest.mark.parametrize("line, name, bash, options", [
    ("x", "x", False, {}),
    ("", None, False, {}),
    ("fetch --bash", "fetch", True, {}),
    ("'my task' --pool big", "my task", False, {"pool": "big"}),
    ("t --env 'A=1 2' B= --after a b", "t", False, {"env": {"A": "1 2", "B": ""}, "after": ["a", "b"]}),
    ("%%task t --no-cache --gpus 2", "t", False, {"cache": False, "gpus": 2}),
])
def test_task_lines_parse_as_a_shell_would_split_them(line, name, bash, options) -> None:
    parsed = parse_task_line(line)
    assert (parsed.name, parsed.bash, parsed.options) == (name, bash, options)


@pytest.mark.parametrize("line, message", [
    ("t --retrys 2", "unrecognized arguments: --retrys 2"),
    ("t --cores many", "argument --cores: invalid int value: 'many'"),
    ("t --env NOVALUE", "%%task t: --env takes KEY=VALUE pairs, got 'NOVALUE'"),
    ('t --env "A=1', "cannot split the %%task line 't --env \"A=1': No closing quotation"),
])
def test_bad_task_lines_are_one_error(line, message) -> None:
    with pytest.raises(TaskLineError) as info:
        parse_task_line(line)
    assert str(info.value).startswith(message)


# -- 8. outputs named like builtins --------------------------------------------------------------


def test_names_bound_like_builtins_shadow_them_in_kernel_and_script(tmp_path, kernel_env,
                                                                    monkeypatch) -> None:
    cells = [
        "%load_ext nbpipe",
        "%%task raw\ninput = [1, 2, 3]",             # a task output named like a builtin
        "max = 10",                                 # a plain variable named like one
        "%%task len\nlength = len(input)",          # a task named like a builtin
        "%%task total\ntotal = sum(input) + max + len(input) + length",
        "print('total', total)",
    ]
    notebook = tmp_path / "builtins.ipynb"
    r = execute(notebook, cells, monkeypatch)
    no_errors(r, 0, 1, 2, 3, 4, 5)
    assert last(r[5]) == "total 22"
    script, output = export_and_run(notebook, kernel_env)
    assert re.search(r"def total_cell\(input, max, length\):", script), script
    assert "def len(" not in script  # a module-level `len` would shadow the builtin for all
    assert "total 22" in output and "0 executed, 3 already done" in output


# -- 9. static analysis, block by block ---------------------------------------------------------


@pytest.mark.parametrize("source, reads, writes", [
    # `global x` in a nested function: the outer function's `x` stays local (not an output)
    ("def outer():\n    x = 1\n    def inner():\n        global x\n        return x\n"
     "    return inner() + x\nvalue = outer()", ["x"], ["outer", "value"]),
    # ...and a `global` in the outer function does not reach a nested one's local
    ("def outer():\n    global y\n    y = 1\n    def inner():\n        y = 2\n        return y\n"
     "    return inner()", [], ["outer", "y"]),
    # `except E as e`: deleted when the handler ends
    ("try:\n    1 / 0\nexcept ZeroDivisionError as err:\n    message = str(err)",
     ["ZeroDivisionError", "str"], ["message"]),
    # a name only a nested function binds is read from outside by the outer one
    ("def outer():\n    def inner():\n        z = 1\n    return z", ["z"], ["outer"]),
    # comprehension variables stay in the comprehension, walrus targets leave it
    ("def f():\n    [w := i for i in range(2)]\n    return w, i", ["range", "i"], ["f"]),
    # class bodies are not enclosing scopes of their methods
    ("class C:\n    k = 1\n    def m(self):\n        return k", ["k"], ["C"]),
    # lambda parameters and defaults
    ("f = lambda a, b=c: a + b + d", ["c", "d"], ["f"]),
    # `with ... as`: not an output; bound again later, it is one
    ("with open(p) as fh:\n    data = fh.read()", ["open", "p"], ["data"]),
    ("with open(p) as fh:\n    pass\nfh = 1", ["open", "p"], ["fh"]),
    # a generator expression runs once: not an output either
    ("gen = (x for x in xs)\nfirst = next(gen)", ["xs", "next"], ["first"]),
    # match patterns bind at top level
    ("match point:\n    case (px, *rest):\n        pass\n    case {'k': v, **others}:\n        pass",
     ["point"], ["px", "rest", "v", "others"]),
])
def test_cell_scope_follows_python_block_by_block(source, reads, writes) -> None:
    scope = analyze(source)
    assert (scope.reads, scope.writes) == (reads, writes)


def test_scoping_edge_cases_run_as_python_runs_them(tmp_path, kernel_env, monkeypatch) -> None:
    cells = [
        "%load_ext nbpipe",
        "x = 10",
        "%%task scoped\n"
        "def outer():\n    x = 1\n    def inner():\n        global x\n        return x\n"
        "    return inner() + x\n"
        "value = outer()\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError as err:\n    message = str(err)",
        "print(value, message)",
        "err",
    ]
    r = execute(tmp_path / "scoping.ipynb", cells, monkeypatch)
    no_errors(r, 0, 1, 2, 3)
    assert last(r[3]) == "11 division by zero"  # inner() read the notebook's x
    assert r[4]["error"] == "NameError: name 'err' is not defined"  # as after a plain cell


# -- 10. %pipeline wait --------------------------------------------------------------------------


def test_wait_waits_for_submitted_tasks_and_names_the_others(tmp_path, kernel_env, monkeypatch) -> None:
    cells = [
        "%load_ext nbpipe",
        "from nbpipe import task\n\n@task\ndef double(x: int) -> int:\n    return 2 * x\n\n"
        "later = [double(i) for i in range(2)]",
        "%%task y\ny = 1",
        "%pipeline wait --timeout 60",
        "%pipeline run",
        "%pipeline wait --timeout 60",
        "print([ref.result() for ref in later])",
    ]
    r = execute(tmp_path / "wait.ipynb", cells, monkeypatch)
    no_errors(r, *range(7))
    first, second = r[3]["text"], r[5]["text"]
    assert "(1 SUCCEEDED)" in first
    assert ("not waited for: 2 task(s) registered but not submitted (double(x=0), double(x=1)); "
            "`%pipeline run` runs them") in first
    assert "(3 SUCCEEDED)" in second and "not waited for" not in second
    assert last(r[6]) == "[0, 2]"


# -- 11. an import from another task cell --------------------------------------------------------


def test_an_import_from_another_task_cell_is_a_short_error_with_the_import(
        tmp_path, kernel_env, monkeypatch) -> None:
    cells = [
        "%load_ext nbpipe",
        "%%task load\nimport math\nimport os.path\nfrom statistics import mean as average\n"
        "data = [math.floor(2.5), 4]",
        "%%task stats\nm = math.fsum(data)",             # a task cell
        "%%task where\nw = os.path.basename('a/b')",
        "%%task avg\na = average(data)",
        "math.pi",                                       # a plain cell
        "%%task nowhere\nq = undefined_name + 1",         # a name nothing defines: short too
        "import math\nprint(math.floor(1.5))",            # imported here, every cell may use it
        "%%task stats\nm = math.fsum(data)",
        "print(m)",
    ]
    r = execute(tmp_path / "imports.ipynb", cells, monkeypatch)
    no_errors(r, 0, 1, 7, 8, 9)
    assert r[2]["error"] == ("CellInputError: task 'stats' reads 'math', a module that %%task load "
                             "imports; modules are not task outputs: `import math` in this cell")
    assert r[3]["error"].endswith("`import os.path` in this cell")
    assert r[4]["error"].endswith("`from statistics import mean as average` in this cell")
    assert r[5]["error"] == ("CellInputError: this cell reads 'math', a module that %%task load "
                             "imports; modules are not task outputs: `import math` in this cell")
    assert r[6]["error"].startswith("CellInputError: task 'nowhere' reads 'undefined_name'")
    for i in (2, 3, 4, 5, 6):
        short(r[i])
    assert last(r[9]) == "6.0"


# -- 12. %pipeline use ---------------------------------------------------------------------------


def test_use_closes_the_previous_runner_and_keeps_its_local_cluster(tmp_path, kernel_env,
                                                                     monkeypatch) -> None:
    monkeypatch.setenv("DASK_NBPIPE__CLUSTER", "{'kind': 'local', 'workers': 1}")
    cells = [
        "%load_ext nbpipe",
        "%%task x\nx = 1",
        "print(x)",
        "import threading\nsession = get_ipython()._nbpipe_session\n"
        "first = session.pipe.connection.cluster\n"
        "def runners():\n    return sorted(t.name for t in threading.enumerate() "
        "if t.name.startswith('nbpipe-runner'))\n"
        "print(type(first).__name__, runners())",
        "%pipeline use other",
        "%%task z\nz = 2",
        "print(z)",
        "print(session.pipe.connection.cluster is first, first.process.poll() is None, runners())",
    ]
    r = execute(tmp_path / "first.ipynb", cells, monkeypatch)
    no_errors(r, *range(8))
    assert last(r[3]) == "LocalProcessCluster ['nbpipe-runner-first']"  # nbpipe's local cluster
    assert "pipeline 'other'" in r[4]["text"]
    assert last(r[6]) == "2"
    assert last(r[7]) == "True True ['nbpipe-runner-other']"  # the same cluster, still up


def test_pipe_wait_skips_tasks_only_registered_and_unsubmitted_lists_them(pipe) -> None:
    from nbpipe import State

    def inc(x: int) -> int:
        return x + 1

    ran = pipe.task(inc)(1)
    idle = [pipe.task(inc)(i) for i in (10, 11)]
    pipe.run([ran])
    assert pipe.unsubmitted() == idle
    summary = pipe.wait(timeout=30)  # returns: nothing it waits for is left
    assert summary.counts == {"SUCCEEDED": 1}
    assert all(r.state is State.WAITING for r in idle)
    pipe.run()
    assert pipe.unsubmitted() == [] and [r.result() for r in idle] == [11, 12]


def test_reopen_hands_the_cluster_to_the_next_pipeline_and_stops_the_runner(pipe, store) -> None:
    from nbpipe import Pipeline

    def one() -> int:
        return 1

    pipe.task(one)()
    pipe.run(check=True)
    client = pipe.client
    other = pipe.reopen("other")
    try:
        assert other.client is client and other.name == "other"
        again = Pipeline(pipe.name, store=store, cluster=client)  # its lock was given back
        again.task(one)()
        assert again.run(check=True).cached == 1
        again.close()
    finally:
        other.close()


def test_a_cell_run_again_without_its_with_forgets_the_name(tmp_path, kernel_env, monkeypatch) -> None:
    cells = [
        "%load_ext nbpipe",
        "f = 'the notebook'",
        "%%task load\nimport io\nwith io.StringIO('x') as f:\n    data = [1]",
        "%%task load\ndata = [2]",     # the same cell, edited: no `with ... as f` now
        "%%task use\nuse = (f, data)",
        "print(use)",
    ]
    r = execute(tmp_path / "again.ipynb", cells, monkeypatch)
    no_errors(r, *range(6))
    assert last(r[5]) == "('the notebook', [2])"


def test_export_refuses_an_import_from_another_task_cell_as_the_magic_does(tmp_path) -> None:
    from nbpipe.export import ExportError, export_notebook

    notebook = tmp_path / "imports.ipynb"
    cells = ["%%task load\nimport numpy as np\ndata = np.arange(3)", "%%task stats\nm = np.mean(data)"]
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells]), notebook)
    with pytest.raises(ExportError, match=r"cell 2 \(%%task stats\): reads 'np', a module that %%task "
                                          r"load imports; modules are not task outputs: `import numpy "
                                          r"as np` in this cell"):
        export_notebook(notebook)
    cells.insert(1, "import numpy as np")  # imported in a plain cell: every cell may use it
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells]), notebook)
    assert "def stats(np, data):" in export_notebook(notebook).script
