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
import textwrap
from typing import Any

import cloudpickle

from .errors import TaskDefinitionError
from .identity import CodeIdentity, digest, normalised_source_digest
from .task import TaskFunction, TaskOptions

__all__ = ["CellFunction", "CellRunner", "CellTask", "cell_function", "code_digest", "fill_placeholders",
           "placeholders"]

DISPLAY = "__nbpipe_display__"  # key of a cell's rich output in its result dict

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
        for name in self.outputs:
            if name not in namespace:
                continue  # assigned on a branch that did not run
            value = namespace[name]
            try:
                cloudpickle.dumps(value)
            except Exception as exc:
                raise TypeError(
                    f"output {name!r} of task {self.name!r} cannot be pickled ({exc}); "
                    f"compute it in the cell that needs it, or `del {name}` at the end of "
                    "this cell"
                ) from None
            outputs[name] = value
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

    def identity(self) -> CodeIdentity:
        """The cell's code (comments and formatting do not count); inputs enter as arguments."""
        return CodeIdentity(code_digest(self.source, self.kind), {}, {}, {})


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
        return self._target()._add(self, (), dict(bound.arguments), label=self.name)


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
