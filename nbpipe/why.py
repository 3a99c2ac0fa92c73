"""Why a task (re-)runs: the difference between its key's components and the last record.

>>> explain({"code": "a", "args": {"x": "1"}}, {"code": "b", "args": {"x": "1"}}, "f")
'the code of `f` changed'
>>> explain({"code": "a", "args": {"x": "2"}}, {"code": "a", "args": {"x": "1"}}, "f")
'argument `x` changed'
"""

from __future__ import annotations

from typing import Any

__all__ = ["explain"]

_NOUN = {"helpers": "helper", "globals": "global", "closure": "closure variable",
         "modules": "module", "args": "argument", "files": "input file",
         "defaults": "default values of", "env": "environment variable",
         "env_inputs": "environment variable"}
_KINDS = ("helpers", "defaults", "globals", "closure", "modules", "args", "files", "env",
          "env_inputs")


def _dict_changes(kind: str, new: dict[str, Any], old: dict[str, Any]) -> list[str]:
    noun = _NOUN[kind]
    reasons = []
    for name in sorted(set(new) | set(old)):
        shown = name if kind == "files" else f"`{name}`"
        if kind == "env_inputs":
            shown += " (env_inputs)"
        if name not in old:
            reasons.append(f"{noun} {shown} is new" if kind != "defaults"
                           else f"helper {shown} now has default values")
        elif name not in new:
            reasons.append(f"{noun} {shown} is no longer used" if kind != "defaults"
                           else f"helper {shown} no longer has default values")
        elif new[name] != old[name]:
            if kind == "modules":
                reasons.append(f"module `{name}` changed version {old[name]} -> {new[name]}")
            elif kind == "helpers":
                reasons.append(f"the code of `{name}` changed" if "." in name
                               else f"the code of helper `{name}` changed")
            elif kind == "defaults":
                reasons.append(f"the default values of helper {shown} changed")
            else:
                reasons.append(f"{noun} {shown} changed")
    return reasons


def explain(new: dict[str, Any], old: dict[str, Any] | None, name: str) -> str:
    """A sentence saying what changed between two sets of key components."""
    if old is None:
        return "new task"
    if new.get("identity") != old.get("identity"):
        return (f"nbpipe's identity rules changed (version {old.get('identity', 1)} -> "
                f"{new.get('identity')}): results made under the older rules are kept, and "
                "this task runs once under the new ones")
    reasons: list[str] = []
    if new.get("code") != old.get("code"):
        reasons.append(f"the code of `{name}` changed")
    for kind in _KINDS:
        reasons += _dict_changes(kind, new.get(kind) or {}, old.get(kind) or {})
    new_pairs = [tuple(p) for p in new.get("upstream") or []]
    old_pairs = [tuple(p) for p in old.get("upstream") or []]
    new_up, old_up = dict(new_pairs), dict(old_pairs)
    for label in sorted(set(new_up) | set(old_up)):
        if label not in old_up:
            reasons.append(f"upstream task `{label}` is new")
        elif label not in new_up:
            reasons.append(f"upstream task `{label}` is no longer used")
        elif new_up[label] != old_up[label]:
            if str(new_up[label]).startswith("result:") and str(old_up[label]).startswith("result:"):
                reasons.append(f"the value of upstream task `{label}` (cache=False) changed")
            else:
                reasons.append(f"upstream task `{label}` changed")
    if not reasons and new_pairs != old_pairs:
        reasons.append("the order of its upstream tasks changed")
    if new.get("version") != old.get("version"):
        reasons.append(f"version changed {old.get('version')!r} -> {new.get('version')!r}")
    if new.get("after") != old.get("after"):
        reasons.append("its after= dependencies changed")
    if new.get("kind") != old.get("kind"):
        reasons.append("it changed between a python and a bash task")
    if new.get("outputs") != old.get("outputs"):
        reasons.append("the names the cell assigns changed")
    if not reasons:  # name the part, never a catch-all
        parts = sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k))
        reasons.append(f"its {', '.join(parts)} changed" if parts
                       else "its result is no longer recorded")
    return "; ".join(reasons)
