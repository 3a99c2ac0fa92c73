"""User modules reach the workers, as people write and run their code.

Every case is a script written at module level (no ``__main__`` guard) with the user's own modules
beside it -- ``mylib.py``, a local package, a folder put on ``sys.path`` -- run with ``python`` in a
fresh process. Most run on a *shared* cluster: a Dask scheduler and two ``dask worker`` processes
this module starts in a folder of their own, with none of the user's folders on their path, as a
cluster someone started before the module existed (``Pipeline(cluster="tcp://...")``). The workers
are restarted before each test, so no test sees modules an earlier one left in them. Worker ``A``
advertises ``gpus=1`` and worker ``B`` ``memory``: a task asking for ``gpus=1`` runs on A and one
asking for ``memory=`` on B, which makes a value cross from one worker to the other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import Client
from helpers import execute_notebook, new_notebook, notebook_text, reap

TIMEOUT = 300  # seconds for one script on a loaded 2-core machine

MYLIB = '''
import dataclasses

K = 2


def f(x):
    return x * K


@dataclasses.dataclass
class Point:
    x: int
    where: str = ""

    def doubled(self):
        return self.x * K
'''


def _dask(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([str(Path(sys.executable).parent / "dask"), *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A scheduler and two workers started in a folder of their own; the scheduler's address."""
    home = tmp_path_factory.mktemp("cluster-home")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DASK_NBPIPE__CLUSTER")}
    scheduler_file = home / "scheduler.json"
    procs = [_dask("scheduler", "--port", "0", "--dashboard-address", ":0",
                   "--scheduler-file", str(scheduler_file), cwd=home, env=env)]
    try:
        deadline = time.monotonic() + 120
        while not scheduler_file.exists():
            assert time.monotonic() < deadline, "the scheduler did not start"
            time.sleep(0.2)
        for name, resources in (("A", "gpus=1"), ("B", "memory=4e9")):
            procs.append(_dask("worker", "--scheduler-file", str(scheduler_file), "--nthreads",
                               "1", "--name", name, "--resources", resources, cwd=home, env=env))
        address = json.loads(scheduler_file.read_text())["address"]
        with Client(address, timeout=120) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for proc in reversed(procs):
            reap(proc)


@pytest.fixture
def cluster_address(shared: str) -> str:
    """The shared cluster, its workers restarted: they know none of the user's modules."""
    with Client(shared, timeout=120) as client:
        client.restart(timeout=120)
        client.wait_for_workers(2, timeout=120)
        assert not any(client.run(lambda: "mylib" in sys.modules).values())
    return shared


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "DASK_NBPIPE__CLUSTER", "NBPIPE_STORE", "NBPIPE_PIPELINE")}
    env["NBPIPE_WIDGETS"] = "0"
    return env


def _project(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def _run(script: Path, *args: str, cwd: Path | None = None) -> str:
    """``python script ARGS`` in ``cwd`` (default: the script's folder); its output, which must
    end well."""
    proc = subprocess.run([sys.executable, str(script), *args], cwd=cwd or script.parent,
                          env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _script(body: str) -> str:
    """A script's text: ``body`` (dedented), then the run and a line of its results."""
    return textwrap.dedent(body) + REPORT


def _results(out: str) -> dict[str, object]:
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


REPORT = '''
summary = pipe.run()
print("RESULT " + json.dumps({"executed": summary.executed, "failed": summary.failed,
                              **{k: v.result() for k, v in refs.items()}}))
pipe.close()
'''


PACKAGE = {
    "pkg/__init__.py": "",
    "pkg/helpers.py": '''
        SCALE = 10

        def scale(x):
            return x * SCALE
    ''',
    "pkg/sub.py": '''
        from . import helpers
        from .helpers import SCALE


        def f(x):
            return helpers.scale(x) + SCALE


        def late(x):
            from .helpers import scale  # a relative import when the task runs
            return scale(x) - 1
    ''',
    "pkg/deep/__init__.py": "from .inner import base\n",
    "pkg/deep/inner.py": "def base():\n    return 100\n",
}


HEAD = """
import json, sys
from pathlib import Path
from nbpipe import Pipeline
"""

#: One way of writing per case, each alone in its script: cloudpickle sends a function by value
#: once *any* task has registered its module, so two ways in one script would hide each other.
#: (files beside the script, the script's own lines, the values its tasks must give)
CASES: dict[str, tuple[dict[str, str], str, dict[str, int]]] = {
    "function of mylib as the task": ({"mylib.py": MYLIB}, """
        import mylib
        refs = {"f": pipe.task(mylib.f)(3)}
    """, {"f": 6}),
    "mylib.f called in the task": ({"mylib.py": MYLIB}, """
        import mylib

        @pipe.task
        def g(x):
            return mylib.f(x) + 1

        refs = {"g": g(3)}
    """, {"g": 7}),
    "import mylib as m": ({"mylib.py": MYLIB}, """
        import mylib as m

        @pipe.task
        def aliased(x):
            return m.f(x)

        refs = {"aliased": aliased(1)}
    """, {"aliased": 2}),
    "from mylib import f as g, as the task": ({"mylib.py": MYLIB}, """
        from mylib import f as g
        refs = {"g": pipe.task(g)(5)}
    """, {"g": 10}),
    "from mylib import f as g, called in the task": ({"mylib.py": MYLIB}, """
        from mylib import f as g

        @pipe.task
        def renamed(x):
            return g(x) + 1

        refs = {"renamed": renamed(1)}
    """, {"renamed": 3}),
    "imports inside the task body": ({"mylib.py": MYLIB}, """
        @pipe.task
        def inside(x):
            import mylib as lib
            from mylib import Point as P
            return P(x).doubled() + lib.K

        refs = {"inside": inside(1)}
    """, {"inside": 4}),
    "package submodule function as the task": (PACKAGE, """
        import pkg.sub
        refs = {"f": pipe.task(pkg.sub.f)(1)}
    """, {"f": 20}),
    "package function with a relative import at run time": (PACKAGE, """
        from pkg.sub import late
        refs = {"late": pipe.task(late)(1)}
    """, {"late": 9}),
    "package and its subpackage called in the task": (PACKAGE, """
        import pkg.sub
        from pkg import deep

        @pipe.task
        def uses(x):
            return pkg.sub.f(x) + deep.base()

        refs = {"uses": uses(1)}
    """, {"uses": 120}),
    "folder put on sys.path, function as the task": ({"../shared/code/mylib.py": MYLIB}, """
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "shared" / "code"))
        import mylib
        refs = {"f": pipe.task(mylib.f)(4)}
    """, {"f": 8}),
    "folder put on sys.path, called in the task": ({"../shared/code/mylib.py": MYLIB}, """
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "shared" / "code"))
        import mylib

        @pipe.task
        def g(x):
            return mylib.Point(x).doubled()

        refs = {"g": g(5)}
    """, {"g": 10}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_modules_reach_workers_that_cannot_import_them(
        case: str, tmp_path: Path, cluster_address: str) -> None:
    files, body, values = CASES[case]
    project = tmp_path / "project"
    _project(project, files)
    _project(project, {"flow.py": _script(
        HEAD + f'pipe = Pipeline("flow", cluster="{cluster_address}")\n' +
        textwrap.dedent(body))})
    assert _results(_run(project / "flow.py")) == {"executed": len(values), "failed": [],
                                                   **values}
    # run again: nothing runs, the values are read back
    assert _results(_run(project / "flow.py")) == {"executed": 0, "failed": [], **values}


OBJECTS = '''
    import json, sys
    from distributed import get_worker
    from nbpipe import Pipeline
    import mylib

    FACTOR = int(sys.argv[1])
    pipe = Pipeline("objects", cluster="{address}")


    @pipe.task(gpus=1)  # on worker A
    def make(i):
        return mylib.Point(i, where=get_worker().name)


    @pipe.task(memory="1GB")  # on worker B; its code never names mylib
    def total(points):
        return [sum(p.x for p in points) * FACTOR, [p.where for p in points], get_worker().name]


    refs = {{"total": total([make(1), make(-3)])}}
'''


def test_objects_of_a_module_class_cross_from_one_worker_to_another(
        tmp_path: Path, cluster_address: str) -> None:
    """Results that are objects of the user's classes reach a consumer on another worker: handed
    over in memory (the consumer waits for them), and read back from their files (a later run
    whose workers were restarted)."""
    _project(tmp_path, {"mylib.py": MYLIB, "objects.py": _script(OBJECTS.format(
        address=cluster_address))})
    first = _results(_run(tmp_path / "objects.py", "1"))
    assert first["total"] == [-2, ["A", "A"], "B"]
    assert first["executed"] == 3
    with Client(cluster_address, timeout=120) as client:
        client.restart(timeout=120)
        client.wait_for_workers(2, timeout=120)
    again = _results(_run(tmp_path / "objects.py", "2"))
    assert again["executed"] == 1  # only the consumer: it reads make's results from their files
    assert again["total"] == [-4, ["A", "A"], "B"]


def test_a_module_edited_between_runs_on_a_long_lived_cluster(
        tmp_path: Path, cluster_address: str) -> None:
    """The workers keep the module of the first run in memory; the second run's code runs, and
    the first run's result is not reused."""
    _project(tmp_path, {"mylib.py": MYLIB, "flow.py": _script(f'''
        import json
        from nbpipe import Pipeline
        import mylib

        pipe = Pipeline("flow", cluster="{cluster_address}")

        @pipe.task
        def g(x):
            import mylib
            return mylib.Point(x).doubled()

        refs = {{"f": pipe.task(mylib.f)(3), "g": g(3)}}
        print("WHY", pipe.why(refs["f"]), "|", pipe.why(refs["g"]))
    ''')})
    assert _results(_run(tmp_path / "flow.py")) == {"executed": 2, "failed": [], "f": 6, "g": 6}
    mylib = tmp_path / "mylib.py"
    mylib.write_text(mylib.read_text().replace("K = 2", "K = 5"))
    out = _run(tmp_path / "flow.py")
    assert _results(out) == {"executed": 2, "failed": [], "f": 15, "g": 15}
    why = [x for x in out.splitlines() if x.startswith("WHY")][-1]
    assert why == "WHY global `K` changed | global `mylib.K` changed", why


def test_a_script_run_from_another_directory_on_the_default_local_cluster(
        tmp_path: Path) -> None:
    """``python sub/flow.py``: Python puts the script's folder on ``sys.path``, not the working
    directory; the workers of nbpipe's own cluster find ``mylib`` beside the script too."""
    _project(tmp_path, {"sub/mylib.py": MYLIB, "sub/flow.py": _script('''
        import json
        from nbpipe import Pipeline
        import mylib

        pipe = Pipeline("flow")

        @pipe.task
        def g(x):
            return mylib.Point(x).doubled()

        @pipe.task
        def read():
            with open("data.txt") as f:  # relative: the folder the script was started in
                return f.read()

        refs = {"f": pipe.task(mylib.f)(2), "g": g(2), "read": read()}
    ''')})
    (tmp_path / "data.txt").write_text("from the driver's folder")
    out = _run(Path("sub") / "flow.py", cwd=tmp_path)
    assert _results(out) == {"executed": 3, "failed": [], "f": 4, "g": 4,
                             "read": "from the driver's folder"}


def test_a_notebook_beside_its_module_on_a_shared_cluster(
        tmp_path: Path, cluster_address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBPIPE_WIDGETS", "0")
    monkeypatch.setenv("DASK_NBPIPE__CLUSTER", cluster_address)
    for name in ("PYTHONPATH", "NBPIPE_STORE", "NBPIPE_PIPELINE"):
        monkeypatch.delenv(name, raising=False)
    _project(tmp_path, {"mylib.py": MYLIB})
    path = tmp_path / "analysis.ipynb"
    new_notebook(path, [
        "%load_ext nbpipe",
        "import mylib\nfrom nbpipe import task\nfrom distributed import get_worker",
        "%%task points --gpus 1\npoints = [mylib.Point(i, where=get_worker().name) "
        "for i in range(3)]",
        "%%task total --memory 1GB\n"
        "total = [sum(p.x for p in points), get_worker().name]",
        "f = task(mylib.f)\nten = f(5)",
        "@task\ndef g(x):\n    import mylib as m\n    return m.Point(x).doubled()\ntwelve = g(6)",
        "print('VALUES', total, ten.result(), twelve.result())",
    ])
    text = notebook_text(execute_notebook(path))
    assert "VALUES [3, 'B'] 10 12" in text


def test_a_relative_path_on_a_shared_cluster_says_where_it_was_looked_for(
        tmp_path: Path, cluster_address: str) -> None:
    """The workers of a cluster started elsewhere keep their own working directory (two
    pipelines from two folders may share one worker process): a relative path that is not found
    there names the worker's folder and the driver's, and the fix."""
    (tmp_path / "data.txt").write_text("here")
    _project(tmp_path, {"flow.py": f"""
        from nbpipe import Pipeline

        pipe = Pipeline("flow", cluster="{cluster_address}")

        @pipe.task
        def read():
            with open("data.txt") as f:
                return f.read()

        ref = read()
        print(pipe.run().failed)
        print("ERROR", pipe.tasks()[0].error)
        print("TRACEBACK", repr(ref.traceback))
    """})
    out = _run(tmp_path / "flow.py")
    error = [x for x in out.splitlines() if x.startswith("ERROR")][0]
    traceback = [x for x in out.splitlines() if x.startswith("TRACEBACK")][0]
    assert ", in read\\n" in traceback and "nbpipe" not in traceback, traceback  # users' code only
    assert "FileNotFoundError: [Errno 2] No such file or directory on this worker, whose " \
        "working directory is " in error, error
    assert f"not {tmp_path} where the pipeline was defined (a relative path is looked for " \
        "there); give the task an absolute path (e.g. Path('data.txt').resolve() in your " \
        "script), or start the workers in that folder: 'data.txt'" in error, error


def test_a_module_that_cannot_travel_fails_on_the_worker_naming_it_and_the_fix(
        tmp_path: Path, cluster_address: str) -> None:
    """A lock at module level: the module cannot be pickled by value. The driver warns once;
    a task that imports it on a worker that cannot fails with a message naming the module, why
    and what to do; a function of it that does not touch the lock still runs."""
    _project(tmp_path, {"locked.py": """
        import threading

        LOCK = threading.Lock()


        def f(x):
            return x + 1
    """, "flow.py": f"""
        import locked
        from nbpipe import Pipeline

        pipe = Pipeline("flow", cluster="{cluster_address}")

        @pipe.task
        def uses(x):
            import locked
            return locked.f(x) * 10

        ok = pipe.task(locked.f)(1)
        bad = uses(1)
        print(pipe.run().failed)
        print("VALUE", ok.result())
        print("ERROR", [t.error for t in pipe.tasks() if t.error][0])
    """})
    proc = subprocess.run([sys.executable, str(tmp_path / "flow.py")], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "VALUE 2" in proc.stdout
    error = [x for x in proc.stdout.splitlines() if x.startswith("ERROR")][0]
    assert error == (
        "ERROR ModuleNotFoundError: No module named 'locked' on this worker: nbpipe could not "
        "send your module 'locked' to the workers by value (TypeError: cannot pickle "
        "'_thread.lock' object). Make it importable on the workers (install it, or put its "
        "folder on the workers' PYTHONPATH), or keep values that cannot be pickled (locks, open "
        "files, clients) out of its module level"), error
    assert proc.stderr.count("which cannot be sent to the workers by value") == 1, proc.stderr


def test_the_documented_module_example_runs_on_a_cluster_that_cannot_import_it(
        tmp_path: Path, cluster_address: str) -> None:
    """docs/concepts.md, "Your modules on the workers": its ``mylib.py`` and script, as printed,
    on the shared cluster (given as a user's environment would: ``DASK_NBPIPE__CLUSTER``)."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "concepts.md").read_text()
    section = page.split("## Your modules on the workers", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("\n", 1)[1] for b in section.split("```python")[1:3]]
    module, script = (b.split("```", 1)[0] for b in blocks)
    assert module.startswith("# mylib.py\n")
    (tmp_path / "mylib.py").write_text(module)
    (tmp_path / "script.py").write_text(script)
    proc = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=TIMEOUT,
                          env={**_env(), "DASK_NBPIPE__CLUSTER": cluster_address})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "[0.0, 5.0, 10.0]", proc.stdout
    assert "6 executed" in proc.stdout, proc.stdout


def test_a_module_made_after_the_cluster_started_in_the_test_process(
        tmp_path: Path, pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    """The report this file answers: ``mylib.py`` written into a test's ``tmp_path`` and put on
    ``sys.path`` after the session's LocalCluster started, ``pipe.task(mylib.f)`` alone."""
    (tmp_path / "mylib.py").write_text(MYLIB)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mylib", raising=False)
    import mylib  # type: ignore[import-not-found]

    try:
        assert pipe.task(mylib.f)(3).result() == 6
    finally:
        sys.modules.pop("mylib", None)
