"""The server extension on both engines: the sidebar's REST reads of a store named by its
folder (a PostgreSQL store's results folder names its database), and the events long poll
(``wait=``) that answers at the runner's commit -- ``NOTIFY`` on PostgreSQL, a look every 0.2 s
on SQLite."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
from test_store_engines import fresh_schema, postgres_url

from nbpipe import Pipeline
from nbpipe.store import Batch, Store


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"nbpipe.server": True}}}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.ci_required)])
def folder_store(request: pytest.FixtureRequest, jp_root_dir: Path):
    """A store whose folder lies in the server root: ``.nbpipe``, or a PostgreSQL store's
    results folder."""
    if request.param == "sqlite":
        yield Store(jp_root_dir / ".nbpipe"), ".nbpipe"
        return
    with fresh_schema(postgres_url()) as url:
        yield Store(url, results=jp_root_dir / "results"), "results"


async def get(jp_fetch, name: str, **params):
    response = await jp_fetch("nbpipe", "api", name, params=params)
    return json.loads(response.body)


async def test_the_sidebar_reads_and_waits_for_events_of_a_store_on_either_engine(
        jp_fetch, folder_store, client) -> None:
    store, relative = folder_store
    pipe = Pipeline("watched", store=store, cluster=client)

    @pipe.task
    def one() -> int:
        return 1

    one()
    pipe.run()
    graph = await get(jp_fetch, "graph", store=relative, pipeline="watched")
    assert [n["state"] for n in graph["nodes"]] == ["SUCCEEDED"]
    since = graph["last_event"]
    key = graph["nodes"][0]["key"]

    def later_write() -> None:  # another process's runner, a moment after the request
        time.sleep(1.0)
        batch = Batch()
        batch.state(pipe.pipeline_id, key, "WAITING", attempts=1, message="written elsewhere")
        Store(os.fspath(store.url) if store.engine == "postgresql" else store.path).write(batch)

    started = time.monotonic()
    waiting = asyncio.ensure_future(get(jp_fetch, "events", store=relative, pipeline="watched",
                                        since=since, wait=30))
    await asyncio.get_running_loop().run_in_executor(None, later_write)
    answer = await waiting
    took = time.monotonic() - started
    assert [e["message"] for e in answer["events"]] == ["written elsewhere"]
    assert 1.0 <= took < 25, took  # it waited for the write, and not the whole 30 s
    empty = await get(jp_fetch, "events", store=relative, pipeline="watched",
                      since=answer["last_event"], wait=0.5)
    assert empty["events"] == []
    pipe.close()
