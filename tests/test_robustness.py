"""Hostile inputs never hang a run, damaged stores never crash a door (issue 17, items 7-14).

Each test makes the problem for real: tasks that print undecodable text on real worker
processes, runner errors from settings and arguments, damaged SQLite files, colliding lock
names, permissions under ``umask 000``.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nbpipe import ConfigError, Pipeline, RunnerError, TaskDefinitionError, TaskFailed


def run_script(path: Path, source: str, *, env: dict[str, str] | None = None,
               timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run ``source`` as a fresh Python process in ``path``'s folder (with extra ``env``)."""
    path.write_text(textwrap.dedent(source))
    return subprocess.run([sys.executable, str(path)], cwd=path.parent, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})

# -- item 7: task output is bytes until shown -----------------------------------------------------


def prints_surrogate(i: int) -> int:
    """What a task listing a Latin-1 file name prints (os.listdir gives lone surrogates)."""
    print(f"caf\udce9-{i}.txt")
    return i


def prints_other_surrogates(i: int) -> int:
    import sys

    print("\ud800 high alone", file=sys.stderr)  # not an escaped byte: escaped as text
    sys.stdout.write("\udcff\udc80 end")
    return i


def writes_raw_bytes(i: int) -> int:
    import sys

    sys.stdout.buffer.write(b"raw \xff\xfe bytes and \xc3\xa9 utf-8\n")
    sys.stdout.flush()
    return i


def raises_with_surrogate(i: int) -> int:
    raise FileNotFoundError(f"no such file: caf\udce9-{i}.txt")


def test_tasks_printing_undecodable_text_all_finish_and_their_output_is_escaped(
        pipe: Pipeline) -> None:
    refs = [pipe.task(prints_surrogate)(i) for i in range(8)]
    refs += [pipe.task(prints_other_surrogates)(i) for i in range(4)]
    refs += [pipe.task(writes_raw_bytes)(i) for i in range(4)]
    failing = [pipe.task(raises_with_surrogate)(i) for i in range(3)]

    @pipe.bash_task
    def latin1_listing(i: int) -> str:
        return f"printf 'caf\\351-{i}.txt\\n'; printf 'err \\377\\n' >&2"

    refs += [latin1_listing(i) for i in range(2)]
    summary = pipe.run(timeout=240)  # before the fix: a worker restarted and tasks waited forever
    assert summary.counts == {"SUCCEEDED": 18, "FAILED": 3}, summary
    conn = sqlite3.connect(pipe.store.db_path)
    out = dict(conn.execute(
        "SELECT t.label, a.stdout || '|' || a.stderr || '|' || COALESCE(a.error, '') "
        "FROM attempts a JOIN tasks t USING (pipeline_id, key)"))
    assert out["prints_surrogate(i=3)"] == "caf\\xe9-3.txt\n||"
    assert out["prints_other_surrogates(i=1)"] == "\\xff\\x80 end|\\ud800 high alone\n|"
    assert out["writes_raw_bytes(i=0)"] == "raw \\xff\\xfe bytes and é utf-8\n||"
    assert out["latin1_listing(i=1)"].startswith("caf\\xe9-1.txt\n|err \\xff\n|")
    assert out["raises_with_surrogate(i=2)"].endswith(
        "|FileNotFoundError: no such file: caf\\xe9-2.txt")
    with pytest.raises(FileNotFoundError, match="caf\udce9-0"):  # the exception itself
        failing[0].result()
    assert [r.result() for r in refs[:8]] == list(range(8))


# -- item 8: every setting checked wherever it comes from; runner errors reach run() ------------

SETTING_MISTAKES = [
    # (nbpipe.yaml text, environment, dask.config, what the message must name)
    ("batch-seconds: .inf\n", {}, {}, "batch-seconds=inf"),
    ("inline-bytes: .inf\n", {}, {}, "inline-bytes=inf"),
    ("inline-bytes: 1.5\n", {}, {}, "inline-bytes=1.5"),
    ("idle-timeout: .inf\n", {}, {}, "idle-timeout=inf"),
    ("batch-seconds: .nan\n", {}, {}, "batch-seconds=nan"),
    (None, {"DASK_NBPIPE__INLINE_BYTES": "lots"}, {},
     "the environment variable DASK_NBPIPE__INLINE_BYTES: inline-bytes='lots'"),
    (None, {"DASK_NBPIPE__BATCH_SECONDS": "-1"}, {},
     "the environment variable DASK_NBPIPE__BATCH_SECONDS: batch-seconds=-1"),
    (None, {}, {"nbpipe.batch-seconds": "soon"}, "dask.config 'nbpipe.batch-seconds'"),
    (None, {}, {"nbpipe.inline-bytes": [1]}, "dask.config 'nbpipe.inline-bytes'"),
    (b"cluster: local\n# caf\xe9\n", {}, {}, "is not UTF-8 text"),
]


@pytest.mark.parametrize(("yaml_text", "env", "configured", "named"), SETTING_MISTAKES)
def test_a_bad_setting_is_refused_when_the_pipeline_opens_whatever_its_source(
        tmp_path: Path, yaml_text: str | bytes | None, env: dict[str, str],
        configured: dict[str, object], named: str) -> None:
    if yaml_text is not None:
        data = yaml_text if isinstance(yaml_text, bytes) else yaml_text.encode()
        (tmp_path / "nbpipe.yaml").write_bytes(data)
    result = run_script(tmp_path / "opens.py", f"""
        import dask, nbpipe
        dask.config.set({configured!r})
        try:
            nbpipe.Pipeline("p", store=".nbpipe")
        except nbpipe.ConfigError as exc:
            print("ConfigError:", exc)
        else:
            print("accepted")
    """, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ConfigError:"), result.stdout
    assert named in result.stdout and "Traceback" not in result.stdout


def test_a_bad_setting_made_after_the_pipeline_opened_fails_run_naming_it(
        store: Path, client) -> None:
    import dask

    pipe = Pipeline("late", store=store, cluster=client)
    pipe.task(prints_surrogate)(1)
    with dask.config.set({"nbpipe.batch-seconds": "soon"}), \
            pytest.raises(ConfigError, match=r"nbpipe.batch-seconds.*'soon'"):
        pipe.run(timeout=60)
    assert pipe.run(timeout=120).counts == {"SUCCEEDED": 1}  # fixed: it runs
    pipe.close()


class Locked:
    """An argument nbpipe can hash (its token) but not send to a worker (it holds a lock)."""

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()

    def __nbpipe_token__(self) -> str:
        return "locked"


def uses(value: object, i: int = 0) -> int:
    return i


def test_an_argument_that_cannot_be_sent_fails_its_task_naming_it_and_the_rest_run(
        pipe: Pipeline) -> None:
    bad = pipe.task(uses)(Locked(), 1)
    good = [pipe.task(uses)(None, i) for i in range(2, 5)]
    summary = pipe.run(timeout=120)  # before the fix: the runner loop failed, run() waited forever
    assert summary.counts == {"SUCCEEDED": 3, "FAILED": 1}
    with pytest.raises(TaskFailed, match=r"task 'uses\(.*\)': its argument 1 cannot be sent to a "
                                         r"worker \(TypeError: cannot pickle '_thread.lock'"):
        bad.result()
    assert [g.result() for g in good] == [2, 3, 4]


@pytest.mark.parametrize("container", ["namedtuple", "set", "frozenset"])
def test_a_task_result_hidden_in_a_container_nbpipe_does_not_follow_is_refused(
        pipe: Pipeline, container: str) -> None:
    from collections import namedtuple

    first = pipe.task(uses)(None, 1)
    wrap = {"namedtuple": lambda r: namedtuple("Point", "x y")(r, 2),
            "set": lambda r: {r}, "frozenset": lambda r: frozenset([r])}[container]
    with pytest.raises(TaskDefinitionError, match=r"task 'uses': an argument holds a task result "
                                                  r"inside a (Point|set|frozenset)"):
        pipe.task(uses)(wrap(first), 2)


def test_a_runner_that_cannot_go_on_stops_and_run_raises_naming_the_cause(
        store: Path, cluster) -> None:
    from distributed import Client

    client = Client(cluster)
    pipe = Pipeline("stops", store=store, cluster=client)
    refs = [pipe.task(sleeps)(i) for i in range(6)]
    chain = pipe.task(uses)(refs, 9)
    pipe.run(wait=False)
    client.close()  # the cluster goes away under the runner
    with pytest.raises(RunnerError, match=r"the runner of pipeline 'stops' stopped: \w+"):
        pipe.wait(timeout=120)  # (run() would start a new runner if this one stopped already)
    rows = Pipeline("stops", store=store).tasks()
    assert {r.state for r in rows} <= {"FAILED", "SUCCEEDED", "UPSTREAM_FAILED"}
    assert any((r.error or "").startswith("the runner stopped: ") for r in rows)
    assert chain.state.final
    pipe.close()


def sleeps(i: int) -> int:
    import time

    time.sleep(1)
    return i


# -- item 9: damaged and odd stores: every door names the store and what to do -------------------


def damage(store: Path, how: str) -> None:
    """Damage ``store``'s database for real: random bytes, cut in half, or a newer schema."""
    db = store / "nbpipe.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    for extra in ("-wal", "-shm"):
        Path(f"{db}{extra}").unlink(missing_ok=True)
    if how == "random":
        db.write_bytes(os.urandom(max(db.stat().st_size, 8192)))
    elif how == "truncated":
        data = db.read_bytes()
        db.write_bytes(data[: len(data) // 2])
    elif how == "newer":
        conn = sqlite3.connect(db)
        conn.execute("PRAGMA user_version = 999")
        conn.close()


DAMAGES = ["random", "truncated", "newer"]
WHAT_TO_DO = {"random": ".recover", "truncated": ".recover", "newer": "upgrade nbpipe"}


@pytest.fixture
def made_store(tmp_path: Path, client) -> Path:
    """A store with pipeline ``demo``: twelve tasks done (big enough to cut in half)."""
    store = tmp_path / "proj" / ".nbpipe"
    pipe = Pipeline("demo", store=store, cluster=client)
    for i in range(12):
        pipe.task(uses)("x" * 2000, i)
    pipe.run(check=True, timeout=120)
    pipe.close()
    return store


def _cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nbpipe.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env={**os.environ, **(env or {})})


@pytest.mark.timeout(900)  # a dozen command-line processes; slow on a loaded machine
@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_or_newer_store_gives_every_door_a_clear_message(
        made_store: Path, how: str, tmp_path: Path) -> None:
    damage(made_store, how)
    result = run_script(tmp_path / "opens.py", f"""
        import nbpipe
        try:
            pipe = nbpipe.Pipeline("demo", store={str(made_store)!r})
            pipe.tasks()
        except nbpipe.StoreError as exc:
            print(type(exc).__name__, exc)
    """)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert str(made_store) in result.stdout and WHAT_TO_DO[how] in result.stdout, result.stdout
    commands = [["tasks", "demo"], ["show", "demo", "uses"],
                ["pipelines"], ["logs", "demo", "uses"], ["retry", "demo", "--failed"],
                ["pause", "demo"], ["graph", "demo"], ["doctor"], ["doctor", "--json"],
                ["gc"], ["delete", "demo", "--force"]]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:  # each command is a Python start-up: run a few at once
        results = list(pool.map(lambda args: _cli("--store", str(made_store), *args), commands))
    for args, done in zip(commands, results, strict=True):
        output = done.stdout + done.stderr
        assert "Traceback" not in output, (args, output)
        assert done.returncode in (1, 2), (args, output)
        assert str(made_store) in output.replace("\n", "").replace("  ", " ") or \
            str(made_store) in output, (args, output)
        assert WHAT_TO_DO[how] in output.replace("\n", " "), (args, output)


def test_doctor_on_a_damaged_database_shows_its_own_advice(made_store: Path) -> None:
    damage(made_store, "random")
    done = _cli("--store", str(made_store), "doctor")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.startswith("database: damaged"), done.stdout
    assert "cp -a" in done.stdout and ".recover" in done.stdout


def test_pipelines_all_skips_and_marks_a_damaged_store(made_store: Path, tmp_path: Path,
                                                       client, private_registry: Path) -> None:
    good = tmp_path / "other" / ".nbpipe"
    pipe = Pipeline("fine", store=good, cluster=client)
    pipe.task(uses)(None, 1)
    pipe.run(check=True, timeout=120)
    pipe.close()
    damage(made_store, "truncated")
    done = _cli("pipelines", "--all", "--json", env={"XDG_DATA_HOME": str(private_registry)})
    assert done.returncode == 0, done.stderr
    import json

    rows = {r["store"]: r for r in json.loads(done.stdout)}
    assert rows[str(good)]["name"] == "fine"
    assert rows[str(made_store)]["name"] is None
    assert ".recover" in rows[str(made_store)]["error"]


# -- item 10: lock names are injective and bounded ----------------------------------------------

LOOKALIKES = [("a/b", "a_b"), ("a b", "a_b"), ("café", "caf_"), ("x" * 300, "x" * 301),
              ("A", "a"), ("../up", ".._up"), ("é" * 200, "è" * 200)]


@pytest.mark.parametrize(("one", "other"), LOOKALIKES)
def test_pipelines_whose_names_look_alike_have_locks_of_their_own(
        store: Path, one: str, other: str) -> None:
    from nbpipe.store import RunnerLock, Store

    s = Store(store)
    first, second = RunnerLock(s, one), RunnerLock(s, other)
    first.acquire()
    try:
        second.acquire()  # before: PipelineBusy naming the other pipeline, or a raw OSError
        assert RunnerLock(s, one).busy() and RunnerLock(s, other).busy()
        second.release()
    finally:
        first.release()
    assert first.path.parent == store / "locks" and len(first.path.name) < 100


def test_a_pipeline_with_a_long_or_slashed_name_runs_beside_its_lookalike(
        store: Path, cluster, tmp_path: Path) -> None:
    script = f"""
        import sys, nbpipe
        pipe = nbpipe.Pipeline(sys.argv[1], store={str(store)!r},
                               cluster={cluster.scheduler_address!r})

        def wait(seconds: float) -> float:
            import time
            time.sleep(seconds)
            return seconds

        pipe.task(wait)(float(sys.argv[2]))
        print(pipe.run(check=True, timeout=120).counts)
    """
    (tmp_path / "runs.py").write_text(textwrap.dedent(script))
    holder = subprocess.Popen([sys.executable, str(tmp_path / "runs.py"), "a/b", "8"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        from nbpipe.store import RunnerLock, Store

        s = Store(store)
        deadline = __import__("time").monotonic() + 90
        while not RunnerLock(s, "a/b").busy():
            assert holder.poll() is None and __import__("time").monotonic() < deadline, \
                holder.communicate()
            __import__("time").sleep(0.1)
        for name in ("a_b", "a" * 300):
            done = subprocess.run([sys.executable, str(tmp_path / "runs.py"), name, "0"],
                                  cwd=tmp_path, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0 and "'SUCCEEDED': 1" in done.stdout, done.stderr
    finally:
        out, err = holder.communicate(timeout=180)
    assert holder.returncode == 0 and "'SUCCEEDED': 1" in out, err


# -- item 11: after= a task of another pipeline is refused like a data dependency ---------------


def test_after_a_task_of_another_pipeline_is_refused(tmp_path: Path) -> None:
    other = Pipeline("other", store=tmp_path / ".nbpipe")
    mine = Pipeline("mine", store=tmp_path / ".nbpipe")
    theirs = other.task(uses)(None, 1)
    for after in (theirs, [theirs], (theirs,), {theirs}):
        with pytest.raises(TaskDefinitionError, match=r"task 'uses' has after='uses\(.*\)' from "
                                                      r"pipeline 'other'.*same pipeline \('mine'\)"):
            mine.task(uses, after=after)(None, 2)
    # the same task of its own pipeline is fine, and nothing was registered by the refusals
    mine.task(uses, after=mine.task(uses)(None, 3))(None, 4)
    assert len(mine.tasks()) == 2 and len(other.tasks()) == 1


# -- item 12: private from creation, repaired on open -------------------------------------------


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_under_umask_000_everything_nbpipe_creates_is_private(tmp_path: Path, cluster) -> None:
    nb = tmp_path / "analysis.ipynb"
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("from nbpipe import task\n\n"
                                                "@task\ndef one() -> int:\n    return 1\n\n"
                                                "x = one()")]
    nbformat.write(notebook, nb)
    result = run_script(tmp_path / "umask.py", f"""
        import os, subprocess, sys
        os.umask(0)
        import nbpipe
        from nbpipe.pools import PoolCluster, parse_pools
        from pathlib import Path
        store = Path(".nbpipe")
        pipe = nbpipe.Pipeline("p", store=store, cluster={cluster.scheduler_address!r})

        def one() -> int:
            return 1

        pipe.task(one)()
        pipe.run(check=True, timeout=120)
        pipe.close()
        pools = parse_pools({{"kind": "slurm", "cores": 1, "memory": "1GB"}}, store)
        try:
            PoolCluster(pools, security=False, store_dir=store).close()
        except Exception as exc:  # no sbatch needed: the folder is made before any job
            print("cluster:", type(exc).__name__, exc)
        subprocess.run([sys.executable, "-m", "nbpipe.cli", "export", "analysis.ipynb",
                        "-o", "analysis.py"], check=True)
    """)
    assert result.returncode == 0, result.stderr
    store = tmp_path / ".nbpipe"
    assert _mode(store) == 0o700 and _mode(store / "jobs") == 0o700
    assert _mode(store / "nbpipe.sqlite") == 0o600
    for path in store.rglob("*"):
        assert _mode(path) & 0o077 == 0, (path, oct(_mode(path)))


def test_the_exported_script_in_the_store_is_private_whatever_the_umask(
        tmp_path: Path) -> None:
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("x = 1")]
    nbformat.write(notebook, tmp_path / "nb.ipynb")
    result = run_script(tmp_path / "exports.py", """
        import os
        os.umask(0)
        from pathlib import Path
        from nbpipe.cli import _notebook_script
        print(_notebook_script(Path("nb.ipynb")))
    """)
    assert result.returncode == 0, result.stderr
    script = Path(result.stdout.strip())
    assert script.parent == tmp_path / ".nbpipe" / "exports" and _mode(script) == 0o600
    assert _mode(script.parent) == 0o700


def test_a_store_made_readable_by_others_is_made_private_again_on_open(store: Path) -> None:
    Pipeline("p", store=store).close()
    os.chmod(store, 0o755)
    os.chmod(store / "nbpipe.sqlite", 0o644)
    (store / "jobs").mkdir(mode=0o777)
    os.chmod(store / "jobs", 0o777)
    Pipeline("p", store=store).close()
    assert _mode(store) == 0o700 and _mode(store / "nbpipe.sqlite") == 0o600


def test_a_kill_right_after_the_database_is_created_leaves_it_private(tmp_path: Path) -> None:
    """The database is created with its mode: there is no moment when it is 0644."""
    import signal
    import time

    for attempt in range(3):
        store = tmp_path / f"s{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import os
            os.umask(0)
            from nbpipe.store import Store
            while True:
                Store({str(store)!r}).close()
        """)])
        deadline = time.monotonic() + 60
        while not (store / "nbpipe.sqlite").exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _mode(store / "nbpipe.sqlite") == 0o600


@pytest.fixture
def jp_server_config() -> dict[str, object]:
    return {"ServerApp": {"jpserver_extensions": {"nbpipe.server": True}}}


async def test_a_folder_listing_marks_unreadable_stores_and_lists_the_rest(
        jp_fetch, jp_root_dir: Path, tmp_path_factory: pytest.TempPathFactory, client) -> None:
    import json

    good = jp_root_dir / "good" / ".nbpipe"
    pipe = Pipeline("fine", store=good, cluster=client)
    pipe.task(uses)(None, 1)
    pipe.run(check=True, timeout=120)
    pipe.close()
    for name, how in (("random", "random"), ("cut", "truncated"), ("newer", "newer")):
        other = jp_root_dir / name / ".nbpipe"
        Pipeline("x", store=other).close()
        if how == "truncated":  # big enough to cut
            big = Pipeline("x", store=other)
            for i in range(40):
                big.task(uses)("y" * 4000, i)
            big.resolve()
            big.close()
        damage(other, how)
    outside = tmp_path_factory.mktemp("outside") / ".nbpipe"
    Pipeline("away", store=outside).close()
    (jp_root_dir / "linked").mkdir()
    (jp_root_dir / "linked" / ".nbpipe").symlink_to(outside)

    answer = await jp_fetch("nbpipe", "api", "pipelines", params={"path": ""})
    rows = {r["store"]: r for r in json.loads(answer.body)}  # before: a 403 or 500 for all
    assert rows["good/.nbpipe"]["name"] == "fine" and "error" not in rows["good/.nbpipe"]
    for store, says in (("random/.nbpipe", ".recover"), ("cut/.nbpipe", ".recover"),
                        ("newer/.nbpipe", "upgrade nbpipe"), ("linked/.nbpipe", "outside")):
        assert rows[store]["name"] is None and says in rows[store]["error"], rows[store]
    for store in ("random/.nbpipe", "newer/.nbpipe"):  # and asking for them: 409, named
        with pytest.raises(Exception) as info:
            await jp_fetch("nbpipe", "api", "graph", params={"store": store, "pipeline": "x"})
        assert info.value.code == 409 and store in json.loads(info.value.response.body)["message"]
