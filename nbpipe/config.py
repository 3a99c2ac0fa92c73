"""Configuration: the ``nbpipe`` namespace of ``dask.config``, plus ``nbpipe.yaml`` beside the project.

A project keeps its cluster settings in ``nbpipe.yaml`` (in the working directory or a parent
directory), with the same keys as the ``nbpipe`` namespace of ``dask.config``::

    # nbpipe.yaml
    cluster:
      kind: slurm
      cores: 4
      memory: 16GB
      walltime: "02:00:00"
      max_jobs: 10

Precedence, strongest first: arguments (``Pipeline(cluster=...)``), ``dask.config.set``,
``DASK_NBPIPE__*`` environment variables, ``nbpipe.yaml``, Dask's own YAML files
(``~/.config/dask/*.yaml``), then nbpipe's defaults (the ``nbpipe.yaml`` inside the package,
:data:`DEFAULTS_PATH`, given to ``dask.config.update_defaults`` as dask-jobqueue does).
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
from pathlib import Path
from typing import Any

import dask
import dask.config
import dask.utils
import yaml

from .errors import ConfigError

__all__ = ["check_configured", "load_project_config", "project_config_path", "setting"]

FILENAME = "nbpipe.yaml"

#: nbpipe's defaults, in the package's own nbpipe.yaml: Dask's defaults for the namespace.
DEFAULTS_PATH = Path(__file__).with_name(FILENAME)
DEFAULTS: dict[str, Any] = yaml.safe_load(DEFAULTS_PATH.read_text(encoding="utf-8"))["nbpipe"]
dask.config.update_defaults({"nbpipe": DEFAULTS})

_loaded: set[Path] = set()


def project_config_path(start: str | os.PathLike[str] | None = None) -> Path | None:
    """The nearest ``nbpipe.yaml`` in ``start`` (default: the working directory) or a parent."""
    here = Path(start or os.getcwd()).resolve()
    home = Path.home().resolve()
    for directory in (here, *here.parents):
        candidate = directory / FILENAME
        if candidate.is_file():
            return candidate
        if directory == home:  # a file above the home directory belongs to someone else
            break
    return None


def load_project_config(start: str | os.PathLike[str] | None = None) -> Path | None:
    """Merge the nearest ``nbpipe.yaml`` into ``dask.config`` (once per file); return its path.

    Environment variables (``DASK_NBPIPE__CLUSTER``, ...) are applied again afterwards so they
    keep precedence over the file.
    """
    path = project_config_path(start)
    if path is None or path in _loaded:
        return path
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: the file is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
            f"{exc.start}); save it as UTF-8"
        ) from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read it as YAML ({exc}); fix or remove the file") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the file must hold a mapping of nbpipe settings (like 'cluster: local'), "
            f"not a {type(data).__name__}"
        )
    if "nbpipe" in data and len(data) == 1:  # also accept the dask.config layout
        data = data["nbpipe"]
    check_settings(data, str(path))
    dask.config.update(dask.config.config, {"nbpipe": data}, priority="new")
    env = dask.config.collect_env()
    if "nbpipe" in env:
        dask.config.update(dask.config.config, {"nbpipe": env["nbpipe"]}, priority="new")
    _loaded.add(path)
    return path


#: The settings nbpipe reads, and what each must be (``cluster`` is checked by nbpipe.cluster).
SETTINGS = {
    "cluster": "a cluster: local, a batch scheduler kind, an address or a mapping with a kind",
    "idle-timeout": "a finite duration such as '60s' (how long a batch pool keeps jobs it no "
                    "longer needs)",
    "batch-seconds": "a finite number of seconds >= 0 (0 turns off batching tiny tasks and "
                     "fusing chains of them)",
    "database": "a path to the store's SQLite file on a local disk (for a store folder on a network "
                "file system; result files stay in the folder)",
    "store": "the store: a folder (default .nbpipe) or a PostgreSQL URL postgresql://user@host/db "
             "(NBPIPE_STORE wins over it)",
    "results-dir": "the folder of a PostgreSQL store's result files, mounted by every host "
                   "(NBPIPE_RESULTS wins over it)",
    "inline-bytes": "a finite whole number of bytes >= 0 (results of quick tasks up to this size are kept in "
                    "the store's database; 0: every result is a file)",
    "task": "task defaults: a mapping of retries, timeout, retry_on, trust_existing "
            "(see nbpipe.policy)",
    "run": "run modes: a mapping of stop-on-failure, keep-succeeded, trust-existing (true/false; "
           "what `nbpipe run --stop-on-failure` sets) and skip (a list of names, labels, globs "
           "or states; what `nbpipe run --skip` sets)",
    "store-patience": "a finite number of seconds >= 0 (how long a runner retries a store that "
                      "cannot be written before it stops and run() raises)",
    "store-busy-timeout": "a finite number of seconds > 0 (how long a process waits for another "
                          "one's write to an SQLite store before it gives up)",
    "max-concurrent": "a whole number >= 1 (tasks of a pipeline running at once; unset: no cap)",
    "max-jobs": "a whole number >= 1 (a batch pool's jobs at most, unless its cluster spec says "
                "max_jobs)",
    "min-jobs": "a whole number >= 0 (a batch pool's jobs at least, unless its cluster spec says "
                "min_jobs)",
}

#: Settings that are whole numbers, and the least each may be.
_WHOLE = {"inline-bytes": 0, "max-concurrent": 1, "max-jobs": 1, "min-jobs": 0}

#: Settings that must be more than 0 (SQLite with no busy timeout fails at once on any
#: concurrent write instead of waiting its turn).
_POSITIVE = {"store-busy-timeout"}


def check_settings(data: Any, where: str) -> None:
    """Refuse unknown keys (a typo would be ignored silently) and values of the wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the nbpipe settings must be a mapping, not {type(data).__name__}")
    for key, value in data.items():
        if key not in SETTINGS:
            guess = difflib.get_close_matches(str(key), SETTINGS, 1)
            hint = f" (did you mean {guess[0]!r}?)" if guess else ""
            raise ConfigError(
                f"{where}: unknown setting {key!r}{hint}; nbpipe reads {', '.join(SETTINGS)}"
            )
        check_value(key, value, where)


def check_value(key: str, value: Any, where: str) -> Any:
    """``value`` of setting ``key`` as nbpipe uses it (a float for seconds, an int for bytes,
    the value itself otherwise), or :class:`ConfigError` naming ``where`` it came from.

    Infinities and NaN are refused: ``batch-seconds: .inf`` would make one Dask task of a whole
    map, ``inline-bytes: .inf`` cannot be compared with a size.
    """
    if value is None or key == "cluster":
        return value
    if key in ("task", "run"):
        from .errors import TaskDefinitionError
        from .policy import check_defaults, check_run_modes

        try:
            return (check_defaults if key == "task" else check_run_modes)(value, f"{where}: {key}")
        except TaskDefinitionError as exc:
            raise ConfigError(str(exc)) from None
    if key in ("database", "store", "results-dir"):
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where}: {key}={value!r} must be {SETTINGS[key]}")
        return os.path.expandvars(value)
    try:
        if key == "idle-timeout":
            seconds = dask.utils.parse_timedelta(value)
            if seconds is None or not math.isfinite(seconds) or seconds < 0:
                raise ValueError
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError
        number = float(value)
        if not math.isfinite(number) or number < 0:
            raise ValueError
        if key in _POSITIVE and number <= 0:
            raise ValueError
        if key in _WHOLE:
            if number != int(number) or number < _WHOLE[key]:
                raise ValueError
            return int(number)
        return number
    except (ValueError, TypeError, KeyError, OverflowError):
        raise ConfigError(f"{where}: {key}={value!r} must be {SETTINGS[key]}") from None


def _source(key: str, value: Any) -> str:
    """Where the value of ``nbpipe.<key>`` comes from, as a user would look for it."""
    variable = "DASK_NBPIPE__" + key.upper().replace("-", "_")
    if variable in os.environ:
        env = dask.config.collect_env({variable: os.environ[variable]}).get("nbpipe", {})
        if value in env.values():
            return f"the environment variable {variable}"
    return f"dask.config 'nbpipe.{key}'"


def setting(key: str, default: Any = None, *, despite_file: bool = False) -> Any:
    """``dask.config.get("nbpipe.<key>")`` after loading the project's ``nbpipe.yaml``, checked
    wherever it came from (the file, ``dask.config.set``, a ``DASK_NBPIPE__*`` variable).

    ``despite_file``: a mistake elsewhere in ``nbpipe.yaml`` (a YAML error, another setting's
    bad value) does not stop reading this one; only this setting's own bad value raises. For
    what opens a store: steering a pipeline (pause, kill, retry) must work with a broken file,
    and whoever needs the rest of the file says what is wrong with it.
    """
    try:
        load_project_config()
    except ConfigError:
        if not despite_file:
            raise
        path = project_config_path()
        data: Any = None
        with contextlib.suppress(OSError, UnicodeDecodeError, yaml.YAMLError):
            data = yaml.safe_load(path.read_bytes().decode("utf-8")) if path else None
        if isinstance(data, dict) and "nbpipe" in data and len(data) == 1:
            data = data["nbpipe"]
        if isinstance(data, dict) and data.get(key) is not None:
            value = data[key]
            variable = "DASK_NBPIPE__" + key.upper().replace("-", "_")
            if variable not in os.environ and dask.config.get(f"nbpipe.{key}", None) in (
                    None, DEFAULTS.get(key)):  # (dask.config.set and variables win over the file)
                return check_value(key, value, str(path))
    value = dask.config.get(f"nbpipe.{key}", None)
    if value is None:
        return default
    return check_value(key, value, _source(key, value))


def check_configured() -> None:
    """Check every nbpipe setting now (a mistake shows when a pipeline opens, not mid-run)."""
    for key in SETTINGS:
        setting(key)
