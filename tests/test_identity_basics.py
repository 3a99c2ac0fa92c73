"""Task identity in process: canonical encoding, what enters a key and what does not."""

from __future__ import annotations

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
