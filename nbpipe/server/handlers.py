"""REST handlers under ``/nbpipe/api/``: a thin layer over :mod:`nbpipe.queries` and
:mod:`nbpipe.control` for the JupyterLab sidebar.

Every handler requires Jupyter authentication (``@tornado.web.authenticated``); writes are POST
requests, which Jupyter also checks for an XSRF token when the client authenticates with a
cookie. Stores are named by their path relative to the server root and must lie inside it.

=====================================  ==============================================
``GET  pipelines?path=NB_OR_DIR``      pipelines of the stores for a notebook or a folder
``GET  graph?store=S&pipeline=P``      tasks, edges, counts, the last event id
``GET  events?store=S&pipeline=P&since=N``  state changes after event N, paused, the runner;
                                       ``&wait=SECONDS``: wait up to that long for one
``GET  task?store=S&pipeline=P&task=T[&source=CELL]``  attempts, logs, traceback, resources,
                                       versions; with the cell's text, whether it changed
``GET  cluster?store=S&pipeline=P``    worker pools, job scripts, batch jobs
``POST command`` (JSON body)           ``{store, pipeline, verb, tasks?, failed?, all?}``
``POST export`` (JSON body)            ``{path}``: the notebook's script, written beside it
=====================================  ==============================================
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado.ioloop import IOLoop

from .. import queries
from ..control import VERBS, steer
from ..errors import NbpipeError, StoreError, UnknownTask
from ..store import Store, is_store, known_stores

__all__ = ["HANDLERS", "setup_handlers"]

STORE_DIR = ".nbpipe"
SCAN_DEPTH = 4  # folders below the root searched for stores when no notebook is given
SKIP = {"node_modules", "__pycache__", ".git", ".ipynb_checkpoints", ".venv", "venv"}
LOG_TAIL = 16_384  # characters of stdout/stderr sent per attempt

_stores: dict[Path, Store] = {}
_stores_lock = threading.Lock()


class NbpipeHandler(APIHandler):
    """Resolves store paths inside the server root and runs queries off the event loop."""

    @property
    def root(self) -> Path:
        return Path(os.path.realpath(self.settings["server_root_dir"]))

    def inside_root(self, relative: str, what: str) -> Path:
        """``relative`` under the root, refusing anything that resolves outside it."""
        if relative is None or "\x00" in relative:
            raise tornado.web.HTTPError(400, f"{what} is missing")
        path = Path(os.path.realpath(self.root / relative.lstrip("/")))
        if path != self.root and self.root not in path.parents:
            raise tornado.web.HTTPError(403, f"{what} {relative!r} is outside the server root")
        return path

    def store(self, relative: str | None = None) -> Store:
        """The store named by the ``store`` argument (a folder holding nbpipe.sqlite)."""
        relative = relative if relative is not None else self.get_argument("store")
        path = self.inside_root(relative, "store")
        if not is_store(path):
            raise tornado.web.HTTPError(404, f"{relative!r} is not an nbpipe store")
        with _stores_lock:
            if path not in _stores:
                try:
                    _stores[path] = Store(path)
                except StoreError as exc:  # damaged, newer schema, not writable: say which
                    raise tornado.web.HTTPError(409, str(exc)) from None
            return _stores[path]

    def json_body(self) -> dict[str, Any]:
        """The request's JSON object (a 400 for anything else)."""
        try:
            body = json.loads(self.request.body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise tornado.web.HTTPError(400, "the body must be JSON (UTF-8 text)") from None
        except RecursionError:
            raise tornado.web.HTTPError(400, "the body is JSON nested too deeply") from None
        if not isinstance(body, dict):
            raise tornado.web.HTTPError(400, "the body must be a JSON object")
        return body

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    async def answer(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        """Run ``fn`` in a thread (SQLite reads, spawning a runner) and write its JSON."""
        try:
            result = await IOLoop.current().run_in_executor(None, lambda: fn(*args, **kwargs))
        except UnknownTask as exc:
            raise tornado.web.HTTPError(404, str(exc)) from None
        except StoreError as exc:
            raise tornado.web.HTTPError(409, str(exc)) from None
        except NbpipeError as exc:
            raise tornado.web.HTTPError(400, str(exc)) from None
        except sqlite3.DatabaseError as exc:  # damaged while in use: name the store, say what to do
            store = next((a for a in args if isinstance(a, Store)), None)
            if store is None:
                raise
            raise tornado.web.HTTPError(409, str(store.damaged(exc))) from None
        self.finish(json.dumps(result, default=str))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Errors as JSON ``{"message": ...}`` (the sidebar shows the message)."""
        self.set_header("Content-Type", "application/json")
        message = self._reason
        exc_info = kwargs.get("exc_info")
        if exc_info and isinstance(exc_info[1], tornado.web.HTTPError) and exc_info[1].log_message:
            message = exc_info[1].log_message
        self.finish(json.dumps({"message": message}))


class PipelinesHandler(NbpipeHandler):
    """The pipelines of a notebook's store (beside it or above it), or of every store in a folder."""

    @tornado.web.authenticated
    async def get(self) -> None:
        target = self.inside_root(self.get_argument("path", ""), "path")
        await self.answer(self._pipelines, target)

    def _pipelines(self, target: Path) -> list[dict[str, Any]]:
        """The pipelines of every store found; a store that cannot be read (damaged, newer
        schema, a link out of the root) is one entry with ``error`` saying why and no name."""
        notebook = target if target.suffix == ".ipynb" else None
        stores = _stores_for(target, self.root)
        out = []
        for path in stores:
            relative = os.path.relpath(path, self.root)
            try:
                store = self.store(relative)
                found = queries.pipelines(store)
            except tornado.web.HTTPError as exc:
                out.append(_bad_store(relative, exc.log_message or str(exc)))
                continue
            except sqlite3.DatabaseError as exc:
                out.append(_bad_store(relative, str(store.damaged(exc))))
                continue
            for p in found:
                out.append({**p, "store": self.relative(path),
                            "default": bool(notebook and p["name"] == notebook.stem)})
        return out


def _bad_store(relative: str, message: str) -> dict[str, Any]:
    """A listing's entry for a store that cannot be read: marked, not fatal to the listing."""
    return {"store": relative, "name": None, "error": message, "tasks": 0, "states": {},
            "paused": False, "runner": None, "default": False}


def _stores_for(target: Path, root: Path) -> list[Path]:
    """Stores for a notebook (the nearest ``.nbpipe`` up to the root) or under a folder."""
    if target.suffix == ".ipynb" or target.is_file():
        for folder in (target.parent, *target.parent.parents):
            if is_store(folder / STORE_DIR):
                return [folder / STORE_DIR]
            if folder == root:
                break
        return []
    found: list[Path] = []
    base_depth = len(target.parts)
    for folder, dirs, _files in os.walk(target):
        here = Path(folder)
        if is_store(here / STORE_DIR):
            found.append(here / STORE_DIR)
        dirs[:] = [d for d in dirs if d not in SKIP and not d.startswith(".")
                   and len(here.parts) - base_depth < SCAN_DEPTH]
    for path in known_stores():  # stores used elsewhere under this folder, deeper down
        real = Path(os.path.realpath(path))
        if (real == target or target in real.parents) and real not in found:
            found.append(real)
    return sorted(found)


class GraphHandler(NbpipeHandler):
    """A pipeline's tasks and edges."""

    @tornado.web.authenticated
    async def get(self) -> None:
        await self.answer(queries.graph, self.store(), self.get_argument("pipeline"))


class EventsHandler(NbpipeHandler):
    """State changes after an event id: the sidebar polls this for live updates."""

    @tornado.web.authenticated
    async def get(self) -> None:
        try:
            since = int(self.get_argument("since", "0"))
            if not 0 <= since < 2**63:  # SQLite's integers are 64-bit
                raise ValueError
        except ValueError:
            raise tornado.web.HTTPError(
                400, "since must be an event id (an integer from 0 to 2**63 - 1)") from None
        try:
            wait = float(self.get_argument("wait", "0"))
            if not 0 <= wait <= 60:
                raise ValueError
        except ValueError:
            raise tornado.web.HTTPError(
                400, "wait must be a number of seconds from 0 to 60 (how long to wait for an "
                "event after since)") from None
        await self.answer(self._events, self.store(), self.get_argument("pipeline"), since, wait)

    @staticmethod
    def _events(store: Store, pipeline: str, since: int, wait: float) -> dict[str, Any]:
        # A long poll: PostgreSQL's store wakes on NOTIFY at the runner's commit, SQLite's looks
        # every 0.2 s; either way the answer comes as soon as there is something to say.
        if wait:
            store.wait_for_events(store.pipeline_id(pipeline, create=False), since, wait)
        return queries.events(store, pipeline, since)


class TaskHandler(NbpipeHandler):
    """Everything about one task, with the tail of each attempt's output."""

    @tornado.web.authenticated
    async def get(self) -> None:
        task = self.get_argument("task")
        if not task.strip():
            raise tornado.web.HTTPError(400, "task is empty: give a task's name, label or key")
        await self.answer(self._task, self.store(), self.get_argument("pipeline"), task,
                          self.get_argument("source", None))

    @staticmethod
    def _task(store: Store, pipeline: str, task: str, source: str | None = None) -> dict[str, Any]:
        detail = queries.task_detail(store, pipeline, task)
        # the cell's text as the notebook holds it now: has it changed since the task was defined?
        detail["cell_changed"] = (queries.cell_changed(store, pipeline, detail["key"], source)
                                  if source is not None else None)
        for attempt in detail["attempts"]:
            for part in ("stdout", "stderr"):
                if attempt[part] and len(attempt[part]) > LOG_TAIL:
                    attempt[part] = attempt[part][-LOG_TAIL:]
        row = store.task_rows(store.pipeline_id(pipeline, create=False), [detail["key"]])
        detail["cell"] = row[detail["key"]]["cell"] if detail["key"] in row else None
        return detail


class ClusterHandler(NbpipeHandler):
    """The pipeline's cluster: pools, job scripts and batch jobs with their queue states."""

    @tornado.web.authenticated
    async def get(self) -> None:
        await self.answer(queries.cluster_detail, self.store(), self.get_argument("pipeline"))


class CommandHandler(NbpipeHandler):
    """Retry, kill, pause or resume, through the store's command table."""

    @tornado.web.authenticated
    async def post(self) -> None:
        body = self.json_body()
        verb = body.get("verb")
        if verb not in VERBS:
            raise tornado.web.HTTPError(400, f"verb must be one of {', '.join(VERBS)}, not {verb!r}")
        tasks = body.get("tasks") or []
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise tornado.web.HTTPError(400, "tasks must be a list of task names, labels or keys")
        store = self.store(str(body.get("store", "")))
        pipeline = body.get("pipeline")
        if not isinstance(pipeline, str):
            raise tornado.web.HTTPError(400, "pipeline must be a pipeline name")
        flags = {}
        for flag in ("failed", "all"):
            value = body.get(flag, False)
            if not isinstance(value, bool):  # "false" is a true string: refuse, do not guess
                raise tornado.web.HTTPError(400, f"{flag} must be true or false (JSON booleans), "
                                                 f"not {value!r}")
            flags[flag] = value
        await self.answer(steer, store, pipeline, verb, tasks, **flags)


class ExportHandler(NbpipeHandler):
    """Export a saved notebook to a script beside it (``nbpipe export``)."""

    @tornado.web.authenticated
    async def post(self) -> None:
        body = self.json_body()
        notebook = self.inside_root(str(body.get("path", "")), "path")
        if notebook.suffix != ".ipynb" or not notebook.is_file():
            raise tornado.web.HTTPError(404, f"{body.get('path')!r} is not a notebook")
        # The script goes beside the notebook: a symlink there must not write outside the root.
        self.inside_root(self.relative(notebook.with_suffix(".py")), "the script beside it")
        await self.answer(self._export, notebook)

    def _export(self, notebook: Path) -> dict[str, Any]:
        from ..export import write_export

        target, result = write_export(notebook)
        return {"script": self.relative(target), "tasks": result.tasks, "warnings": result.warnings}


HANDLERS: list[tuple[str, type[NbpipeHandler]]] = [
    ("pipelines", PipelinesHandler), ("graph", GraphHandler), ("events", EventsHandler),
    ("task", TaskHandler), ("cluster", ClusterHandler), ("command", CommandHandler),
    ("export", ExportHandler),
]


def setup_handlers(web_app: Any) -> None:
    """Register the handlers under ``<base_url>nbpipe/api/``."""
    base = url_path_join(web_app.settings["base_url"], "nbpipe", "api")
    web_app.add_handlers(".*$", [(url_path_join(base, name), cls) for name, cls in HANDLERS])
