"""A store that opens but is damaged deeper down names itself and the cure at every door
(issue 17, item 9).

``tests/test_robustness.py`` damages the whole file (random bytes, cut in half, a newer
schema): the store does not even open. Here the header and the schema are intact and the
damage is deeper, where only some statements meet it: pages in the middle overwritten with
random bytes, an index's pages broken, a table's pages zeroed, the file cut short. Each real
damaged file is tried through every door: the Python API in a fresh process, every ``nbpipe``
command as a real process, and every REST handler. A door may work (the damage is not on its
way) or raise :class:`nbpipe.StoreDamaged` naming the store and saying what to do, never a raw
``sqlite3`` error, a traceback or a bare 500.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

# Defined in each script (sent to the shared cluster's workers by value).
WORK = '''
def noisy(i):
    print("x" * 1500, i)  # attempts with output: many pages to damage
    return i


def fails():
    raise ValueError("on purpose")
'''

POPULATE = WORK + '''
import sys
from nbpipe import Pipeline

pipe = Pipeline("demo", store=sys.argv[1], cluster=sys.argv[2])
refs = [pipe.task(noisy)(i) for i in range(80)]
pipe.task(fails)()
summary = pipe.run(timeout=300)
assert summary.counts == {"SUCCEEDED": 80, "FAILED": 1}, summary
pipe.close()
'''

#: Every door of the Python API, each tried on its own (a fresh Pipeline each time).
DOORS = WORK + '''
import json, sys, traceback
from nbpipe import Pipeline, StoreDamaged
from nbpipe import queries
from nbpipe.store import Store

store, address = sys.argv[1], sys.argv[2]


def opened():
    return Pipeline("demo", store=store, cluster=address)


def result():
    pipe = opened()
    return pipe.task(noisy)(3).result(timeout=120)


def why():
    pipe = opened()
    pipe.task(noisy)(3)
    return pipe.why("noisy(i=3)")


def run():
    pipe = opened()
    for i in range(80):
        pipe.task(noisy)(i)
    pipe.task(fails)()
    return str(pipe.run(timeout=120))


DOORS = {
    "Pipeline()": opened,
    "tasks": lambda: len(opened().tasks()),
    "tasks(state)": lambda: len(opened().tasks("FAILED")),
    "result": result,
    "why": why,
    "run": run,
    "retry": lambda: opened().retry(failed=True),
    "kill": lambda: opened().kill(all=True),
    "pause": lambda: opened().pause(),
    "resume": lambda: opened().resume(),
    "paused": lambda: opened().paused,
    "reopen": lambda: opened().reopen("other"),
    "queries.pipelines": lambda: queries.pipelines(Store(store)),
    "queries.graph": lambda: len(queries.graph(Store(store), "demo")),
    "queries.doctor": lambda: queries.doctor(Store(store))["ok"],
    "queries.gc": lambda: queries.gc(Store(store)),
    "queries.delete_pipeline": lambda: queries.delete_pipeline(Store(store), "demo", force=True),
}
for name, door in DOORS.items():
    try:
        door()
        outcome = {"door": name, "error": None}
    except StoreDamaged as exc:
        outcome = {"door": name, "error": "StoreDamaged", "message": str(exc)}
    except BaseException as exc:
        outcome = {"door": name, "error": type(exc).__name__, "message": str(exc),
                   "traceback": traceback.format_exc()}
    print("DOOR", json.dumps(outcome), flush=True)
'''


def _script(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory, cluster) -> Path:
    """A project whose store holds pipeline ``demo``: 80 tasks done with output, one failed."""
    project = tmp_path_factory.mktemp("populated")
    script = _script(project / "populate.py", POPULATE)
    done = subprocess.run([sys.executable, str(script), str(project / ".nbpipe"),
                           cluster.scheduler_address], cwd=project, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return project


def _pages(db: Path, name: str) -> list[int]:
    """The page numbers of table or index ``name`` (SQLite's dbstat)."""
    conn = sqlite3.connect(db)
    try:
        return [n for (n,) in conn.execute("SELECT pageno FROM dbstat WHERE name = ?", (name,))]
    finally:
        conn.close()


def deep_damage(store: Path, how: str) -> None:
    """Damage ``store``'s database below its header and schema, for real."""
    db = store / "nbpipe.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    for extra in ("-wal", "-shm"):
        Path(f"{db}{extra}").unlink(missing_ok=True)
    count = db.stat().st_size // page
    if how == "middle":  # random bytes over the middle third of the pages
        pages = range(count // 3 + 1, 2 * count // 3 + 1)
    elif how == "index":  # an index's pages broken (the table behind it intact)
        pages = _pages(db, "tasks_label")
    elif how == "tasks zeroed":
        pages = _pages(db, "tasks")
    elif how == "events zeroed":
        pages = _pages(db, "events")
    elif how == "truncated":  # cut at two thirds (a copy that stopped, a full disk)
        with open(db, "r+b") as f:
            f.truncate(2 * count // 3 * page)
        return
    assert pages and min(pages) > 1, (how, pages)  # the header and the schema stay intact
    with open(db, "r+b") as f:
        for number in pages:
            f.seek((number - 1) * page)
            f.write(bytes(page) if how.endswith("zeroed") else os.urandom(page))


DEEP = ["middle", "index", "tasks zeroed", "events zeroed", "truncated"]
#: Doors that must meet the damage (so the test knows it is real), by kind of damage.
MUST_MEET = {"middle": {"queries.doctor"}, "index": {"run", "queries.doctor"},
             "tasks zeroed": {"tasks", "run", "queries.graph"},
             "events zeroed": {"run", "queries.doctor"}, "truncated": {"Pipeline()", "tasks"}}


@pytest.fixture(params=DEEP)
def damaged(request: pytest.FixtureRequest, populated: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the populated project with its store damaged one way."""
    project = tmp_path / "project"
    shutil.copytree(populated, project)
    deep_damage(project / ".nbpipe", request.param)
    return project, request.param


def _says_damaged(message: str, store: Path) -> bool:
    flat = " ".join(message.split())
    return str(store) in flat and ".recover" in flat and "cp -a" in flat


@pytest.mark.timeout(900)
def test_every_python_door_of_a_deep_damaged_store_names_it_and_the_cure(
        damaged: tuple[Path, str], cluster) -> None:
    project, how = damaged
    store = project / ".nbpipe"
    script = _script(project / "doors.py", DOORS)
    done = subprocess.run([sys.executable, str(script), str(store), cluster.scheduler_address],
                          cwd=project, capture_output=True, text=True, timeout=800)
    outcomes = {o["door"]: o for o in (json.loads(line[5:]) for line in done.stdout.splitlines()
                                       if line.startswith("DOOR "))}
    assert len(outcomes) == 17, (done.stdout, done.stderr[-3000:])
    wrong = {door: outcome for door, outcome in outcomes.items() if outcome["error"] is not None
             and not (outcome["error"] == "StoreDamaged"
                      and _says_damaged(outcome["message"], store))}
    assert not wrong, (how, wrong)
    met = {door for door, outcome in outcomes.items() if outcome["error"]}
    assert MUST_MEET[how] <= met, (how, outcomes)


#: Commands that only read or post a command, run a few at once.
COMMANDS = [["pipelines"], ["pipelines", "--all"], ["tasks", "demo"],
            ["tasks", "demo", "--state", "FAILED"], ["show", "demo", "noisy(i=3)"],
            ["logs", "demo", "noisy(i=3)"], ["why", "demo", "noisy(i=3)"], ["graph", "demo"],
            ["retry", "demo", "--failed", "--no-spawn"], ["kill", "demo", "--all"],
            ["pause", "demo"], ["resume", "demo", "--no-spawn"]]
#: Then those that look at runner locks (another command's look holds one for an instant) or
#: change the store, one after the other (a delete first would leave the others no pipeline).
CHANGING = [["gc", "--dry-run"], ["doctor"], ["doctor", "--json"], ["doctor", "--repair"],
            ["gc"], ["delete", "demo", "--force"]]


@pytest.mark.timeout(900)  # a couple of dozen command-line processes on a loaded machine
def test_every_command_on_a_deep_damaged_store_names_it_and_the_cure(
        damaged: tuple[Path, str]) -> None:
    project, how = damaged
    store = project / ".nbpipe"
    env = {**os.environ, "XDG_DATA_HOME": str(project / "xdg")}
    (project / "xdg" / "nbpipe").mkdir(parents=True)
    (project / "xdg" / "nbpipe" / "stores.txt").write_text(f"{store}\n")

    def cli(args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "nbpipe.cli", "--store", str(store), *args],
                              capture_output=True, text=True, timeout=300, cwd=project, env=env)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(cli, COMMANDS))
    results += [cli(args) for args in CHANGING]
    failed = set()
    for args, done in zip(COMMANDS + CHANGING, results, strict=True):
        output = done.stdout + done.stderr
        assert "Traceback" not in output, (how, args, output)
        if args[0] == "doctor":  # its own finding, with its advice, and exit code 1
            assert done.returncode == 1 and ".recover" in output, (how, args, output)
            continue
        if args[:2] == ["pipelines", "--all"]:  # a listing marks the store, it does not fail
            assert done.returncode == 0, (how, args, output)
            if "(unreadable)" in output:
                failed.add("pipelines --all")
                assert ".recover" in output, (how, args, output)
            continue
        if done.returncode != 0:
            failed.add(" ".join(args))
            assert done.returncode == 2 and _says_damaged(output, store), (how, args, output)
    assert failed, (how, "no command met the damage")


@pytest.fixture
def jp_server_config() -> dict[str, object]:
    return {"ServerApp": {"jpserver_extensions": {"nbpipe.server": True}}}


async def test_every_rest_handler_on_a_deep_damaged_store_answers_json_naming_it(
        jp_fetch, jp_root_dir: Path, populated: Path) -> None:
    import tornado.httpclient

    for how in DEEP:
        shutil.copytree(populated, jp_root_dir / how.replace(" ", "-"))
        deep_damage(jp_root_dir / how.replace(" ", "-") / ".nbpipe", how)
    listing = json.loads((await jp_fetch("nbpipe", "api", "pipelines", params={"path": ""})).body)
    for how in DEEP:
        store = f"{how.replace(' ', '-')}/.nbpipe"
        rows = [r for r in listing if r["store"] == store]
        assert rows, (how, listing)  # listed, or marked: never missing, never the whole list lost
        for row in rows:
            assert row["name"] == "demo" or (row["name"] is None and ".recover" in row["error"])
        requests = [("graph", {"store": store, "pipeline": "demo"}, None),
                    ("events", {"store": store, "pipeline": "demo", "since": "0"}, None),
                    ("task", {"store": store, "pipeline": "demo", "task": "noisy(i=3)"}, None),
                    ("cluster", {"store": store, "pipeline": "demo"}, None),
                    ("command", {}, {"store": store, "pipeline": "demo", "verb": "retry",
                                     "failed": True}),
                    ("command", {}, {"store": store, "pipeline": "demo", "verb": "pause"})]
        answers = []
        for handler, params, body in requests:
            try:
                if body is None:
                    answer = await jp_fetch("nbpipe", "api", handler, params=params)
                else:
                    answer = await jp_fetch("nbpipe", "api", handler, method="POST",
                                            body=json.dumps(body))
                answers.append((handler, answer.code, json.loads(answer.body)))
            except tornado.httpclient.HTTPClientError as exc:
                assert exc.response is not None, (how, handler, exc)
                answers.append((handler, exc.code, json.loads(exc.response.body)))
        for handler, code, data in answers:
            assert code in (200, 409), (how, handler, code, data)
            if code == 409:
                assert store in data["message"] and ".recover" in data["message"], (how, data)
        assert any(code == 409 for _, code, _ in answers) or how in ("middle", "index"), \
            (how, answers)
