"""Cells as tasks: the source of a ``%%task`` cell, its inputs by name and its outputs as a dict.

This module knows nothing of IPython: the magics give it a cell's source and the values of the
names it reads; it gives back a task function whose identity is the cell's normalised code.

>>> runner = CellRunner("stats", "mean = sum(data) / len(data)", ["mean"])
>>> runner(data=[1, 2, 3])
{'mean': 2.0}
"""

from __future__ import annotations

import ast
import builtins
import functools
import inspect
import linecache
import re
import shlex
import sys
import textwrap
import types
from collections.abc import Mapping
from typing import Any

import cloudpickle

from .errors import OutputNotStored, TaskDefinitionError
from .identity import CodeIdentity, cell_identity, digest, normalised_source_digest
from .task import TaskFunction, TaskOptions

__all__ = ["RUNNER_NAMES", "CellFunction", "CellRunner", "CellTask", "cell_function", "cell_output",
           "code_digest", "fill_placeholders", "placeholders"]

DISPLAY = "__nbpipe_display__"  # key of a cell's rich output in its result dict
SKIPPED = "__nbpipe_skipped__"  # key of {name: why it is not stored} in a cell's result dict
HIDDEN = (DISPLAY, SKIPPED)  # keys of a cell's result dict that are not its outputs
#: Names a cell finds on its worker as it does in the kernel, where IPython provides them: they
#: are not inputs of the cell (in the kernel, in the exported script, or in keys).
RUNNER_NAMES = frozenset({"display"})


def cell_output(result: dict[str, Any], name: str, task: str | None = None) -> Any:
    """The output ``name`` of a cell's ``result``, or :class:`~nbpipe.OutputNotStored` saying
    why the cell did not store it.

    >>> cell_output({"x": 1}, "x")
    1
    """
    try:
        return result[name]
    except KeyError:
        why = result.get(SKIPPED, {}).get(name) if isinstance(result, dict) else None
        raise OutputNotStored(why or f"{name!r} is not an output of task {task or '?'}") from None


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"

_PLACEHOLDER = re.compile(r"(?<![{$])\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")


def placeholders(script: str) -> list[str]:
    """The ``{name}`` placeholders of a bash cell, in order (``${VAR}`` and ``{{x}}`` are not)."""
    return list(dict.fromkeys(_PLACEHOLDER.findall(script)))


def fill_placeholders(script: str, values: dict[str, Any]) -> str:
    """Replace ``{name}`` with the shell-quoted value of ``name``."""
    return _PLACEHOLDER.sub(
        lambda m: shlex.quote(str(values[m.group(1)])) if m.group(1) in values else m.group(0),
        script,
    )


class CellRunner:
    """Runs a cell on a worker: executes its source with its inputs, returns its outputs.

    Tracebacks point into the cell's own line numbers (the file name is ``<task NAME>``).
    For a bash cell, calling it returns the script with its placeholders filled.
    """

    def __init__(self, name: str, source: str, outputs: list[str], kind: str = "python"):
        self.name = name
        self.source = source
        self.outputs = list(outputs)
        self.kind = kind
        self.__name__ = name
        self.__qualname__ = name

    @property
    def filename(self) -> str:
        """The pseudo file name the cell's code is compiled under."""
        return f"<task {self.name}>"

    def __call__(self, **inputs: Any) -> Any:
        if self.kind == "bash":
            return fill_placeholders(self.source, inputs)
        linecache.cache[self.filename] = (
            len(self.source), None, self.source.splitlines(True), self.filename
        )
        displays: list[tuple[dict[str, Any], dict[str, Any]]] = []

        def display(*objects: Any, **_: Any) -> None:
            """Rich output of the cell, shown under it in the notebook when the task ends."""
            from IPython.core.formatters import format_display_data

            displays.extend(format_display_data(obj) for obj in objects)

        namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins,
                                     "display": display, **inputs}
        tree = ast.parse(self.source, self.filename)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, self.filename, "exec"), namespace)
        if last is not None:  # like a notebook cell, the value of a final expression is shown
            value = eval(compile(ast.Expression(last.value), self.filename, "eval"), namespace)
            if value is not None:
                display(value)
        outputs: dict[str, Any] = {DISPLAY: displays} if displays else {}
        skipped: dict[str, str] = {}
        where = f"%%task {self.name}"
        for name in self.outputs:
            if name not in namespace:
                skipped[name] = (f"{name!r} was not assigned by {where} (the code that assigns it "
                                 "did not run); assign it on every path, or read it elsewhere")
                continue
            value = namespace[name]
            try:
                cloudpickle.dumps(value)
            except Exception as exc:
                # A throwaway value (an open or closed file, a lock, a generator) must not fail
                # the cell: it is left out, and a cell that reads it is told why.
                skipped[name] = (f"{name!r} is not an output of {where}: it holds a "
                                 f"{_type_name(value)}, which cannot be stored ({exc}); "
                                 f"compute it in the cell that reads it")
                continue
            outputs[name] = value
        unpicklable = [n for n in skipped if n in namespace]
        if unpicklable:
            print(f"nbpipe: {where} did not store {', '.join(unpicklable)} (cannot be pickled: "
                  f"{', '.join(_type_name(namespace[n]) for n in unpicklable)}); a cell that reads "
                  f"{'it' if len(unpicklable) == 1 else 'them'} gets an error", file=sys.stderr)
        if skipped:
            outputs[SKIPPED] = skipped
        return outputs

    def __reduce__(self) -> tuple[Any, ...]:
        return (CellRunner, (self.name, self.source, self.outputs, self.kind))


def code_digest(source: str, kind: str = "python") -> str:
    """The code part of a cell task's key: its body's normalised code (a bash body, stripped).

    The sidebar compares a cell's current text with a task's recorded code through this, so it
    is the one definition of "the cell's code".

    >>> code_digest("x = 1  # one") == code_digest("x=1")
    True
    """
    return normalised_source_digest(source) if kind == "python" else digest(["bash", source.strip()])


class CellTask(TaskFunction):
    """A ``%%task`` cell as a task function; its identity is the cell's normalised code."""

    def __init__(self, name: str, source: str, outputs: list[str], options: TaskOptions,
                 pipeline: Any, kind: str = "python", cell_id: str | None = None):
        super().__init__(CellRunner(name, source, outputs, kind), kind, options, pipeline)
        self.name = name
        self.source = source
        self.outputs = list(outputs)
        self.cell_id = cell_id

    def identity(self, arguments: Mapping[str, Any] | None = None) -> CodeIdentity:
        """The cell's code (comments and formatting do not count); inputs enter as arguments,
        except modules of the user's own code: the members the cell uses count by content."""
        if self.kind != "python":
            return CodeIdentity(code_digest(self.source, self.kind), {}, {}, {})
        values = dict(arguments or {})
        if self.var_keyword in values:  # a cell takes its inputs as **inputs
            values.update(values.pop(self.var_keyword))
        modules = {k: v for k, v in values.items() if isinstance(v, types.ModuleType)}
        return cell_identity(self.source, modules, owner=self.name)

    def argument_digest(self, value: Any) -> str:
        """A module input counts through the members the cell uses (see :meth:`identity`)."""
        if isinstance(value, types.ModuleType):
            return digest(["module", value.__name__])
        return digest(value)


class CellFunction(CellTask):
    """A cell written as a function (``@task(outputs=...)``): called like a function, a cell inside.

    Positional arguments are matched to the function's parameters; every parameter is an input
    of the cell, by name, as the notebook passes them.
    """

    def __init__(self, fn: Any, name: str, source: str, outputs: list[str], options: TaskOptions,
                 pipeline: Any, kind: str):
        super().__init__(name, source, outputs, options, pipeline, kind=kind)
        self.function = fn
        self.parameters = inspect.signature(fn)
        functools.update_wrapper(self, fn, updated=())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            bound = self.parameters.bind(*args, **kwargs)
        except TypeError as exc:
            raise TaskDefinitionError(f"task {self.name!r}: {exc}; its inputs are "
                                      f"{', '.join(self.parameters.parameters)}") from None
        bound.apply_defaults()
        return self._target().add(self, (), dict(bound.arguments), label=self.name)


def cell_function(fn: Any, kind: str, options: TaskOptions, pipeline: Any,
                  outputs: Any) -> CellFunction:
    """Read a cell back from a function: a Python body less its final ``return``, or the
    template string a bash function returns."""
    name = options.name or fn.__name__
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError) as exc:
        raise TaskDefinitionError(f"task {name!r}: cannot read the function's source ({exc})") from None
    node = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if node is None:
        raise TaskDefinitionError(f"task {name!r}: a cell task must be a function defined with def")
    body = list(node.body)
    if kind == "bash":
        value = body[-1].value if body and isinstance(body[-1], ast.Return) else None
        if len(body) != 1 or not isinstance(value, ast.Constant) or not isinstance(value.value, str):
            raise TaskDefinitionError(
                f"task {name!r}: a @bash_task(template=True) function's body is one "
                "`return \"...{name}...\"` of a string with {placeholders} for its parameters"
            )
        return CellFunction(fn, name, value.value, [], options, pipeline, "bash")
    if isinstance(outputs, str) or not all(isinstance(o, str) for o in outputs):
        raise TaskDefinitionError(f"task {name!r}: outputs={outputs!r} must be a list of names")
    if body and isinstance(body[-1], ast.Return):
        body = body[:-1]  # it hands the outputs back; the cell's value is its namespace
    source = ast.unparse(ast.Module(body=body, type_ignores=[])) if body else "pass"
    return CellFunction(fn, name, source, list(outputs), options, pipeline, "python")
