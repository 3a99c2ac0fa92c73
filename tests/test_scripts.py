"""Pipeline scripts as people write them, run the ways people run them: fresh processes, the
default local cluster (nothing configured), real stores.

Every script shown in README.md and docs/ is extracted and run verbatim, with ``python`` and
with ``nbpipe run``, twice: the second run executes nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import psutil
import pytest
from conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(?:python|\{code-block\} python)\n(?::caption: nb/([\w.]+)\n\n)?(.*?)^```",
                   re.S | re.M)
OTHER_SYSTEMS = re.compile(r"^(from|import) (desipipe|depio|jobmon|cloud_tasks)\b", re.M)
# Arguments and files a documented script needs, as its page says to run it.
NEEDS: dict[str, tuple[list[str], dict[str, str]]] = {
    "load_tasks(sys.argv[1])": (["my_tasks.json"], {"my_tasks.json": json.dumps(
        [{"task_id": f"frame-{i}", "data": {"x": i}} for i in range(3)])}),
    # the module the page shows beside the script, as printed there
    "import mylib\n": ([], {"mylib.py": next(
        m.group(2) for m in FENCE.finditer((ROOT / "docs" / "concepts.md").read_text())
        if m.group(2).startswith("# mylib.py\n"))}),
}


BOOKKEEPING = re.compile(r"executed|found done|new task|changed")  # what a run says of itself


def _environment() -> dict[str, str]:
    """The user's environment: nothing configured, the `nbpipe` command on the PATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NBPIPE_", "DASK_")) and k != "JPY_SESSION_NAME"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def _notebook_files(name: str) -> dict[str, str]:
    """The files a notebook writes with ``%%writefile`` (a script it runs may read them)."""
    nb = nbformat.read(ROOT / "nb" / name, as_version=4)
    files = {}
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.source.startswith("%%writefile "):
            first, _, body = cell.source.partition("\n")
            files[first.split()[1]] = body
    return files


def doc_scripts() -> list[pytest.param]:
    """Every Python block of the docs that runs a pipeline (not a notebook cell, though a script a
    notebook writes is one; not another system's code); blocks shown twice (README and
    quickstart) are run once."""
    found: dict[str, list[str]] = {}
    extra: dict[str, dict[str, str]] = {}
    for page in DOCS:
        for number, match in enumerate(FENCE.finditer(page.read_text()), 1):
            notebook, code = match.groups()
            if re.search(r"^\s*[%!]", code, re.M) or OTHER_SYSTEMS.search(code):
                continue  # notebook cells, and the code of the systems being migrated from
            if not re.search(r"\.(run|result)\(|\brun_tasks\(", code):
                continue  # a fragment, not a script
            if notebook and code.strip() not in [
                    text.strip() for name, text in _notebook_files(notebook).items()
                    if name.endswith(".py")]:
                continue  # a cell of the notebook, not a script it writes
            found.setdefault(code, []).append(f"{page.relative_to(ROOT)}#{number}")
            if notebook:
                extra[code] = _notebook_files(notebook)
    return [pytest.param(code, extra.get(code, {}), id="+".join(where))
            for code, where in found.items()]


SCRIPTS = doc_scripts()


def attempts(folder: Path) -> int:
    """Attempts recorded in the store of ``folder``: every task execution leaves one."""
    with sqlite3.connect(folder / ".nbpipe" / "nbpipe.sqlite") as db:
        return db.execute("SELECT count(*) FROM attempts").fetchone()[0]


def launch(folder: Path, launcher: str, script: str, *args: str,
           timeout: float = 600) -> subprocess.CompletedProcess[str]:
    command = [sys.executable] if launcher == "python" else [sys.executable, "-m", "nbpipe.cli", "run"]
    return subprocess.run([*command, script, *args], cwd=folder, capture_output=True, text=True,
                          timeout=timeout, env=_environment())


def our_processes(folder: Path) -> list[psutil.Process]:
    """Processes whose command line names ``folder``: a driver or its local cluster."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with_folder = " ".join(proc.info["cmdline"] or ())
        if str(folder) in with_folder and proc.pid != os.getpid():
            found.append(proc)
    return found


def test_the_docs_show_the_scripts_this_file_runs() -> None:
    ids = " ".join(p.id for p in SCRIPTS)
    for page in ("README.md", "docs/quickstart.md", "docs/migration/rms-cloud-tasks.md",
                 "docs/migration/depio.md", "docs/migration/jobmon.md"):
        assert page in ids, f"no script found in {page}: {ids}"


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("launcher", ["python", "nbpipe run"])
@pytest.mark.parametrize(("code", "files"), SCRIPTS)
def test_a_documented_script_runs_twice_and_the_second_run_executes_nothing(
        code: str, files: dict[str, str], launcher: str, tmp_path: Path) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    args: list[str] = []
    for needle, (needed_args, needed_files) in NEEDS.items():
        if needle in code:
            args = needed_args
            for name, text in needed_files.items():
                (tmp_path / name).write_text(text)
    (tmp_path / "script.py").write_text(code)
    first = launch(tmp_path, launcher, "script.py", *args)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Traceback" not in first.stderr, first.stderr
    ran = attempts(tmp_path)
    assert ran > 0
    second = launch(tmp_path, launcher, "script.py", *args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert attempts(tmp_path) == ran, "the second run executed tasks again"
    if launcher == "python":  # the same values printed (an estimate of pi), bookkeeping aside
        def values(out: str) -> list[str]:
            return [line for line in out.splitlines() if not BOOKKEEPING.search(line)]

        assert values(first.stdout) == values(second.stdout)
    wait_for(lambda: not our_processes(tmp_path), timeout=60)  # no cluster left behind


# -- scripts without a __main__ guard ----------------------------------------------------------

MODULE_LEVEL = '''
import os
from dataclasses import dataclass

from helpers import double            # a module of the project, beside the script
from nbpipe import Pipeline

with open("imports.log", "a") as log:  # every process that runs this script says so
    log.write(f"{os.getpid()}\\n")

OFFSET = 10


def shift(x: int) -> int:             # a helper of the script: travels by value
    return x + OFFSET


@dataclass
class Point:                           # a class of the script: travels by value
    x: int


pipe = Pipeline("unguarded")


@pipe.task
def work(p: Point) -> int:
    return double(shift(p.x))


@pipe.task
def total(values: list[int]) -> int:
    return sum(values)


result = total([work(Point(i)) for i in range(3)])
print(pipe.run(check=True))
print("total", result.result())
'''


@pytest.mark.timeout(900)
@pytest.mark.parametrize("launcher", ["python", "nbpipe run", "nbpipe run --detach"])
def test_a_module_level_script_runs_and_its_workers_never_run_it(launcher: str,
                                                                 tmp_path: Path) -> None:
    (tmp_path / "helpers.py").write_text("def double(x):\n    return 2 * x\n")
    (tmp_path / "unguarded.py").write_text(MODULE_LEVEL)
    outputs = []
    for _ in range(2):
        if launcher.endswith("--detach"):
            started = subprocess.run([sys.executable, "-m", "nbpipe.cli", "run", "unguarded.py",
                                      "--detach"], cwd=tmp_path, capture_output=True, text=True,
                                     timeout=120, env=_environment())
            assert started.returncode == 0, started.stderr
            log = tmp_path / "nbpipe-run.log"

            def finished(log: Path = log, runs: int = len(outputs) + 1) -> bool:
                text = log.read_text() if log.exists() else ""
                return text.count("all tasks succeeded") == runs or "Error" in text

            wait_for(finished, timeout=600, step=0.5)
            text = log.read_text()
            outputs.append(text[sum(len(o) for o in outputs):])
        else:
            run = launch(tmp_path, launcher, "unguarded.py")
            assert run.returncode == 0, run.stdout + run.stderr
            outputs.append(run.stdout)
    first, second = outputs
    assert "4 executed, 0 already done (4 SUCCEEDED)" in first, first
    assert "total 66" in first and "total 66" in second  # 2 * (10 + 0 + 10 + 1 + 10 + 2)
    assert "0 executed, 4 already done (4 SUCCEEDED)" in second, second
    # Only the drivers ran the script: not one of the workers imported it.
    assert len((tmp_path / "imports.log").read_text().split()) == 2
    wait_for(lambda: not our_processes(tmp_path), timeout=60)


USER_CLUSTER = '''
from distributed import LocalCluster
from nbpipe import Pipeline


def square(x: int) -> int:
    return x * x


if __name__ == "__main__":   # a LocalCluster of one's own needs this guard (Dask's rule)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster:
        pipe = Pipeline("mine", cluster=cluster)
        refs = [pipe.task(square)(i) for i in range(3)]
        print(pipe.run(check=True))
        print("squares", [r.result() for r in refs])
        pipe.close()
'''


@pytest.mark.timeout(600)
def test_a_local_cluster_made_by_the_user_keeps_working(tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text(USER_CLUSTER)
    run = launch(tmp_path, "python", "mine.py")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 executed" in run.stdout and "squares [0, 1, 4]" in run.stdout, run.stdout


SLOW = '''
import time
from nbpipe import Pipeline

pipe = Pipeline("slow")


@pipe.task
def wait(i: int) -> int:
    open(f"started-{i}", "w").close()
    time.sleep(600)
    return i


refs = [wait(i) for i in range(2)]
pipe.run()
'''


@pytest.mark.timeout(600)
def test_the_local_cluster_ends_with_its_driver_even_when_the_driver_is_killed(
        tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text(SLOW)
    driver = subprocess.Popen([sys.executable, "slow.py"], cwd=tmp_path, env=_environment(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (tmp_path / "started-0").exists(), timeout=300, step=0.2)
        tree = psutil.Process(driver.pid).children(recursive=True)
        assert len(tree) >= 3, tree  # the cluster's process and its workers
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                 for p in tree), timeout=90, step=0.5)
    finally:
        if driver.poll() is None:
            driver.kill()


# -- what a run reports ------------------------------------------------------------------------

SUMMARY = '''
from nbpipe import Pipeline

pipe = Pipeline("summary")


@pipe.task
def f(x: int) -> int:
    return x


print("value", f(1).result())          # runs one task before run()
more = [f(i) for i in range(2, 4)]
print("first", pipe.run())
print("again", pipe.run())              # in the same process: nothing ran since
later = f(9)
pipe.run(wait=False)
print("after wait=False", pipe.run())   # it ran during this call, or the one before it
'''


@pytest.mark.timeout(600)
def test_run_summary_counts_tasks_run_by_result_before_run_as_executed(tmp_path: Path) -> None:
    (tmp_path / "summary.py").write_text(SUMMARY)
    first = launch(tmp_path, "python", "summary.py")
    assert first.returncode == 0, first.stderr
    lines = dict(line.split(" ", 1) for line in first.stdout.splitlines()
                 if line.startswith(("value", "first", "again")))
    assert lines["first"] == "3 executed, 0 already done (3 SUCCEEDED)", first.stdout
    assert lines["again"] == "0 executed, 3 already done (3 SUCCEEDED)", first.stdout
    assert "after wait=False 1 executed, 3 already done (4 SUCCEEDED)" in first.stdout, first.stdout
    second = launch(tmp_path, "python", "summary.py")
    assert "first 0 executed, 3 already done (3 SUCCEEDED)" in second.stdout, second.stdout
    assert "after wait=False 0 executed, 4 already done (4 SUCCEEDED)" in second.stdout


# -- another process holds the pipeline --------------------------------------------------------

HOLDER = '''
import time
from pathlib import Path
from nbpipe import Pipeline

pipe = Pipeline("shared")


@pipe.task
def part(i: int) -> int:
    Path(f"started-{i}").touch()
    while not Path("release").exists():  # the test lets it finish
        time.sleep(0.1)
    return i


values = [part(i) for i in range(2)]
print("holder", pipe.run(check=True))
'''

WAITER = HOLDER.replace('print("holder", pipe.run(check=True))', '''import sys
kw = {"wait_for_runner": True} if "--wait" in sys.argv else {}
print("waiter", pipe.run(check=True, **kw))
print("values", [v.result() for v in values])''')


@pytest.mark.timeout(900)
def test_a_script_can_wait_for_the_process_that_runs_its_pipeline(tmp_path: Path) -> None:
    (tmp_path / "holder.py").write_text(HOLDER)
    (tmp_path / "waiter.py").write_text(WAITER)
    holder = subprocess.Popen([sys.executable, "holder.py"], cwd=tmp_path, env=_environment(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    waiter = None
    try:
        wait_for(lambda: (tmp_path / "started-0").exists(), timeout=300, step=0.2)
        refused = launch(tmp_path, "python", "waiter.py")
        assert refused.returncode == 1
        assert "PipelineBusy: pipeline 'shared' is already being run by pid" in refused.stderr
        assert "use pipe.run(wait_for_runner=True)" in refused.stderr, refused.stderr
        with open(tmp_path / "waiter.err", "w") as err_file:
            waiter = subprocess.Popen([sys.executable, "waiter.py", "--wait"], cwd=tmp_path,
                                      env=_environment(), stdout=subprocess.PIPE,
                                      stderr=err_file, text=True)
        wait_for(lambda: "waiting for it" in (tmp_path / "waiter.err").read_text(),
                 timeout=300, step=0.2)
        (tmp_path / "release").touch()
        out, err = holder.communicate(timeout=300)
        waited, _ = waiter.communicate(timeout=300)
    finally:
        (tmp_path / "release").touch()
        for proc in (holder, waiter):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert "holder 2 executed" in out, out + err
    message = (tmp_path / "waiter.err").read_text()
    assert waiter.returncode == 0, waited + message
    assert "nbpipe: pipeline 'shared' is already being run by pid" in message, message
    assert "waiter 0 executed, 2 already done (2 SUCCEEDED)" in waited, waited
    assert "values [0, 1]" in waited


def test_waiting_for_a_runner_gives_up_after_the_timeout(tmp_path: Path) -> None:
    from nbpipe import Pipeline
    from nbpipe.errors import PipelineBusy
    from nbpipe.store import RunnerLock

    pipe = Pipeline("held", store=tmp_path / ".nbpipe")
    pipe.task(abs)(-1)
    other = RunnerLock(pipe.store, "held")  # as another process would hold it
    other.acquire()
    try:
        start = time.monotonic()
        with pytest.raises(PipelineBusy, match=r"still so after waiting 1\.5 s"):
            pipe.run(wait_for_runner=True, timeout=1.5)
        assert time.monotonic() - start >= 1.5
    finally:
        other.release()
        pipe.close()


# -- a task that ends its own process ----------------------------------------------------------

ENDS_ITS_PROCESS = '''
import ctypes
import os
import sys

import dask
from nbpipe import Pipeline

GIVES_UP = "--dask-gives-up" in sys.argv
if GIVES_UP:  # Dask fails the task at the first death: the runner reads what the worker left
    dask.config.set({"distributed.scheduler.allowed-failures": 0})
RETRIES = int(next((a.split("=")[1] for a in sys.argv if a.startswith("--retries=")), 0))
pipe = Pipeline("ends")


@pipe.task(retries=RETRIES)
def ender(how: str) -> int:
    print("about to end", how, flush=True)
    print("on stderr too", file=sys.stderr, flush=True)
    with open("pids", "a") as f:
        f.write(f"{os.getpid()}\\n")
    if how == "os._exit":
        os._exit(3)
    if how == "sys.exit":
        sys.exit(3)
    ctypes.string_at(0)  # a segfault in C code
    return 0


@pipe.task
def fine(i: int) -> int:
    return i


bad = ender(sys.argv[1])
# (with allowed-failures 0, Dask also fails the tasks queued on the worker that died)
good = [] if GIVES_UP else [fine(i) for i in range(4)]
print(pipe.run())
'''
EXIT_CODES = {"os._exit": 3, "sys.exit": 3, "segfault": -11}
MESSAGES = {
    "os._exit": "task \"ender(how='os._exit')\" ended its worker process: the process exited "
                "with code 3 (os._exit() or exit() in the task or in C code it called)",
    "sys.exit": "task \"ender(how='sys.exit')\" exited with code 3 (sys.exit(3) in the task)",
    "segfault": "task \"ender(how='segfault')\" ended its worker process: the process was "
                "killed by signal 11 (SIGSEGV, a crash in C code (segmentation fault)); its "
                "traceback is in `nbpipe logs`",
}


def _cli(folder: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "nbpipe.cli", *args], cwd=folder,
                          capture_output=True, text=True, timeout=120, env=_environment())
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.timeout(900)
@pytest.mark.parametrize("dask_gives_up", [False, True], ids=["dask-retries", "allowed-failures-0"])
@pytest.mark.parametrize("how", ["os._exit", "sys.exit", "segfault"])
def test_a_task_that_ends_its_process_is_one_attempt_with_its_exit_code_and_output(
        how: str, dask_gives_up: bool, tmp_path: Path) -> None:
    if dask_gives_up and how == "sys.exit":
        pytest.skip("sys.exit() in a task ends the task, not the worker: Dask sees no death")
    (tmp_path / "ends.py").write_text(ENDS_ITS_PROCESS)
    run = launch(tmp_path, "python", "ends.py", how, *(["--dask-gives-up"] if dask_gives_up else []))
    assert run.returncode == 0, run.stdout + run.stderr
    expected = ("1 executed, 0 already done (1 FAILED)" if dask_gives_up
                else "5 executed, 0 already done (1 FAILED, 4 SUCCEEDED)")
    assert expected in run.stdout, run.stdout
    # One process ended, not one per worker Dask tried it on.
    assert len((tmp_path / "pids").read_text().split()) == 1
    label = f"ender(how='{how}')"
    detail = json.loads(_cli(tmp_path, "show", "ends", label, "--json"))
    assert detail["state"] == "FAILED" and len(detail["attempts"]) == 1, detail
    attempt = detail["attempts"][0]
    assert attempt["exit_code"] == EXIT_CODES[how]
    assert attempt["error"].startswith(MESSAGES[how]), attempt["error"]
    assert "memory" not in attempt["error"]
    logs = _cli(tmp_path, "logs", "ends", label)
    assert f"about to end {how}" in logs and "on stderr too" in logs, logs
    assert f"exit code (attempt 1): {EXIT_CODES[how]}" in logs
    if how == "segfault":
        assert "Fatal Python error: Segmentation fault" in logs and "in ender" in logs, logs
    assert not list((tmp_path / ".nbpipe" / "running").iterdir())  # nothing left behind


@pytest.mark.timeout(900)
def test_a_task_that_ends_its_process_is_retried_as_its_retries_say(tmp_path: Path) -> None:
    (tmp_path / "ends.py").write_text(ENDS_ITS_PROCESS)
    run = launch(tmp_path, "python", "ends.py", "os._exit", "--retries=1")
    assert run.returncode == 0, run.stdout + run.stderr
    assert len((tmp_path / "pids").read_text().split()) == 2  # two attempts, two processes
    detail = json.loads(_cli(tmp_path, "show", "ends", "ender(how='os._exit')", "--json"))
    assert [a["exit_code"] for a in detail["attempts"]] == [3, 3], detail


CHUNK = '''
import os
from nbpipe import Pipeline

pipe = Pipeline("chunk")


@pipe.task
def item(i: int) -> int:
    print("item", i)
    if i == 2:
        os._exit(5)
    return i


refs = item.map(range(5), chunksize=5)
print(pipe.run())
'''


@pytest.mark.timeout(600)
def test_an_item_of_a_chunk_that_ends_its_process_fails_alone(tmp_path: Path) -> None:
    (tmp_path / "chunk.py").write_text(CHUNK)
    run = launch(tmp_path, "python", "chunk.py")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "5 executed, 0 already done (1 FAILED, 4 SUCCEEDED); failed: item(i=2)" in run.stdout
    detail = json.loads(_cli(tmp_path, "show", "chunk", "item(i=2)", "--json"))
    assert [(a["exit_code"], a["stdout"].strip()) for a in detail["attempts"]] == [(5, "item 2")]


# -- the command line: global options where people put them ------------------------------------


@pytest.fixture(scope="module")
def listed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a store holding pipeline ``p``: task ``job`` done, ``bad`` failed."""
    folder = tmp_path_factory.mktemp("listed")
    (folder / "p.py").write_text(textwrap.dedent('''
        from nbpipe import Pipeline

        pipe = Pipeline("p", store="elsewhere")


        @pipe.task
        def job() -> int:
            print("working")
            return 1


        @pipe.task
        def bad() -> int:
            raise ValueError("no")


        job(), bad()
        pipe.run()
    '''))
    run = launch(folder, "python", "p.py")
    assert run.returncode == 0, run.stderr
    return folder


COMMANDS = [
    ["pipelines"], ["tasks", "p"], ["show", "p", "job"], ["show", "p"], ["logs", "p", "job"],
    ["why", "p", "job"], ["graph", "p"], ["gc", "--dry-run"], ["delete", "p"], ["doctor"],
    ["pause", "p"], ["resume", "p", "--no-spawn"], ["retry", "p", "bad", "--no-spawn"],
    ["kill", "p", "bad"],
]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a))
def test_store_goes_before_or_after_the_command_name(args: list[str], listed: Path) -> None:
    from click.testing import CliRunner

    from nbpipe.cli import main

    store = str(listed / "elsewhere")
    before = CliRunner().invoke(main, ["--store", store, *args], env=_environment())
    after = CliRunner().invoke(main, [*args, "--store", store], env=_environment())
    assert before.exit_code == after.exit_code, (before.output, after.output)
    assert before.exit_code in (0, 1), before.output  # doctor exits 1 on a failed task? never 2
    assert before.output.replace(" ", "") == after.output.replace(" ", "")


@pytest.mark.parametrize("args", [["pipelines"], ["tasks", "p"], ["show", "p", "job"],
                                  ["show", "p"], ["doctor"]], ids=lambda a: " ".join(a))
def test_json_goes_before_or_after_the_command_name(args: list[str], listed: Path) -> None:
    store = str(listed / "elsewhere")
    outputs = []
    for argv in (["--json", "--store", store, *args], [*args, "--json", "--store", store],
                 ["--store", store, "--json", *args]):
        done = subprocess.run([sys.executable, "-m", "nbpipe.cli", *argv], cwd=listed,
                              capture_output=True, text=True, timeout=120, env=_environment())
        assert done.returncode in (0, 1), done.stderr
        outputs.append(json.loads(done.stdout))
    for data in outputs:  # (times of day in doctor's report aside)
        assert type(data) is type(outputs[0]) and len(data) == len(outputs[0])


def test_json_on_a_command_without_a_listing_says_which_have_one(listed: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "nbpipe.cli", "--json", "--store",
                           str(listed / "elsewhere"), "why", "p", "job"], cwd=listed,
                          capture_output=True, text=True, timeout=120, env=_environment())
    assert done.returncode == 2
    assert "--json: `nbpipe why` has no machine-readable output" in done.stderr, done.stderr
