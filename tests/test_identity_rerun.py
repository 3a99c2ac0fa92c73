"""Never a stale result: every piece of user code and data a task runs with is in its key.

Each case is a small project (a script written as people write it, at module level, and its
helper modules) run in fresh processes: a first run, then an edit that must re-run exactly the
affected tasks with the right value and a reason naming the cause, and the same place edited as a
no-op (a comment, a docstring, formatting, an unrelated helper) that must re-run nothing.
The scripts find the test's Dask scheduler through ``DASK_NBPIPE__CLUSTER``, as a user's
``nbpipe.yaml`` or environment would give it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPORT = '''
summary = pipe.run()
print("RESULT " + __import__("json").dumps({
    "executed": summary.executed,
    "tasks": {r.label: [r.reason, r.result()] for r in pipe._refs.values()},
}))
'''


@dataclass
class Edit:
    """Files changed (path -> new text, or (old, new) replacements) and what must follow."""

    changes: dict[str, object]
    rerun: set[str]  # labels that must run again (all others found done)
    values: dict[str, object] = field(default_factory=dict)  # label -> value after the edit
    reason: dict[str, str] = field(default_factory=dict)  # label -> words its reason contains
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Case:
    files: dict[str, str]
    values: dict[str, object]  # label -> value after the first run
    edits: list[Edit]
    env: dict[str, str] = field(default_factory=dict)


def _apply(root: Path, changes: dict[str, object]) -> None:
    for name, change in changes.items():
        path = root / name
        if isinstance(change, tuple):
            old, new = change
            text = path.read_text()
            assert old in text, f"{old!r} not in {name}"
            path.write_text(text.replace(old, new, 1))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(str(change)))


def _run(root: Path, address: str, env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "pipeline.py"], cwd=root, capture_output=True, text=True, timeout=240,
        env={**os.environ, "DASK_NBPIPE__CLUSTER": address, **env},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _check(case_name: str, case: Case, tmp_path: Path, address: str) -> None:
    _apply(tmp_path, {**case.files, "pipeline.py": case.files["pipeline.py"] + REPORT})
    first = _run(tmp_path, address, case.env)
    for label, value in case.values.items():
        assert first["tasks"][label][1] == value, (label, first)
    again = _run(tmp_path, address, case.env)
    assert again["executed"] == 0, again
    env = dict(case.env)
    for number, edit in enumerate(case.edits):
        _apply(tmp_path, edit.changes)
        env.update(edit.env)
        result = _run(tmp_path, address, env)
        ran = {label for label, (reason, _) in result["tasks"].items() if reason != "found done"}
        where = f"{case_name}, edit {number}: {result}"
        assert ran == edit.rerun, where
        assert result["executed"] == len(edit.rerun), where
        for label, value in edit.values.items():
            assert result["tasks"][label][1] == value, where
        for label, words in edit.reason.items():
            assert words in result["tasks"][label][0], where


def _script(body: str) -> str:
    return "from nbpipe import Pipeline\n\npipe = Pipeline('p')\n" + textwrap.dedent(body)


CASES: dict[str, Case] = {
    # 1. The user's own modules, used by attribute, imported at the top or in the task body.
    "module-attribute": Case(
        files={
            "mylib.py": "K = 10\n\ndef f(x):\n    return x * 3\n\ndef unrelated():\n    return 1\n",
            "pipeline.py": _script('''
                import mylib

                @pipe.task
                def top(x):
                    return mylib.f(x) + mylib.K

                @pipe.task
                def inside(x):
                    import mylib as lib
                    return lib.f(x)

                top(2), inside(2)
            '''),
        },
        values={"top(x=2)": 16, "inside(x=2)": 6},
        edits=[
            Edit({"mylib.py": ("def f(x):\n", "def f(x):\n    # a comment\n    '''A doc.'''\n")},
                 set()),
            Edit({"mylib.py": ("return 1", "return 2")}, set()),  # an unrelated function
            Edit({"mylib.py": ("x * 3", "x * 4")}, {"top(x=2)", "inside(x=2)"},
                 {"top(x=2)": 18, "inside(x=2)": 8}, {"top(x=2)": "`mylib.f`"}),
            Edit({"mylib.py": ("K = 10", "K = 20")}, {"top(x=2)"}, {"top(x=2)": 28},
                 {"top(x=2)": "`mylib.K`"}),
        ],
    ),
    "local-package": Case(
        files={
            "pkg/__init__.py": "",
            "pkg/sub.py": "SCALE = 2\n\ndef f(x):\n    return x * SCALE\n",
            "pipeline.py": _script('''
                import pkg.sub as s

                @pipe.task
                def aliased(x):
                    return s.f(x)

                @pipe.task
                def from_import(x):
                    from pkg.sub import f
                    return f(x) + 1

                @pipe.task
                def dotted(x):
                    import pkg.sub
                    return pkg.sub.f(x) + 2

                aliased(1), from_import(1), dotted(1)
            '''),
        },
        values={"aliased(x=1)": 2, "from_import(x=1)": 3, "dotted(x=1)": 4},
        edits=[
            Edit({"pkg/sub.py": ("SCALE = 2", "SCALE = 2  # two")}, set()),
            Edit({"pkg/sub.py": ("SCALE = 2", "SCALE = 5")},
                 {"aliased(x=1)", "from_import(x=1)", "dotted(x=1)"},
                 {"aliased(x=1)": 5, "from_import(x=1)": 6, "dotted(x=1)": 7},
                 {"aliased(x=1)": "`pkg.sub.SCALE`"}),
        ],
    ),
    # 2. Methods of objects: an instance counts with its class's code.
    "methods": Case(
        files={
            "models.py": "class Base:\n    def bias(self):\n        return 1\n",
            "pipeline.py": _script('''
                from dataclasses import dataclass

                from models import Base

                @dataclass
                class Model(Base):
                    w: float

                    def predict(self, x):
                        return self.w * x + self.bias()

                class Plain:
                    def __init__(self, k):
                        self.k = k

                    def apply(self, x):
                        return x + self.k

                MODEL = Model(w=2.0)
                PLAIN = Plain(3)

                @pipe.task
                def predict(x):
                    return MODEL.predict(x)

                @pipe.task
                def apply(x):
                    return PLAIN.apply(x)

                predict(1.0), apply(1)
            '''),
        },
        values={"predict(x=1.0)": 3.0, "apply(x=1)": 4},
        edits=[
            Edit({"pipeline.py": ("def predict(self, x):", "def predict(self,x):  # w x + b")},
                 set()),
            Edit({"pipeline.py": ("return self.w * x", "return self.w * x * 10")},
                 {"predict(x=1.0)"}, {"predict(x=1.0)": 21.0}, {"predict(x=1.0)": "`MODEL`"}),
            Edit({"models.py": ("return 1", "return 5")}, {"predict(x=1.0)"},
                 {"predict(x=1.0)": 25.0}),
            Edit({"pipeline.py": ("return x + self.k", "return x - self.k")}, {"apply(x=1)"},
                 {"apply(x=1)": -2}),
            Edit({"pipeline.py": ("Plain(3)", "Plain(4)")}, {"apply(x=1)"}, {"apply(x=1)": -3}),
        ],
    ),
    # 3. The user's own decorators (with functools.wraps), lru_cache, partial.
    "decorators": Case(
        files={
            "pipeline.py": _script('''
                import functools

                def logged(fn):
                    @functools.wraps(fn)
                    def wrapper(*args):
                        return fn(*args) + 100
                    return wrapper

                @logged
                def helper(x):
                    return x * 2

                @functools.lru_cache
                def cached(x):
                    return x + 1

                def scale(x, factor):
                    return x * factor

                triple = functools.partial(scale, factor=3)

                @pipe.task
                def wrapped(x):
                    return helper(x)

                @pipe.task
                def uses_cache(x):
                    return cached(x)

                @pipe.task
                def uses_partial(x):
                    return triple(x)

                wrapped(1), uses_cache(1), uses_partial(1)
            '''),
        },
        values={"wrapped(x=1)": 102, "uses_cache(x=1)": 2, "uses_partial(x=1)": 3},
        edits=[
            Edit({"pipeline.py": ("+ 100", "+ 100  # offset")}, set()),
            Edit({"pipeline.py": ("+ 100", "+ 200")}, {"wrapped(x=1)"}, {"wrapped(x=1)": 202}),
            Edit({"pipeline.py": ("return x * 2", "return x * 3")}, {"wrapped(x=1)"},
                 {"wrapped(x=1)": 203}),
            Edit({"pipeline.py": ("return x + 1", "return x + 2")}, {"uses_cache(x=1)"},
                 {"uses_cache(x=1)": 3}),
            Edit({"pipeline.py": ("factor=3", "factor=4")}, {"uses_partial(x=1)"},
                 {"uses_partial(x=1)": 4}),
            Edit({"pipeline.py": ("return x * factor", "return x * factor + 1")},
                 {"uses_partial(x=1)"}, {"uses_partial(x=1)": 5}),
        ],
    ),
    # 4. Default values of helpers, evaluated when the helper is defined.
    "defaults": Case(
        files={
            "pipeline.py": _script('''
                N = 3

                def times_n(x, n=N):
                    return x * n

                def keyword_only(x, *, k=N + 1):
                    return x + k

                @pipe.task
                def use(x):
                    return times_n(x) + keyword_only(x)

                use(2)
            '''),
        },
        values={"use(x=2)": 12},
        edits=[
            Edit({"pipeline.py": ("N = 3", "N = 3  # three")}, set()),
            Edit({"pipeline.py": ("N = 3", "N = 4")}, {"use(x=2)"}, {"use(x=2)": 15},
                 {"use(x=2)": "default values of helper `times_n`"}),
        ],
    ),
    # 5. Values changed after the call: the key is made with the values the task runs with.
    "after-the-call": Case(
        files={
            "pipeline.py": _script('''
                CFG = {"k": 1}
                ITEMS = [1, 2]

                @pipe.task
                def use_cfg(x):
                    return x * CFG["k"]

                @pipe.task
                def total(values):
                    return sum(values)

                use_cfg(5)
                total(ITEMS)
                CFG["k"] = 2
                ITEMS.append(3)
            '''),
        },
        values={"use_cfg(x=5)": 10, "total(values=[1, 2])": 6},
        edits=[
            # The same final values written at once: the same keys, nothing runs.
            Edit({"pipeline.py": ('CFG = {"k": 1}', 'CFG = {"k": 2}')}, set()),
            Edit({"pipeline.py": ('CFG["k"] = 2', 'CFG["k"] = 3')}, {"use_cfg(x=5)"},
                 {"use_cfg(x=5)": 15}, {"use_cfg(x=5)": "global `CFG` changed"}),
        ],
    ),
    # 6. Dict order: a task can see it.
    "dict-order": Case(
        files={
            "pipeline.py": _script('''
                @pipe.task
                def join(d):
                    return ",".join(d)

                join({"a": 1, "b": 2})
            '''),
        },
        values={"join(d={'a': 1, 'b': 2})": "a,b"},
        edits=[
            Edit({"pipeline.py": ('{"a": 1, "b": 2}', '{"b": 2, "a": 1}')},
                 {"join(d={'b': 2, 'a': 1})"}, {"join(d={'b': 2, 'a': 1})": "b,a"},
                 {"join(d={'b': 2, 'a': 1})": "argument `d` changed"}),
        ],
    ),
    # 9. Environment variables: env= given to a task, and env_inputs it inherits.
    "environment": Case(
        files={
            "pipeline.py": _script('''
                import os

                @pipe.task(env={"MODE": "fast"})
                def mode():
                    return os.environ["MODE"]

                @pipe.task(env_inputs=["OUTPUT_DIR"])
                def where():
                    return os.environ["OUTPUT_DIR"]

                mode(), where()
            '''),
        },
        env={"OUTPUT_DIR": "/data/a"},
        values={"mode": "fast", "where": "/data/a"},
        edits=[
            Edit({"pipeline.py": ('"fast"}', '"slow"}')}, {"mode"}, {"mode": "slow"},
                 {"mode": "environment variable `MODE` changed"}),
            Edit({}, {"where"}, {"where": "/data/b"},
                 {"where": "environment variable `OUTPUT_DIR` (env_inputs) changed"},
                 env={"OUTPUT_DIR": "/data/b"}),
        ],
    ),
    # Reasons name the cause: an argument of a call, a closure variable, upstream order.
    "reasons": Case(
        files={
            "pipeline.py": _script('''
                def make(offset):
                    def add(x):
                        return x + offset
                    return add

                adder = make(1)

                @pipe.task
                def f(x):
                    return adder(x)

                @pipe.task
                def g(x):
                    return x

                @pipe.task
                def ordered(values):
                    return values

                f(5), ordered([g(1), g(2)])
            '''),
        },
        values={"f(x=5)": 6, "ordered(values=[2 tasks])": [1, 2]},
        edits=[
            Edit({"pipeline.py": ("f(5)", "f(6)")}, {"f(x=6)"}, {"f(x=6)": 7},
                 {"f(x=6)": "argument `x` changed"}),
            Edit({"pipeline.py": ("make(1)", "make(2)")}, {"f(x=6)"}, {"f(x=6)": 8},
                 {"f(x=6)": "closure variable `offset` changed"}),
            Edit({"pipeline.py": ("[g(1), g(2)]", "[g(2), g(1)]")},
                 {"ordered(values=[2 tasks])"}, {"ordered(values=[2 tasks])": [2, 1]},
                 {"ordered(values=[2 tasks])": "the order of its upstream tasks changed"}),
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_edit_reruns_exactly_what_it_affects_with_the_cause(name: str, tmp_path: Path,
                                                               cluster) -> None:
    _check(name, CASES[name], tmp_path, cluster.scheduler_address)
