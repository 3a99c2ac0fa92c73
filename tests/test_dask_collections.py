"""Dask citizens: a TaskRef is a Dask collection (``dask.compute(ref)``,
``dask.delayed(f)(ref)``, ``ref.visualize()``), and Dask collections passed to tasks (a
``dask.delayed``, a ``dask.array``) count in the task's key by Dask's own ``tokenize`` and are
computed on the cluster as the task's inputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest

from nbpipe import Pipeline, State


def test_dask_compute_runs_a_task_and_returns_its_value(pipe: Pipeline) -> None:
    @pipe.task
    def square(x: int) -> int:
        return x * x

    a, b = square(3), square(4)
    assert dask.compute(a, b) == (9, 16)
    assert a.state is State.SUCCEEDED and b.state is State.SUCCEEDED
    assert dask.compute(a)[0] == 9  # found done: its token is its content key
    assert dask.base.tokenize(a) == dask.base.tokenize(square(3))
    assert dask.base.tokenize(a) != dask.base.tokenize(b)


def test_a_task_feeds_a_dask_delayed_and_a_dask_array(pipe: Pipeline) -> None:
    @pipe.task
    def matrix(n: int) -> np.ndarray:
        return np.arange(n * n, dtype=float).reshape(n, n)

    ref = matrix(4)
    assert dask.delayed(np.trace)(ref).compute() == np.trace(np.arange(16.0).reshape(4, 4))
    lazy = da.from_delayed(dask.delayed(ref), shape=(4, 4), dtype=float)
    assert float((lazy + 1).sum().compute()) == float(np.arange(16.0).sum() + 16)


def test_a_failed_task_raises_its_error_in_dask_compute(pipe: Pipeline) -> None:
    @pipe.task
    def broken() -> int:
        raise ValueError("no value")

    with pytest.raises(ValueError, match="no value"):
        dask.compute(broken())


def test_a_dask_array_argument_is_computed_on_the_cluster(pipe: Pipeline) -> None:
    @pipe.task
    def total(values: np.ndarray) -> float:
        assert isinstance(values, np.ndarray)  # computed before the task runs
        return float(values.sum())

    ones = total(da.ones((200, 200), chunks=50))
    assert ones.result() == 40_000.0
    assert total(da.ones((200, 200), chunks=50)).key == ones.key  # Dask's token: the same
    zeros = total(da.zeros((200, 200), chunks=50))
    assert zeros.key != ones.key
    assert zeros.result() == 0.0


def test_a_dask_delayed_argument_is_computed_and_counts_in_the_key(pipe: Pipeline) -> None:
    def triple(x: int) -> int:
        return 3 * x

    @pipe.task
    def plus_one(x: int) -> int:
        return x + 1

    ref = plus_one(dask.delayed(triple)(5))
    assert ref.result() == 16
    assert plus_one(dask.delayed(triple)(6)).key != ref.key
    nested = plus_one({"value": dask.delayed(triple)(7)}["value"])
    assert nested.result() == 22


def test_dask_collections_on_both_sides_of_a_task(pipe: Pipeline) -> None:
    @pipe.task
    def scale(values: np.ndarray, factor: float) -> np.ndarray:
        return values * factor

    scaled = scale(da.arange(10, chunks=5), dask.delayed(float)(2))
    back = da.from_delayed(dask.delayed(scaled), shape=(10,), dtype=float)
    assert float(back.sum().compute()) == 90.0


def test_a_failing_dask_argument_fails_the_task_naming_the_error(pipe: Pipeline) -> None:
    def explode() -> int:
        raise RuntimeError("collection failed")

    @pipe.task
    def use(x: int) -> int:
        return x

    ref = use(dask.delayed(explode)())
    pipe.run(check=False)
    assert ref.state is State.FAILED
    assert "collection failed" in (ref.error or "")


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot is not installed")
def test_visualize_draws_the_task_and_its_upstream_without_running(
        pipe: Pipeline, tmp_path: Path) -> None:
    @pipe.task
    def load() -> int:
        return 1

    @pipe.task
    def clean(x: int) -> int:
        return x

    ref = clean(load())
    ref.visualize(str(tmp_path / "graph"), format="svg")
    svg = (tmp_path / "graph.svg").read_text()
    assert "load" in svg and "clean" in svg
    assert ref.state is State.WAITING
