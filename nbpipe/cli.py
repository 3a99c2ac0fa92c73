"""The ``nbpipe`` command: inspect and control pipelines from a terminal.

    nbpipe pipelines
    nbpipe tasks pi --state FAILED
    nbpipe show pi average
    nbpipe retry pi --failed

Every listing takes ``--json``. The store is ``--store DIR``, else ``$NBPIPE_STORE``, else the
nearest ``.nbpipe`` from the current directory upward. ``--store`` and ``--json`` go before or
after the command name (``nbpipe --store DIR tasks pi`` is ``nbpipe tasks pi --store DIR``).
Exit codes: 0 success, 1 a task failed (``run``) or a check failed (``doctor``), 2 a usage error.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import queries
from .errors import ConfigError, NbpipeError, StoreDamaged
from .pipeline import Pipeline
from .states import State
from .store import Store, is_store
from .store.postgres import is_url

console = Console()

JSON_COMMANDS = {"doctor", "events", "pipelines", "show", "tasks"}  # the commands with a --json option

STATE_STYLE = {
    "WAITING": "dim", "PENDING": "cyan", "RUNNING": "blue", "SUCCEEDED": "green",
    "FAILED": "red", "UPSTREAM_FAILED": "yellow", "KILLED": "magenta",
    "TIMED_OUT": "red",  # an attempt stopped by its timeout (nbpipe.policy)
}


class _Group(click.Group):
    """Turns nbpipe's own errors into a one-line message and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NbpipeError as exc:
            raise click.UsageError(str(exc), ctx) from None
        except sqlite3.DatabaseError as exc:  # the store got damaged under the command
            store = (ctx.obj or {}).get("opened")
            if store is None:
                raise
            raise click.UsageError(str(store.damaged(exc)), ctx) from None


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """Keep a global option given after the command name where the group's own copy goes."""
    if value is not None and value is not False:
        ctx.ensure_object(dict)[param.name] = value


def _store_option(command: Any) -> Any:
    """``--store`` after the command name too: people put it where they think of it."""
    return click.option("--store", type=click.Path(file_okay=False), expose_value=False,
                        callback=_remember, help="the store: a folder or a postgresql:// URL")(command)


def _store(ctx: click.Context) -> Store:
    path = ctx.obj.get("store") or os.environ.get("NBPIPE_STORE")
    if not path:
        from .config import setting

        try:
            path = setting("store")  # the project's nbpipe.yaml (a PostgreSQL URL, a folder)
        except ConfigError as exc:
            # Steering needs only the store: a broken nbpipe.yaml must not stop pause, kill or
            # retry (running needs it, and says so). Said, never silent: the store may be named
            # in the file that could not be read.
            click.echo(f"nbpipe: {exc}\nnbpipe: looking for a .nbpipe store instead", err=True)
            path = None
    if path is None:
        found = queries.find_store()
        if found is None:
            raise click.UsageError(
                "no .nbpipe store here or in any parent directory; give one with --store DIR"
            )
        path = found
    elif not is_url(path) and not is_store(path):
        raise click.UsageError(f"{path} is not an nbpipe store (no nbpipe.sqlite in it)")
    store = ctx.obj["opened"] = Store(path)
    return store


def _output_path(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An output file's folder must exist and be writable (checked before any work is done)."""
    if value is not None:
        folder = Path(value).absolute().parent
        if not folder.is_dir():
            raise click.BadParameter(f"the folder {folder} does not exist; create it first "
                                     "(mkdir -p) or write elsewhere", ctx, param)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise click.BadParameter(f"the folder {folder} is not writable by you; write "
                                     "elsewhere", ctx, param)
    return value


def _emit(data: Any, as_json: bool, table: Table | None = None) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    elif table is not None:
        console.print(table)


def _state(state: str) -> str:
    style = STATE_STYLE.get(state)
    return f"[{style}]{state}[/]" if style else escape(state)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", type=click.Path(file_okay=False),
              help="the store: a folder, or a postgresql:// URL (its results folder: recorded, "
                   "or NBPIPE_RESULTS); also accepted after the command name")
@click.option("--json", "as_json", is_flag=True,
              help="machine-readable output of a listing (also accepted after the command name)")
@click.version_option(package_name="nbpipe")
@click.pass_context
def main(ctx: click.Context, store: str | None, as_json: bool) -> None:
    """Inspect and control nbpipe pipelines."""
    ctx.ensure_object(dict)
    ctx.obj["store"] = store
    ctx.obj["json"] = as_json
    if as_json and ctx.invoked_subcommand and ctx.invoked_subcommand not in JSON_COMMANDS:
        raise click.UsageError(
            f"--json: `nbpipe {ctx.invoked_subcommand}` has no machine-readable output; the "
            f"commands that have one are {', '.join(sorted(JSON_COMMANDS))}"
        )


@main.command()
@_store_option
@click.option("--all", "all_", is_flag=True, help="every store this user has used")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def pipelines(ctx: click.Context, all_: bool, as_json: bool) -> None:
    """Pipelines in the store, with their tasks counted by state."""
    as_json = as_json or ctx.obj["json"]
    from .store import known_stores

    rows = []
    for path in known_stores() if all_ else [None]:
        if path is None:
            store = _store(ctx)
            rows += [{**p, "store": str(store.path)} for p in queries.pipelines(store)]
            continue
        try:  # one store that cannot be read (damaged, newer) is marked, not fatal
            store = Store(path)
            rows += [{**p, "store": str(store.path)} for p in queries.pipelines(store)]
        except NbpipeError as exc:
            rows.append({"name": None, "store": str(path), "error": str(exc)})
        except sqlite3.DatabaseError as exc:
            rows.append({"name": None, "store": str(path), "error": str(store.damaged(exc))})
    table = Table("pipeline", "tasks", "states", "paused", "runner", *(["store"] if all_ else []))
    for p in rows:
        if p["name"] is None:
            table.add_row("[red](unreadable)[/]", "", escape(p["error"]), "", "", escape(p["store"]))
            continue
        states = ", ".join(f"{n} {_state(s)}" for s, n in sorted(p["states"].items()))
        runner = f"pid {p['runner']['pid']} on {p['runner']['host']}" if p["runner"] else ""
        table.add_row(p["name"], str(p["tasks"]), states, "yes" if p["paused"] else "", runner,
                      *([p["store"]] if all_ else []))
    _emit(rows, as_json, table)


@main.command()
@_store_option
@click.argument("pipeline")
@click.option("--state", type=click.Choice([s.value for s in State], case_sensitive=False))
@click.option("--name", help="glob on task names or labels, e.g. 'fraction*'")
@click.option("--upstream", metavar="TASK", help="only TASK and what it needs (transitively)")
@click.option("--downstream", metavar="TASK", help="only TASK and what needs it (transitively)")
@click.option("--as-taskfile", "taskfile", type=click.Path(dir_okay=False), metavar="FILE",
              help="write the listed task-file entries to FILE (.json, .yaml, .jsonl) for a later run")
@click.option("--from", "source", type=click.Path(exists=True, dir_okay=False), metavar="TASKFILE",
              help="with --as-taskfile: take the entries from this task file (default: the store)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def tasks(ctx: click.Context, pipeline: str, state: str | None, name: str | None,
          upstream: str | None, downstream: str | None, taskfile: str | None, source: str | None,
          as_json: bool) -> None:
    """The tasks of PIPELINE (filtered by state, name, or the sub-graph around a task)."""
    as_json = as_json or ctx.obj["json"]
    store = _store(ctx)
    rows = queries.tasks(store, pipeline, state, name, upstream=upstream, downstream=downstream)
    if taskfile is not None:
        from .taskfile import dump_tasks

        items = queries.taskfile_entries(store, rows, source)
        count = dump_tasks(taskfile, items)
        click.echo(f"wrote {count} task-file entr{'y' if count == 1 else 'ies'} to {taskfile}",
                   err=as_json)
        if not as_json:
            return
    table = Table("task", "state", "attempts", "why it ran", "key")
    for t in rows:
        # labels of task-file entries look like markup (`process[frame-001]`): print them as text
        state_text = _state(t["state"]) + (f" ({t['outcome']})" if t.get("outcome") else "")
        table.add_row(escape(t["label"]), state_text, str(t["attempts"]), escape(t["reason"] or ""),
                      t["key"][:12])
    _emit(rows, as_json, table)


@main.command()
@_store_option
@click.argument("pipeline")
@click.option("--follow", "-f", is_flag=True, help="keep printing new events until interrupted")
@click.option("--since", type=int, default=0, metavar="ID", help="only events after this id")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@click.pass_context
def events(ctx: click.Context, pipeline: str, follow: bool, since: int, as_json: bool) -> None:
    """The event log of PIPELINE: every state change with its time and message (cloud_tasks'
    event stream); --follow waits for new ones, --json prints one JSON object per line."""
    as_json = as_json or ctx.obj["json"]
    store = _store(ctx)
    labels: dict[str, str] = {}
    cursor = since
    while True:
        batch = queries.events(store, pipeline, cursor)
        missing = [e["key"] for e in batch["events"] if e["key"] and e["key"] not in labels]
        if missing:
            labels.update(store.labels_of(missing))
        for e in batch["events"]:
            e["task"] = labels.get(e["key"] or "", "")
            if as_json:
                click.echo(json.dumps(e, default=str))
            else:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"]))
                click.echo(f"{e['id']:>6} {stamp} {e['state'] or '':<15} {e['task']}"
                           + (f"  {e['message']}" if e["message"] else ""))
        sys.stdout.flush()
        cursor = batch["last_event"]
        if not follow:
            return
        if not batch["events"]:
            time.sleep(0.5)


@main.command()
@_store_option
@click.argument("pipeline")
@click.argument("task", nargs=-1, required=True)
@click.pass_context
def accept(ctx: click.Context, pipeline: str, task: tuple[str, ...]) -> None:
    """Let TASKs keep the result of their last successful run instead of running again (after
    an edit you call cosmetic); `why` says "accepted by hand on DATE"; undo with `nbpipe retry`."""
    from .accept import accept_keys

    store = _store(ctx)
    pid = store.pipeline_id(pipeline, create=False)
    keys = [t["key"] for name in task for t in queries.tasks(store, pipeline)
            if name in (t["name"], t["label"]) or t["key"].startswith(name)]
    if not keys:
        raise click.UsageError(f"no task {task[0]!r} in pipeline {pipeline!r}; "
                               f"`nbpipe tasks {pipeline}` lists its tasks")
    accepted = accept_keys(store, pid, list(dict.fromkeys(keys)), pipeline=pipeline)
    labels = store.labels_of(list(accepted))
    for key, reason in accepted.items():
        click.echo(f"{labels.get(key, key[:12])}: {reason}")
    if not accepted:
        click.echo("nothing to accept: the tasks are done already")


def _show_cluster(store: Store, pipeline: str, as_json: bool) -> None:
    detail = queries.cluster_detail(store, pipeline)
    counts = next((p for p in queries.pipelines(store) if p["name"] == pipeline), {})
    detail["states"] = counts.get("states", {})
    if as_json:
        _emit(detail, True)
        return
    states = ", ".join(f"{n} {_state(s)}" for s, n in sorted(detail["states"].items())) or "no tasks"
    console.print(f"[bold]{pipeline}[/]  {states}")
    if detail["cluster"]:
        console.print(f"runner on cluster {detail['cluster']}; dashboard {detail['dashboard'] or '-'}")
    else:
        console.print("no runner attached")
    for pool in detail["pools"]:
        console.print(f"pool {pool['description']}; job script:")
        console.print(pool["job_script"].rstrip(), markup=False, highlight=False)
    if detail["jobs"]:
        table = Table("pool", "job", "worker", "state", "submitted", "ended")
        for j in detail["jobs"]:
            table.add_row(j["pool"], j["job_id"], j["name"], j["state"] or "",
                          time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["submitted"])),
                          time.strftime("%H:%M:%S", time.localtime(j["ended"])) if j["ended"] else "")
        console.print(table)


@main.command()
@_store_option
@click.argument("pipeline")
@click.argument("task", required=False)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def show(ctx: click.Context, pipeline: str, task: str | None, as_json: bool) -> None:
    """Everything about TASK: key, state, resources, why it ran, attempts (with batch job ids)
    and versions. Without TASK: the pipeline's cluster, worker pools with their job scripts,
    and batch jobs with their scheduler states."""
    as_json = as_json or ctx.obj["json"]
    if task is None:
        _show_cluster(_store(ctx), pipeline, as_json)
        return
    detail = queries.task_detail(_store(ctx), pipeline, task)
    if as_json:
        _emit(detail, True)
        return
    outcome = f" ({detail['outcome']})" if detail.get("outcome") else ""
    console.print(f"[bold]{escape(detail['label'])}[/]  {_state(detail['state'])}{outcome}  "
                  f"key {detail['key']}")
    console.print(f"why it ran: {escape(detail['reason'] or '-')}")
    resources = {k: v for k, v in detail["resources"].items() if v}
    console.print(f"resources: {resources or '-'}")
    if detail["error"]:
        console.print(f"error: [red]{escape(detail['error'])}[/]")
    table = Table("attempt", "state", "seconds", "host", "worker", "job", "python", "git")
    for a in detail["attempts"]:
        seconds = f"{a['seconds']:.2f}" if a["seconds"] is not None else ""
        table.add_row(str(a["number"]), _state(a["state"]), seconds, a["hostname"] or "",
                      a["worker"] or "", a["job_id"] or "", a["python"] or "",
                      (a["git_commit"] or "")[:12])
    console.print(table)


@main.command()
@_store_option
@click.argument("pipeline")
@click.argument("task")
@click.option("--attempt", type=int, help="attempt number (default: the last)")
@click.option("--follow", is_flag=True, help="wait for the running attempt to end first")
@click.pass_context
def logs(ctx: click.Context, pipeline: str, task: str, attempt: int | None, follow: bool) -> None:
    """stdout, stderr and traceback of an attempt of TASK."""
    store = _store(ctx)
    detail = queries.task_detail(store, pipeline, task)
    while follow and detail["state"] in ("WAITING", "PENDING", "RUNNING"):
        time.sleep(0.5)  # output is recorded when an attempt ends
        detail = queries.task_detail(store, pipeline, task)
    attempts = detail["attempts"]
    if not attempts:
        raise click.UsageError(f"task {detail['label']!r} has not run yet ({detail['state']})")
    chosen = attempts[-1] if attempt is None else next(
        (a for a in attempts if a["number"] == attempt), None)
    if chosen is None:
        raise click.UsageError(f"task {detail['label']!r} has no attempt {attempt}; "
                               f"it has {len(attempts)}")
    for part in ("stdout", "stderr", "traceback"):
        if chosen[part]:
            click.echo(f"--- {part} (attempt {chosen['number']}) ---")
            click.echo(chosen[part].rstrip())
    if chosen["error"] and not chosen["traceback"]:  # e.g. a process that ended itself
        click.echo(f"--- error (attempt {chosen['number']}) ---")
        click.echo(chosen["error"])
    if chosen["exit_code"] is not None:
        click.echo(f"--- exit code (attempt {chosen['number']}): {chosen['exit_code']}")


@main.command()
@_store_option
@click.argument("pipeline")
@click.argument("task")
@click.pass_context
def why(ctx: click.Context, pipeline: str, task: str) -> None:
    """Why TASK last ran."""
    detail = queries.task_detail(_store(ctx), pipeline, task)
    click.echo(f"{detail['label']}: {detail['reason'] or 'no run recorded'}")


def _pipeline(ctx: click.Context, name: str) -> Pipeline:
    """An existing pipeline, to run it (steering needs only :class:`~nbpipe.control.Controller`)."""
    from .control import open_pipeline

    store = open_pipeline(_store(ctx), name).store  # a wrong name is an error, not a new pipeline
    return Pipeline(name, store=store)


def _spawned(result: dict[str, Any], store: Store) -> None:
    if result["spawned"]:
        click.echo(f"started a detached runner (pid {result['spawned']}); see {store.path}/logs")


@main.command()
@_store_option
@click.argument("pipeline")
@click.pass_context
def pause(ctx: click.Context, pipeline: str) -> None:
    """Start no new task in PIPELINE; running tasks finish."""
    from .control import steer

    steer(_store(ctx), pipeline, "pause")
    click.echo(f"pipeline {pipeline!r} paused")


@main.command()
@_store_option
@click.argument("pipeline")
@click.option("--no-spawn", is_flag=True, help="do not start a runner when none is attached")
@click.pass_context
def resume(ctx: click.Context, pipeline: str, no_spawn: bool) -> None:
    """Start tasks of PIPELINE again."""
    from .control import steer

    store = _store(ctx)
    result = steer(store, pipeline, "resume", start_runner=not no_spawn)
    click.echo(f"pipeline {pipeline!r} resumed")
    _spawned(result, store)


@main.command()
@_store_option
@click.argument("pipeline")
@click.argument("task", nargs=-1)
@click.option("--failed", is_flag=True, help="every failed or killed task")
@click.option("--no-spawn", is_flag=True, help="do not start a runner when none is attached")
@click.pass_context
def retry(ctx: click.Context, pipeline: str, task: tuple[str, ...], failed: bool,
          no_spawn: bool) -> None:
    """Run TASKs (or --failed ones) again, with everything they blocked."""
    from .control import steer

    if not task and not failed:
        raise click.UsageError("name tasks to retry, or use --failed")
    store = _store(ctx)
    result = steer(store, pipeline, "retry", task, failed=failed, start_runner=not no_spawn)
    click.echo(f"retry requested in pipeline {pipeline!r}")
    _spawned(result, store)


@main.command()
@_store_option
@click.argument("pipeline")
@click.argument("task", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="every unfinished task")
@click.pass_context
def kill(ctx: click.Context, pipeline: str, task: tuple[str, ...], all_: bool) -> None:
    """Stop TASKs (or --all unfinished ones) of PIPELINE."""
    from .control import steer

    if not task and not all_:
        raise click.UsageError("name tasks to kill, or use --all")
    steer(_store(ctx), pipeline, "kill", task, all=all_)
    click.echo(f"kill requested in pipeline {pipeline!r}")


@main.command()
@_store_option
@click.argument("pipeline")
@click.option("--force", is_flag=True, help="really delete (otherwise only show what would go)")
@click.pass_context
def delete(ctx: click.Context, pipeline: str, force: bool) -> None:
    """Delete PIPELINE's records from the store (result files go with `nbpipe gc`).

    Refused while a runner of PIPELINE is live.
    """
    counts = queries.delete_pipeline(_store(ctx), pipeline, force=force)
    what = ", ".join(f"{n} {table}" for table, n in counts.items())
    click.echo(f"{'deleted' if force else 'would delete'} pipeline {pipeline!r}: {what}")
    if not force:
        click.echo("run again with --force to delete")


@main.command()
@_store_option
@click.option("--dry-run", is_flag=True, help="only count what would be removed")
@click.pass_context
def gc(ctx: click.Context, dry_run: bool) -> None:
    """Remove results (files and inline ones) that no registered task could use.

    Refused while a runner of the store is live; a result file the store does not list yet is
    kept when a task could adopt it.
    """
    removed = queries.gc(_store(ctx), dry_run=dry_run)
    click.echo(f"{'would remove' if dry_run else 'removed'} {len(removed)} result(s)")


@main.group("store")
def store_group() -> None:
    """Work on a store as a whole (copy it elsewhere)."""


@store_group.command("copy")
@click.argument("source")
@click.argument("target")
@click.option("--database", type=click.Path(dir_okay=False),
              help="where the copy keeps its SQLite file (a local disk, when TARGET is on a "
                   "network file system); default: in TARGET")
@click.option("--results", type=click.Path(file_okay=False),
              help="the folder for the result files when TARGET is a PostgreSQL URL (mounted by "
                   "every host); default: $NBPIPE_RESULTS")
def store_copy(source: str, target: str, database: str | None, results: str | None) -> None:
    """Copy the store SOURCE (its database and result files) to TARGET -- a new folder, or a
    PostgreSQL URL with no pipelines yet -- and verify the copy (every row, every result's
    checksum). Either may be a folder or a postgresql:// URL. Nothing runs again from the copy.

    Refused while a runner of SOURCE is live, and when TARGET holds a store already.
    """
    from .store.copy import copy_store

    if not is_url(source) and not is_store(source):
        raise click.UsageError(f"{source} is not an nbpipe store (no nbpipe.sqlite in it)")
    report = copy_store(Store(source), target, database=database, results=results)
    rows = sum(report["tables"].values())
    if not report["ok"]:
        raise click.ClickException(f"the copy in {report['target']} differs from {source}: "
                                   f"{json.dumps(report['problems'], default=str)}")
    click.echo(f"copied {report['source']} to {report['target']} (database {report['database']}): "
               f"{rows} rows, {report['files']} files; verified")


def _damaged_report(ctx: click.Context, message: str, as_json: bool) -> None:
    """``nbpipe doctor`` on a store whose database cannot be read: the finding, exit 1."""
    if as_json:
        _emit({"integrity": ["damaged"], "ok": False, "damaged": message}, True)
    else:
        click.echo(f"database: damaged\n  {message}")
    ctx.exit(1)


@main.command()
@_store_option
@click.option("--repair", is_flag=True,
              help="forget damaged results (their tasks run again), remove left-over temporary "
                   "files, orphan specs, records of deleted pipelines and of workers killed "
                   "under a runner that is gone, release stale runners")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def doctor(ctx: click.Context, repair: bool, as_json: bool) -> None:
    """Check the store: database integrity, every result's checksum, what crashes left behind.

    Exits 1 while problems remain (after --repair: only a damaged database remains).
    """
    try:
        as_json = as_json or ctx.obj["json"]
        store = _store(ctx)
        report = queries.doctor(store, repair=repair)
    except StoreDamaged as exc:  # doctor's own finding: say it and what to do, no traceback
        _damaged_report(ctx, str(exc), as_json)
    except sqlite3.DatabaseError as exc:
        _damaged_report(ctx, str(store.damaged(exc)), as_json)
    if as_json:
        _emit(report, True)
        ctx.exit(0 if report["ok"] else 1)
    click.echo(f"database: {', '.join(report['integrity'])}")
    if report["integrity"] != ["ok"]:
        click.echo("  the database is damaged: copy the store aside, then rebuild it with "
                   "`sqlite3 nbpipe.sqlite .recover | sqlite3 recovered.sqlite`; result files stay "
                   "valid and are adopted by the next run")
    sections = [
        ("damaged or missing result files", report["bad_results"],
         lambda b: f"{b['key'][:12]} {b['problem']}: {b['path']}"),
        ("temporary files left by killed workers", report["temp_files"], str),
        ("stale runners (their process died)", report["stale_runners"],
         lambda r: f"{r['pipeline']}: {r['runner']}"),
        ("tasks a dead runner left PENDING/RUNNING", report["stale_tasks"],
         lambda t: f"{t['pipeline']}: {t['label']} ({t['state']})"),
        ("task specs of unknown tasks", report["orphan_specs"], str),
        ("records of workers killed without a word (their runner is gone)",
         report["worker_records"], str),
        ("records of deleted pipelines", list(report["orphan_records"].items()),
         lambda t: f"{t[1]} in {t[0]}"),
    ]
    for title, items, fmt in sections:
        click.echo(f"{title}: {len(items)}")
        for item in items[:20]:
            click.echo(f"  {fmt(item)}")
        if len(items) > 20:
            click.echo(f"  ... and {len(items) - 20} more")
    if report["unrecorded_results"]:
        click.echo(f"result files the store does not list: {len(report['unrecorded_results'])} "
                   "(adopted by the next run; `nbpipe gc` removes those no task wants)")
    if report["repaired"]:
        click.echo("repaired: damaged results forgotten (their tasks run again), left-overs removed")
    elif not report["ok"] and report["integrity"] == ["ok"]:
        click.echo("run `nbpipe doctor --repair` to fix these")
    ctx.exit(0 if report["ok"] else 1)


@main.command()
@_store_option
@click.argument("pipeline")
@click.option("-o", "--output", type=click.Path(dir_okay=False), callback=_output_path,
              help="FILE.svg, .png or .dot")
@click.pass_context
def graph(ctx: click.Context, pipeline: str, output: str | None) -> None:
    """The task graph of PIPELINE, coloured by state (Graphviz)."""
    from .display import task_graph

    store = _store(ctx)
    pid = store.pipeline_id(pipeline, create=False)
    rows = store.task_rows(pid)
    edges = [(p, c) for p, c, _ in store.edges(pid)]
    dot = task_graph(pipeline, [(k, r["label"], r["state"], r["name"]) for k, r in rows.items()],
                     [(p, c) for p, c in edges if p in rows and c in rows])
    if output is None or output.endswith(".dot"):
        if output:
            Path(output).write_text(dot.source)
        else:
            click.echo(dot.source)
        return
    fmt = Path(output).suffix.lstrip(".")
    if fmt not in ("svg", "png"):
        raise click.UsageError("-o takes a .svg, .png or .dot file")
    Path(output).write_bytes(dot.pipe(format=fmt))
    click.echo(f"wrote {output}")


@main.command()
@_store_option
@click.argument("pipeline")
@click.pass_context
def spawn(ctx: click.Context, pipeline: str) -> None:
    """Run the unfinished tasks of PIPELINE handed over by a notebook or script (detached).

    Exits when the pipeline is done (0), a task failed (1), or it is paused (0).
    """
    from .specs import revive

    pipe = _pipeline(ctx, pipeline)
    refs = revive(pipe)
    click.echo(f"nbpipe spawn: pipeline {pipeline!r}, {len(refs)} task(s), pid {os.getpid()}")
    summary = pipe.run(check=False)
    click.echo(f"nbpipe spawn: {summary}")
    pipe.close()
    sys.exit(1 if summary.failed else 0)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("script", type=click.Path(exists=True, dir_okay=False))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--cluster", metavar="KIND",
              help="local, slurm, pbs, sge, lsf, htcondor or a scheduler address (default: configuration)")
@click.option("-o", "--cluster-option", "options", multiple=True, metavar="KEY=VALUE",
              help="a job option for the cluster, e.g. -o memory=4GB -o queue=short (repeatable)")
@click.option("--detach", is_flag=True, help="run in the background; output in nbpipe-run.log")
@click.option("--stop-on-failure", is_flag=True,
              help="start no new task after the first failure (desipipe's stop_at_error)")
@click.option("--keep-succeeded", is_flag=True,
              help="tasks whose key changed keep their last successful result (recorded as "
                   "accepted); only failed and new tasks run")
@click.option("--trust-existing", is_flag=True,
              help="adopt tasks whose declared Out files all exist instead of running them")
@click.option("--skip", "skip", multiple=True, metavar="PATTERN",
              help="leave out of every run() the unfinished tasks matching PATTERN -- a state "
                   "(FAILED), a name, a label or a glob of either (fit*) -- and what depends on "
                   "them (repeatable); their old failures do not count in the exit status")
@click.option("--inside-allocation", is_flag=True,
              help="under `srun` in a Slurm job: rank 0 is the scheduler, rank 1 runs the script, "
                   "the other ranks are its workers (dask-jobqueue's SLURMRunner)")
def run(script: str, args: tuple[str, ...], cluster: str | None, options: tuple[str, ...],
        detach: bool, stop_on_failure: bool, keep_succeeded: bool, trust_existing: bool,
        skip: tuple[str, ...], inside_allocation: bool) -> None:
    """Run a pipeline script, or a notebook's pipeline headless (SCRIPT.ipynb, no Jupyter);
    exit 0 when every task succeeded, 1 when one failed."""
    import subprocess

    import dask

    from .cluster import parse_words, validate
    from .current import open_pipelines
    from .errors import TaskDefinitionError
    from .policy import check_skip

    try:
        patterns = check_skip(list(skip), "nbpipe run --skip") if skip else []
    except TaskDefinitionError as exc:
        raise click.BadParameter(str(exc), param_hint="--skip") from None
    if script.endswith(".ipynb") and not detach:
        script = str(_notebook_script(Path(script)))

    spec = parse_words([*([cluster] if cluster else []), *options])
    spec = validate(spec) if spec is not None else None  # merged with the configured options
    if detach:
        command = [sys.executable, "-m", "nbpipe.cli", "run", script, *args]
        if cluster:
            command[4:4] = ["--cluster", cluster]
        for option in options:
            command[4:4] = ["-o", option]
        for flag, on in (("--stop-on-failure", stop_on_failure),
                         ("--keep-succeeded", keep_succeeded), ("--trust-existing", trust_existing)):
            if on:
                command.insert(4, flag)
        for pattern in patterns:
            command[4:4] = ["--skip", pattern]
        from .results import append_private

        with append_private("nbpipe-run.log") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        click.echo(f"running {script} in the background (pid {proc.pid}); output in nbpipe-run.log")
        return

    sys.argv = [script, *args]
    start = time.monotonic()
    code = 0
    stop = threading.Event()
    monitor = threading.Thread(target=_report_progress, args=(stop, sys.stdout.isatty()), daemon=True)
    monitor.start()
    with contextlib.ExitStack() as stack:
        if inside_allocation:  # only rank 1 gets past this line; the others serve, then exit
            spec = stack.enter_context(_allocation_client())
        stack.enter_context(dask.config.set({"nbpipe.cluster": spec} if spec is not None else {}))
        modes: dict[str, Any] = {name: True for name, on in (("stop-on-failure", stop_on_failure),
                 ("keep-succeeded", keep_succeeded), ("trust-existing", trust_existing)) if on}
        if patterns:  # read by Pipeline.run (nbpipe.policy.run_skip)
            modes["skip"] = patterns
        if modes:  # read by Pipeline.run (nbpipe.policy.run_mode)
            stack.enter_context(dask.config.set({"nbpipe.run": modes}))
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exc:  # the script's own verdict; the tasks' states come first
            code = exc.code if isinstance(exc.code, int) else (1 if exc.code else 0)
        finally:
            stop.set()
            monitor.join()
    failed = []
    left_out = 0
    for pipe in open_pipelines():
        left_out += len(pipe.skipped)
        pipe.wait()
        failed += [t.label for t in pipe.tasks() if t.state in ("FAILED", "UPSTREAM_FAILED", "KILLED")
                   and t.label not in pipe.skipped]  # what --skip left out is not this run's
    elapsed = time.monotonic() - start
    if failed:
        click.echo(f"{len(failed)} task(s) failed after {elapsed:.1f} s: {', '.join(failed[:10])}",
                   err=True)
        sys.exit(1)
    if code:
        sys.exit(code)
    click.echo(f"all tasks succeeded ({elapsed:.1f} s)"
               + (f"; {left_out} left out by --skip" if left_out else ""))


@main.command("export")
@click.argument("notebook", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), callback=_output_path,
              help="the script (default: NOTEBOOK.py)")
@click.option("--pipeline", help="the pipeline's name (default: the notebook's, as in the notebook)")
@click.option("--cluster", metavar="KIND", help="write this cluster into the script (default: configuration)")
@click.option("--sbatch", type=click.Path(dir_okay=False), metavar="JOB.sh", callback=_output_path,
              help="also write a Slurm batch script that runs the exported script as the driver")
@click.option("--inside-allocation", is_flag=True,
              help="with --sbatch: the whole run in that one job (scheduler, driver and workers)")
@click.option("--ntasks", type=click.IntRange(min=3), help="with --inside-allocation: Slurm tasks")
def export_command(notebook: str, output: str | None, pipeline: str | None, cluster: str | None,
                   sbatch: str | None, inside_allocation: bool, ntasks: int | None) -> None:
    """Export NOTEBOOK's pipeline to a plain Python script that shares its results.

    Each %%task cell becomes a @task function; the script computes the same task keys as the
    notebook, so running it after the notebook executes nothing new.
    """
    from .export import sbatch_script, write_export

    target, result = write_export(notebook, output, pipeline=pipeline, cluster=cluster)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"wrote {target} ({len(result.tasks)} task cell(s); run it with `python {target}` "
               f"or `nbpipe run {target}`)")
    if sbatch:
        name = pipeline or Path(notebook).stem
        Path(sbatch).write_text(sbatch_script(target, name, cluster=cluster,
                                              inside_allocation=inside_allocation, ntasks=ntasks))
        click.echo(f"wrote {sbatch} (submit it with `sbatch {sbatch}`)")


@main.command("cluster")
@click.argument("words", nargs=-1, metavar="[KIND] [KEY=VALUE]...")
def cluster_command(words: tuple[str, ...]) -> None:
    """Preview a batch cluster: its worker pools and their job scripts (submits no job).

    Without arguments, the configured cluster (nbpipe.yaml or Dask's configuration); with
    them, e.g. `nbpipe cluster slurm cores=4 memory=16GB queue=short`.
    """
    from .cluster import parse_words, validate
    from .poolcluster import PoolCluster
    from .pools import KINDS, parse_pools

    spec = validate(parse_words(words))
    if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
        click.echo(f"cluster: {spec!r} (not a batch scheduler: nothing to preview)")
        return
    pools = parse_pools(spec)
    for pool in pools:
        pool.min_jobs = 0
    preview = PoolCluster(pools, security=spec.get("security", True),
                          scheduler_options=spec.get("scheduler_options"))
    try:
        for pool in preview.previews():
            click.echo(f"# pool {pool['description']}")
            click.echo(pool["job_script"])
    finally:
        preview.close()


@contextlib.contextmanager
def _allocation_client() -> Any:
    """A Client of a Dask cluster made of this Slurm job's tasks (``srun``): rank 0 runs the
    scheduler, rank 1 continues as the driver, every other rank is a worker."""
    from dask_jobqueue.slurm import SLURMRunner
    from distributed import Client

    if "SLURM_PROCID" not in os.environ:
        raise click.UsageError("--inside-allocation runs under srun in a Slurm job (srun nbpipe run ...)")
    threads = int(os.environ.get("SLURM_CPUS_PER_TASK", "1"))
    scheduler_file = Path.cwd() / ".nbpipe-scheduler-{job_id}.json"
    with SLURMRunner(scheduler_file=str(scheduler_file), worker_options={"nthreads": threads}) as runner, \
            Client(runner) as client:
        client.wait_for_workers(runner.n_workers)
        yield client


def _notebook_script(notebook: Path) -> Path:
    """Export a notebook into its store (``.nbpipe/exports/``) to run it as a script."""
    from .export import write_export

    exports = notebook.resolve().parent / ".nbpipe" / "exports"
    from .results import private_dirs

    private_dirs(exports)
    target, result = write_export(notebook, exports / f"{notebook.stem}.py", private=True)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    return target


def _counts() -> tuple[int, int, int]:
    """(finished, failed, total) over the tasks of every pipeline open in this process."""
    from .current import open_pipelines
    from .states import BAD

    refs = [r for pipe in open_pipelines() for r in pipe.refs()]
    return (sum(r.state.final for r in refs), sum(r.state in BAD for r in refs), len(refs))


def _report_progress(stop: threading.Event, tty: bool) -> None:
    """A live bar on a terminal; otherwise a plain line when counts change (batch logs)."""
    if tty:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        with Progress("[progress.description]{task.description}", BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                      transient=True) as progress:
            bar = progress.add_task("tasks", total=None)
            while not stop.wait(0.2):
                done, failed, total = _counts()
                progress.update(bar, completed=done, total=total or None,
                                description=f"tasks ({failed} failed)" if failed else "tasks")
        return
    last: tuple[int, int, int] | None = None
    while not stop.wait(5.0):
        counts = _counts()
        if counts != last and counts[2]:
            click.echo(f"{time.strftime('%H:%M:%S')} {counts[0]}/{counts[2]} tasks finished, "
                       f"{counts[1]} failed", err=True)
            last = counts


def reference() -> str:
    """The command reference in Markdown, from the commands' own help (docs/cli.md)."""
    parts = ["# Command reference", "",
             "Generated from `nbpipe --help`; a test keeps this page in sync with the command.", ""]
    # The group's context settings (-h as well as --help), as a real invocation has them:
    # click caches each command's help option from the first context it sees.
    ctx = click.Context(main, info_name="nbpipe", terminal_width=100, max_content_width=100,
                        **main.context_settings)
    parts += ["```", main.get_help(ctx), "```", ""]
    for name in sorted(main.commands):
        command = main.commands[name]
        sub = click.Context(command, info_name=name, parent=ctx, terminal_width=100,
                            max_content_width=100)
        parts += [f"## nbpipe {name}", "", "```", command.get_help(sub), "```", ""]
        for word in sorted(getattr(command, "commands", {})):  # a group's own commands
            inner = command.commands[word]
            deeper = click.Context(inner, info_name=word, parent=sub, terminal_width=100,
                                   max_content_width=100)
            parts += [f"## nbpipe {name} {word}", "", "```", inner.get_help(deeper), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":  # pragma: no cover
    main()
