"""The ``%%task`` line: its options in one table, read by one parser.

The magic, ``nbpipe export`` and the options table of ``docs/magics.md`` all come from
:data:`OPTIONS`, so they cannot disagree. The line is split like a shell line (quotes group
words and are removed), so ``--env "MSG=hello world"`` sets ``MSG`` to ``hello world``.

>>> line = parse_task_line('stats --retries 2 --env "MSG=hello world" --no-cache')
>>> line.name, line.bash
('stats', False)
>>> line.options
{'retries': 2, 'env': {'MSG': 'hello world'}, 'cache': False}

This module knows nothing of IPython; a mistake raises :class:`TaskLineError`.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from typing import Any

from .errors import NbpipeError

__all__ = ["OPTIONS", "Option", "TaskLine", "TaskLineError", "markdown_table", "parse_task_line",
           "synopsis", "usage"]


class TaskLineError(NbpipeError, ValueError):
    """A ``%%task`` line nbpipe cannot read (an unknown option, a value of the wrong type)."""


@dataclass(frozen=True)
class Option:
    """One option of the ``%%task`` line: how it is written, what it becomes, how it is documented."""

    flag: str  # "--retries", or "name" for the positional task name
    keyword: str | None  # the @task keyword it becomes (None: not a task option)
    help: str
    example: str  # a whole %%task line
    type: Any = str
    metavar: str | None = None
    many: bool = False  # takes one or more words
    switch: bool = False  # takes no value

    @property
    def label(self) -> str:
        """How the docs and the usage line write it."""
        if self.flag == "name":
            return "NAME"
        if self.switch:
            return self.flag
        value = self.metavar or self.flag.lstrip("-").upper()
        return f"{self.flag} {value}" + (" ..." if self.many else "")


OPTIONS: tuple[Option, ...] = (
    Option("name", None, "the task's name (default: the cell's first output)", "%%task stats"),
    Option("--after", "after", "run after these tasks (no data passes)",
           "%%task report --after stats load", metavar="TASK", many=True),
    Option("--retries", "retries", "attempts after the first failure", "%%task load --retries 2",
           type=int, metavar="N"),
    Option("--timeout", "timeout", "stop the task when it runs longer (attempt TIMED_OUT)",
           "%%task fit --timeout 10m", metavar="TIME"),
    Option("--retry-on", "retry_on", "kinds of failure retried: exception timeout exit lost",
           "%%task fetch --retries 3 --retry-on exception timeout", metavar="KIND", many=True),
    Option("--cores", "cores", "cores a worker must have", "%%task fit --cores 8", type=int, metavar="N"),
    Option("--memory", "memory", "memory a worker must have", "%%task fit --memory 16GB", metavar="SIZE"),
    Option("--walltime", "walltime", "time limit", "%%task fit --walltime 02:00:00", metavar="TIME"),
    Option("--gpus", "gpus", "GPUs a worker must have", "%%task train --gpus 1", type=int, metavar="N"),
    Option("--pool", "pool", "the worker pool to run in", "%%task fit --pool bigmem", metavar="POOL"),
    Option("--retry-memory-factor", "retry_memory_factor",
           "grow --memory by F on each retry after the worker died (out of memory)",
           "%%task fit --memory 8GB --retry-memory-factor 2", type=float, metavar="F"),
    Option("--env", "env", "environment variables for this task (quote a value with spaces)",
           '%%task fit --env OMP_NUM_THREADS=8 "MSG=hello world"', metavar="KEY=VALUE", many=True),
    Option("--env-inputs", "env_inputs", "inherited environment variables that count in the identity",
           "%%task save --env-inputs OUTPUT_DIR", metavar="NAME", many=True),
    Option("--version", "version", "bump to re-run without changing code", "%%task fit --version 2",
           metavar="V"),
    Option("--no-cache", "cache", "run every time", "%%task fetch --no-cache", switch=True),
    Option("--bash", None, "the cell is a bash script; {name} fills in values", "%%task archive --bash",
           switch=True),
)


@dataclass
class TaskLine:
    """A parsed ``%%task`` line: the task's name, whether it is bash, and its ``@task`` options."""

    name: str | None
    bash: bool = False
    options: dict[str, Any] = field(default_factory=dict)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]  # never sys.exit
        raise TaskLineError(message)

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        raise TaskLineError(message or self.format_help())


def _parser() -> _Parser:
    parser = _Parser(prog="%%task", usage=synopsis(80).replace("%", "%%"),  # argparse %-formats it
                     add_help=False, description="Turn the cell into a task.")
    for option in OPTIONS:
        if option.flag == "name":
            parser.add_argument("name", nargs="?", help=option.help)
        elif option.switch:
            parser.add_argument(option.flag, action="store_true", help=option.help)
        else:
            parser.add_argument(option.flag, type=option.type, metavar=option.metavar, help=option.help,
                                nargs="+" if option.many else None, default=[] if option.many else None)
    return parser


def usage() -> str:
    """The usage and option list, as ``%%task?`` shows it."""
    return _parser().format_help()


def parse_task_line(line: str) -> TaskLine:
    """Read the words after ``%%task`` (the line may also start with ``%%task``)."""
    try:
        words = shlex.split(line)
    except ValueError as exc:  # an unclosed quote
        raise TaskLineError(f"cannot split the %%task line {line.strip()!r}: {exc}") from None
    if words[:1] == ["%%task"]:
        words = words[1:]
    args = _parser().parse_args(words)
    where = f"%%task {args.name or ''}".rstrip()
    options: dict[str, Any] = {}
    for option in OPTIONS:
        if option.keyword is None:
            continue
        value = getattr(args, option.flag.lstrip("-").replace("-", "_"))
        if option.keyword == "cache":
            if value:
                options["cache"] = False
        elif option.keyword == "env":
            if value:
                options["env"] = _env(value, where)
        elif option.many:
            if value:
                options[option.keyword] = list(value)
        elif value is not None:
            options[option.keyword] = value
    return TaskLine(args.name, args.bash, options)


def _env(pairs: list[str], where: str) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise TaskLineError(f"{where}: --env takes KEY=VALUE pairs, got {pair!r}; "
                                "e.g. --env OMP_NUM_THREADS=4")
        env[key] = value
    return env


def synopsis(width: int = 100) -> str:
    """``%%task [NAME] [--after TASK ...] ...``: every option, wrapped at ``width``."""
    words = [f"[{option.label}]" for option in OPTIONS]
    lines, line = [], "%%task"
    for word in words:
        if len(line) + 1 + len(word) > width:
            lines.append(line)
            line = "      "
        line += " " + word
    return "\n".join([*lines, line])


def markdown_table() -> str:
    """The options table of ``docs/magics.md`` (a test keeps the page equal to this)."""
    rows = ["| option | example | meaning |", "| --- | --- | --- |"]
    for option in OPTIONS:
        rows.append(f"| `{option.label}` | `{option.example}` | {option.help} |")
    return "\n".join(rows)
