"""Why a task (re-)runs: the difference between its key's components and the last record.

>>> explain({"code": "a", "args": {"x": "1"}}, {"code": "b", "args": {"x": "1"}}, "f")
'the code of `f` changed'
"""

from __future__ import annotations

from typing import Any

__all__ = ["explain"]

_NOUN = {"helpers": "helper", "globals": "global", "modules": "module", "args": "argument",
         "files": "input file"}


def _dict_changes(kind: str, new: dict[str, Any], old: dict[str, Any]) -> list[str]:
    noun = _NOUN[kind]
    reasons = []
    for name in sorted(set(new) | set(old)):
        shown = name if kind == "files" else f"`{name}`"
        if name not in old:
            reasons.append(f"{noun} {shown} is new")
        elif name not in new:
            reasons.append(f"{noun} {shown} is no longer used")
        elif new[name] != old[name]:
            if kind == "modules":
                reasons.append(f"module `{name}` changed version {old[name]} -> {new[name]}")
            elif kind == "helpers":
                reasons.append(f"the code of helper `{name}` changed")
            else:
                reasons.append(f"{noun} {shown} changed")
    return reasons


def explain(new: dict[str, Any], old: dict[str, Any] | None, name: str) -> str:
    """A sentence saying what changed between two sets of key components."""
    if old is None:
        return "new task"
    reasons: list[str] = []
    if new.get("code") != old.get("code"):
        reasons.append(f"the code of `{name}` changed")
    for kind in ("helpers", "globals", "modules", "args", "files"):
        reasons += _dict_changes(kind, new.get(kind) or {}, old.get(kind) or {})
    new_up = dict(map(tuple, new.get("upstream") or []))
    old_up = dict(map(tuple, old.get("upstream") or []))
    for label in sorted(set(new_up) | set(old_up)):
        if new_up.get(label) != old_up.get(label):
            reasons.append(f"upstream task `{label}` changed")
    if new.get("version") != old.get("version"):
        reasons.append(f"version changed {old.get('version')!r} -> {new.get('version')!r}")
    if new.get("after") != old.get("after"):
        reasons.append("its after= dependencies changed")
    if new.get("kind") != old.get("kind"):
        reasons.append("it changed between a python and a bash task")
    return "; ".join(reasons) or "its identity changed"
