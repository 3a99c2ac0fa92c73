"""The notebook layer: ``%load_ext nbpipe``, ``%%task`` cells, ``%pipeline``, outputs as variables.

A thin layer over the core: cells become :class:`~nbpipe.cells.CellTask` tasks, whose inputs are
the names they read (task outputs become dependencies; other variables are captured by value)
and whose outputs are the names they assign. A plain cell that reads a task output waits for the
task and finds the value in the variable, through an AST transformer that pulls the values in
before the cell's own code runs (so Ctrl-C stops the waiting, and a task's error is the cell's).
"""

from __future__ import annotations

import argparse
import ast
import builtins
import json
import os
import shlex
import warnings
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from . import queries
from .cells import HIDDEN, CellTask, placeholders
from .cellscope import analyze, analyze_tree
from .cluster import parse_words
from .display import ClusterView, Progress, StatusLine, TaskTable, task_graph, widgets_enabled
from .errors import CellInputError, NbpipeError, OutputNotStored, UnknownTask
from .graph import order, reach
from .identity import is_stand_in, register_stand_ins
from .naming import find_task, row_fields
from .pipeline import Pipeline, use
from .results import locate, read_result
from .runner import record_jobs
from .states import State
from .task import TaskOutput, TaskRef, make_options
from .taskline import TaskLineError, parse_task_line, usage

__all__ = ["NotebookSession", "load_ipython_extension", "notebook_path"]

PULL = "__nbpipe_pull__"


def notebook_path(shell: Any) -> Path | None:
    """The notebook's path, from ``__session__`` or ``JPY_SESSION_NAME`` (None when unknown)."""
    for candidate in (shell.user_ns.get("__session__"), os.environ.get("JPY_SESSION_NAME")):
        if isinstance(candidate, str) and candidate.endswith(".ipynb"):
            return Path(candidate).absolute()
    return None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # never sys.exit inside a kernel
        raise UsageError(f"{message}\n{self.format_usage()}")

    def exit(self, status: int = 0, message: str | None = None) -> None:
        raise UsageError(message or self.format_help())


class NotebookSession:
    """nbpipe's state in one kernel: the pipeline, which task produces which name, the options."""

    def __init__(self, shell: Any, name: str | None = None, store: str | None = None):
        self.shell = shell
        path = notebook_path(shell)
        self.notebook = path
        name = name or os.environ.get("NBPIPE_PIPELINE") or (path.stem if path else "notebook")
        store = store or os.environ.get("NBPIPE_STORE") or str(
            (path.parent if path else Path.cwd()) / ".nbpipe")
        self.pipe = Pipeline(name, store=store)
        self.outputs: dict[str, TaskRef | TaskOutput] = {}
        self.cell_of: dict[str, str | None] = {}  # task name -> id of the cell that defined it
        # Names a %%task cell binds but does not output, with why (`with ... as` values), and
        # modules it imports (name -> (task, import statement)): a cell reading one is told.
        self.dropped: dict[str, tuple[str, str]] = {}  # name -> (task, why)
        self.imported: dict[str, tuple[str, str]] = {}  # name -> (task, import statement)
        self.autorun = True
        use(self.pipe)

    def banner(self) -> str:
        """One line: pipeline, store, cluster, dashboard."""
        cluster = self.pipe.cluster or "local"
        dashboard = ""
        connection = self.pipe.started_connection
        if connection is not None:
            cluster = connection.description
            dashboard = f" · dashboard {connection.dashboard}"
        return (f"nbpipe: pipeline {self.pipe.name!r} · store {self.pipe.store.name} · "
                f"cluster {cluster}{dashboard}")

    # -- plain cells ----------------------------------------------------------------------------

    def pull(self, names: list[str]) -> None:
        """Wait for the tasks that produce ``names`` and put their values in the namespace."""
        for name in names:
            producer = self.outputs.get(name)
            if producer is None:
                self.check_readable(name)
                continue
            ref = producer.ref if isinstance(producer, TaskOutput) else producer
            if ref.state.final:
                self.shell.user_ns[name] = producer.result()
                continue
            # Ctrl-C interrupts this wait (the cell), not the task, which keeps running.
            with Progress(self.pipe.closure([ref]), f"waiting for {ref.label}"):
                self.shell.user_ns[name] = producer.result()

    def check_readable(self, name: str, reader: str = "this cell") -> None:
        """Raise a short error when ``name`` is one a ``%%task`` cell bound but did not output (a
        ``with ... as`` value) or a module only a ``%%task`` cell imported."""
        if name in self.dropped:
            raise OutputNotStored(self.dropped[name][1])
        if name in self.imported and name not in self.shell.user_ns:
            task, line = self.imported[name]
            raise CellInputError(
                f"{reader} reads {name!r}, a module that %%task {task} imports; modules are not "
                f"task outputs: `{line}` in this cell"
            )

    def forget_cell(self, task: str) -> None:
        """Forget the names task cell ``task`` dropped or imported (it runs again, changed)."""
        for names in (self.dropped, self.imported):
            for name in [n for n, (owner, _) in names.items() if owner == task]:
                del names[name]

    def unknown_name(self, task: str, name: str) -> Exception:
        """The error for a name a ``%%task`` cell reads that nothing defines."""
        try:
            self.check_readable(name, f"task {task!r}")
        except CellInputError as exc:
            return exc
        return CellInputError(
            f"task {task!r} reads {name!r}, but no task output, variable or builtin has that name; "
            f"define {name!r} in a cell (or a %%task cell) and run it first"
        )

    def override(self, names: list[str]) -> None:
        """Names a plain cell assigns stop following their task from then on."""
        for name in names:
            self.outputs.pop(name, None)
            self.dropped.pop(name, None)
            self.imported.pop(name, None)


class _PullTransformer(ast.NodeTransformer):
    """Puts ``__nbpipe_pull__([...])`` first in plain cells that read task outputs."""

    def __init__(self, session: NotebookSession):
        self.session = session

    def visit_Module(self, node: ast.Module) -> ast.Module:
        session = self.session
        if not (session.outputs or session.dropped or session.imported):
            return node
        scope = analyze_tree(node)
        known = session.outputs.keys() | session.dropped.keys() | session.imported.keys()
        wanted = [n for n in scope.reads if n in known]
        session.override([n for n in [*scope.writes, *scope.imports] if n in known])
        if wanted:
            call = ast.Expr(ast.Call(
                func=ast.Name(PULL, ast.Load()),
                args=[ast.List([ast.Constant(n) for n in wanted], ast.Load())], keywords=[],
            ))
            node.body.insert(0, ast.copy_location(call, node.body[0]) if node.body else call)
            ast.fix_missing_locations(node)
        return node


@magics_class
class NbpipeMagics(Magics):
    """``%%task`` and ``%pipeline``."""

    def __init__(self, shell: Any, session: NotebookSession):
        super().__init__(shell)
        self.session = session

    # -- %%task ---------------------------------------------------------------------------------

    @cell_magic
    def task(self, line: str, cell: str) -> None:
        try:
            args = parse_task_line(line)
            name = args.name
            if args.bash and not name:
                raise TaskLineError("a --bash cell needs a name: %%task NAME --bash")
        except TaskLineError as exc:
            raise UsageError(str(exc)) from None
        session = self.session
        transient: dict[str, str] = {}
        imports: dict[str, str] = {}
        if args.bash:
            reads, outputs = placeholders(cell), []
        else:
            try:
                compile(cell, f"<task {name or 'cell'}>", "exec")
                scope = analyze(cell)
            except SyntaxError as exc:
                exc.filename = f"<task {name or 'cell'}>"
                raise exc from None
            reads, outputs = scope.reads, scope.writes
            transient, imports = scope.transient, scope.import_lines
            name = name or (outputs[0] if outputs else None)
            if not name:
                raise UsageError("this cell assigns nothing, so name it: %%task NAME")
        options = make_options(name, **args.options)
        session.forget_cell(name)  # what this cell dropped or imported when it last ran
        after = args.options.get("after", [])
        self._check_after(name, after)
        inputs = self._inputs(name, reads)
        cell_id = self._cell_id()
        previous_cell = session.cell_of.get(name)
        if previous_cell is not None and cell_id is not None and previous_cell != cell_id:
            warnings.warn(f"task {name!r} was defined by another cell; this cell replaces it",
                          stacklevel=2)
        func = CellTask(name, cell, outputs, options, session.pipe,
                        kind="bash" if args.bash else "python", cell_id=cell_id)
        self._check_cycle(name, inputs)
        ref = session.pipe.add(func, (), inputs, label=name)
        session.cell_of[name] = cell_id
        session.override([*outputs, *transient, *imports])  # this cell binds them now
        for output in outputs:
            session.outputs[output] = ref.output(output)
        for dropped, why in transient.items():
            what = (f"it is bound by `with ... as {dropped}`, whose value (a file, a lock) is closed "
                    "when the block ends" if why == "with" else
                    "it is a generator expression, which runs once and cannot be stored")
            session.dropped[dropped] = (name, f"{dropped!r} is not an output of %%task {name}: "
                                              f"{what}; compute it in the cell that reads it")
        for module, statement in imports.items():
            session.imported[module] = (name, statement)
        if args.bash:
            session.outputs[name] = ref
        if session.autorun:
            session.pipe.run([ref], wait=False)
        else:
            session.pipe.resolve([ref])
        StatusLine(ref)

    task.__doc__ = usage()  # `%%task?` shows the option table's help

    def _cell_id(self) -> str | None:
        try:
            return self.shell.kernel.get_parent()["metadata"].get("cellId")
        except Exception:
            return None

    def _inputs(self, task_name: str, reads: list[str]) -> dict[str, Any]:
        """Values for the names a cell reads: task outputs (dependencies) or captured values."""
        session, ns = self.session, self.shell.user_ns
        hidden = self.shell.user_ns_hidden
        inputs: dict[str, Any] = {}
        for name in reads:
            if name in session.dropped:  # a later binding than any kernel variable of that name
                raise OutputNotStored(session.dropped[name][1])
            if name in session.outputs:
                inputs[name] = session.outputs[name]
            elif name in ns and is_stand_in(name, ns[name]):
                continue  # IPython's own `open`: the builtin, as in the exported script
            elif name in ns and name in hidden and ns[name] is hidden[name] \
                    and not hasattr(builtins, name):
                raise UsageError(
                    f"%%task {task_name}: the cell reads {name!r}, which IPython defines in "
                    "this kernel only (its history or shell), so a task cannot use it on a "
                    f"worker; copy what you need into a variable of your own in a plain cell "
                    f"(e.g. `value = {name}`) and read that")
            elif name in ns:
                inputs[name] = ns[name]
            elif hasattr(builtins, name):
                continue
            else:
                raise session.unknown_name(task_name, name)
        return inputs

    def _check_after(self, task_name: str, after: list[str]) -> None:
        """Every ``--after`` name must be a task already defined: a typo must not leave a task
        behind that no later cell can resolve."""
        pipe = self.session.pipe
        known = {r.label for r in pipe.refs()} | {r.name for r in pipe.refs()}
        for name in after:
            if name not in known:
                listing = ", ".join(sorted(known)[:10]) or "none yet"
                raise UnknownTask(
                    f"%%task {task_name}: --after {name} names no task of pipeline "
                    f"{pipe.name!r} (its tasks: {listing}); run the cell that defines {name!r} "
                    "first, or fix the name"
                )

    def _check_cycle(self, name: str, inputs: dict[str, Any]) -> None:
        """Refuse a cell whose inputs come, through upstream cells, from its own earlier run."""
        read = [v.ref for v in inputs.values() if isinstance(v, TaskOutput)]
        # cells by label; this cell's earlier version gives way to the one being defined
        graph = {name: [r.label for r in read]}
        for ref in reach(read, lambda r: r.upstream, follow=lambda r: r.label != name):
            if ref.label != name:
                graph[ref.label] = [u.label for u in ref.upstream]
        order(graph, what="cells", fix="a cell cannot read what a cell downstream of it produces",
              start=name)

    # -- %pipeline ------------------------------------------------------------------------------

    def _parser(self) -> _Parser:
        parser = _Parser(prog="%pipeline", description="Inspect and control this notebook's pipeline.")
        sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
        sub.add_parser("status", help="tasks by state")
        p = sub.add_parser("graph", help="the task graph, coloured by state (live in Jupyter)")
        p.add_argument("--static", action="store_true", help="a Graphviz picture, not the widget")
        p = sub.add_parser("run", help="run tasks (all, or NAMES and what they need)")
        p.add_argument("names", nargs="*")
        p.add_argument("--detach", action="store_true")
        p = sub.add_parser("wait", help="wait until every submitted task ends")
        p.add_argument("--timeout", type=float)
        p = sub.add_parser("retry", help="run tasks again, with what they blocked")
        p.add_argument("names", nargs="*")
        p.add_argument("--failed", action="store_true")
        p = sub.add_parser("kill", help="stop tasks")
        p.add_argument("names", nargs="+")
        sub.add_parser("pause", help="start no new task")
        sub.add_parser("resume", help="start tasks again")
        p = sub.add_parser("why", help="why a task ran or will run")
        p.add_argument("name")
        p = sub.add_parser("logs", help="stdout, stderr and traceback of a task's last attempt")
        p.add_argument("name")
        p = sub.add_parser("pull", help="load outputs of done tasks into the namespace")
        p.add_argument("names", nargs="+")
        p = sub.add_parser("use", help="switch to another pipeline")
        p.add_argument("name")
        p.add_argument("--store")
        p = sub.add_parser("cluster", help="show the cluster, or switch: KIND|ADDRESS [KEY=VALUE ...]")
        p.add_argument("spec", nargs="*")
        p = sub.add_parser("export", help="write this notebook's pipeline as a script (PATH.py)")
        p.add_argument("path", nargs="?")
        p = sub.add_parser("autorun", help="submit %%task cells when they run (on) or not (off)")
        p.add_argument("mode", choices=["on", "off"])
        return parser

    @line_magic
    def pipeline(self, line: str) -> Any:
        """``%pipeline status|graph|run|wait|retry|kill|pause|resume|why|logs|pull|use|cluster|autorun``."""
        args = self._parser().parse_args(shlex.split(line))
        try:
            return getattr(self, f"_do_{args.command}")(args)
        except (NbpipeError, KeyError) as exc:
            raise UsageError(str(exc)) from None

    def _do_status(self, args: Any) -> TaskTable:
        pipe = self.session.pipe
        infos = pipe.tasks()
        counts: dict[str, int] = {}
        for info in infos:
            counts[info.state] = counts.get(info.state, 0) + 1
        title = f"pipeline {pipe.name!r}: " + (", ".join(f"{n} {s}" for s, n in counts.items()) or "no tasks")
        rows = [(i.label, i.state, str(i.attempts), i.reason or "", i.key[:12]) for i in infos]
        return TaskTable(title, rows, ("task", "state", "attempts", "why", "key"))

    def _do_graph(self, args: Any) -> Any:
        """The live widget in a Jupyter kernel (shares the sidebar's layout), else Graphviz."""
        pipe = self.session.pipe
        pipe.resolve()
        if not args.static and widgets_enabled():
            from .widget import GraphWidget, available

            if available():
                return GraphWidget(pipe)
        refs = pipe.refs()
        return task_graph(pipe.name, [(r.key, r.label, r.state.value, r.name) for r in refs],
                          [(dep.key, r.key) for r in refs for dep in r.deps])

    def _targets(self, names: list[str]) -> list[TaskRef]:
        return self.session.pipe.find(names) if names else []

    def _do_run(self, args: Any) -> None:
        if args.detach:
            pid = self.session.pipe.detach()
            print(f"pipeline {self.session.pipe.name!r} handed to a detached runner (pid {pid}); "
                  "it keeps running after this kernel ends")
            return
        targets = self._targets(args.names) or None
        summary = self.session.pipe.run(targets, wait=False)
        print(f"submitted: {summary}")

    def _do_wait(self, args: Any) -> None:
        """Wait for the submitted tasks; say which are only registered, and how to run them."""
        pipe = self.session.pipe
        idle = set(pipe.unsubmitted())
        with Progress([r for r in pipe.refs() if r not in idle], f"pipeline {pipe.name}"):
            summary = pipe.wait(timeout=args.timeout)
        print(summary)
        idle_now = pipe.unsubmitted()
        if idle_now:
            names = ", ".join(r.label for r in idle_now[:5]) + (", ..." if len(idle_now) > 5 else "")
            print(f"not waited for: {len(idle_now)} task(s) registered but not submitted ({names}); "
                  "`%pipeline run` runs them (`%pipeline run NAME` one of them), as does reading "
                  "their values")

    def _do_retry(self, args: Any) -> None:
        if not args.names and not args.failed:
            raise UsageError("%pipeline retry NAME... or %pipeline retry --failed")
        self.session.pipe.retry(args.names or None, failed=args.failed)

    def _do_kill(self, args: Any) -> None:
        self.session.pipe.kill(args.names)

    def _do_pause(self, args: Any) -> None:
        self.session.pipe.pause()
        print(f"pipeline {self.session.pipe.name!r} paused")

    def _do_resume(self, args: Any) -> None:
        self.session.pipe.resume()
        print(f"pipeline {self.session.pipe.name!r} resumed")

    def _do_why(self, args: Any) -> None:
        print(f"{args.name}: {self.session.pipe.why(args.name)}")

    def _row(self, name: str) -> Any:
        pipe = self.session.pipe
        rows = pipe.store.task_rows(pipe.pipeline_id)
        found = find_task(name, sorted(rows.values(), key=lambda r: r["updated"]), *row_fields)
        if found is None:
            raise UnknownTask(f"no task {name!r} in pipeline {pipe.name!r}; see %pipeline status")
        return found

    def _do_logs(self, args: Any) -> None:
        pipe = self.session.pipe
        row = self._row(args.name)
        attempts = pipe.store.attempts(pipe.pipeline_id, row["key"])
        if not attempts:
            print(f"task {row['label']} has not run in this store ({row['state']})")
            return
        last = attempts[-1]
        print(f"task {row['label']}: attempt {last['number']} {last['state']} on {last['hostname']}")
        for part in ("stdout", "stderr", "traceback"):
            if last[part]:
                print(f"--- {part} ---\n{last[part].rstrip()}")

    def _do_pull(self, args: Any) -> None:
        pipe = self.session.pipe
        for name in args.names:
            row = self._row(name)
            result = pipe.store.results([row["key"]]).get(row["key"])
            if result is None or row["state"] != State.SUCCEEDED.value:
                raise UsageError(f"task {row['label']} is {row['state']}: nothing to pull")
            value = read_result(locate(pipe.store.path, result["path"]), result["checksum"],
                                result["data"])
            outputs = json.loads(row["components"]).get("outputs")
            if outputs is not None and isinstance(value, dict):
                value = {k: v for k, v in value.items() if k not in HIDDEN}
                self.shell.user_ns.update(value)
                print(f"pulled {', '.join(value) or 'nothing'} from task {row['label']}")
            else:
                self.shell.user_ns[row["name"]] = value
                print(f"pulled {row['name']} from task {row['label']}")

    def _do_use(self, args: Any) -> None:
        """Switch pipelines: the old one's runner stops, its cluster carries on for the new one."""
        session = self.session
        session.pipe = session.pipe.reopen(args.name, store=args.store)
        for names in (session.outputs, session.dropped, session.imported, session.cell_of):
            names.clear()
        use(session.pipe)
        print(session.banner())

    def _do_cluster(self, args: Any) -> ClusterView:
        """Switch to ``KIND [KEY=VALUE ...]`` (then start it), or show the cluster and its jobs."""
        pipe = self.session.pipe
        if args.spec:
            pipe.set_cluster(parse_words(args.spec))
            _ = pipe.client  # start it now: a mistake shows here, and the banner has the dashboard
        connection = pipe.started_connection
        pools = connection.pools if connection is not None else None
        if pools is not None:  # jobs of the last seconds too
            pools.poll()
            record_jobs(pipe.store, pipe.pipeline_id, pools)
        detail = queries.cluster_detail(pipe.store, pipe.name)
        previews = pools.previews() if pools is not None else detail["pools"]
        return ClusterView(self.session.banner(), previews, detail["jobs"])

    def _do_export(self, args: Any) -> None:
        """Export the saved notebook (save it first: the file on disk is what is read)."""
        from .export import write_export

        notebook = self.session.notebook
        if notebook is None or not Path(notebook).is_file():
            raise UsageError("this kernel does not know its notebook file; use `nbpipe export "
                             "NOTEBOOK.ipynb` in a terminal")
        target, result = write_export(notebook, args.path, pipeline=self.session.pipe.name)
        for warning in result.warnings:
            print(f"warning: {warning}")
        print(f"wrote {target} ({len(result.tasks)} task cell(s)) from the saved {Path(notebook).name}")

    def _do_autorun(self, args: Any) -> None:
        self.session.autorun = args.mode == "on"
        print(f"autorun {args.mode}")


def load_ipython_extension(shell: Any) -> None:
    """``%load_ext nbpipe``: open the notebook's pipeline and register the magics."""
    session = getattr(shell, "_nbpipe_session", None)
    # IPython binds its own `open`, `exit` and `quit` in the user namespace: code that uses them
    # counts as using the builtins, so a notebook and its exported script share keys.
    register_stand_ins({name: shell.user_ns_hidden[name] for name in ("open", "exit", "quit")
                        if name in shell.user_ns_hidden and hasattr(builtins, name)})
    if session is None:
        session = NotebookSession(shell)
        shell._nbpipe_session = session
        shell.register_magics(NbpipeMagics(shell, session))
        shell.ast_transformers.append(_PullTransformer(session))
        shell.user_ns[PULL] = session.pull
        shell.user_ns_hidden[PULL] = session.pull
        try:
            _ = session.pipe.client  # start the cluster now: the banner shows its dashboard
        except Exception as exc:
            print(f"nbpipe: the cluster could not start yet ({exc}); tasks will retry it")
    print(session.banner())


def unload_ipython_extension(shell: Any) -> None:
    """``%unload_ext nbpipe``: stop the runner and the cluster nbpipe started."""
    session = getattr(shell, "_nbpipe_session", None)
    if session is None:
        return
    shell.ast_transformers[:] = [t for t in shell.ast_transformers if not isinstance(t, _PullTransformer)]
    session.pipe.close()
    del shell._nbpipe_session
