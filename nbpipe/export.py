"""Export a notebook's pipeline to a plain Python script (``nbpipe export``, ``%pipeline export``).

The script is readable Python without IPython:

- each ``%%task`` cell becomes a function decorated with ``@nbpipe.task(outputs=[...])``
  (``@nbpipe.bash_task(template=True)`` for ``--bash`` cells) whose parameters are the cell's
  inputs; its identity is the cell's, so the script and the notebook share results: running the
  script after the notebook executes nothing new, and the other way round;
- imports, functions (``@task`` ones too), classes and plain assignments of other cells stay at
  module level, in notebook order; the rest of those cells runs in ``main()``, in notebook
  order, with task outputs read through ``.result()`` (which runs what they need first);
- ``main()`` opens the notebook's pipeline in the notebook's store, registers everything, runs
  what is not done, and returns the names it bound.

Magics and shell escapes have no script meaning: they are left out, each with a warning that
names its cell.

>>> result = export_notebook("analysis.ipynb")          # doctest: +SKIP
>>> print(result.warnings)                               # doctest: +SKIP
"""

from __future__ import annotations

import ast
import builtins
import io
import json
import keyword
import os
import re
import shlex
import sys
import textwrap
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cells import RUNNER_NAMES, placeholders
from .cellscope import analyze, analyze_tree
from .errors import NbpipeError
from .task import make_options
from .taskline import TaskLineError, parse_task_line

__all__ = [
    "ExportError", "Exported", "export_notebook", "sbatch_script", "write_export",
]

MODULE_LEVEL = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
TASK_DECORATORS = {"task", "bash_task"}


class ExportError(NbpipeError, ValueError):
    """A notebook nbpipe cannot turn into a script (not a notebook, a cell it cannot read)."""


@dataclass
class Exported:
    """The script's text, and what could not be carried over (each naming its cell)."""

    script: str
    warnings: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)


@dataclass
class _State:
    top: list[str] = field(default_factory=list)  # module-level blocks, in notebook order
    main: list[str] = field(default_factory=list)  # lines of main(), unindented
    outputs: dict[str, str] = field(default_factory=dict)  # task output name -> "output" | "ref"
    main_names: list[str] = field(default_factory=list)
    module_names: set[str] = field(default_factory=set)
    plain_names: set[str] = field(default_factory=set)  # bound at module level by plain cells
    task_imports: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (task, import)
    task_functions: set[str] = field(default_factory=set)
    imports: list[str] = field(default_factory=list)
    cluster: Any = None  # from a `%pipeline cluster KIND key=value ...` line
    warnings: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)


def _source(cell: dict[str, Any]) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else str(source)


def _has_multiline_strings(source: str) -> bool:
    try:
        tokens = tokenize.generate_tokens(io.StringIO(source).readline)
        return any(t.type == tokenize.STRING and t.start[0] != t.end[0] for t in tokens)
    except (tokenize.TokenError, SyntaxError):
        return True


def _identifier(name: str) -> str:
    out = re.sub(r"\W", "_", name)
    if not out or out[0].isdigit() or keyword.iskeyword(out):
        out = f"cell_{out}"
    return out


def _option_kwargs(options: dict[str, Any], name: str, where: str) -> list[str]:
    """The decorator's keywords, checked as the magic checks them (a bad value fails here)."""
    try:
        make_options(name, **options)
    except NbpipeError as exc:
        raise ExportError(f"{where}: {exc}") from None
    return [f"{key}={value!r}" for key, value in options.items()]


def _task_cell(number: int, line: str, body: str, state: _State) -> None:
    where = f"cell {number} ({line.strip()})"
    try:
        args = parse_task_line(line)
    except TaskLineError as exc:
        raise ExportError(f"{where}: cannot read the %%task options ({exc})") from None
    if args.bash:
        if not args.name:
            raise ExportError(f"{where}: a --bash cell needs a name: %%task NAME --bash")
        name, inputs = args.name, placeholders(body)
        options = _option_kwargs(args.options, name, where)
        fname = _function_name(name, [name], inputs, state)  # `name` holds its ref in main()
        plain = '"""' not in body and not body.endswith(("\\", '"'))
        literal = f'r"""{body}"""' if plain else repr(body)
        decorator = ", ".join(["template=True", *options, *([f"name={name!r}"] if fname != name else [])])
        state.top.append(
            f"# {line.strip()}\n@nbpipe.bash_task({decorator})\n"
            f"def {fname}({', '.join(inputs)}) -> str:\n    return {literal}\n"
        )
        call = f"{fname}({', '.join(f'{i}={i}' for i in inputs)})"
        state.main.append(f"{name} = {call}")
        state.outputs[name] = "ref"
        _bind_main(state, name)
        state.tasks.append(name)
        return
    try:
        scope = analyze(body)
    except SyntaxError as exc:
        raise ExportError(f"{where}: the cell is not valid Python ({exc.msg}, line {exc.lineno})") from None
    outputs = scope.writes  # without `with ... as` names: their values are not kept
    name = args.name or (outputs[0] if outputs else None)
    if not name:
        raise ExportError(f"{where}: the cell assigns nothing, so it needs a name: %%task NAME")
    options = _option_kwargs(args.options, name, where)
    # A name the notebook bound before shadows the builtin of that name, as in the kernel.
    bound = state.outputs.keys() | state.plain_names | set(state.main_names)
    inputs = [r for r in scope.reads
              if r in bound or not hasattr(builtins, r) and r not in RUNNER_NAMES]
    if "display" in scope.reads and "display" not in inputs:  # what the kernel's display is
        state.imports.append("from IPython.display import display")
    for read in inputs:
        if read in state.task_imports and read not in bound:  # as the magic refuses it
            task, statement = state.task_imports[read]
            raise ExportError(f"{where}: reads {read!r}, a module that %%task {task} imports; modules "
                              f"are not task outputs: `{statement}` in this cell")
    for module, statement in scope.import_lines.items():
        state.task_imports[module] = (name, statement)
    fname = _function_name(name, outputs, inputs, state)
    # indenting a multi-line string would change it: such a cell is written from its AST
    code = ast.unparse(ast.parse(body)) if _has_multiline_strings(body) else _quiet_imports(body.rstrip())
    lines = textwrap.indent(code, "    ") if code.strip() else "    pass"
    if outputs:
        lines += f"\n    return {', '.join(outputs)}"
    decorator = ", ".join([f"outputs={outputs!r}", *options, *([f"name={name!r}"] if fname != name else [])])
    signature = f"def {fname}({', '.join(inputs)}):"
    state.top.append(f"# {line.strip()}\n@nbpipe.task({decorator})\n{signature}\n{lines}\n")
    call = f"{fname}({', '.join(f'{i}={i}' for i in inputs)})"
    if len(outputs) == 1:
        state.main.append(f'{outputs[0]} = {call}.output("{outputs[0]}")')
    elif outputs:
        handle = f"{_identifier(name)}_"
        state.main.append(f"{handle} = {call}")
        state.main.append(f"{', '.join(outputs)} = "
                          + ", ".join(f'{handle}.output("{o}")' for o in outputs))
        _bind_main(state, handle)
    else:
        state.main.append(call)
    for output in outputs:
        state.outputs[output] = "output"
        _bind_main(state, output)
    state.tasks.append(name)


def _quiet_imports(code: str) -> str:
    """Mark runs of imports in a cell with ``# noqa: I001``: sorting them would change the
    cell's code, and so its identity (a comment does not)."""
    lines = code.splitlines()
    body = ast.parse(code).body
    run: list[ast.stmt] = []
    marks = []
    for node in [*body, None]:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            run.append(node)
            continue
        if len(run) > 1:
            marks.append(run[0].lineno)
        run = []
    for lineno in marks:
        if "#" not in lines[lineno - 1]:
            lines[lineno - 1] += "  # noqa: I001"
    return "\n".join(lines)


def _function_name(name: str, outputs: list[str], inputs: list[str], state: _State) -> str:
    fname = _identifier(name)
    taken = set(outputs) | set(inputs) | state.module_names | set(state.main_names)
    while fname in taken or hasattr(builtins, fname):  # a module-level `sum` would shadow sum()
        fname += "_cell"
    state.module_names.add(fname)
    return fname


def _bind_main(state: _State, name: str) -> None:
    if name not in state.main_names:
        state.main_names.append(name)


def _calls_task(node: ast.AST, state: _State) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in state.task_functions
               for n in ast.walk(node))


class _ReadResults(ast.NodeTransformer):
    """``mean`` -> ``mean.result()`` for task outputs a plain statement reads."""

    def __init__(self, names: set[str]):
        self.names = names
        self.changed = False

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if isinstance(node.ctx, ast.Load) and node.id in self.names:
            self.changed = True
            call = ast.Call(func=ast.Attribute(value=ast.Name(node.id, ast.Load()), attr="result",
                                               ctx=ast.Load()), args=[], keywords=[])
            return ast.copy_location(call, node)
        return node


def _segment(source: str, node: ast.stmt) -> str:
    lines = source.splitlines()
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    return "\n".join(lines[first - 1:node.end_lineno])


def _plain_cell(number: int, source: str, state: _State) -> None:
    kept = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith(("%", "!")) and line == line.lstrip():
            words = stripped.split()
            if words[:2] == ["%pipeline", "cluster"] and len(words) > 2:
                from .cluster import parse_words

                state.cluster = parse_words(shlex.split(stripped)[2:])  # the script's cluster=
            elif not stripped.startswith("%load_ext nbpipe"):
                state.warnings.append(f"cell {number}: `{stripped}` has no meaning in a script; left out")
            kept.append("")  # keep line numbers
        else:
            kept.append(line)
    code = "\n".join(kept)
    if not code.strip():
        return
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        state.warnings.append(f"cell {number}: not plain Python ({exc.msg}, line {exc.lineno}: "
                              f"magics inside expressions?); left out")
        return
    for node in tree.body:
        scope = analyze_tree(ast.Module(body=[node], type_ignores=[]))
        reads_main = set(scope.reads) & set(state.main_names)
        bound = [*scope.writes, *scope.imports]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                (d.func if isinstance(d, ast.Call) else d).__class__ in (ast.Name, ast.Attribute)
                and _decorator_name(d) in TASK_DECORATORS for d in node.decorator_list):
            state.task_functions.add(node.name)
        module_level = isinstance(node, MODULE_LEVEL) or (
            isinstance(node, (ast.Assign, ast.AnnAssign, ast.Try))
            and not reads_main and not _calls_task(node, state))
        if module_level:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                state.imports.append(_segment(code, node))
            else:
                state.top.append(_segment(code, node) + "\n")
            state.module_names.update(bound)
            state.plain_names.update(bound)
            continue
        outputs = set(scope.reads) & {n for n, kind in state.outputs.items()}
        if outputs:
            rewriter = _ReadResults(outputs)
            text = ast.unparse(rewriter.visit(ast.parse(_segment(code, node))))
        else:
            text = _segment(code, node)
        if node is tree.body[-1] and isinstance(node, ast.Expr) and not isinstance(
                node.value, (ast.Call, ast.Await, ast.Yield, ast.YieldFrom)):
            text = f"print({text})"  # what the notebook displays for a cell's last expression
        overwritten = set(scope.writes) & set(state.outputs)
        if overwritten:
            state.warnings.append(f"cell {number}: assigns {', '.join(sorted(overwritten))}, a task "
                                  "output; in the script later tasks still read the task's value")
        state.main.append(text)
        for name in scope.writes:
            _bind_main(state, name)


def _decorator_name(node: ast.expr) -> str:
    target = node.func if isinstance(node, ast.Call) else node
    if isinstance(target, ast.Attribute):
        return target.attr
    return target.id if isinstance(target, ast.Name) else ""


HEADER_IMPORTS = ["import os", "from pathlib import Path", "from typing import Any", "import nbpipe"]


def _name_order(name: str) -> tuple[int, str]:
    """isort's order of imported names: CONSTANTS, then Classes, then functions."""
    kind = 0 if name.isupper() and len(name) > 1 else 1 if name[:1].isupper() else 2
    return kind, name


def _import_block(statements: list[str], script_tail: str, folder: Path | None = None) -> list[str]:
    """The script's imports, one per line, in isort's order (standard library, then installed
    packages, then the user's own modules beside the script; ``import x`` before ``from x import
    y``); imports the script never reads keep a ``# noqa: F401`` (the notebook had them)."""
    used = {n.id for n in ast.walk(ast.parse(script_tail)) if isinstance(n, ast.Name)}

    def section(top: str, level: int = 0) -> int:
        if level or folder is not None and top and (
                (folder / f"{top}.py").exists() or (folder / top / "__init__.py").exists()):
            return 2  # first party: a module or package beside the notebook
        return 0 if top in sys.stdlib_module_names else 1

    plain: dict[tuple[int, str], str] = {}
    froms: dict[tuple[int, str], set[str]] = {}
    for statement in statements:
        for node in ast.parse(statement).body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    top = alias.name.partition(".")[0]
                    text = f"import {alias.name}" + (f" as {alias.asname}" if alias.asname else "")
                    plain[(section(top), text.lower())] = text
            elif isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                top = (node.module or "").partition(".")[0]
                names = froms.setdefault((section(top, node.level), module), set())
                names.update(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
    out: list[str] = []
    for third_party in (0, 1, 2):
        section = [plain[k] for k in sorted(k for k in plain if k[0] == third_party)]
        section += [f"from {m} import {', '.join(sorted(froms[(tp, m)], key=_name_order))}"
                    for tp, m in sorted(k for k in froms if k[0] == third_party)]
        if section and out:
            out.append("")
        for line in section:
            node = ast.parse(line).body[0]
            names = [(a.asname or a.name).partition(".")[0] for a in node.names]  # type: ignore[attr-defined]
            header = line in HEADER_IMPORTS
            out.append(line if header or any(n in used for n in names) else line + "  # noqa: F401")
    return out


def export_notebook(notebook: str | os.PathLike[str], *, script: str | os.PathLike[str] | None = None,
                    pipeline: str | None = None, cluster: Any = None) -> Exported:
    """Turn a notebook into a script; ``script`` is where it will live (for the store's path)."""
    path = Path(notebook).resolve()
    try:
        data = json.loads(path.read_text())
        cells = data["cells"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{notebook}: not a readable notebook ({exc})") from None
    target = Path(script).resolve() if script is not None else path.with_suffix(".py")
    store = Path(os.path.relpath(path.parent / ".nbpipe", target.parent)).as_posix()
    name = pipeline or path.stem
    state = _State()
    number = 0
    for cell in cells:
        if cell.get("cell_type") != "code":
            continue
        number += 1
        source = _source(cell)
        first, _, body = source.partition("\n")
        if first.startswith("%%task"):
            _task_cell(number, first, body, state)
        elif first.startswith("%%"):
            state.warnings.append(f"cell {number}: the cell magic `{first.split()[0]}` has no meaning "
                                  "in a script; cell left out")
        else:
            _plain_cell(number, source, state)

    cluster = cluster if cluster is not None else state.cluster
    bound = ", ".join(f'"{n}": {n}' for n in state.main_names)
    main = [
        f"pipe = nbpipe.Pipeline({name!r}, store=os.environ.get(\"NBPIPE_STORE\") or HERE / {store!r}"
        + (f", cluster={cluster!r})" if cluster is not None else ")"),
        "nbpipe.use(pipe)",
        *state.main,
        "print(pipe.run(check=True))",
        f"return {{{bound}}}",
    ]
    body = "\n".join(textwrap.indent(block, "    ") for block in main)
    tail = "\n\n".join([*(b.rstrip() + "\n" for b in state.top),
                        f"def main() -> dict[str, Any]:\n    \"\"\"Register the tasks, run what is not "
                        f"done, return the names the notebook bound.\"\"\"\n{body}\n",
                        'if __name__ == "__main__":\n    main()\n'])
    imports = _import_block([*HEADER_IMPORTS, *state.imports], tail, path.parent)
    header = [
        f'"""Pipeline {name!r}, exported from {path.name} by `nbpipe export`.',
        "",
        "Each %%task cell is a function below; running this script shares results with the notebook",
        f'(store {store}): what the notebook computed is not computed again, and the other way round.',
        '"""',
        "",
        "from __future__ import annotations",
        "",
        *imports,
        "",
        "HERE = Path(__file__).resolve().parent",
        "",
        "",
        "",
    ]
    text = "\n".join(header) + tail
    try:
        ast.parse(text)
    except SyntaxError as exc:  # pragma: no cover - a bug in the exporter
        raise ExportError(f"{notebook}: the exported script does not parse ({exc}); please report "
                          "it") from None
    return Exported(text, state.warnings, state.tasks)


def write_export(notebook: str | os.PathLike[str], script: str | os.PathLike[str] | None = None,
                 *, private: bool = False, **options: Any) -> tuple[Path, Exported]:
    """Export ``notebook`` and write the script (default: beside it, ``NOTEBOOK.py``).

    ``private``: the script is readable by the user only from its creation (0600; for copies
    kept inside the store, which is private).
    """
    target = Path(script) if script is not None else Path(notebook).with_suffix(".py")
    result = export_notebook(notebook, script=target, **options)
    if private:
        from .results import write_private

        write_private(target, result.script.encode())
    else:
        target.write_text(result.script)
    return target, result


def sbatch_script(script: str | os.PathLike[str], pipeline: str, *, cluster: Any = None,
                  python: str | None = None, inside_allocation: bool = False,
                  ntasks: int | None = None) -> str:
    """A Slurm batch script that runs an exported script as the pipeline's driver.

    By default the driver job is small (one core) and the workers are the jobs its cluster
    submits (the ``cluster`` given, else the configured one). ``inside_allocation`` runs
    everything in this one job instead: ``ntasks`` Slurm tasks (default: the cluster's
    ``max_jobs`` + 2), of which one is the scheduler, one the driver and the rest workers with
    the cluster's cores and memory each. Queue, account, walltime and prologue lines come from a
    Slurm cluster's options when it has them.
    """
    from .cluster import resolve_spec

    script = Path(script).resolve()
    spec = resolve_spec(cluster)
    options = spec if isinstance(spec, dict) and spec.get("kind") == "slurm" else {}
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", pipeline)
    lines = [
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name=nbpipe-{safe}",
        f"#SBATCH --output={script.parent}/nbpipe-{safe}-%j.out",
    ]
    if inside_allocation:
        from dask.utils import parse_bytes

        cores = int(options.get("cores") or 1)
        lines += [f"#SBATCH --ntasks={ntasks or int(options.get('max_jobs') or 2) + 2}",
                  f"#SBATCH --cpus-per-task={cores}"]
        if options.get("memory"):
            per_cpu = parse_bytes(str(options["memory"])) // cores // 2**20
            lines.append(f"#SBATCH --mem-per-cpu={per_cpu}M")
    else:
        lines += ["#SBATCH --ntasks=1", "#SBATCH --cpus-per-task=1", "#SBATCH --mem=2G"]
    lines.append(f"#SBATCH --time={options.get('walltime') or '01:00:00'}")
    if options.get("queue"):
        lines.append(f"#SBATCH --partition={options['queue']}")
    if options.get("account"):
        lines.append(f"#SBATCH --account={options['account']}")
    lines += [
        "",
        f"# The driver of pipeline {pipeline!r}: it runs {script.name}, whose worker jobs come from",
        "# the cluster configuration (nbpipe.yaml or Dask's); results go to the notebook's store.",
        "set -euo pipefail",
        *[str(line) for line in options.get("job_script_prologue") or []],
        f"cd {shlex.quote(str(script.parent))}",
    ]
    command = f"{shlex.quote(python or sys.executable)} -m nbpipe.cli run {shlex.quote(script.name)}"
    if inside_allocation:
        lines.append(f"exec srun {command} --inside-allocation")
    else:
        lines.append(f"exec {command}" + ("" if not isinstance(cluster, str)
                                          else f" --cluster {shlex.quote(cluster)}"))
    lines.append("")
    return "\n".join(lines)
