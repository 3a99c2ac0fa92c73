"""The bad input catalogue: every mistake a user can make on each surface, with its message.

One list of cases (``CASES``) drives both the tests below and ``docs/errors.md``; the page is
generated from it (``python tests/test_errors.py`` rewrites it) and a test keeps it in sync.
Each case runs the real thing (a Pipeline on real SQLite, an IPython shell with ``%load_ext
nbpipe``, the click command, ``nbpipe.yaml`` files, the REST API on a real Jupyter server) and
checks the error type, that the message names the task, cell or option, and the whole message
against the documented one (``…`` stands for a part that varies: a path, a pid).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import dask
import pytest
from click.testing import CliRunner
from IPython.terminal.interactiveshell import TerminalInteractiveShell
from IPython.testing.globalipapp import start_ipython
from tornado.httpclient import HTTPClientError

from nbpipe import In, Out, Pipeline, load_tasks, task
from nbpipe.cli import main as cli_main
from nbpipe.store import SCHEMA_VERSION, RunnerLock, Store

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "errors.md"

SURFACES = ("Python API", "magics", "command line", "configuration", "REST")


@dataclass(frozen=True)
class Case:
    """One mistake: how to make it, what the user sees, how to fix it."""

    surface: str
    mistake: str  # what the user did (Markdown)
    error: str  # exception class, "exit 2" for the command line, "HTTP 4xx" for REST
    message: str  # the message, with … for parts that vary
    names: str  # the task, cell, option or thing the message must name
    fix: str  # how to fix it (Markdown)
    action: Any = None  # python/config: callable(tmp); magics: cell source; cli: argv; REST: request
    setup: tuple[str, ...] = field(default=())  # magics: cells run first; config: nbpipe.yaml text

    @property
    def id(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", f"{self.surface} {self.mistake}".lower()).strip("-")[:70]


def matches(documented: str, actual: str) -> bool:
    """``actual`` is ``documented`` where each ``…`` stands for any text."""
    pattern = ".*?".join(re.escape(part) for part in documented.split("…"))
    return re.fullmatch(pattern, actual, flags=re.DOTALL) is not None


# -- Python API ---------------------------------------------------------------------------------


def job() -> int:
    """A task body for the catalogue."""
    return 1


LOCK = __import__("threading").Lock()


def uses_lock() -> bool:
    """A task body that reads a global nbpipe cannot hash."""
    return LOCK.locked()


def takes_two(x: int, y: int = 0) -> int:
    """A task body with two parameters."""
    return x + y


def _pipe(tmp: Path, name: str = "demo", **kw: Any) -> Pipeline:
    return Pipeline(name, store=tmp / ".nbpipe", **kw)


def _two_tasks_one_output(tmp: Path) -> None:
    pipe = _pipe(tmp)

    def first(out: Annotated[Path, Out]) -> None:
        out.write_text("first")

    def second(out: Annotated[Path, Out]) -> None:
        out.write_text("second")

    pipe.task(first)(tmp / "same.txt")
    pipe.task(second)(tmp / "same.txt")
    pipe.run()


def _missing_input(tmp: Path) -> None:
    pipe = _pipe(tmp)

    def smooth(raw: Annotated[Path, In]) -> str:
        return raw.read_text()

    pipe.task(smooth)(tmp / "raw.csv")
    pipe.run()


def _cycle(tmp: Path) -> None:
    pipe = _pipe(tmp)

    def a() -> int:
        return 1

    def b() -> int:
        return 2

    pipe.task(a, after=["b"])()
    pipe.task(b, after=["a"])()
    pipe.run()


def _other_pipeline(tmp: Path) -> None:
    upstream = _pipe(tmp, "other").task(job)()
    _pipe(tmp).task(takes_two)(upstream)


def _unknown_after(tmp: Path) -> None:
    pipe = _pipe(tmp)
    pipe.task(job, after="lod")()
    pipe.run()  # names in after= are looked up when the graph is resolved


def _other_pipeline_after(tmp: Path) -> None:
    upstream = _pipe(tmp, "other").task(job)()
    _pipe(tmp).task(takes_two, after=upstream)(1)


def _hidden_in_namedtuple(tmp: Path) -> None:
    from collections import namedtuple

    pipe = _pipe(tmp)
    point = namedtuple("Point", "x y")(pipe.task(job)(), 2)
    pipe.task(takes_two)(point)


def _deep_damaged_store(tmp: Path) -> None:
    """A store whose header and schema are intact, its ``tasks`` table's pages zeroed."""
    import sqlite3

    pipe = _pipe(tmp)
    for i in range(20):
        pipe.task(takes_two)("x", i)
    pipe.resolve()
    pipe.close()
    db = tmp / ".nbpipe" / "nbpipe.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = [n for (n,) in conn.execute("SELECT pageno FROM dbstat WHERE name = 'tasks'")]
    with open(db, "r+b") as f:
        for number in pages:
            f.seek((number - 1) * size)
            f.write(bytes(size))
    _pipe(tmp).tasks()


def _damaged_store(tmp: Path, data: bytes | None = None, cut: bool = False) -> None:
    store = tmp / ".nbpipe"
    if cut:  # a real store, cut in half
        pipe = _pipe(tmp)
        for i in range(20):
            pipe.task(takes_two)("x" * 4000, i)
        pipe.resolve()
        pipe.close()
        db = store / "nbpipe.sqlite"
        import sqlite3

        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        Path(f"{db}-wal").unlink(missing_ok=True)
        data = db.read_bytes()[: db.stat().st_size // 2]
    store.mkdir(exist_ok=True)
    (store / "nbpipe.sqlite").write_bytes(data or b"")
    _pipe(tmp)


def _set_state(tmp: Path) -> None:
    from nbpipe import State

    ref = _pipe(tmp).task(job)()
    ref.state = State.SUCCEEDED


def _async(tmp: Path) -> None:
    async def fetch() -> int:
        return 1

    task(fetch)


def _pipe_on_newer_store(tmp: Path) -> None:
    Store(tmp / ".nbpipe").close()
    import sqlite3

    with sqlite3.connect(tmp / ".nbpipe" / "nbpipe.sqlite") as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    _pipe(tmp)


def _store_on_nfs(tmp: Path) -> None:
    """A store in a folder the mount table lists as NFS (the line as the kernel writes it)."""
    from nbpipe.store import mounts

    home = tmp / "home"
    home.mkdir()
    table = tmp / "mounts"
    table.write_text(f"10.10.0.5:/export/home {home} nfs4 rw,relatime,vers=4.2 0 0\n")
    before, mounts.MOUNTS = mounts.MOUNTS, str(table)
    try:
        _pipe(home)
    finally:
        mounts.MOUNTS = before


def _database_on_another_host(tmp: Path) -> None:
    """A store whose database another host keeps on its local disk."""
    (tmp / ".nbpipe").mkdir()
    (tmp / ".nbpipe" / "database.json").write_text(json.dumps(
        {"path": "/tmp/ada/survey.sqlite", "host": "node-a"}))
    _pipe(tmp)


def _busy(tmp: Path, **run: Any) -> None:
    """Run a pipeline that another process runs (its runner lock is held, as by that process)."""
    from nbpipe.store import RunnerLock

    pipe = _pipe(tmp)
    pipe.task(job)()
    other = RunnerLock(pipe.store, "demo")
    other.acquire()
    try:
        pipe.run(**run)
    finally:
        other.release()


def _ends_its_process(tmp: Path) -> None:
    import os

    def ender() -> int:
        os._exit(3)

    pipe = _pipe(tmp, cluster={"kind": "local", "workers": 1})
    try:
        pipe.task(ender)().result()
    finally:
        pipe.close()


@contextlib.contextmanager
def _cluster_elsewhere(tmp: Path) -> Any:
    """A client of a one-worker LocalCluster whose worker runs in another folder and was started
    before anything of ``tmp`` was on ``sys.path`` (a cluster someone else started)."""
    import os

    from distributed import Client, LocalCluster

    here = os.getcwd()
    (tmp / "elsewhere").mkdir()
    os.chdir(tmp / "elsewhere")
    try:
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                               dashboard_address=":0")
    finally:
        os.chdir(here)
    with cluster, Client(cluster) as client:
        yield client


def _module_that_cannot_travel(tmp: Path) -> None:
    with _cluster_elsewhere(tmp) as client:
        (tmp / "lockedlib.py").write_text("import threading\n\nLOCK = threading.Lock()\n\n\n"
                                          "def f(x):\n    return x + 1\n")
        sys.path.insert(0, str(tmp))
        try:
            pipe = _pipe(tmp, cluster=client)

            def uses(x: int) -> int:
                import lockedlib

                return lockedlib.f(x)

            try:
                pipe.task(uses)(1).result()
            finally:
                pipe.close()
        finally:
            sys.path.remove(str(tmp))
            sys.modules.pop("lockedlib", None)


def _relative_path_elsewhere(tmp: Path) -> None:
    (tmp / "data.txt").write_text("here")
    with _cluster_elsewhere(tmp) as client:
        pipe = _pipe(tmp, cluster=client)

        def read() -> str:
            with open("data.txt") as f:
                return f.read()

        try:
            pipe.task(read)().result()
        finally:
            pipe.close()


def _task_file(tmp: Path, name: str, text: str) -> None:
    (tmp / name).write_text(text)
    load_tasks(tmp / name)


PYTHON = [
    Case("Python API", '`@task(memory="lots")`', "TaskDefinitionError",
         "task 'job': memory='lots' is not a size; use e.g. '4GB', '500MiB' or a number of bytes",
         "memory", "Give a size with a unit: `memory=\"4GB\"`.",
         lambda tmp: task(memory="lots")(job)),
    Case("Python API", '`@task(walltime="soon")`', "TaskDefinitionError",
         "task 'job': walltime='soon' is not a duration; use 'HH:MM:SS', 'D-HH:MM:SS', '2h', "
         "'30min' or a number of seconds", "walltime", 'Give a duration: `walltime="01:30:00"`.',
         lambda tmp: task(walltime="soon")(job)),
    Case("Python API", "A misspelt option, `@task(retrys=2)`", "TaskDefinitionError",
         "task 'job': unknown option(s) retrys (did you mean retries?); valid options are after, "
         "cache, cores, env, env_inputs, gpus, max_concurrent, memory, name, pool, retries, "
         "retry_memory_factor, retry_on, timeout, trust_existing, version, walltime", "retrys",
         "Use one of the listed options.",
         lambda tmp: task(retrys=2)(job)),
    Case("Python API", '`@task(cores="4")` (a string)', "TaskDefinitionError",
         "task 'job': cores='4' must be an integer >= 1", "cores", "Pass a number: `cores=4`.",
         lambda tmp: task(cores="4")(job)),
    Case("Python API", "`@task(timeout=0)`", "TaskDefinitionError",
         "task 'job': timeout=0 is not a duration longer than 0 s; use e.g. '10m', '1h', '00:30:00' "
         "or a number of seconds (leave it out for no limit)", "timeout",
         'Give a duration: `timeout="10m"`, or leave it out.', lambda tmp: task(timeout=0)(job)),
    Case("Python API", '`@task(retry_on=["segfault"])`', "TaskDefinitionError",
         "task 'job': retry_on has the unknown kind 'segfault'; the kinds are exception, timeout, "
         "exit, lost", "retry_on", "List kinds from the message.",
         lambda tmp: task(retry_on=["segfault"])(job)),
    Case("Python API", '`Pipeline(defaults={"retires": 2})`', "TaskDefinitionError",
         "Pipeline('demo', defaults=...): unknown task default 'retires' (did you mean 'retries'?); "
         "defaults can set retries, timeout, retry_on, trust_existing (resources stay per task)",
         "'retires'", "Fix the name; resources such as `cores=` stay on each task.",
         lambda tmp: _pipe(tmp, defaults={"retires": 2})),
    Case("Python API", "`pipe.accept(ref)` for a task that never succeeded", "NbpipeError",
         "task 'job' of pipeline 'demo' has no earlier successful run whose result is kept, so "
         "there is nothing to accept; run it instead", "'job'", "Run the task instead.",
         lambda tmp: (lambda p: p.accept(p.task(job)()))(_pipe(tmp))),
    Case("Python API", "`@task(retries=-1)`", "TaskDefinitionError",
         "task 'job': retries=-1 must be an integer >= 0", "retries",
         "Pass how many attempts to add after the first failure, 0 or more.",
         lambda tmp: task(retries=-1)(job)),
    Case("Python API", '`@task(env=["OMP_NUM_THREADS=4"])` (a list)', "TaskDefinitionError",
         "task 'job': env=['OMP_NUM_THREADS=4'] must be a dict of variable names to strings", "env",
         'Pass a dict: `env={"OMP_NUM_THREADS": "4"}`.',
         lambda tmp: task(env=["OMP_NUM_THREADS=4"])(job)),
    Case("Python API", '`@task(cache="no")`', "TaskDefinitionError",
         "task 'job': cache='no' must be True or False", "cache", "Pass `cache=False`.",
         lambda tmp: task(cache="no")(job)),
    Case("Python API", "`@task(version=1.5)` (a float)", "TaskDefinitionError",
         "task 'job': version=1.5 must be a str or int", "version", 'Use `version=2` or `version="1.5"`.',
         lambda tmp: task(version=1.5)(job)),
    Case("Python API", "`@task(after=3)`", "TaskDefinitionError",
         "task 'job': after= takes task references or task names, not int", "after",
         "Pass the task's reference or its name: `after=[load]` or `after=\"load\"`.",
         lambda tmp: task(after=3)(job)),
    Case("Python API", "`@task(retry_memory_factor=0.5)`", "TaskDefinitionError",
         "task 'job': retry_memory_factor=0.5 must be a number >= 1, e.g. 1.5 (the memory request "
         "grows by that factor on each retry after its worker died)", "retry_memory_factor",
         "Use a factor of 1 or more.", lambda tmp: task(retry_memory_factor=0.5)(job)),
    Case("Python API", "`task(42)`: decorating something that is not a function",
         "TaskDefinitionError",
         "@task needs a function, got 42; put @task on a def (or call task(fn) with a function)",
         "@task", "Put `@task` above a `def`.", lambda tmp: task(42)),
    Case("Python API", "`task(job, retries=2)`: the function and options together", "TaskDefinitionError",
         "@task on 'job': pass options with the decorator, @task(retries=...), not with the function",
         "'job'", "Write `task(retries=2)(job)` or `@task(retries=2)` above the def.",
         lambda tmp: task(job, retries=2)),
    Case("Python API", "`@task` on an `async def`", "TaskDefinitionError",
         "task 'fetch': async and generator functions cannot be tasks; return a value instead",
         "'fetch'", "Make it a plain function that returns its value.", _async),
    Case("Python API", "Calling a task with arguments its function does not take", "TaskDefinitionError",
         "task 'takes_two': too many positional arguments; its signature is takes_two(x: …, "
         "y: … = 0) -> …", "takes_two",
         "Call it as its signature says.", lambda tmp: _pipe(tmp).task(takes_two)(1, 2, 3)),
    Case("Python API", "`@task(env_inputs=\"OUTPUT DIR\")`: not a variable name", "TaskDefinitionError",
         "task 'job': env_inputs='OUTPUT DIR' must be a list of environment variable names, e.g. "
         "env_inputs=['OUTPUT_DIR']", "env_inputs",
         "Name the variables the task reads: `env_inputs=[\"OUTPUT_DIR\"]`.",
         lambda tmp: task(env_inputs="OUTPUT DIR")(job)),
    Case("Python API", "A global nbpipe cannot hash (a lock the task reads)", "UnhashableValue",
         "task 'uses_lock' reads global 'LOCK', a _thread.lock, which nbpipe cannot hash "
         "deterministically; pass it as an argument of a type nbpipe can hash (numbers, strings, "
         "paths, lists, dicts, numpy arrays, dataclasses, objects of your own classes), give its "
         "class a __nbpipe_token__() method, or build it inside the task", "'LOCK'",
         "Build the object inside the task, or give its class a `__nbpipe_token__()` method.",
         lambda tmp: _pipe(tmp).task(uses_lock)()),
    Case("Python API", "An argument nbpipe cannot hash (a lock)", "UnhashableValue",
         "task 'takes_two': argument 'x' is a _thread.lock, which nbpipe cannot hash "
         "deterministically; pass a value of a type nbpipe can hash (numbers, strings, paths, "
         "lists, dicts, numpy arrays, dataclasses), give its class a __nbpipe_token__() method, or "
         "build the object inside the task", "'x'",
         "Pass plain data, or give the class a `__nbpipe_token__()` method.",
         lambda tmp: _pipe(tmp).task(takes_two)(threading.Lock())),
    Case("Python API", "A task of one pipeline passed to a task of another", "TaskDefinitionError",
         "task 'takes_two' got <TaskRef job WAITING> from pipeline 'other'; tasks can only depend on "
         "tasks of the same pipeline ('demo')", "takes_two",
         "Register both tasks in the same pipeline.", _other_pipeline),
    Case("Python API", '`after="lod"`: a name no task has', "UnknownTask",
         "task 'job' has after='lod', but no task of pipeline 'demo' has that name; register it "
         "first or fix the name", "'lod'", "Fix the name, or register that task first.",
         _unknown_after),
    Case("Python API", "`after=` a task of another pipeline", "TaskDefinitionError",
         "task 'takes_two' has after='job' from pipeline 'other'; tasks can only wait for tasks of "
         "the same pipeline ('demo'): run the other pipeline first, or define that task in this one",
         "takes_two", "Register both tasks in the same pipeline.", _other_pipeline_after),
    Case("Python API", "A task result inside a namedtuple argument", "TaskDefinitionError",
         "task 'takes_two': an argument holds a task result inside a Point; nbpipe finds task "
         "results only in lists, tuples and dicts (the data dependencies): pass the result "
         "directly, or in one of those", "Point",
         "Pass the result itself, or a list, tuple or dict of results.", _hidden_in_namedtuple),
    Case("Python API", '`@task(walltime="00:00:00")`', "TaskDefinitionError",
         "task 'job': walltime='00:00:00' must be a finite duration longer than 0 s (no scheduler "
         "gives a job more, or less); e.g. '01:30:00', or leave it out for no limit of nbpipe's",
         "walltime", 'Give a duration: `walltime="01:30:00"`, or none.',
         lambda tmp: task(walltime="00:00:00")(job)),
    Case("Python API", '`@task(walltime=float("inf"))`', "TaskDefinitionError",
         "task 'job': walltime=inf must be a finite duration longer than 0 s (no scheduler "
         "gives a job more, or less); e.g. '01:30:00', or leave it out for no limit of nbpipe's",
         "walltime", "Leave `walltime` out for no limit.", lambda tmp: task(walltime=float("inf"))(job)),
    Case("Python API", '`@task(memory=float("inf"))`', "TaskDefinitionError",
         "task 'job': memory=inf is not a size; use e.g. '4GB', '500MiB' or a number of bytes",
         "memory", "Give a size: `memory=\"4GB\"`.", lambda tmp: task(memory=float("inf"))(job)),
    Case("Python API", '`@task(env={"A=B": "1"})`: a variable name with `=`', "TaskDefinitionError",
         "task 'job': env has the variable name 'A=B'; a name cannot be empty or contain '=' or a "
         "NUL byte: write env={'NAME': 'value'}", "'A=B'", 'Write `env={"A": "B"}`.',
         lambda tmp: task(env={"A=B": "1"})(job)),
    Case("Python API", "`fn.map(5)`: not an iterable", "TaskDefinitionError",
         "task 'takes_two': map() takes an iterable of items (a list, a range, ...), not int 5; e.g. "
         "takes_two.map(range(5))", "map()", "Pass a list or a range: `fn.map(range(5))`.",
         lambda tmp: _pipe(tmp).task(takes_two).map(5)),
    Case("Python API", "`Pipeline(store=123)`", "InvalidArgument",
         "store=123 is not a folder: pass a path (a str or pathlib.Path) such as store='.nbpipe', or "
         "leave it out for ./.nbpipe", "store=123", "Pass a folder path.",
         lambda tmp: Pipeline("demo", store=123)),
    Case("Python API", "A store whose `nbpipe.sqlite` is not a database", "StoreDamaged",
         "the store …/.nbpipe is damaged: SQLite cannot read nbpipe.sqlite (file is not a database); "
         "copy the folder aside (cp -a …/.nbpipe …/.nbpipe.damaged), then recover what SQLite can "
         "with `sqlite3 …/.nbpipe.damaged/nbpipe.sqlite .recover | sqlite3 …/.nbpipe/nbpipe.sqlite` "
         "after removing the damaged nbpipe.sqlite, or start a new store; result files stay valid "
         "and the next run adopts them", ".nbpipe",
         "Follow the message: copy the store aside and `.recover` it, or start a new store.",
         lambda tmp: _damaged_store(tmp, bytes(range(256)) * 64)),
    Case("Python API", "A store that opens but whose `tasks` table is damaged (its pages zeroed)",
         "StoreDamaged",
         "the store …/.nbpipe is damaged: SQLite cannot read nbpipe.sqlite (database disk image is "
         "malformed); copy the folder aside (cp -a …/.nbpipe …/.nbpipe.damaged), then recover what "
         "SQLite can with `sqlite3 …/.nbpipe.damaged/nbpipe.sqlite .recover | sqlite3 "
         "…/.nbpipe/nbpipe.sqlite` after removing the damaged nbpipe.sqlite, or start a new store; "
         "result files stay valid and the next run adopts them", ".nbpipe",
         "Copy the store aside and `.recover` it, or start a new store (any method that meets the "
         "damage says the same).", lambda tmp: _deep_damaged_store(tmp)),
    Case("Python API", "A store whose `nbpipe.sqlite` was cut short", "StoreDamaged",
         "the store …/.nbpipe is damaged: SQLite cannot read nbpipe.sqlite (…); copy the folder "
         "aside …", ".nbpipe",
         "Copy the store aside and `.recover` it, or start a new store.",
         lambda tmp: _damaged_store(tmp, cut=True)),
    Case("Python API", "Tasks that wait for each other (a cycle of `after=`)", "CycleError",
         "tasks form a cycle: … -> … -> …; remove one of these dependencies (an after= or an "
         "In/Out file)", "cycle", "Remove one of the dependencies named.", _cycle),
    Case("Python API", "Two tasks declaring the same `Out` file", "TaskDefinitionError",
         "tasks 'first(out=…)' and 'second(out=…)' both declare …/same.txt as their output; give "
         "each task its own output path", "same.txt", "Give each task its own output path.",
         _two_tasks_one_output),
    Case("Python API", "An `In` file that does not exist and that no task writes", "MissingInputError",
         "task 'smooth(raw=…)' reads …/raw.csv, which does not exist and which no task of the "
         "pipeline declares as an Out file; create the file, fix the path, or register the task "
         "that writes it", "raw.csv", "Create the file, fix the path, or register its producer.",
         _missing_input),
    Case("Python API", "`Pipeline(max_concurrent=0)`", "TaskDefinitionError",
         "pipeline 'p': max_concurrent=0 must be a whole number >= 1 (tasks running at once), or "
         "None for no cap", "max_concurrent", "Give a number of tasks, or leave it out.",
         lambda tmp: Pipeline("p", store=tmp / ".nbpipe", max_concurrent=0)),
    Case("Python API", '`Pipeline("")`', "TaskDefinitionError",
         "a pipeline needs a non-empty name, got ''", "name", "Name the pipeline.",
         lambda tmp: Pipeline("", store=tmp / ".nbpipe")),
    Case("Python API", "A store path that is a file", "StoreNotWritable",
         "cannot create the nbpipe store at …/notes.txt: File exists; choose a writable directory "
         "with Pipeline(store=...) or the NBPIPE_STORE variable", "notes.txt",
         "Point `store=` at a directory.",
         lambda tmp: ((tmp / "notes.txt").write_text("x"), Pipeline("p", store=tmp / "notes.txt"))),
    Case("Python API", "A store written by a newer nbpipe", "StoreVersionError",
         "the store … was written by a newer nbpipe (schema …; this nbpipe knows …); upgrade nbpipe "
         "(pip install -U nbpipe) or use another store; the store was left untouched",
         "newer nbpipe", "Upgrade nbpipe, or use another store.", lambda tmp: _pipe_on_newer_store(tmp)),
    Case("Python API", "A store on a network file system (NFS, Lustre, GPFS, ...)", "StoreOnNetworkFS",
         "the store's database …/home/.nbpipe/nbpipe.sqlite would lie on a network file system (nfs4 "
         "10.10.0.5:/export/home mounted on …/home), where SQLite's write-ahead log does not work "
         "across hosts (each host keeps its own index of it: the database can be corrupted); keep "
         "the database on a local disk of the host that runs the pipeline and the result files in "
         "…/home/.nbpipe: set NBPIPE_DATABASE=/tmp/$USER/home.sqlite (or `database:` in nbpipe.yaml, "
         "or Store(..., database=...)); see docs/store.md, 'A store on a cluster'", "nfs4",
         "Keep the database on a local disk (`NBPIPE_DATABASE`); results stay on the shared "
         "folder.", _store_on_nfs),
    Case("Python API", "A store whose database another host keeps on its local disk", "StoreError",
         "the store …/.nbpipe keeps its database on the local disk of host 'node-a' "
         "(/tmp/ada/survey.sqlite), and this is host '…': run nbpipe on 'node-a', or move the "
         "database back into the store folder (`mv /tmp/ada/survey.sqlite …/.nbpipe/nbpipe.sqlite` "
         "there, then remove …/.nbpipe/database.json) -- see docs/store.md, 'A store on a cluster'",
         "node-a", "Run nbpipe on that host, or move the database back.", _database_on_another_host),
    Case("Python API", '`Pipeline(store="mysql://db.example.org/survey")`', "InvalidArgument",
         "store='mysql://db.example.org/survey' is a URL nbpipe cannot open: a store is a folder "
         "(store='.nbpipe') or a PostgreSQL database (store='postgresql://user@host/db', with "
         "results=DIR); see docs/store.md", "URL",
         "Pass a folder, or a `postgresql://` URL with `results=` (docs/store.md).",
         lambda tmp: Pipeline("survey", store="mysql://ada:pw@db.example.org/survey")),
    Case("Python API", "A PostgreSQL store whose server cannot be reached", "StoreUnreachable",
         "the store postgresql://ada@127.0.0.1:9/survey cannot be used: …; check that the "
         "PostgreSQL server runs and the URL (host, port, user, database, password or ~/.pgpass) "
         "is right", "127.0.0.1:9",
         "Start the server, or correct the URL (the message never shows the password).",
         lambda tmp: Pipeline("survey", store="postgresql://ada:pw@127.0.0.1:9/survey",
                              results=tmp / "results")),
    Case("Python API", "`results=` given with a store folder", "InvalidArgument",
         "results='…/elsewhere': the store …/.nbpipe keeps its result files in its own folder; "
         "results= goes with a PostgreSQL store (store='postgresql://...')", "results=",
         "Leave `results=` out for a folder store.",
         lambda tmp: Pipeline("survey", store=tmp / ".nbpipe", results=str(tmp / "elsewhere"))),
    Case("Python API", "`NBPIPE_DATABASE` set for a store that keeps its database in its folder",
         "StoreError",
         "the store …/.nbpipe keeps its database in its folder (nbpipe.sqlite), and the database "
         "setting names …/elsewhere.sqlite: unset the setting (NBPIPE_DATABASE, database:) for "
         "this store, or move …/.nbpipe/nbpipe.sqlite to …/elsewhere.sqlite first, with no nbpipe "
         "process using the store", "nbpipe.sqlite",
         "Unset the setting for this store, or move its database there first.",
         lambda tmp: (Store(tmp / ".nbpipe").close(),
                      Store(tmp / ".nbpipe", database=tmp / "elsewhere.sqlite"))),
    Case("Python API", '`Pipeline(cluster="lots")`', "ClusterError",
         "cluster='lots' is not something nbpipe can run on; use 'local', a batch scheduler kind "
         "(slurm, pbs, sge, lsf, htcondor), a scheduler address like 'tcp://host:8786', a dict like "
         "{'kind': 'slurm', 'cores': 1, 'memory': '2GB'}, a dask Cluster or a Client", "'lots'",
         "Use one of the listed forms.", lambda tmp: _pipe(tmp, cluster="lots")),
    Case("Python API", "A misspelt job option, `cluster={..., \"coers\": 4}`", "ClusterError",
         "cluster pool 'default': 'coers' is not an option of slurm jobs; did you mean 'cores'? see "
         "`nbpipe cluster slurm` and dask-jobqueue's SLURMCluster for the options", "'coers'",
         "Fix the option's name.",
         lambda tmp: _pipe(tmp, cluster={"kind": "slurm", "coers": 4, "cores": 1, "memory": "1GB"})),
    Case("Python API", '`cluster={"kind": "slurm", "security": "maybe"}`', "ClusterError",
         "cluster security='maybe': use True (temporary TLS certificates, the default), a mapping of "
         "distributed.Security options, a Security object, or False to turn TLS off", "security",
         "Leave it out (TLS on), or pass one of the listed values.",
         lambda tmp: _pipe(tmp, cluster={"kind": "slurm", "cores": 1, "memory": "1GB",
                                         "security": "maybe"})),
    Case("Python API", '`pipe.tasks(state="DONE")`', "InvalidArgument",
         "pipeline 'demo': tasks(state='DONE') is not a state; use one of WAITING, PENDING, RUNNING, "
         "SUCCEEDED, FAILED, UPSTREAM_FAILED, KILLED", "state", "Use one of the listed states.",
         lambda tmp: _pipe(tmp).tasks(state="DONE")),
    Case("Python API", '`pipe.kill("nope")`: an unknown task', "UnknownTask",
         "no task 'nope' in pipeline 'demo'; see pipe.tasks()", "'nope'",
         "Use a name or label from `pipe.tasks()`.", lambda tmp: _pipe(tmp).kill("nope")),
    Case("Python API", "`pipe.retry()` with nothing to retry", "TaskDefinitionError",
         "pipe.retry() needs tasks to retry, or failed=True", "retry",
         "Name the tasks, or pass `failed=True`.", lambda tmp: _pipe(tmp).retry()),
    Case("Python API", "`fn.map(items, chunksize=0)`", "TaskDefinitionError",
         "task 'job': chunksize=0 must be an integer >= 1", "chunksize", "Use a chunk size of 1 or more.",
         lambda tmp: _pipe(tmp).task(job).map([1], chunksize=0)),
    Case("Python API", "`load_tasks` on a file that does not exist", "TaskfileError",
         "task file …/tasks.yaml does not exist", "tasks.yaml", "Fix the path.",
         lambda tmp: load_tasks(tmp / "tasks.yaml")),
    Case("Python API", "A task file entry without `task_id`", "TaskfileError",
         "task file …/tasks.yaml, entry 2: each entry needs a task_id (and optional data)",
         "entry 2", "Give every entry a `task_id`.",
         lambda tmp: _task_file(tmp, "tasks.yaml", "- task_id: a\n- data: 1\n")),
    Case("Python API", "A task file with the same `task_id` twice", "TaskfileError",
         "task file …/tasks.json, entry 2: task_id 'a' appears twice; ids must be unique", "'a'",
         "Make the ids unique.",
         lambda tmp: _task_file(tmp, "tasks.json", '[{"task_id": "a"}, {"task_id": "a"}]')),
    Case("Python API", "A task file that is not valid YAML", "TaskfileError",
         "task file …/tasks.yaml is not valid YAML: …", "tasks.yaml", "Fix the YAML.",
         lambda tmp: _task_file(tmp, "tasks.yaml", "- task_id: [a\n")),
    Case("Python API", "A task file with another extension", "TaskfileError",
         "task file …/tasks.txt: use a .json, .yaml, .yml or .jsonl file", "tasks.txt",
         "Rename it to .json, .yaml, .yml or .jsonl.", lambda tmp: _task_file(tmp, "tasks.txt", "[]")),
    Case("Python API", "`pipe.run()` while another process runs the pipeline", "PipelineBusy",
         "pipeline 'demo' is already being run by pid …; wait for it to finish, watch it with "
         "`nbpipe tasks`, or stop it with `nbpipe pause` (only one process may run a pipeline at a "
         "time); to wait for that runner and then run what it left, use "
         "pipe.run(wait_for_runner=True)", "wait_for_runner",
         "Pass `wait_for_runner=True` (scripts that only want results), or pause the other runner.",
         _busy),
    Case("Python API", "`pipe.run(wait_for_runner=True, timeout=1)` while the other runner keeps "
         "going", "PipelineBusy",
         "pipeline 'demo' is already being run by pid …; still so after waiting 1 s "
         "(wait_for_runner=True)", "wait_for_runner",
         "Wait longer (`timeout=None` waits until it ends), or pause the other runner.",
         lambda tmp: _busy(tmp, wait_for_runner=True, timeout=1)),
    Case("Python API", "A task that ends its own process (`os._exit(3)`, a segfault in C code)",
         "TaskFailed",
         "task 'ender' failed: task 'ender' ended its worker process: the process exited with code "
         "3 (os._exit() or exit() in the task or in C code it called)\n", "code 3",
         "Return or raise instead of exiting; `nbpipe logs PIPELINE TASK` shows what it printed "
         "(and, after a crash in C code, its traceback).", _ends_its_process),
    Case("Python API", "Setting a task's state by hand, `ref.state = State.SUCCEEDED`",
         "AttributeError",
         "task 'job': ref.state is read-only (nbpipe records where a task is in its run); run, "
         "retry or kill the task instead: pipe.run(), pipe.retry(ref), pipe.kill(ref)",
         "'job'", "Let nbpipe move the task: `pipe.run()`, `pipe.retry(ref)` or `pipe.kill(ref)`; "
         "read `ref.run_state` for its state, attempts, error and result file at one moment.",
         _set_state),
    Case("Python API", "A task imports a module of yours whose top level holds a lock, on workers "
         "that cannot import it", "ModuleNotFoundError",
         "No module named 'lockedlib' on this worker: "
         "nbpipe could not send your module 'lockedlib' to the workers by value (TypeError: "
         "cannot pickle '_thread.lock' object). Make it importable on the workers (install it, or "
         "put its folder on the workers' PYTHONPATH), or keep values that cannot be pickled "
         "(locks, open files, clients) out of its module level", "'lockedlib'",
         "Install the module where the workers run (or add its folder to their `PYTHONPATH`), or "
         "build the lock inside a function.", _module_that_cannot_travel),
    Case("Python API", "A task opens a relative path on a cluster whose workers run in another "
         "folder", "FileNotFoundError",
         "[Errno 2] No such file or directory on this worker, whose working directory is …, not "
         "… where the pipeline was defined (a relative path is looked for there); give the task "
         "an absolute path (e.g. Path('data.txt').resolve() in your script), or start the "
         "workers in that folder: 'data.txt'",
         "'data.txt'", "Pass `Path(\"data.txt\").resolve()` from the script, or declare the file "
         "with `In`.", _relative_path_elsewhere),
]


# -- magics -------------------------------------------------------------------------------------

MAGICS = [
    Case("magics", "A `%%task` cell reads IPython's history (`Out`)", "UsageError",
         "%%task t: the cell reads 'Out', which IPython defines in this kernel only (its history or "
         "shell), so a task cannot use it on a worker; copy what you need into a variable of your "
         "own in a plain cell (e.g. `value = Out`) and read that", "'Out'",
         "Copy the value into a variable of your own in a plain cell, and read that.",
         "%%task t\nt = len(Out)"),
    Case("magics", "`%%task x --retrys 2`: an option `%%task` does not have", "UsageError",
         "unrecognized arguments: --retrys 2", "--retrys",
         "See `%%task?` for the options.", "%%task x --retrys 2\nx = 1"),
    Case("magics", "`%%task x --memory lots`", "TaskDefinitionError",
         "task 'x': memory='lots' is not a size; use e.g. '4GB', '500MiB' or a number of bytes",
         "memory", "Give a size with a unit: `--memory 4GB`.", "%%task x --memory lots\nx = 1"),
    Case("magics", "`%%task x --retries many`", "UsageError",
         "argument --retries: invalid int value: 'many'", "--retries",
         "Give a number.", "%%task x --retries many\nx = 1"),
    Case("magics", "`%%task x --env OMP`: not KEY=VALUE", "UsageError",
         "%%task x: --env takes KEY=VALUE pairs, got 'OMP'; e.g. --env OMP_NUM_THREADS=4", "--env",
         "Write `--env OMP_NUM_THREADS=4`.", "%%task x --env OMP\nx = 1"),
    Case("magics", "A `%%task` cell that assigns nothing and has no name", "UsageError",
         "this cell assigns nothing, so name it: %%task NAME", "%%task NAME",
         "Name the task: `%%task report`.", "%%task\nprint('hello')"),
    Case("magics", "`%%task --bash` without a name", "UsageError",
         "a --bash cell needs a name: %%task NAME --bash", "--bash", "Name it: `%%task fetch --bash`.",
         "%%task --bash\necho hi"),
    Case("magics", "A syntax error in a `%%task` cell", "SyntaxError",
         "'(' was never closed (<task broken>, line 1)", "<task broken>", "Fix the cell's code.",
         "%%task broken\ny = (2 +\n"),
    Case("magics", "A `%%task` cell reading a name nothing defines", "CellInputError",
         "task 'x' reads 'nowhere', but no task output, variable or builtin has that name; define "
         "'nowhere' in a cell (or a %%task cell) and run it first", "'nowhere'",
         "Define the name first (or fix the typo).", "%%task x\nx = nowhere + 1"),
    Case("magics", "A `%%task` cell using a module another `%%task` cell imports", "CellInputError",
         "task 'stats' reads 'np', a module that %%task load imports; modules are not task outputs: "
         "`import numpy as np` in this cell", "'np'",
         "Import the module in the cell that uses it (or once in a plain cell).",
         "%%task stats\nm = np.mean(data)",
         ("%%task load\nimport numpy as np\ndata = np.arange(3)",)),
    Case("magics", "A plain cell using a module only a `%%task` cell imports", "CellInputError",
         "this cell reads 'math', a module that %%task load imports; modules are not task outputs: "
         "`import math` in this cell", "'math'", "Import the module in this cell.", "math.pi",
         ("%%task load\nimport math\ny = math.floor(2.5)",)),
    Case("magics", "Reading a `%%task` cell's `with ... as` name", "OutputNotStored",
         "'f' is not an output of %%task read: it is bound by `with ... as f`, whose value (a file, "
         "a lock) is closed when the block ends; compute it in the cell that reads it", "%%task read",
         "Use the value inside the `with` block, or open it again in the cell that needs it.",
         "f.read()", ("%%task read\nimport io\nwith io.StringIO('text') as f:\n    x = f.read()",)),
    Case("magics", "A `%%task` line with an unclosed quote", "UsageError",
         "cannot split the %%task line 'x --env \"MSG=hello': No closing quotation", "--env",
         "Close the quote: `--env \"MSG=hello world\"`.", "%%task x --env \"MSG=hello\nx = 1"),
    Case("magics", "Cells that read each other's outputs (a cycle)", "CycleError",
         "cells form a cycle: … -> … -> a; a cell cannot read what a cell downstream of it produces",
         "a", "Move the shared computation into its own cell.", "%%task a\na = b + 1",
         ("%%task a\na = 1", "%%task b\nb = a + 1")),
    Case("magics", "`%%task y --after lod`: a task that does not exist", "UnknownTask",
         "%%task y: --after lod names no task of pipeline '…' (its tasks: none yet); run the cell "
         "that defines 'lod' first, or fix the name", "lod",
         "Run the cell that defines it first, or fix the name.", "%%task y --after lod\ny = 1"),
    Case("magics", "Reading a `%%task` cell's value that cannot be pickled (a lock)", "OutputNotStored",
         "'lock' is not an output of %%task locks: it holds a _thread.lock, which cannot be stored "
         "(cannot pickle '_thread.lock' object); compute it in the cell that reads it", "%%task locks",
         "Keep such objects inside the cell, or build them in the cell that uses them.",
         "lock", ("%%task locks\nimport threading\nlock = threading.Lock()",)),
    Case("magics", "`%pipeline use other` while tasks of this pipeline run", "UsageError",
         "pipeline '…': 1 task(s) are running; wait for them (pipe.wait(), %pipeline wait) or kill "
         "them before switching to pipeline 'other'", "'other'",
         "Wait for the tasks (`%pipeline wait`) or kill them, then switch.", "%pipeline use other",
         ("%%task nap\nimport time\ntime.sleep(3)\nnap = 1",
          "import time\nnap_ref = get_ipython()._nbpipe_session.pipe._by_label['nap']\n"
          "deadline = time.monotonic() + 60\n"
          "while nap_ref.state.value != 'RUNNING' and time.monotonic() < deadline:\n"
          "    time.sleep(0.02)")),
    Case("magics", "A task whose return value cannot be pickled", "TypeError",
         "the return value of task 'locked' (a lock) cannot be pickled (cannot pickle "
         "'_thread.lock' object); return plain data (numbers, strings, lists, dicts, arrays) and "
         "build such objects where they are used", "return value",
         "Return plain data; build the object where it is used.",
         "locked().result()",
         ("from nbpipe import task\n\n@task\ndef locked():\n    import threading\n"
          "    return threading.Lock()",)),
    Case("magics", "`%pipeline frobnicate`", "UsageError",
         "argument command: invalid choice: 'frobnicate' (choose from …)\nusage: …", "frobnicate",
         "Use one of the listed commands.", "%pipeline frobnicate"),
    Case("magics", "`%pipeline why nope`: an unknown task", "UsageError",
         "no task 'nope' in pipeline '…'; see pipe.tasks() for names", "'nope'",
         "Use a name from `%pipeline status`.", "%pipeline why nope"),
    Case("magics", "`%pipeline retry` with nothing to retry", "UsageError",
         "%pipeline retry NAME... or %pipeline retry --failed", "retry",
         "Name the tasks, or add `--failed`.", "%pipeline retry"),
    Case("magics", "`%pipeline cluster warp`", "UsageError",
         "cluster='warp' is not something nbpipe can run on; use 'local', …", "'warp'",
         "Use `local`, a batch scheduler kind or an address.", "%pipeline cluster warp"),
    Case("magics", "`%pipeline cluster pbs memory=lots`", "UsageError",
         "cluster pool 'default': memory='lots' is not a size; use e.g. '16GB'", "memory",
         "Give a size with a unit.", "%pipeline cluster pbs cores=1 memory=lots"),
    Case("magics", "`%pipeline export` in a kernel that does not know its notebook", "UsageError",
         "this kernel does not know its notebook file; use `nbpipe export NOTEBOOK.ipynb` in a "
         "terminal", "nbpipe export", "Export from a terminal.", "%pipeline export"),
    Case("magics", "`%pipeline autorun maybe`", "UsageError",
         "argument mode: invalid choice: 'maybe' (choose from …on…, …off…)\nusage: …", "maybe",
         "Use `on` or `off`.", "%pipeline autorun maybe"),
]

# -- command line -------------------------------------------------------------------------------

CLI = [
    Case("command line", "No store here and no `--store`", "exit 2",
         "no .nbpipe store here or in any parent directory; give one with --store DIR", "--store",
         "Run it in the project folder or pass `--store DIR`.", ["pipelines"]),
    Case("command line", "`--store` pointing at a folder that is not a store", "exit 2",
         "… is not an nbpipe store (no nbpipe.sqlite in it)", "nbpipe.sqlite",
         "Point it at the `.nbpipe` folder.", ["--store", "{tmp}", "pipelines"]),
    Case("command line", "`nbpipe tasks nope`: an unknown pipeline", "exit 2",
         "no pipeline named 'nope' in the store …; `nbpipe pipelines` lists the pipelines of a "
         "store", "'nope'", "Use a name from `nbpipe pipelines`.", ["--store", "{store}", "tasks", "nope"]),
    Case("command line", "`nbpipe show demo nope`: an unknown task", "exit 2",
         "no task 'nope' in pipeline 'demo'; `nbpipe tasks demo` lists its tasks", "'nope'",
         "Use a name from `nbpipe tasks demo`.", ["--store", "{store}", "show", "demo", "nope"]),
    Case("command line", "`nbpipe tasks demo --downstream nope`: an unknown task", "exit 2",
         "no task 'nope' in pipeline 'demo'; `nbpipe tasks demo` lists its tasks", "'nope'",
         "Use a name from `nbpipe tasks demo`.",
         ["--store", "{store}", "tasks", "demo", "--downstream", "nope"]),
    Case("command line", "`nbpipe accept demo nope`: an unknown task", "exit 2",
         "no task 'nope' in pipeline 'demo'; `nbpipe tasks demo` lists its tasks", "'nope'",
         "Use a name from `nbpipe tasks demo`.", ["--store", "{store}", "accept", "demo", "nope"]),
    Case("command line", "`nbpipe tasks demo --as-taskfile out.txt`", "exit 2",
         "task file …/out.txt: use a .json, .yaml, .yml or .jsonl file", "out.txt",
         "Name a `.json`, `.yaml` or `.jsonl` file.",
         ["--store", "{store}", "tasks", "demo", "--as-taskfile", "{tmp}/out.txt"]),
    Case("command line", "`nbpipe tasks demo --state DONE`", "exit 2",
         "Invalid value for '--state': 'DONE' is not one of …", "--state", "Use one of the listed states.",
         ["--store", "{store}", "tasks", "demo", "--state", "DONE"]),
    Case("command line", "`nbpipe retry demo` without tasks or `--failed`", "exit 2",
         "name tasks to retry, or use --failed", "--failed", "Name tasks or add `--failed`.",
         ["--store", "{store}", "retry", "demo"]),
    Case("command line", "`nbpipe kill demo` without tasks or `--all`", "exit 2",
         "name tasks to kill, or use --all", "--all", "Name tasks or add `--all`.",
         ["--store", "{store}", "kill", "demo"]),
    Case("command line", "`nbpipe logs demo job --attempt 9`: an attempt that never was", "exit 2",
         "task 'job' has no attempt 9; it has 1", "attempt 9", "Use an attempt `nbpipe show` lists.",
         ["--store", "{store}", "logs", "demo", "job", "--attempt", "9"]),
    Case("command line", "`nbpipe graph demo -o graph.pdf`", "exit 2",
         "-o takes a .svg, .png or .dot file", "-o", "Write .svg, .png or .dot.",
         ["--store", "{store}", "graph", "demo", "-o", "{tmp}/graph.pdf"]),
    Case("command line", "`nbpipe run job.py --skip ''`: an empty pattern", "exit 2",
         "Invalid value for --skip: nbpipe run --skip: skip pattern '' matches no task; give a task "
         "name, label, glob or state (e.g. 'FAILED', 'fit*')", "--skip",
         "Give a state, a name, a label or a glob.", ["run", "{script}", "--skip", ""]),
    Case("command line", "`nbpipe run missing.py`", "exit 2",
         "Invalid value for 'SCRIPT': File '…missing.py' does not exist.", "missing.py", "Fix the path.",
         ["run", "{tmp}/missing.py"]),
    Case("command line", "`nbpipe run job.py --cluster warp`", "exit 2",
         "cluster='warp' is not something nbpipe can run on; …", "'warp'",
         "Use `local`, a batch scheduler kind or an address.", ["run", "{script}", "--cluster", "warp"]),
    Case("command line", "`nbpipe run job.py --cluster slurm -o memory`: an option without a value",
         "exit 2", "cluster option 'memory': write KEY=VALUE, e.g. memory=4GB", "memory",
         "Write `-o memory=4GB`.", ["run", "{script}", "--cluster", "slurm", "-o", "memory"]),
    Case("command line", "`nbpipe export broken.ipynb`: not a notebook", "exit 2",
         "…broken.ipynb: not a readable notebook …", "broken.ipynb", "Export a saved .ipynb file.",
         ["export", "{tmp}/broken.ipynb"]),
    Case("command line", "`nbpipe cluster slurm cores=1 memory=lots`", "exit 2",
         "cluster pool 'default': memory='lots' is not a size; use e.g. '16GB'", "memory",
         "Give a size with a unit.", ["cluster", "slurm", "cores=1", "memory=lots"]),
    Case("command line", "`nbpipe delete nope`: an unknown pipeline", "exit 2",
         "no pipeline named 'nope' in the store …; `nbpipe pipelines` lists the pipelines of a "
         "store", "'nope'", "Use a name from `nbpipe pipelines`.", ["--store", "{store}", "delete", "nope"]),
    Case("command line", "`nbpipe gc` while a runner of the store is live", "exit 2",
         "nbpipe gc removes nothing while a runner is live in the store … (pid … on … (demo)): its "
         "workers write results the store does not list yet; run gc again once it has finished",
         "runner is live", "Wait for the run to end, then run `nbpipe gc` again.",
         ["--store", "{store}", "gc"], ("live runner",)),
    Case("command line", "`nbpipe delete demo --force` while a runner of `demo` is live", "exit 2",
         "cannot delete pipeline 'demo': it is being run by pid … on …; wait for the run to "
         "finish, or stop it (`nbpipe kill demo --all`, or end that process), then delete it",
         "'demo'", "Let the run finish (or stop it), then delete.",
         ["--store", "{store}", "delete", "demo", "--force"], ("live runner",)),
    Case("command line", "`nbpipe graph demo -o missing/graph.svg`: a folder that does not exist",
         "exit 2", "Invalid value for '-o' / '--output': the folder …/missing does not exist; create "
         "it first (mkdir -p) or write elsewhere", "missing", "Create the folder first.",
         ["--store", "{store}", "graph", "demo", "-o", "{tmp}/missing/graph.svg"]),
    Case("command line", "`nbpipe export nb.ipynb -o missing/nb.py`", "exit 2",
         "Invalid value for '-o' / '--output': the folder …/missing does not exist; create it first "
         "(mkdir -p) or write elsewhere", "--output", "Create the folder first.",
         ["export", "{tmp}/broken.ipynb", "-o", "{tmp}/missing/nb.py"]),
    Case("command line", "`nbpipe show demo ''`: an empty task name", "exit 2",
         "no task '' in pipeline 'demo'; `nbpipe tasks demo` lists its tasks", "''",
         "Name a task from `nbpipe tasks demo`.", ["--store", "{store}", "show", "demo", ""]),
    Case("command line", "`--store` naming a store whose database is damaged", "exit 2",
         "the store …/damaged is damaged: SQLite cannot read nbpipe.sqlite (file is not a "
         "database); copy the folder aside (cp -a …/damaged …/damaged.damaged), then recover what "
         "SQLite can with `sqlite3 …/damaged.damaged/nbpipe.sqlite .recover | sqlite3 "
         "…/damaged/nbpipe.sqlite` after removing the damaged nbpipe.sqlite, or start a new store; "
         "result files stay valid and the next run adopts them", "damaged",
         "Copy the store aside and `.recover` it (`nbpipe doctor` says the same).",
         ["--store", "{tmp}/damaged", "tasks", "demo"]),
    Case("command line", "`--store` naming a store written by a newer nbpipe", "exit 2",
         "the store …/newer was written by a newer nbpipe (schema 99; this nbpipe knows …); "
         "upgrade nbpipe (pip install -U nbpipe) or use another store; the store was left untouched",
         "newer",
         "Upgrade nbpipe.", ["--store", "{tmp}/newer", "pipelines"]),
    Case("command line", "`nbpipe frobnicate`", "exit 2", "No such command 'frobnicate'.",
         "frobnicate", "See `nbpipe --help`.", ["frobnicate"]),
    Case("command line", "`nbpipe --json why demo job`: `--json` on a command without a listing",
         "exit 2", "--json: `nbpipe why` has no machine-readable output; the commands that have "
         "one are doctor, events, pipelines, show, tasks", "--json",
         "Drop `--json`; it goes with `pipelines`, `tasks`, `show`, `events` and `doctor`, before or after "
         "the command name.", ["--json", "--store", "{store}", "why", "demo", "job"]),
]

# -- configuration ------------------------------------------------------------------------------

CONFIG = [
    Case("configuration", "`nbpipe.yaml` that is not valid YAML", "ConfigError",
         "…/nbpipe.yaml: cannot read it as YAML (…); fix or remove the file", "nbpipe.yaml",
         "Fix the YAML.", None, ("cluster: [slurm\n",)),
    Case("configuration", "`nbpipe.yaml` holding a list", "ConfigError",
         "…/nbpipe.yaml: the file must hold a mapping of nbpipe settings (like 'cluster: local'), "
         "not a list", "nbpipe.yaml", "Write `key: value` settings.", None, ("- slurm\n",)),
    Case("configuration", "A misspelt setting, `clsuter: slurm`", "ConfigError",
         "…/nbpipe.yaml: unknown setting 'clsuter' (did you mean 'cluster'?); nbpipe reads cluster, "
         "idle-timeout, batch-seconds, database, store, results-dir, inline-bytes, task, run, "
         "store-patience, store-busy-timeout, max-concurrent, max-jobs, min-jobs",
         "'clsuter'", "Fix the setting's name.", None, ("clsuter: slurm\n",)),
    Case("configuration", "`task: {retry_on: [exeption]}`: a misspelt kind of failure", "ConfigError",
         "…/nbpipe.yaml: task: retry_on has the unknown kind 'exeption' (did you mean 'exception'?); "
         "the kinds are exception, timeout, exit, lost", "retry_on", "Fix the kind's name.", None,
         ("task: {retry_on: [exeption]}\n",)),
    Case("configuration", "`task: {cores: 4}`: a resource as a task default", "ConfigError",
         "…/nbpipe.yaml: task: unknown task default 'cores'; defaults can set retries, timeout, "
         "retry_on, trust_existing (resources stay per task)", "'cores'",
         "Set resources on each task (`@task(cores=4)`) or on the cluster.", None,
         ("task: {cores: 4}\n",)),
    Case("configuration", "`run: {skip: 3}`", "ConfigError",
         "…/nbpipe.yaml: run: skip=3 must be a task name, label, glob or state (e.g. 'FAILED', "
         "'fit*'), or a list of them", "skip", "Write a pattern or a list: `skip: [FAILED, fit*]`.",
         None, ("run: {skip: 3}\n",)),
    Case("configuration", "`run: {stop-on-failure: maybe}`", "ConfigError",
         "…/nbpipe.yaml: run: stop-on-failure='maybe' must be true or false", "stop-on-failure",
         "Write `true` or `false`.", None, ("run: {stop-on-failure: maybe}\n",)),
    Case("configuration", "`database: 3`", "ConfigError",
         "…/nbpipe.yaml: database=3 must be a path to the store's SQLite file on a local disk (for a "
         "store folder on a network file system; result files stay in the folder)", "database",
         "Give a path such as `/tmp/$USER/project.sqlite`.", None, ("database: 3\n",)),
    Case("configuration", "`batch-seconds: soon`", "ConfigError",
         "…/nbpipe.yaml: batch-seconds='soon' must be a finite number of seconds >= 0 (0 turns off "
         "batching tiny tasks and fusing chains of them)", "batch-seconds", "Give a number of seconds.", None,
         ("batch-seconds: soon\n",)),
    Case("configuration", "`idle-timeout: forever`", "ConfigError",
         "…/nbpipe.yaml: idle-timeout='forever' must be a finite duration such as '60s' (how long a batch "
         "pool keeps jobs it no longer needs)", "idle-timeout", "Give a duration.", None,
         ("idle-timeout: forever\n",)),
    Case("configuration", "`cluster: warp`", "ClusterError",
         "cluster='warp' is not something nbpipe can run on; …", "'warp'",
         "Use `local`, a batch scheduler kind or an address.", None, ("cluster: warp\n",)),
    Case("configuration", "`cluster: {kind: local, cores: 4}`", "ClusterError",
         "cluster kind 'local' takes only 'workers'; remove cores", "cores",
         "Use `workers:` for a local cluster.", None, ("cluster: {kind: local, cores: 4}\n",)),
    Case("configuration", "A Slurm cluster without cores and memory", "ClusterError",
         "cluster pool 'default': say how many cores and how much memory each slurm job has, e.g. "
         "cluster={'kind': 'slurm', 'cores': 4, 'memory': '16GB'}, or set jobqueue.slurm.cores and "
         "jobqueue.slurm.memory in Dask's configuration", "cores",
         "Add `cores:` and `memory:`.", None, ("cluster: {kind: slurm, queue: short}\n",)),
    Case("configuration", "A pool with `cores: lots`", "ClusterError",
         "cluster pool 'big': cores='lots' must be an integer >= 1", "'big'", "Give a number.", None,
         ("cluster: {kind: slurm, cores: 1, memory: 1GB, pools: {big: {cores: lots}}}\n",)),
    Case("configuration", "`batch-seconds: .inf`", "ConfigError",
         "…/nbpipe.yaml: batch-seconds=inf must be a finite number of seconds >= 0 (0 turns "
         "off batching tiny tasks and fusing chains of them)", "batch-seconds",
         "Give a finite number of seconds.", None,
         ("batch-seconds: .inf\n",)),
    Case("configuration", "`inline-bytes: .inf`", "ConfigError",
         "…/nbpipe.yaml: inline-bytes=inf must be a finite whole number of bytes >= 0 (results of "
         "quick tasks up to this size are kept in the store's database; 0: every result is a file)",
         "inline-bytes", "Give a number of bytes, e.g. `4096`.", None, ("inline-bytes: .inf\n",)),
    Case("configuration", "`max-concurrent: 0`", "ConfigError",
         "…/nbpipe.yaml: max-concurrent=0 must be a whole number >= 1 (tasks of a pipeline running "
         "at once; unset: no cap)", "max-concurrent", "Give a number of tasks, or remove the line.",
         None, ("max-concurrent: 0\n",)),
    Case("configuration", "`store-patience: soon`", "ConfigError",
         "…/nbpipe.yaml: store-patience='soon' must be a finite number of seconds >= 0 (how long a "
         "runner retries a store that cannot be written before it stops and run() raises)",
         "store-patience", "Give a number of seconds.", None, ("store-patience: soon\n",)),
    Case("configuration", "`store-busy-timeout: 0`", "ConfigError",
         "…/nbpipe.yaml: store-busy-timeout=0 must be a finite number of seconds > 0 (how long a "
         "process waits for another one's write to an SQLite store before it gives up)",
         "store-busy-timeout", "Give a number of seconds, e.g. `120` on a slow disk.", None,
         ("store-busy-timeout: 0\n",)),
    Case("configuration", "`max-jobs: 0`", "ConfigError",
         "…/nbpipe.yaml: max-jobs=0 must be a whole number >= 1 (a batch pool's jobs at most, "
         "unless its cluster spec says max_jobs)", "max-jobs", "Give a whole number of jobs, e.g. "
         "`8`.", None, ("max-jobs: 0\n",)),
    Case("configuration", "An `nbpipe.yaml` that is not UTF-8", "ConfigError",
         "…/nbpipe.yaml: the file is not UTF-8 text (byte 0xe9 at offset 20); save it as UTF-8",
         "nbpipe.yaml", "Save the file as UTF-8.", None, ("cluster: local\n# caf\xe9\n",)),
    Case("configuration", "`DASK_NBPIPE__INLINE_BYTES=lots`", "ConfigError",
         "the environment variable DASK_NBPIPE__INLINE_BYTES: inline-bytes='lots' must be a finite "
         "whole number of bytes >= 0 (results of quick tasks up to this size are kept in the "
         "store's database; 0: every result is a file)", "DASK_NBPIPE__INLINE_BYTES",
         "Set a number of bytes, or unset the variable.", {"env": ("DASK_NBPIPE__INLINE_BYTES", "lots")}, ()),
    Case("configuration", '`dask.config.set({"nbpipe.batch-seconds": "soon"})`', "ConfigError",
         "dask.config 'nbpipe.batch-seconds': batch-seconds='soon' must be a finite number of "
         "seconds >= 0 (0 turns off batching tiny tasks and fusing chains of them)", "nbpipe.batch-seconds",
         "Set a number of seconds.", {"nbpipe.batch-seconds": "soon"}, ()),
    Case("configuration", '`dask.config.set({"nbpipe.cluster": "warp"})`', "ClusterError",
         "cluster='warp' is not something nbpipe can run on; …", "'warp'",
         "Use `local`, a batch scheduler kind or an address.", "dask.config", ()),
]

# -- REST ---------------------------------------------------------------------------------------

S = "analysis/.nbpipe"
REST = [
    Case("REST", "`GET graph` without `store`", "HTTP 400", "Missing argument store", "store",
         "Add `store=` (the store folder, relative to the server root).",
         ("GET", "graph", {"pipeline": "run"})),
    Case("REST", "`GET graph` of an unknown pipeline", "HTTP 404",
         "no pipeline named 'nope' in the store …; `nbpipe pipelines` lists the pipelines of a "
         "store", "'nope'", "Use a name from `GET pipelines`.",
         ("GET", "graph", {"store": S, "pipeline": "nope"})),
    Case("REST", "A store outside the server root", "HTTP 403",
         "store '../outside/.nbpipe' is outside the server root", "store",
         "Open stores under the folder Jupyter serves.",
         ("GET", "graph", {"store": "../outside/.nbpipe", "pipeline": "run"})),
    Case("REST", "A folder that is not a store", "HTTP 404", "'analysis' is not an nbpipe store",
         "'analysis'", "Name the `.nbpipe` folder.",
         ("GET", "graph", {"store": "analysis", "pipeline": "run"})),
    Case("REST", "`GET events` with `since=abc`", "HTTP 400",
         "since must be an event id (an integer from 0 to 2**63 - 1)",
         "since", "Pass the `last_event` of the previous answer.",
         ("GET", "events", {"store": S, "pipeline": "run", "since": "abc"})),
    Case("REST", "`GET task` of an unknown task", "HTTP 404",
         "no task 'nope' in pipeline 'run'; `nbpipe tasks run` lists its tasks", "'nope'",
         "Use a label from `GET graph`.", ("GET", "task", {"store": S, "pipeline": "run", "task": "nope"})),
    Case("REST", "`GET cluster` of an unknown pipeline", "HTTP 404",
         "no pipeline named 'nope' in the store …; `nbpipe pipelines` lists the pipelines of a store",
         "'nope'", "Use a name from `GET pipelines`.", ("GET", "cluster", {"store": S, "pipeline": "nope"})),
    Case("REST", "`POST command` whose body is not JSON", "HTTP 400",
         "the body must be JSON (UTF-8 text)", "body",
         "Send a JSON object.", ("POST", "command", "verb=pause")),
    Case("REST", "`POST command` whose body is a JSON list", "HTTP 400", "the body must be a JSON object",
         "object", "Send a JSON object.", ("POST", "command", [])),
    Case("REST", "`POST command` with an unknown verb", "HTTP 400",
         "verb must be one of retry, kill, pause, resume, not 'explode'", "verb",
         "Use one of the listed verbs.",
         ("POST", "command", {"store": S, "pipeline": "run", "verb": "explode"})),
    Case("REST", "`POST command` with `tasks` a string", "HTTP 400",
         "tasks must be a list of task names, labels or keys", "tasks", 'Send `"tasks": ["job"]`.',
         ("POST", "command", {"store": S, "pipeline": "run", "verb": "kill", "tasks": "job"})),
    Case("REST", "`POST command` without `pipeline`", "HTTP 400", "pipeline must be a pipeline name",
         "pipeline", "Add `pipeline`.", ("POST", "command", {"store": S, "verb": "pause"})),
    Case("REST", "`POST command` retrying an unknown task", "HTTP 404",
         "no task 'nope' in pipeline 'run'; see pipe.tasks()", "'nope'", "Use a label from `GET graph`.",
         ("POST", "command", {"store": S, "pipeline": "run", "verb": "retry", "tasks": ["nope"]})),
    Case("REST", "`GET events` with a `since` beyond 64 bits", "HTTP 400",
         "since must be an event id (an integer from 0 to 2**63 - 1)", "since",
         "Pass the `last_event` of the previous answer.",
         ("GET", "events", {"store": S, "pipeline": "run", "since": "99999999999999999999999"})),
    Case("REST", "`GET task` with an empty `task`", "HTTP 400",
         "task is empty: give a task's name, label or key", "task", "Name a task from `GET graph`.",
         ("GET", "task", {"store": S, "pipeline": "run", "task": ""})),
    Case("REST", "`POST command` whose body is not UTF-8", "HTTP 400",
         "the body must be JSON (UTF-8 text)", "UTF-8", "Send UTF-8 JSON.",
         ("POST", "command", b'{"verb": "pause\xff"}')),
    Case("REST", "`POST command` whose body is nested thousands deep", "HTTP 400",
         "the body is JSON nested too deeply", "nested", "Send a flat JSON object.",
         ("POST", "command", "[" * 100_000 + "]" * 100_000)),
    Case("REST", '`POST command` with `"failed": "false"` (a string)', "HTTP 400",
         "failed must be true or false (JSON booleans), not 'false'", "failed",
         'Send `"failed": false`.',
         ("POST", "command", {"store": S, "pipeline": "run", "verb": "retry", "failed": "false"})),
    Case("REST", "`GET graph` of a store whose database is damaged", "HTTP 409",
         "the store …/broken/.nbpipe is damaged: SQLite cannot read nbpipe.sqlite (file is not a "
         "database); copy the folder aside …", "broken",
         "Copy the store aside and `.recover` it, or start a new store.",
         ("GET", "graph", {"store": "broken/.nbpipe", "pipeline": "run"})),
    Case("REST", "`GET graph` of a store written by a newer nbpipe", "HTTP 409",
         "the store …/newer/.nbpipe was written by a newer nbpipe (schema 99; this nbpipe knows …); "
         "upgrade nbpipe (pip install -U nbpipe) or use another store; the store was left untouched",
         "newer",
         "Upgrade nbpipe in the Jupyter server's environment.",
         ("GET", "graph", {"store": "newer/.nbpipe", "pipeline": "run"})),
    Case("REST", "`POST export` of a file that is not a notebook", "HTTP 404",
         "'analysis/notes.txt' is not a notebook", "notes.txt", "Export a saved .ipynb.",
         ("POST", "export", {"path": "analysis/notes.txt"})),
    Case("REST", "`POST export` of a notebook outside the root", "HTTP 403",
         "path '../run.ipynb' is outside the server root", "path", "Export notebooks under the root.",
         ("POST", "export", {"path": "../run.ipynb"})),
]

CASES: list[Case] = [*PYTHON, *MAGICS, *CLI, *CONFIG, *REST]


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def clean_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh working directory with nbpipe's packaged settings only; dask.config as it was
    afterwards (nbpipe.yaml merges in)."""
    saved = copy.deepcopy(dask.config.config.get("nbpipe"))  # the only key nbpipe.yaml sets
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NBPIPE_STORE", raising=False)
    monkeypatch.delenv("DASK_NBPIPE__CLUSTER", raising=False)
    # nbpipe's packaged defaults stay, as a user has them; only what earlier tests merged goes
    from nbpipe.config import DEFAULTS

    dask.config.config["nbpipe"] = copy.deepcopy(DEFAULTS)
    yield tmp_path
    dask.config.config.pop("nbpipe", None)
    if saved is not None:
        dask.config.config["nbpipe"] = saved


_names = itertools.count()


@pytest.fixture
def shell(cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A shell with nbpipe loaded on the shared cluster, a fresh pipeline and store."""
    ip = start_ipython() or TerminalInteractiveShell.instance()
    monkeypatch.setenv("NBPIPE_STORE", str(tmp_path / ".nbpipe"))
    monkeypatch.setenv("NBPIPE_PIPELINE", f"errors-{next(_names)}")
    monkeypatch.setenv("NBPIPE_WIDGETS", "0")
    with dask.config.set({"nbpipe.cluster": cluster.scheduler_address}):
        ip.run_line_magic("load_ext", "nbpipe")
        yield ip
        ip.run_line_magic("unload_ext", "nbpipe")
    for name in ("a", "b", "x", "y", "lock", "math", "nap_ref", "deadline"):
        ip.user_ns.pop(name, None)


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory: pytest.TempPathFactory, cluster) -> Path:
    """A store with pipeline ``demo``: task ``job`` ran once and succeeded."""
    from distributed import Client

    path = tmp_path_factory.mktemp("cli") / ".nbpipe"
    with Client(cluster) as client:
        pipe = Pipeline("demo", store=path, cluster=client)
        pipe.task(job)()
        pipe.run(check=True)
        pipe.close()
    return path


def check(case: Case, exc_type: str, message: str) -> None:
    """The error type, that the message names the thing, and the documented message."""
    assert exc_type == case.error, (case.mistake, exc_type, message)
    assert case.names in message, (case.mistake, message)
    assert matches(case.message, message), \
        f"{case.mistake}:\n  documented: {case.message}\n  actual:     {message}"


def _by_surface(surface: str) -> list[Any]:
    return [pytest.param(c, id=c.id) for c in CASES if c.surface == surface]


# -- the tests ----------------------------------------------------------------------------------


def test_the_catalogue_has_forty_distinct_mistakes_on_every_surface() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 40
    assert len({c.mistake for c in CASES}) == len(CASES)
    for surface in SURFACES:
        assert sum(c.surface == surface for c in CASES) >= 5, surface


@pytest.mark.parametrize("case", _by_surface("Python API"))
def test_python_api_mistakes(case: Case, tmp_path: Path, clean_config: Path) -> None:
    with pytest.raises(Exception) as info:
        case.action(tmp_path)
    check(case, type(info.value).__name__, str(info.value))


@pytest.mark.parametrize("case", _by_surface("magics"))
def test_magic_mistakes(case: Case, shell) -> None:
    for cell in case.setup:
        result = shell.run_cell(cell)
        assert result.success, cell
    result = shell.run_cell(case.action)
    exc = result.error_before_exec or result.error_in_exec
    assert exc is not None, case.action
    check(case, type(exc).__name__, str(exc))


def test_a_bad_task_cell_leaves_the_pipeline_usable_and_its_records_intact(shell) -> None:
    assert shell.run_cell("%%task x\nx = 21").success
    assert shell.run_cell("y = x * 2").success and shell.user_ns["y"] == 42
    pipe = shell._nbpipe_session.pipe
    before = {t.key: t.state for t in pipe.tasks()}
    for bad in ("%%task z --after lod\nz = x", "%%task z --memory lots\nz = x", "%%task z\nz = nowhere"):
        assert not shell.run_cell(bad).success
    assert shell.run_cell("%%task w\nw = x + 1").success  # later cells still work
    assert shell.run_cell("v = w").success and shell.user_ns["v"] == 22
    after = {t.key: t.state for t in Pipeline(pipe.name, store=pipe.store.path).tasks()}
    assert {k: after[k] for k in before} == before  # nothing recorded was lost
    shell.user_ns.pop("v", None), shell.user_ns.pop("w", None)


@pytest.mark.parametrize("case", _by_surface("command line"))
def test_command_line_mistakes(case: Case, cli_store: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no store here or above
    monkeypatch.delenv("NBPIPE_STORE", raising=False)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # `nbpipe run` sets it for the script
    (tmp_path / "job.py").write_text("print('never runs')\n")
    (tmp_path / "broken.ipynb").write_text("not json")
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "nbpipe.sqlite").write_bytes(bytes(range(256)) * 64)
    _newer_store(tmp_path / "newer")
    args = [a.format(store=cli_store, tmp=tmp_path, script=tmp_path / "job.py") for a in case.action]
    lock = RunnerLock(Store(cli_store), "demo")
    if "live runner" in case.setup:  # this process runs `demo` meanwhile
        lock.acquire()
    try:
        result = CliRunner().invoke(cli_main, args)
    finally:
        lock.release()
    assert result.exit_code == 2, (args, result.output, result.exception)
    last = result.output.strip().splitlines()
    message = " ".join(line.strip() for line in last[last.index(next(
        line for line in last if line.startswith("Error:"))):])[len("Error: "):]
    check(case, "exit 2", message)
    assert "Traceback" not in result.output


@pytest.mark.parametrize("case", _by_surface("configuration"))
def test_configuration_mistakes(case: Case, clean_config: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    if case.setup:
        (clean_config / "nbpipe.yaml").write_bytes(case.setup[0].encode("latin-1"))
    configured = {"nbpipe.cluster": "warp"} if case.action == "dask.config" else case.action or {}
    if "env" in configured:  # as Dask reads the variable when it starts
        variable, value = configured["env"]
        monkeypatch.setenv(variable, value)
        configured = {f"nbpipe.{k}": v for k, v in
                      dask.config.collect_env({variable: value})["nbpipe"].items()}
    with dask.config.set(configured), pytest.raises(Exception) as info:
        Pipeline("configured", store=clean_config / ".nbpipe")
    check(case, type(info.value).__name__, str(info.value))


def test_a_configuration_mistake_loses_nothing_recorded(clean_config: Path, client) -> None:
    store = clean_config / ".nbpipe"
    pipe = Pipeline("kept", store=store, cluster=client)
    pipe.task(job)()
    pipe.run(check=True)
    pipe.close()
    (clean_config / "nbpipe.yaml").write_text("clsuter: slurm\n")
    with pytest.raises(Exception, match="clsuter"):
        Pipeline("kept", store=store)
    (clean_config / "nbpipe.yaml").unlink()
    from nbpipe.config import _loaded

    _loaded.clear()
    again = Pipeline("kept", store=store, cluster=client)
    again.task(job)()
    summary = again.run(check=True)
    again.close()
    assert summary.executed == 0 and summary.cached == 1


@pytest.fixture
def jp_server_config() -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"nbpipe.server": True}}}


@pytest.fixture
def rest_project(jp_root_dir: Path, client) -> Path:
    """analysis/.nbpipe with pipeline ``run`` (task ``job`` done), analysis/notes.txt."""
    folder = jp_root_dir / "analysis"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a notebook")
    pipe = Pipeline("run", store=folder / ".nbpipe", cluster=client)
    pipe.task(job)()
    pipe.run(check=True)
    pipe.close()
    (jp_root_dir / "broken" / ".nbpipe").mkdir(parents=True)
    (jp_root_dir / "broken" / ".nbpipe" / "nbpipe.sqlite").write_bytes(bytes(range(256)) * 64)
    _newer_store(jp_root_dir / "newer" / ".nbpipe")
    return folder


def _newer_store(path: Path) -> None:
    """A store as a newer nbpipe (schema 99) leaves it."""
    import sqlite3

    path.mkdir(parents=True)
    with sqlite3.connect(path / "nbpipe.sqlite") as conn:
        conn.execute("CREATE TABLE future (x)")
        conn.execute("PRAGMA user_version = 99")


async def test_rest_mistakes(jp_fetch, rest_project: Path) -> None:
    """Every REST case, against one server (each answer is JSON {"message": ...})."""
    for case in REST:
        method, name, payload = case.action
        if method == "GET":
            request = jp_fetch("nbpipe", "api", name, params=payload)
        else:
            body = payload if isinstance(payload, (str, bytes)) else json.dumps(payload)
            request = jp_fetch("nbpipe", "api", name, method="POST", body=body)
        with pytest.raises(HTTPClientError) as info:
            await request
        message = json.loads(info.value.response.body)["message"]
        check(case, f"HTTP {info.value.code}", message)
        await asyncio.sleep(0)


# -- docs/errors.md -----------------------------------------------------------------------------


def render() -> str:
    """docs/errors.md, from the catalogue."""
    lines = [
        "# Errors: every mistake, its message, its fix", "",
        "Generated from the catalogue in `tests/test_errors.py`, whose tests make each mistake for "
        "real and check that the message below is the one nbpipe gives (`…` stands for a part that "
        "varies, such as a path). Regenerate with `python tests/test_errors.py`.", "",
        "nbpipe's own checks raise subclasses of `nbpipe.NbpipeError`; a magic's command syntax "
        "gives IPython's `UsageError`, and a `%%task` cell's code gives Python's own `SyntaxError` "
        "or `NameError`, as a plain cell would. The command line prints the message after "
        '`Error:` and exits with status 2; the REST API answers `{"message": ...}` with the '
        "status shown. A mistake never changes what the store has recorded: fix it and run "
        "again.", "",
    ]
    number = 0
    for surface in SURFACES:
        cases = [c for c in CASES if c.surface == surface]
        lines += [f"## {surface} ({len(cases)})", ""]
        for case in cases:
            number += 1
            lines += [f"### {number}. {case.mistake}", "", f"`{case.error}`", "", "```text",
                      case.message, "```", "", f"**Fix:** {case.fix}", ""]
    return "\n".join(lines)


def test_docs_errors_md_is_the_catalogue() -> None:
    assert DOC.read_text() == render(), "run `python tests/test_errors.py` to regenerate docs/errors.md"


if __name__ == "__main__":
    DOC.write_text(render())
    print(f"wrote {DOC} ({len(CASES)} cases)")

