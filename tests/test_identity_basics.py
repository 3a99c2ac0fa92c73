"""Task identity in process: canonical encoding, what enters a key and what does not."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import pytest

from nbpipe import Pipeline, UnhashableValue
from nbpipe.identity import IDENTITY_VERSION, digest, key_digest, normalised_source_digest

LOCK = threading.Lock()
SCALE = 2
WEIGHTS = [1, 2]


def _helper(x: int) -> int:
    return x + 1


def test_encoding_is_canonical_and_unambiguous() -> None:
    # A dict counts in its order (a task can see it); a set has none; a key's components are
    # sorted, so their JSON copy gives the key back.
    assert digest({"a": 1, "b": [1, 2]}) != digest({"b": [1, 2], "a": 1})
    assert digest({"a", "b"}) == digest({"b", "a"})
    assert key_digest({"a": 1, "b": {"y": 1, "x": 2}}) == key_digest({"b": {"x": 2, "y": 1}, "a": 1})
    values = [1, 1.0, True, "1", b"1", (1,), [1], {1}, None, Path("1")]
    assert len({digest(v) for v in values}) == len(values)
    assert digest(("ab", "c")) != digest(("a", "bc"))  # no plain string joins


def test_the_encoding_does_not_drift_between_versions() -> None:
    """Keys computed by an older nbpipe must still match: a store must never recompute because
    nbpipe itself was upgraded. This digest was computed by the encoder of identity version 2
    (dicts in order); changing it is an IDENTITY_VERSION bump, never a silent drift."""
    np = pytest.importorskip("numpy")
    value = {"b": 1, "a": [1.5, "x", None, True, (2,)], "s": {1, 2}, "p": Path("/d"),
             "n": np.arange(4)}
    assert digest(value) == "116e3db6e5a5588f78ae942984e371e8"


def test_a_function_hashed_once_still_sees_changed_globals_and_helpers(tmp_path: Path) -> None:
    """Many calls of one function reuse its identity, but not once a name it reads changed."""
    pipe = Pipeline("memo", store=tmp_path / ".nbpipe")

    @pipe.task
    def work(x: int) -> int:
        return _helper(x) * SCALE + sum(WEIGHTS)

    keys = [work(1).key]
    assert work(1).key == keys[0]
    module = globals()
    try:
        module["SCALE"] = 3  # a rebound global
        keys.append(work(1).key)
        WEIGHTS.append(3)  # a mutable global changed in place
        keys.append(work(1).key)

        def replacement(x: int) -> int:
            return x + 2

        module["_helper"] = replacement  # a redefined helper
        keys.append(work(1).key)
    finally:
        module["SCALE"] = 2
        del WEIGHTS[2:]
        module["_helper"] = _original_helper
    assert len(set(keys)) == 4, keys
    assert work(1).key == keys[0]  # everything back as it was: the first key again


_original_helper = _helper


def test_a_key_is_the_digest_of_its_recorded_components(tmp_path: Path) -> None:
    """Keys are computed from shared pre-encoded parts; they must equal the plain digest of the
    components the store records (so ``why`` and any other tool can recompute them)."""
    pipe = Pipeline("components", store=tmp_path / ".nbpipe")
    (tmp_path / "in.txt").write_text("data")

    @pipe.task(version=3)
    def first(x: int, path: Path, **options: int) -> int:
        return x * SCALE

    @pipe.task
    def second(a: int, b: list[int]) -> int:
        return a + sum(b)

    @pipe.task(after=["first"])
    def third() -> int:
        return 3

    f = first(1, tmp_path / "in.txt", fast=1)
    s = second(f, [f, 2])
    t = third()
    for ref in (f, s, t):
        assert ref.key == key_digest(ref.components)
        assert ref.components["identity"] == IDENTITY_VERSION
    assert s.components["upstream"] == [[f.label, f.key]]
    assert t.components["after"] == [f.key]
    assert set(f.components["args"]) == {"x", "path", "fast"}


def test_numpy_arrays_are_hashed_by_dtype_shape_and_content() -> None:
    np = pytest.importorskip("numpy")
    a = np.arange(6)
    assert digest(a) == digest(np.arange(6))
    assert digest(a) != digest(a.reshape(2, 3))
    assert digest(a) != digest(a.astype("float64"))


def test_comments_docstrings_and_formatting_do_not_change_code_identity() -> None:
    plain = "def f(x):\n    return x + 1\n"
    noisy = 'def f(x):\n    """Docs."""\n    # a comment\n\n    return (x +\n            1)\n'
    assert normalised_source_digest(plain) == normalised_source_digest(noisy)
    assert normalised_source_digest(plain) != normalised_source_digest(plain.replace("1", "2"))


def test_resources_and_names_are_not_identity_but_version_is(tmp_path: Path) -> None:
    pipe = Pipeline("identity", store=tmp_path / ".nbpipe")

    def work(x: int) -> int:
        return x

    base = pipe.task(work)(1).key
    assert pipe.task(cores=8, memory="16GB", retries=3, walltime="01:00:00", pool="big")(work)(1).key == base
    assert pipe.task(name="renamed")(work)(1).key == base
    assert pipe.task(version=2)(work)(1).key != base
    assert pipe.task(work)(2).key != base


def test_identical_calls_are_one_task(tmp_path: Path) -> None:
    pipe = Pipeline("dedupe", store=tmp_path / ".nbpipe")

    @pipe.task
    def work(x: int) -> int:
        return x

    assert work(1) is work(1)
    assert work(x=1) is work(1)
    assert work(1) is not work(2)


def test_unhashable_argument_names_the_task_and_the_argument(tmp_path: Path) -> None:
    pipe = Pipeline("unhashable", store=tmp_path / ".nbpipe")

    @pipe.task
    def locked(guard: object, n: int = 1) -> int:
        return n

    with pytest.raises(UnhashableValue, match=r"task 'locked': argument 'guard'.*lock.*__nbpipe_token__"):
        locked(threading.Lock())
    assert pipe.tasks() == []  # nothing registered


def test_unhashable_global_names_the_task_and_the_global(tmp_path: Path) -> None:
    pipe = Pipeline("unhashable-global", store=tmp_path / ".nbpipe")

    @pipe.task
    def uses_lock() -> bool:
        return LOCK.locked()

    with pytest.raises(UnhashableValue, match=r"task 'uses_lock' reads global 'LOCK'"):
        uses_lock()


def test_objects_with_an_nbpipe_token_are_hashable(tmp_path: Path) -> None:
    pipe = Pipeline("token", store=tmp_path / ".nbpipe")

    class Config:
        def __init__(self, level: int):
            self.level = level

        def __nbpipe_token__(self) -> int:
            return self.level

    @pipe.task
    def use(config: Config) -> int:
        return config.level

    assert use(Config(1)).key == use(Config(1)).key
    assert use(Config(1)).key != use(Config(2)).key


def test_two_calls_that_share_a_label_are_two_tasks(tmp_path: Path) -> None:
    """Registration never drops a task: with_options copies, and two functions given one name,
    are tasks of their own in a script (only a notebook cell run again redefines)."""
    pipe = Pipeline("labels", store=tmp_path / ".nbpipe")

    @pipe.bash_task
    def run(command: str) -> str:
        return command

    @pipe.task
    def a() -> int:
        return 1

    @pipe.task
    def b() -> int:
        return 2

    first = run.with_options(after=[a()])("echo same")
    second = run.with_options(after=[b()])("echo same")

    @pipe.task(name="average")
    def mean_a(values: list) -> float:
        return sum(values) / len(values)

    @pipe.task(name="average")
    def mean_b(values: list) -> float:
        return sorted(values)[len(values) // 2]

    averages = [mean_a([1, 2, 6]), mean_b([1, 2, 6])]
    labels = {t.label for t in pipe.tasks()}
    assert len({first.key, second.key}) == 2
    assert {first.label, second.label} <= labels
    assert {averages[0].label, averages[1].label} <= labels
    assert len(pipe.tasks()) == 6


def test_functions_made_in_a_loop_are_tasks_of_their_own(tmp_path: Path) -> None:
    pipe = Pipeline("loop", store=tmp_path / ".nbpipe")
    refs = []
    for k in range(3):
        @pipe.task(name="scaled")
        def scaled(x: int, k: int = k) -> int:
            return x * k

        refs.append(scaled(1))
    assert len({r.key for r in refs}) == 3
    assert len(pipe.tasks()) == 3


def test_a_store_keyed_by_older_rules_says_so_once_and_keeps_its_results(tmp_path: Path) -> None:
    """Keys of identity version 1 never match version 2: tasks re-run once, saying why, and the
    pipeline warns once; nothing recorded is lost."""
    pipe = Pipeline("old", store=tmp_path / ".nbpipe")

    @pipe.task
    def work(x: int) -> int:
        return x

    ref = work(1)
    old_components = {k: v for k, v in ref.components.items() if k != "identity"}
    pipe.store.register(pipe.pipeline_id, [{
        "key": "0" * 32, "name": "work", "label": ref.label, "kind": "python",
        "state": "SUCCEEDED", "components": old_components, "reason": None,
        "resources": "{}", "cell": None}], [])
    fresh = Pipeline("old", store=tmp_path / ".nbpipe")
    again = fresh.task(work.fn)(1)
    with pytest.warns(UserWarning, match="keyed by an older nbpipe.*results are kept"):
        fresh.tasks()
    assert "identity rules changed (version 1 -> 2)" in again.reason
    rows = fresh.store.task_rows(fresh.pipeline_id, ["0" * 32], active_only=False)
    assert rows["0" * 32]["state"] == "SUCCEEDED"  # the old record is kept


def test_instances_of_user_classes_count_with_their_class_code(tmp_path: Path) -> None:
    class Model:
        def __init__(self, w: float):
            self.w = w

        def predict(self, x: float) -> float:
            return self.w * x

    class Edited(Model):
        def predict(self, x: float) -> float:
            return self.w * x + 1

    Edited.__name__ = Edited.__qualname__ = "Model"
    assert digest(Model(1.0)) == digest(Model(1.0))
    assert digest(Model(1.0)) != digest(Model(2.0))
    assert digest(Model(1.0)) != digest(Edited(1.0))


def test_partial_and_cached_functions_hash_by_what_they_wrap() -> None:
    def scale(x: int, factor: int) -> int:
        return x * factor

    assert digest(functools.partial(scale, factor=2)) == digest(functools.partial(scale, factor=2))
    assert digest(functools.partial(scale, factor=2)) != digest(functools.partial(scale, factor=3))
    assert digest(functools.lru_cache(scale)) == digest(functools.cache(scale))


def test_installed_packages_count_by_version_not_code(tmp_path: Path) -> None:
    """A limit, documented: code of installed packages (site-packages) enters a key by its
    distribution's version; editing it in place is not seen."""
    import json as stdlib_json

    import numpy as np

    pipe = Pipeline("limits", store=tmp_path / ".nbpipe")

    @pipe.task
    def uses_libraries(x: int) -> str:
        return stdlib_json.dumps(float(np.sqrt(x)))

    modules = uses_libraries(4).components["modules"]
    assert modules["numpy"] == np.__version__
    assert modules["json"].startswith("python-")
    assert "helpers" in uses_libraries(4).components
    assert not any("numpy" in h for h in uses_libraries(4).components["helpers"])


def test_a_module_edited_in_a_running_process_counts_once_python_sees_it(tmp_path: Path,
                                                                        monkeypatch) -> None:
    """A limit, documented: in a running kernel an edited module counts once it is reloaded
    (``importlib.reload``, ``%autoreload``, a restart), as Python itself sees it."""
    import importlib
    import sys

    (tmp_path / "kernel_lib.py").write_text("def f(x):\n    return x * 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import kernel_lib

    pipe = Pipeline("reload", store=tmp_path / ".nbpipe")

    @pipe.task
    def use(x: int) -> int:
        return kernel_lib.f(x)

    before = use(1).key
    (tmp_path / "kernel_lib.py").write_text("def f(x):\n    return x * 4  # edited\n")
    assert use(1).key == before  # not reloaded: the kernel still runs the old f
    importlib.reload(kernel_lib)
    assert use(1).key != before
    assert use(1).components["helpers"]["kernel_lib.f"]
    sys.modules.pop("kernel_lib", None)


def test_a_module_used_whole_counts_by_its_whole_file(tmp_path: Path, monkeypatch) -> None:
    """A limit, documented: a module passed on or read with getattr counts by its whole file, so
    editing any of its members changes the key (a re-run more than needed, never a stale one)."""
    import importlib
    import sys

    (tmp_path / "whole_lib.py").write_text("def f(x):\n    return x\n\n\ndef g():\n    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import whole_lib

    pipe = Pipeline("whole", store=tmp_path / ".nbpipe")

    @pipe.task
    def dynamic(name: str) -> int:
        module = whole_lib
        return getattr(module, name)(1)

    before = dynamic("f").key
    (tmp_path / "whole_lib.py").write_text("def f(x):\n    return x\n\n\ndef g():\n    return 1\n")
    importlib.reload(whole_lib)
    assert dynamic("f").key != before
    assert "whole_lib (whole module)" in dynamic("f").components["helpers"]
    sys.modules.pop("whole_lib", None)
