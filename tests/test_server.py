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
