"""The server extension's REST API on a real Jupyter server (pytest-jupyter), over a real store."""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
from tornado.httpclient import HTTPClientError

from nbpipe import Pipeline
from nbpipe.server.handlers import HANDLERS

FLAG = "ready.flag"


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"nbpipe.server": True}}}


@pytest.fixture
def project(jp_root_dir: Path, client, cluster, monkeypatch) -> Path:
    """analysis/run.ipynb's store beside it: a pipeline of 4 tasks, one of them FAILED."""
    folder = jp_root_dir / "analysis"
    folder.mkdir()
    (folder / "run.ipynb").write_text("{}")
    flag = folder / FLAG
    # a detached runner started by a retry reaches the shared test cluster
    monkeypatch.setenv("DASK_NBPIPE__CLUSTER", cluster.scheduler_address)
    pipe = Pipeline("run", store=folder / ".nbpipe", cluster=client)

    @pipe.task
    def square(x: int) -> int:
        return x * x

    @pipe.task
    def picky(values: list[int], flag: str) -> int:
        if not Path(flag).exists():
            raise RuntimeError("the flag file is not there yet")
        return sum(values)

    picky([square(i) for i in range(3)], str(flag))
    pipe.run()
    pipe.close()
    return folder


async def get(jp_fetch, name: str, **params):
    response = await jp_fetch("nbpipe", "api", name, params=params)
    return json.loads(response.body)


async def test_every_handler_refuses_requests_without_authentication(jp_fetch, project) -> None:
    for name, cls in HANDLERS:
        methods = [m for m in ("GET", "POST") if m.lower() in vars(cls)]
        assert methods, name
        for method in methods:
            with pytest.raises(HTTPClientError) as info:
                await jp_fetch("nbpipe", "api", name, method=method,
                               body="{}" if method == "POST" else None, headers={"Authorization": ""})
            assert info.value.code == 403, (name, method, info.value.code)


async def test_a_post_with_the_login_cookie_but_no_xsrf_token_is_refused(
        jp_fetch, jp_serverapp, project, http_server_client, jp_base_url) -> None:
    login = await http_server_client.fetch(  # a browser's first visit: ?token= logs it in
        f"{jp_base_url}api/contents?{urlencode({'token': jp_serverapp.identity_provider.token})}",
        raise_error=False)
    cookies = "; ".join(c.split(";")[0] for c in login.headers.get_list("Set-Cookie"))
    assert "username-" in cookies
    body = json.dumps({"store": "analysis/.nbpipe", "pipeline": "run", "verb": "pause"})
    refused = await http_server_client.fetch(f"{jp_base_url}nbpipe/api/command", method="POST", body=body,
                                             headers={"Cookie": cookies}, raise_error=False)
    assert refused.code == 403 and b"XSRF" in refused.body.upper()
    page = await http_server_client.fetch(f"{jp_base_url}login", raise_error=False)  # sets _xsrf
    xsrf_cookie = next(c.split(";")[0] for c in page.headers.get_list("Set-Cookie") if c.startswith("_xsrf="))
    cookies += "; " + xsrf_cookie
    xsrf = xsrf_cookie.split("=", 1)[1]
    allowed = await http_server_client.fetch(
        f"{jp_base_url}nbpipe/api/command", method="POST", body=body,
        headers={"Cookie": cookies, "X-XSRFToken": xsrf}, raise_error=False)
    assert allowed.code == 200, allowed.body


async def test_a_notebooks_pipelines_come_from_the_store_beside_it(jp_fetch, project) -> None:
    found = await get(jp_fetch, "pipelines", path="analysis/run.ipynb")
    assert [(p["store"], p["name"], p["default"]) for p in found] == [("analysis/.nbpipe", "run", True)]
    assert found[0]["states"] == {"SUCCEEDED": 3, "FAILED": 1}
    everywhere = await get(jp_fetch, "pipelines")  # the whole server root
    assert [p["name"] for p in everywhere] == ["run"]


async def test_graph_events_and_task_detail(jp_fetch, project) -> None:
    graph = await get(jp_fetch, "graph", store="analysis/.nbpipe", pipeline="run")
    labels = {n["label"]: n for n in graph["nodes"]}
    picky = next(n for n in graph["nodes"] if n["name"] == "picky")
    assert set(labels) == {"square(x=0)", "square(x=1)", "square(x=2)", picky["label"]}
    assert picky["state"] == "FAILED" and "flag file" in picky["error"]
    assert len(graph["edges"]) == 3 and graph["last_event"] > 0
    assert all(e["child"] == picky["key"] for e in graph["edges"])
    events = await get(jp_fetch, "events", store="analysis/.nbpipe", pipeline="run", since=0)
    assert events["last_event"] == graph["last_event"]
    # (a quick task's PENDING and RUNNING events may give way to its SUCCEEDED: see Batch)
    assert {e["state"] for e in events["events"]} >= {"PENDING", "SUCCEEDED", "FAILED"}
    later = await get(jp_fetch, "events", store="analysis/.nbpipe", pipeline="run",
                      since=graph["last_event"])
    assert later["events"] == []
    task = await get(jp_fetch, "task", store="analysis/.nbpipe", pipeline="run", task="picky")
    attempt = task["attempts"][-1]
    assert attempt["state"] == "FAILED" and "RuntimeError" in attempt["traceback"]
    assert attempt["python"] and attempt["hostname"] and task["reason"] == "new task"


@pytest.mark.parametrize(("params", "code", "message"), [
    ({"store": "../outside/.nbpipe", "pipeline": "run"}, 403, "outside the server root"),
    ({"store": "/etc", "pipeline": "run"}, 404, "not an nbpipe store"),
    ({"store": "analysis", "pipeline": "run"}, 404, "not an nbpipe store"),
    ({"store": "analysis/.nbpipe", "pipeline": "nope"}, 404, "nope"),
])
async def test_bad_stores_and_pipelines_are_refused_with_a_message(jp_fetch, project, params, code,
                                                                    message) -> None:
    with pytest.raises(HTTPClientError) as info:
        await jp_fetch("nbpipe", "api", "graph", params=params)
    assert info.value.code == code
    assert message in json.loads(info.value.response.body)["message"]


async def test_a_symlink_out_of_the_root_is_refused(jp_fetch, project, tmp_path) -> None:
    outside = tmp_path / "elsewhere"
    Pipeline("x", store=outside / ".nbpipe").close()
    (project / "link").symlink_to(outside)
    with pytest.raises(HTTPClientError) as info:
        await jp_fetch("nbpipe", "api", "graph", params={"store": "analysis/link/.nbpipe", "pipeline": "x"})
    assert info.value.code == 403


async def test_commands_pause_resume_and_retry_start_a_runner(jp_fetch, project) -> None:
    async def command(**body):
        response = await jp_fetch("nbpipe", "api", "command", method="POST",
                                  body=json.dumps({"store": "analysis/.nbpipe", "pipeline": "run", **body}))
        return json.loads(response.body)

    await command(verb="pause")
    assert (await get(jp_fetch, "events", store="analysis/.nbpipe", pipeline="run"))["paused"]
    await command(verb="resume")
    with pytest.raises(HTTPClientError) as info:
        await command(verb="explode")
    assert info.value.code == 400
    (project / FLAG).write_text("go")
    result = await command(verb="retry", tasks=["picky"])
    assert result["runner"] == "none" and result["spawned"]  # a detached runner does the work

    async def state() -> str:
        graph = await get(jp_fetch, "graph", store="analysis/.nbpipe", pipeline="run")
        return next(n["state"] for n in graph["nodes"] if n["name"] == "picky")

    deadline = time.monotonic() + 60
    while await state() != "SUCCEEDED" and time.monotonic() < deadline:
        import asyncio

        await asyncio.sleep(0.2)
    assert await state() == "SUCCEEDED"


async def test_export_writes_the_script_beside_the_notebook(jp_fetch, project) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("%%task x\nx = 1"),
                                         nbformat.v4.new_code_cell("!ls")])
    nbformat.write(nb, project / "small.ipynb")
    response = await jp_fetch("nbpipe", "api", "export", method="POST",
                              body=json.dumps({"path": "analysis/small.ipynb"}))
    result = json.loads(response.body)
    assert result["script"] == "analysis/small.py" and result["tasks"] == ["x"]
    assert "cell 2" in result["warnings"][0]
    assert "@nbpipe.task(outputs=['x']" in (project / "small.py").read_text()
    for path, code in (("../small.ipynb", 403), ("analysis/run.txt", 404)):
        with pytest.raises(HTTPClientError) as info:
            await jp_fetch("nbpipe", "api", "export", method="POST", body=json.dumps({"path": path}))
        assert info.value.code == code


# -- the sidebar's view of the truth ---------------------------------------------------------------


class _CommitBetweenReads:
    """A store connection after whose n-th SELECT another connection (a runner) commits."""

    def __init__(self, conn, after: int, commit) -> None:
        self._conn, self._after, self._commit, self.selects = conn, after, commit, 0

    def execute(self, sql: str, *args):
        cursor = self._conn.execute(sql, *args)
        if sql.lstrip().upper().startswith("SELECT"):
            self.selects += 1
            if self.selects == self._after:
                self._commit()
        return cursor

    def __getattr__(self, name: str):
        return getattr(self._conn, name)


def _registered(store_dir: Path, n: int) -> Pipeline:
    """A pipeline of ``n`` mapped tasks and one that needs them all, recorded (not run)."""
    pipe = Pipeline("map", store=store_dir)

    @pipe.task
    def item(i: int) -> int:
        return i

    @pipe.task
    def total(values: list[int]) -> int:
        return sum(values)

    total([item(i) for i in range(n)])
    pipe.resolve()
    return pipe


def test_a_commit_between_any_two_reads_of_the_graph_reaches_the_view(tmp_path: Path, monkeypatch) -> None:
    """The view's snapshot plus the events after its cursor is the truth, wherever a runner's
    commit falls among the reads that build the snapshot."""
    import threading

    from nbpipe import queries
    from nbpipe.store import Batch, Store

    pipe = _registered(tmp_path / ".nbpipe", 30)
    keys = [r.key for r in pipe._refs.values()]
    pipe.close()
    store = Store(tmp_path / ".nbpipe")
    writer = Store(tmp_path / ".nbpipe")  # the runner: its own connection
    pid = store.pipeline_id("map", create=False)
    real = store.connect()
    # how many SELECTs one snapshot takes: a commit can fall after each of them
    probe = _CommitBetweenReads(real, 0, lambda: None)
    monkeypatch.setattr(store, "connect", lambda: probe)
    queries.graph(store, "map")
    assert probe.selects >= 3
    for after in range(1, probe.selects + 1):
        key, state = keys[after % len(keys)], ("SUCCEEDED" if after % 2 else "FAILED")

        def write(key: str = key, state: str = state, attempts: int = after) -> None:
            batch = Batch()
            batch.state(pid, key, state, attempts=attempts, message="committed between two reads")
            writer.write(batch)

        def commit(write=write) -> None:
            thread = threading.Thread(target=write)
            thread.start()
            thread.join()

        interleaved = _CommitBetweenReads(real, after, commit)
        monkeypatch.setattr(store, "connect", lambda interleaved=interleaved: interleaved)
        view = queries.graph(store, "map")
        monkeypatch.setattr(store, "connect", lambda: real)
        assert interleaved.selects >= after  # the commit did fall between two reads
        # the client: the snapshot, then every event after its cursor
        states = {n["key"]: n["state"] for n in view["nodes"]}
        for event in queries.events(store, "map", view["last_event"])["events"]:
            if event["key"] in states and event["state"]:
                states[event["key"]] = event["state"]
        truth = {k: r["state"] for k, r in store.task_rows(pid).items()}
        assert states == truth, f"a commit after read {after} was lost"
        assert sum(queries.graph(store, "map")["counts"].values()) == len(keys)


async def test_the_graph_lists_tasks_in_the_order_they_were_defined(jp_fetch, jp_root_dir: Path) -> None:
    pipe = _registered(jp_root_dir / ".nbpipe", 12)
    expected = [r.label for r in pipe._refs.values()]
    pipe.close()
    for _ in range(2):  # the same order every time
        graph = await get(jp_fetch, "graph", store=".nbpipe", pipeline="map")
        assert [n["label"] for n in graph["nodes"]] == expected


async def test_events_carry_the_live_runner_and_drop_a_dead_one(jp_fetch, jp_root_dir: Path) -> None:
    """A runner's record outlives its process (a kernel restart): only a held lock counts."""
    from nbpipe.store import RunnerLock, Store

    _registered(jp_root_dir / ".nbpipe", 2).close()
    store = Store(jp_root_dir / ".nbpipe")
    pid = store.pipeline_id("map", create=False)
    lock = RunnerLock(store, "map")
    lock.acquire()
    store.set_runner(pid, {"pid": 4242, "host": "here", "started": 1.0, "cluster": "local",
                           "dashboard": "http://127.0.0.1:8787/status"})
    events = await get(jp_fetch, "events", store=".nbpipe", pipeline="map", since=0)
    graph = await get(jp_fetch, "graph", store=".nbpipe", pipeline="map")
    assert events["runner"]["pid"] == graph["runner"]["pid"] == 4242
    lock.release()  # the runner's process died: its record stays, its lock does not
    events = await get(jp_fetch, "events", store=".nbpipe", pipeline="map", since=0)
    graph = await get(jp_fetch, "graph", store=".nbpipe", pipeline="map")
    assert events["runner"] is None and graph["runner"] is None


def test_the_static_graph_groups_mapped_tasks_and_reads_in_dark_themes(tmp_path: Path) -> None:
    from nbpipe.display import counts_line, task_graph

    pipe = _registered(tmp_path / ".nbpipe", 300)
    refs = list(pipe._refs.values())
    states = ["FAILED" if i < 3 else "RUNNING" if i < 10 else "SUCCEEDED" for i in range(len(refs))]
    dot = task_graph("map", [(r.key, r.label, s, r.name) for r, s in zip(refs, states, strict=True)],
                     [(d.key, r.key) for r in refs for d in r.deps])
    pipe.close()
    source = dot.source
    assert source.count("->") == 1  # 300 edges into `total` are one edge from the group
    assert "item ×300" in source and counts_line(states[:300]) in source
    assert counts_line(states[:300]) == "3 failed · 7 running · 290 done"
    assert "bgcolor=transparent" in source  # no white box in a dark notebook
    assert "#ffffff" not in source.lower() and "black" not in source


async def _execute_like_jupyterlab(folder: Path, cells: list[str]) -> None:
    """Run cells on a real kernel the way JupyterLab does: each request names its cell's id."""
    from jupyter_client.manager import AsyncKernelManager

    manager = AsyncKernelManager(kernel_name="python3")
    await manager.start_kernel(cwd=str(folder))
    kc = manager.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=120)
        for i, source in enumerate(cells):
            msg = kc.session.msg("execute_request", {
                "code": source, "silent": False, "store_history": True, "user_expressions": {},
                "allow_stdin": False, "stop_on_error": True}, metadata={"cellId": f"cell-{i}"})
            kc.shell_channel.send(msg)
            reply = await kc.get_shell_msg(timeout=300)
            while reply["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
                reply = await kc.get_shell_msg(timeout=300)
            assert reply["content"]["status"] == "ok", (source, reply["content"])
    finally:
        kc.stop_channels()
        await manager.shutdown_kernel(now=True)


async def test_the_task_panel_says_when_its_cell_has_changed(jp_fetch, jp_root_dir: Path, cluster,
                                                              monkeypatch) -> None:
    """A retry runs the task as defined; the panel compares the cell's text now with it."""
    import nbformat

    monkeypatch.setenv("DASK_NBPIPE__CLUSTER", cluster.scheduler_address)
    monkeypatch.setenv("NBPIPE_WIDGETS", "0")
    monkeypatch.delenv("NBPIPE_STORE", raising=False)
    monkeypatch.delenv("NBPIPE_PIPELINE", raising=False)
    path = jp_root_dir / "cells.ipynb"
    stats = "%%task stats --retries 1\nmean = sum(data) / len(data)  # the mean"
    cells = ["%load_ext nbpipe", "%%task data\ndata = [1, 2, 3]", stats, "%%task listing --bash\nls -l",
             "from nbpipe import task\n\n@task\ndef double(x: int) -> int:\n    return 2 * x\n\n"
             "d = double(2)\nd.result()"]
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells]), path)
    monkeypatch.setenv("JPY_SESSION_NAME", str(path))
    await _execute_like_jupyterlab(jp_root_dir, cells)

    async def changed(task: str, source: str):
        detail = await get(jp_fetch, "task", store=".nbpipe", pipeline="cells", task=task, source=source)
        return detail["cell_changed"]

    detail = await get(jp_fetch, "task", store=".nbpipe", pipeline="cells", task="stats")
    assert detail["cell"] == "cell-2" and detail["cell_changed"] is None  # not asked: no source sent
    # the same code: comments, formatting and the %%task options do not count
    assert await changed("stats", "%%task stats\nmean = sum(data)/len(data)") is False
    assert await changed("stats", stats) is False
    # other code, code that no longer parses, or no longer a %%task cell: changed
    assert await changed("stats", "%%task stats\nmean = sum(data) / len(data) + 1") is True
    assert await changed("stats", "%%task stats\nmean = (") is True
    assert await changed("stats", "mean = sum(data) / len(data)") is True
    # a bash cell: its text, stripped
    assert await changed("listing", "%%task listing --bash\nls -l\n") is False
    assert await changed("listing", "%%task listing --bash\nls -la") is True
    # a function task has no cell to compare with
    assert await changed("double", "anything") is None


async def test_the_sidebar_finds_a_store_whose_database_is_kept_elsewhere(
    jp_fetch, jp_root_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """A store folder on a network file system keeps its database on a local disk
    (``database=``, docs/store.md): the sidebar finds it by the folder alone."""
    local = tmp_path / "local-disk" / "map.sqlite"
    monkeypatch.setenv("NBPIPE_DATABASE", str(local))
    _registered(jp_root_dir / ".nbpipe", 3).close()
    monkeypatch.delenv("NBPIPE_DATABASE")
    assert local.is_file() and not (jp_root_dir / ".nbpipe" / "nbpipe.sqlite").exists()
    assert [p["name"] for p in await get(jp_fetch, "pipelines")] == ["map"]
    graph = await get(jp_fetch, "graph", store=".nbpipe", pipeline="map")
    assert len(graph["nodes"]) == 4
