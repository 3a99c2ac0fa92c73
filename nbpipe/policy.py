"""Time and retry policy: ``timeout``, ``retries``, ``retry_on`` and where their defaults come from.

A task's policy is its own options, else its pipeline's ``defaults=``, else the ``task:`` section
of ``nbpipe.yaml`` (or ``dask.config`` ``nbpipe.task``, or ``DASK_NBPIPE__TASK__RETRIES``...),
else nbpipe's own defaults (no retries, no timeout, every kind of failure retried)::

    # nbpipe.yaml
    task:
      retries: 2          # jobmon's default of 3 attempts is retries: 2
      timeout: 1h
      retry_on: [exception, timeout, lost]

A failed attempt has one *kind*: ``exception`` (the task raised), ``timeout`` (it ran past its
``timeout`` and was stopped), ``exit`` (its process or its bash command exited non-zero),
``lost`` (its worker died under it, Dask gave up). ``retry_on`` lists the kinds that are
retried; :class:`~nbpipe.Permanent` raised in a task is never retried.

>>> parse_retry_on(["exception", "timeout"], "fit") == {"exception", "timeout"}
True
>>> parse_retry_on({"exit": False}, "fit") == {"exception", "timeout", "lost"}
True
>>> parse_timeout("10m", "fit")
600.0

This module is pure policy: the runner asks it whether to retry and how long a task may run;
the worker wrapper (``nbpipe.worker``) enforces the timeout.
"""

from __future__ import annotations

import difflib
import math
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import TaskDefinitionError
from .task import seconds_of

if TYPE_CHECKING:
    from .pipeline import Pipeline
    from .task import TaskFunction, TaskRef

__all__ = ["DEFAULT_KEYS", "FAILURE_KINDS", "TIMED_OUT", "Policy", "check_defaults", "effective",
           "outcome", "parse_retry_on", "parse_timeout", "should_retry", "timeout_error",
           "timeout_of"]

#: The kinds of failure ``retry_on`` chooses from (cloud_tasks' --retry-on-exception/-timeout/-exit).
FAILURE_KINDS = ("exception", "timeout", "exit", "lost")
#: The state of an attempt stopped by its timeout (the task itself ends FAILED).
TIMED_OUT = "TIMED_OUT"
#: What ``Pipeline(defaults=...)`` and ``nbpipe.yaml``'s ``task:`` section may set.
DEFAULT_KEYS = ("retries", "timeout", "retry_on", "trust_existing")
#: Seconds a timed-out task has to stop before its worker process is ended (code blocked in C).
TIMEOUT_GRACE = 2.0
_TIMEOUT_PREFIX = "timed out after "


def _who(task: str) -> str:
    """How a message names where a value came from: a task, or a place such as a file."""
    return task if task.startswith(("Pipeline(", "/", "the ", "dask.config")) or ":" in task \
        else f"task {task!r}"


def parse_timeout(value: Any, task: str, option: str = "timeout") -> float | None:
    """Seconds from ``"10m"``, ``"1h"``, ``"HH:MM:SS"``, ``"D-HH:MM:SS"`` or a number."""
    if value is None:
        return None
    seconds = seconds_of(value)
    if seconds is not None and math.isfinite(seconds) and seconds > 0:
        return seconds
    raise TaskDefinitionError(
        f"{_who(task)}: {option}={value!r} is not a duration longer than 0 s; use e.g. '10m', "
        "'1h', '00:30:00' or a number of seconds (leave it out for no limit)"
    )


def parse_retry_on(value: Any, task: str) -> frozenset[str]:
    """The kinds of failure to retry: a list of kinds, a comma-separated string, or a mapping
    of kinds to on/off (the kinds not named stay on)."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, Mapping):
        wrong = [k for k, v in value.items() if not isinstance(v, bool)]
        if wrong:
            raise TaskDefinitionError(
                f"{_who(task)}: retry_on={dict(value)!r}: each kind maps to True or False, "
                f"e.g. retry_on={{'exit': False}}")
        kinds = [k for k in value]
        chosen = {k for k in FAILURE_KINDS if value.get(k, True)}
    elif isinstance(value, Iterable):
        kinds = list(value)
        chosen = set(kinds)
    else:
        raise TaskDefinitionError(
            f"{_who(task)}: retry_on={value!r} must list kinds of failure, e.g. "
            f"retry_on=['exception', 'timeout'] (kinds: {', '.join(FAILURE_KINDS)})")
    unknown = [k for k in kinds if k not in FAILURE_KINDS]
    if unknown:
        guess = difflib.get_close_matches(str(unknown[0]), FAILURE_KINDS, 1)
        hint = f" (did you mean {guess[0]!r}?)" if guess else ""
        raise TaskDefinitionError(
            f"{_who(task)}: retry_on has the unknown kind {unknown[0]!r}{hint}; the kinds are "
            f"{', '.join(FAILURE_KINDS)}")
    return frozenset(chosen)


def check_defaults(data: Any, where: str) -> dict[str, Any]:
    """Validated task defaults (``Pipeline(defaults=)``, ``nbpipe.yaml`` ``task:``): retries
    an int >= 0, timeout a duration, retry_on kinds, trust_existing a bool."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise TaskDefinitionError(f"{where}: task defaults must be a mapping such as "
                                  f"{{'retries': 2, 'timeout': '1h'}}, not {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in DEFAULT_KEYS:
            guess = difflib.get_close_matches(str(key), DEFAULT_KEYS, 1)
            hint = f" (did you mean {guess[0]!r}?)" if guess else ""
            raise TaskDefinitionError(
                f"{where}: unknown task default {key!r}{hint}; defaults can set "
                f"{', '.join(DEFAULT_KEYS)} (resources stay per task)")
        if value is None:
            continue
        if key == "retries":
            if isinstance(value, str) and value.strip().isdigit():  # an environment variable
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TaskDefinitionError(f"{where}: retries={value!r} must be an integer >= 0")
            out[key] = value
        elif key == "timeout":
            out[key] = parse_timeout(value, where)
        elif key == "retry_on":
            out[key] = parse_retry_on(value, where)
        else:
            if isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            if not isinstance(value, bool):
                raise TaskDefinitionError(f"{where}: trust_existing={value!r} must be true or false")
            out[key] = value
    return out


#: What ``nbpipe run --stop-on-failure/--keep-succeeded/--trust-existing/--skip`` set
#: (``nbpipe.run``): the flags are true or false, ``skip`` a list of patterns.
RUN_MODES = ("stop-on-failure", "keep-succeeded", "trust-existing", "skip")


def check_skip(value: Any, where: str) -> list[str]:
    """Validated ``skip`` patterns: a string or a list of strings (a name, a label, a glob of
    either, or a state such as ``FAILED``), each non-empty."""
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, (list, tuple)):
        raise TaskDefinitionError(
            f"{where}: skip={value!r} must be a task name, label, glob or state (e.g. 'FAILED', "
            "'fit*'), or a list of them")
    for p in patterns:
        if not isinstance(p, str) or not p.strip():
            raise TaskDefinitionError(
                f"{where}: skip pattern {p!r} matches no task; give a task name, label, glob or "
                "state (e.g. 'FAILED', 'fit*')")
    return [p.strip() for p in patterns]


def run_skip(given: Any) -> list[str] | None:
    """The ``skip`` patterns of a run: ``run(skip=...)`` if given, else the configured ones
    (``nbpipe run --skip PATTERN`` sets them for the script it runs)."""
    if given is not None:
        return check_skip(given, "run(skip=...)")
    from .config import setting

    return (setting("run") or {}).get("skip") or None


def check_run_modes(data: Any, where: str) -> dict[str, Any]:
    """Validated run modes (``dask.config`` ``nbpipe.run``): each flag true or false, ``skip``
    a list of patterns."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise TaskDefinitionError(f"{where}: run modes must be a mapping such as "
                                  f"{{'stop-on-failure': true}}, not {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in RUN_MODES:
            raise TaskDefinitionError(f"{where}: unknown run mode {key!r}; the modes are "
                                      f"{', '.join(RUN_MODES)}")
        if key == "skip":
            out[key] = check_skip(value, where)
            continue
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            raise TaskDefinitionError(f"{where}: {key}={value!r} must be true or false")
        out[key] = value
    return out


def run_mode(name: str, given: bool | None) -> bool:
    """A run mode: the argument of ``run()`` if given, else the configured one (``nbpipe run
    --stop-on-failure`` sets it for the script it runs)."""
    if given is not None:
        return given
    from .config import setting

    return bool((setting("run") or {}).get(name, False))


@dataclass(frozen=True)
class Policy:
    """The policy one task runs under, its defaults applied."""

    retries: int = 0
    timeout: float | None = None
    retry_on: frozenset[str] = frozenset(FAILURE_KINDS)
    trust_existing: bool = False


def _configured() -> dict[str, Any]:
    """The ``task`` section of the configuration (validated when it was loaded)."""

    from .config import load_project_config

    load_project_config()
    from .config import setting

    return setting("task") or {}


# func -> (config snapshot, pipeline defaults, policy): computed once per function and settings.
_memo: weakref.WeakKeyDictionary[Any, tuple[Any, Any, Policy]] = weakref.WeakKeyDictionary()
_NO_DEFAULTS: dict[str, Any] = {}


def effective(func: TaskFunction, pipeline: Pipeline | None) -> Policy:
    """The policy of ``func``'s tasks: its options, else the pipeline's defaults, else the
    configuration's, else nbpipe's."""
    import dask.config

    # (by value: dask.config.set may change the configuration's dicts in place)
    raw = repr(dask.config.get("nbpipe.task", None))
    # (one empty mapping for every pipeline without defaults: a new `{}` per call missed the memo,
    # and each miss looked for nbpipe.yaml from the working directory up: ms per task submitted)
    defaults = getattr(pipeline, "defaults", None) or _NO_DEFAULTS
    memo = _memo.get(func)
    if memo is not None and memo[0] == raw and memo[1] is defaults:
        return memo[2]
    merged = {**_configured(), **defaults}
    opts = func.opts
    for key in DEFAULT_KEYS:
        value = getattr(opts, key, None)
        if value is not None:
            merged[key] = value
    policy = Policy(**merged)
    _memo[func] = (raw, defaults, policy)
    return policy


def timeout_of(ref: TaskRef) -> float | None:
    """Seconds ``ref`` may run (None: no limit)."""
    return effective(ref.func, ref.pipeline).timeout


def should_retry(ref: TaskRef, kind: str) -> bool:
    """Whether a failed attempt of ``ref`` of this ``kind`` is followed by another."""
    if kind == "permanent":
        return False
    policy = effective(ref.func, ref.pipeline)
    if kind not in policy.retry_on:
        return False
    return ref.run_state.retries_used <= policy.retries


def timeout_error(label: str, seconds: float) -> str:
    """The error of an attempt stopped by its timeout (``outcome`` recognises it)."""
    return f"{_TIMEOUT_PREFIX}{seconds:g} s: task {label!r} ran longer than its timeout and was stopped"


def outcome(state: str, error: str | None, reason: str | None) -> str | None:
    """A word for how a task ended beyond its state, for views: ``timed out``, ``accepted``
    (by hand), ``adopted`` (trusted existing files), or None."""
    if state == "FAILED" and (error or "").startswith(_TIMEOUT_PREFIX):
        return "timed out"
    if state == "SUCCEEDED" and reason:
        if reason.startswith("accepted by hand"):
            return "accepted"
        if reason.startswith("adopted"):
            return "adopted"
    return None
