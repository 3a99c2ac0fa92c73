"""Graph resolution on its own: dependencies, cycles, keys and re-keying, with no store, no
cluster and no pipeline (``nbpipe.resolution.TaskGraph``)."""

from __future__ import annotations

import itertools
import os
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

from nbpipe import CycleError, MissingInputError, TaskDefinitionError, UnknownTask
from nbpipe.resolution import TaskGraph
from nbpipe.states import State
from nbpipe.task import TaskFunction, make_options


class Owner:
    """Stands for the pipeline the refs belong to (the graph only compares it); as a
    pipeline, it holds its graph (which holds it weakly)."""

    def __init__(self, name: str = "pure"):
        self.name = name
        self.graph = TaskGraph(self, name)


_owners: list[Owner] = []  # (what a user's variables do for a pipeline: keep it alive)


def new_graph(name: str = "pure") -> TaskGraph:
    _owners.append(Owner(name))
    return _owners[-1].graph


def as_task(fn: Any, **options: Any) -> TaskFunction:
    return TaskFunction(fn, "python", make_options(fn.__name__, **options), None)


_scripts = itertools.count()


def script_functions(source: str, namespace: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``source`` as a script or a notebook cell does (its source in a file, its module not
    an installed one: nbpipe reads the code and follows the globals it uses) in ``namespace``
    (a new one by default), and return the namespace."""
    path = Path(tempfile.gettempdir()) / f"nbpipe-resolution-{os.getpid()}-{next(_scripts)}.py"
    path.write_text(textwrap.dedent(source))
    # (under pytest, __main__ is pytest's own module, which is library code)
    namespace = {"__name__": "resolution_script"} if namespace is None else namespace
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    return namespace


def double(x: int) -> int:
    return 2 * x


def total(values: list[int]) -> int:
    return sum(values)


def first(pair: Any) -> Any:
    return pair[0]


@pytest.fixture()
def graph() -> TaskGraph:
    return new_graph("pure")


def test_the_same_call_is_one_task_and_another_call_another(graph: TaskGraph) -> None:
    f = as_task(double)
    a, again, b = graph.add(f, (1,), {}), graph.add(f, (), {"x": 1}), graph.add(f, (2,), {})
    assert a is again and a is not b
    assert [r.label for r in graph.refs.values()] == ["double(x=1)", "double(x=2)"]


def test_task_results_in_arguments_are_data_dependencies_through_lists_and_dicts(graph: TaskGraph) -> None:
    f, t, one = as_task(double), as_task(total), as_task(first)
    a, b = graph.add(f, (1,), {}), graph.add(f, (2,), {})
    s = graph.add(t, ([a, b],), {})
    d = graph.add(one, ({"p": [b]},), {})
    changed, retired = graph.resolve()
    assert set(changed) == {a, b, s, d} and retired == {}
    assert s.deps == {a: "data", b: "data"} and d.deps == {b: "data"}
    assert set(graph.closure([s])) == {s, a, b} and graph.closure([a]) == [a]
    assert all(r.key_ and r.state is State.WAITING for r in changed)


def test_a_task_result_hidden_in_a_set_or_from_another_pipeline_is_refused(graph: TaskGraph) -> None:
    f, t = as_task(double), as_task(total)
    a = graph.add(f, (1,), {})
    with pytest.raises(TaskDefinitionError, match=r"inside a frozenset"):
        graph.add(t, (frozenset([a]),), {})
    other = new_graph("other")
    with pytest.raises(TaskDefinitionError, match=r"from pipeline 'pure'.*same pipeline \('other'\)"):
        other.add(t, ([a],), {})
    with pytest.raises(TaskDefinitionError, match=r"after='double\(x=1\)' from pipeline 'pure'"):
        other.add(as_task(double, after=[a]), (3,), {})


def test_a_key_follows_the_keys_of_its_upstream_tasks(graph: TaskGraph) -> None:
    f, t = as_task(double), as_task(total)
    s1 = graph.add(t, ([graph.add(f, (1,), {})],), {})
    s2 = graph.add(t, ([graph.add(f, (2,), {})],), {})
    graph.resolve()
    assert s1.key_ != s2.key_
    again = new_graph("pure")  # another process: the same calls give the same keys
    s1_again = again.add(t, ([again.add(f, (1,), {})],), {})
    again.resolve()
    assert s1_again.key_ == s1.key_


def test_after_names_a_task_and_an_unknown_name_says_so(graph: TaskGraph) -> None:
    a = graph.add(as_task(double), (1,), {})
    b = graph.add(as_task(total, after=["double"]), ([],), {})
    graph.resolve()
    assert b.deps == {a: "after"}
    lost = new_graph("pure")
    lost.add(as_task(total, after=["nope"]), ([],), {})
    with pytest.raises(UnknownTask, match=r"after='nope'.*register it first or fix the name"):
        lost.resolve()


def test_a_cycle_of_after_names_is_named(graph: TaskGraph) -> None:
    ns = script_functions("""
        def a():
            return 1
        def b():
            return 2
        def c():
            return 3
    """)
    graph.add(as_task(ns["a"], after=["c"]), (), {})
    graph.add(as_task(ns["b"], after=["a"]), (), {})
    graph.add(as_task(ns["c"], after=["b"]), (), {})
    # (arrows from a task to what it waits for; where the walk starts is graphlib's choice)
    with pytest.raises(CycleError, match=r"tasks form a cycle: (a -> b -> c -> a|b -> c -> a -> b|"
                                         r"c -> a -> b -> c); remove one of these dependencies"):
        graph.resolve()


def test_files_make_dependencies_and_a_missing_input_is_named(graph: TaskGraph, tmp_path: Path) -> None:
    ns = script_functions("""
        from typing import Annotated
        from nbpipe import In, Out
        def make(path: Annotated[str, Out]):
            pass
        def use(path: Annotated[str, In]):
            pass
    """)
    target = tmp_path / "made.txt"
    maker = graph.add(as_task(ns["make"]), (str(target),), {})
    user = graph.add(as_task(ns["use"]), (str(target),), {})
    graph.resolve()
    assert user.deps == {maker: "file"} and user.dynamic
    alone = new_graph("pure")
    alone.add(as_task(ns["use"]), (str(tmp_path / "absent.txt"),), {})
    with pytest.raises(MissingInputError, match=r"absent.txt, which does not exist"):
        alone.resolve()
    twice = new_graph("pure")
    twice.add(as_task(ns["make"]), (str(target),), {})
    twice.add(as_task(ns["make"], version="2"), (str(target),), {})
    with pytest.raises(TaskDefinitionError, match=r"both declare .*made.txt as their output"):
        twice.resolve()


def test_an_argument_changed_in_place_rekeys_the_task_and_its_dependents(graph: TaskGraph) -> None:
    values = [1, 2]
    s = graph.add(as_task(total), (values,), {})
    d = graph.add(as_task(double), (s,), {})
    graph.resolve()
    old_s, old_d = s.key_, d.key_
    values.append(3)
    graph.rekey_changed()
    changed, _ = graph.resolve()
    assert set(changed) == {s, d}
    assert s.key_ != old_s and d.key_ != old_d
    graph.rekey_changed()  # nothing changed since: the keys stay
    assert graph.resolve() == ([], {})


def test_a_changed_global_rekeys_a_task_not_handed_to_a_runner(graph: TaskGraph) -> None:
    ns = script_functions("""
        CFG = {"k": 1}
        def scaled(x):
            return x * CFG["k"]
    """)
    ref = graph.add(as_task(ns["scaled"]), (3,), {})
    graph.resolve()
    old = ref.key_
    ns["CFG"]["k"] = 2
    graph.rekey_changed()
    graph.resolve()
    assert ref.key_ != old
    ref.queued = True  # handed to a runner: it runs with the key it has
    ns["CFG"]["k"] = 3
    key = ref.key_
    graph.rekey_changed()
    graph.resolve()
    assert ref.key_ == key


def test_a_task_a_runner_holds_keeps_its_key(graph: TaskGraph, tmp_path: Path) -> None:
    ns = script_functions("""
        from typing import Annotated
        from nbpipe import In
        def read(path: Annotated[str, In]):
            pass
    """)
    data = tmp_path / "in.txt"
    data.write_text("one")
    ref = graph.add(as_task(ns["read"]), (str(data),), {})
    graph.resolve()
    old = ref.key_
    data.write_text("two")  # read by content every resolution...
    assert graph.resolve(held={ref}) == ([], {})  # ...but not while a runner has it
    assert ref.key_ == old
    changed, _ = graph.resolve()
    assert changed == [ref] and ref.key_ != old


def test_a_def_run_again_replaces_its_task_and_another_def_of_the_name_adds_one(
        graph: TaskGraph) -> None:
    source = "def step(x):\n    return x\n"
    namespace = script_functions(source)  # a notebook cell...
    first = graph.add(as_task(namespace["step"]), (1,), {})
    script_functions(source.replace("return x", "return x + 1"), namespace)  # ...edited, run again
    second = graph.add(as_task(namespace["step"]), (1,), {})
    assert second is not first and list(graph.refs.values()) == [second]
    # two functions of one name, each still bound where it was made (a script, a loop)
    other = script_functions(source.replace("return x", "return x - 1"))["step"]
    third = graph.add(as_task(other), (1,), {})
    assert [r.label for r in graph.refs.values()] == ["step(x=1)", "step(x=1)~2"]
    assert third is not second


def test_tasks_are_found_by_label_name_or_key_prefix(graph: TaskGraph) -> None:
    f = as_task(double)
    a, b = graph.add(f, (1,), {}), graph.add(f, (2,), {})
    graph.resolve()
    assert graph.find("double") == [a, b]
    assert graph.find("double(x=2)") == [b]
    assert graph.find(a.key_[:6]) == [a]
    with pytest.raises(UnknownTask, match=r"no task 'nope' in pipeline 'pure'"):
        graph.find("nope")
    graph.forget([a])
    assert graph.find("double") == [b]


def test_upstream_slots_keep_the_encoding_that_existing_keys_were_made_with() -> None:
    """A task's key encodes the upstream slot's class by name: the name it had when stores
    were made (nbpipe.pipeline._Slot) stays, or every task with an upstream task would run
    again after an upgrade."""
    from nbpipe.identity import digest
    from nbpipe.resolution import Slot

    class _Slot:  # the slot as it was defined before it moved
        def __init__(self, index: int, output: str | None = None):
            self.index, self.output = index, output

        def __nbpipe_token__(self) -> tuple[str, int, str | None]:
            return ("upstream", self.index, self.output)

    _Slot.__module__, _Slot.__qualname__ = "nbpipe.pipeline", "_Slot"
    for slot in ((0, None), (3, "mean")):
        assert digest(Slot(*slot)) == digest(_Slot(*slot))
