"""A task's run state is one immutable record (``TaskRef.run_state``), replaced whole.

The runner thread moves tasks on while other threads (the kernel waiting for a value, the
sidebar's widget, the user's ``ref.state``) read them. Readers take the record once and must see
one moment of the task: never SUCCEEDED without its result file, never an error, traceback and
exception of different attempts, never the failure of an earlier attempt on a task that failed
again or succeeded. These tests hold every transition to that on real runs (the shared
LocalCluster): every record any task is given, from any thread, is checked (``Published``), and a
reader thread polls all the while (``Watcher``).
"""

from __future__ import annotations

import ast
import doctest
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from conftest import wait_for
from distributed import Client

import nbpipe.runstate
from nbpipe import Pipeline, State, context
from nbpipe.runstate import FIELDS, RunState
from nbpipe.task import TaskRef

PACKAGE = Path(nbpipe.runstate.__file__).resolve().parent
FAILURE = ("error", "traceback", "exception")

# -- the record ---------------------------------------------------------------------------------


def test_a_new_record_is_waiting_with_no_attempt_and_nothing_else() -> None:
    run = RunState()
    assert run.state is State.WAITING
    assert (run.attempts, run.budget) == (0, 0)
    assert all(getattr(run, f) is None for f in FIELDS if f not in ("state", "attempts", "budget"))


@pytest.mark.parametrize("field", FIELDS)
def test_a_record_cannot_be_changed_in_place(field: str) -> None:
    run = RunState()
    with pytest.raises(AttributeError):
        setattr(run, field, None)


def test_but_makes_a_new_record_and_leaves_the_old_one_as_it_was() -> None:
    old = RunState(state=State.PENDING, attempts=1)
    new = old.but(state=State.RUNNING, worker="tcp://w:1")
    assert (new.state, new.attempts, new.worker) == (State.RUNNING, 1, "tcp://w:1")
    assert (old.state, old.worker) == (State.PENDING, None)  # a reader holding it keeps its moment


def test_but_names_the_fields_when_given_one_a_record_has_not() -> None:
    with pytest.raises(TypeError, match=r"no field 'result'; its fields are state, attempts"):
        RunState().but(result=("p", "c"))


def test_a_success_carries_its_result_file_and_no_failure_of_an_earlier_attempt() -> None:
    retrying = RunState(attempts=2).ended(State.WAITING, "ValueError: 1", "tb 1", b"exc 1")
    done = retrying.succeeded(("/r/k.pkl", "xxh3:1"), reason="found done")
    assert done.state is State.SUCCEEDED and done.result_file == ("/r/k.pkl", "xxh3:1")
    assert all(getattr(done, f) is None for f in FAILURE)
    assert (done.attempts, done.reason) == (2, "found done")


def test_an_end_replaces_all_three_failure_fields_together() -> None:
    """An end that brings only a message (killed, upstream failed, the runner stopped) leaves no
    traceback or exception of an earlier attempt behind it."""
    failed_once = RunState(attempts=1).ended(State.WAITING, "ValueError: 1", "tb 1", b"exc 1")
    killed = failed_once.ended(State.KILLED, "task 't' was killed on request")
    assert (killed.error, killed.traceback, killed.exception) == (
        "task 't' was killed on request", None, None)
    assert killed.result_file is None


def test_a_retry_by_request_forgets_the_result_and_the_failure_and_counts_retries_anew() -> None:
    run = RunState(state=State.FAILED, attempts=3, budget=0, error="e", traceback="t",
                   exception=b"x")
    assert run.retries_used == 3
    again = run.retried("retried by request")
    assert (again.state, again.result_file, again.budget, again.reason) == (
        State.WAITING, None, 3, "retried by request")
    assert all(getattr(again, f) is None for f in FAILURE)
    assert again.retries_used == 0
    done = RunState(state=State.SUCCEEDED, attempts=1, result_file=("p", "c"))
    assert done.retried("r").result_file is None


def test_the_examples_in_the_module_docstring_hold() -> None:
    result = doctest.testmod(nbpipe.runstate, optionflags=doctest.ELLIPSIS)
    assert result.attempted and not result.failed


def test_the_record_is_pure() -> None:
    """It knows nothing of stores, clusters, runners or Jupyter (a record, not a service)."""
    tree = ast.parse((PACKAGE / "runstate.py").read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"__future__", "typing", "states"}, imported


# -- the record on TaskRef ----------------------------------------------------------------------


@pytest.fixture
def ref(tmp_path: Path) -> Any:
    pipe = Pipeline("runstate-unit", store=tmp_path / ".nbpipe")

    @pipe.task
    def double(x: int) -> int:
        return 2 * x

    yield double(1)
    pipe.close()


@pytest.mark.parametrize("field", FIELDS)
def test_each_run_state_field_of_a_task_reads_its_record(ref: Any, field: str) -> None:
    ref.update(state=State.FAILED, attempts=2, budget=1, error="e", exception=b"x",
               traceback="t", result_file=None, reason="r", worker="tcp://w:1")
    assert getattr(ref, field) == getattr(ref.run_state, field)
    assert getattr(ref, field) is not None or field == "result_file"


@pytest.mark.parametrize("field", FIELDS)
def test_no_run_state_field_of_a_task_can_be_set_alone(ref: Any, field: str) -> None:
    """Setting one field at a time is how half-made states were seen: only whole updates."""
    with pytest.raises(AttributeError, match=rf"task 'double\(x=1\)': ref\.{field} is read-only"):
        setattr(ref, field, getattr(ref, field))


def test_update_swaps_the_whole_record_at_once(ref: Any) -> None:
    before = ref.run_state
    after = ref.update(state=State.SUCCEEDED, attempts=1, result_file=("/r/k.pkl", "c"))
    assert ref.run_state is after and after is not before
    assert (after.state, after.attempts, after.result_file) == (
        State.SUCCEEDED, 1, ("/r/k.pkl", "c"))
    assert (before.state, before.result_file) == (State.WAITING, None)


def test_no_module_sets_a_field_of_a_tasks_run_state_alone() -> None:
    """Every write of run state goes through ``ref.update(...)`` or ``ref.run_state = ...``:
    a new ``ref.state = ...`` (or ``ref.attempts += 1``) anywhere in nbpipe fails here, also on
    a path no other test takes. ``self.<field>`` is another class's own field (a TaskRef's
    cannot be set at all); other objects with fields of these names are listed."""
    others = {  # (module, object): not tasks
        ("worker.py", "outcome"),  # an attempt's Outcome
        ("poolcluster.py", "info"),  # a batch job's JobInfo
    }
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = list(node.targets)
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            flat = [t for target in targets
                    for t in (target.elts if isinstance(target, ast.Tuple) else [target])]
            for t in flat:
                if isinstance(t, ast.Attribute) and t.attr in FIELDS and not (
                        isinstance(t.value, ast.Name)
                        and (t.value.id == "self" or (where, t.value.id) in others)):
                    found.append(f"{where}:{node.lineno}: {ast.unparse(t)}")
    assert not found, ("run state set one field at a time (readers in other threads can see it "
                       "half made): write ref.update(state=..., ...) or ref.run_state = "
                       f"ref.run_state.<transition>(...) instead: {found}")


# -- a real run, watched by another thread --------------------------------------------------------


def attempt_of(text: str | None) -> int | None:
    """The attempt a failure message of the tasks below names (``attempt N of ...``)."""
    if text is None or "attempt " not in text:
        return None
    return int(text.rsplit("attempt ", 1)[1].split(" ", 1)[0])


def violations(run: RunState) -> list[str]:
    """What is wrong with one record of one of the tasks below, if anything."""
    bad = []
    failure = [getattr(run, f) for f in FAILURE]
    if run.state is State.SUCCEEDED:
        if run.result_file is None:
            bad.append("SUCCEEDED without a result file")
        if any(v is not None for v in failure):
            bad.append(f"SUCCEEDED with a failure left: {run.error!r}")
        return bad
    if run.result_file is not None:
        bad.append(f"{run.state.value} with a result file")
    if run.state in (State.FAILED, State.KILLED, State.UPSTREAM_FAILED) and run.error is None:
        bad.append(f"{run.state.value} without an error")
    if run.state is State.UPSTREAM_FAILED and not run.error.startswith("upstream task"):
        bad.append(f"UPSTREAM_FAILED with the error {run.error!r}")
    tagged = attempt_of(run.error)
    if tagged is None:
        if run.traceback is not None or run.exception is not None:
            bad.append(f"a traceback or exception with the error {run.error!r}")
        return bad
    if attempt_of(run.traceback) != tagged:
        bad.append(f"the error of attempt {tagged} with the traceback of another")
    if run.exception is None or attempt_of(str(cloudpickle.loads(run.exception))) != tagged:
        bad.append(f"the error of attempt {tagged} with the exception of another")
    if run.state is State.FAILED and tagged != run.attempts:
        bad.append(f"FAILED at attempt {run.attempts} with the error of attempt {tagged}")
    if not run.state.final and tagged not in (run.attempts, run.attempts - 1):
        # retrying: the failure of the attempt before the one that waits or runs
        bad.append(f"{run.state.value} at attempt {run.attempts} with the error of attempt "
                   f"{tagged}")
    return bad


class Published:
    """Every record any task of the test is given, from any thread, in order.

    Readers in other threads can only ever see a record that was stored, so checking each one
    stored checks every moment a reader could see, however the threads interleave: the test
    does not depend on a reader thread happening to look at the wrong instant.
    """

    def __init__(self, slot: Any):
        self.slot = slot  # TaskRef's own storage of run_state
        self.records: list[tuple[str, RunState]] = []

    def __get__(self, obj: Any, cls: Any = None) -> Any:
        return self if obj is None else self.slot.__get__(obj, cls)

    def __set__(self, obj: Any, run: RunState) -> None:
        self.records.append((obj.label, run))  # (list.append: atomic across threads)
        self.slot.__set__(obj, run)

    def wrong(self) -> list[str]:
        return [f"{label}: {v} ({run})" for label, run in list(self.records)
                for v in violations(run)]


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> Published:
    watch = Published(TaskRef.__dict__["run_state"])
    monkeypatch.setattr(TaskRef, "run_state", watch)
    return watch


class Watcher:
    """A thread that reads every task's record as fast as it can and keeps what is wrong (the
    readers' side, beside :class:`Published`: a real reader in another thread)."""

    def __init__(self, refs: list[Any]):
        self.refs = refs
        self.seen: Counter[str] = Counter()
        self.wrong: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def watch(self) -> None:
        while not self.stop.is_set():
            for ref in list(self.refs):
                run = ref.run_state  # one read: one moment
                self.seen[run.state.value] += 1
                self.wrong += [f"{ref.label}: {v} ({run})" for v in violations(run)]

    def __enter__(self) -> Watcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


@pytest.fixture
def switch_often() -> Any:
    """Let the interpreter switch threads every 10 µs (not every 5 ms) while a test runs, so the
    reader thread looks at the tasks between as many of the runner's steps as it can."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


def flaky_graph(pipe: Pipeline, n: int) -> tuple[list[Any], list[Any]]:
    """``n`` tasks that fail their first attempts (0 to 3 of them; 2 retries) and a chain step
    after each, so retries, final failures, upstream failures and hand-ahead all happen."""

    @pipe.task(retries=2)
    def flaky(i: int, fails: int) -> int:
        attempt = context().attempt
        if attempt <= fails:
            raise ValueError(f"attempt {attempt} of flaky({i}) fails on purpose")
        return i

    @pipe.task(retries=1)
    def step(x: int) -> int:
        attempt = context().attempt
        if x % 5 == 0 and attempt == 1:
            raise RuntimeError(f"attempt {attempt} of step({x}) fails on purpose")
        return x + 1

    firsts = [flaky(i, i % 4) for i in range(n)]  # fails 3 times: FAILED after its retries
    return firsts, [step(f) for f in firsts]


def test_a_reader_thread_always_sees_one_consistent_moment_of_each_task(
        pipe: Pipeline, client: Client, published: Published, switch_often: None) -> None:
    n = 40
    firsts, steps = flaky_graph(pipe, n)
    refs = firsts + steps
    with Watcher(refs) as watcher:
        pipe.run(timeout=600)
        hopeless = [r for r in firsts if r.state is State.FAILED]
        assert len(hopeless) == n // 4  # fails=3 with retries=2
        assert all(s.state is State.UPSTREAM_FAILED for f, s in zip(firsts, steps, strict=True)
                   if f in hopeless)
        # Retried by request, their attempt 4 succeeds, and what they blocked runs.
        pipe.retry(failed=True, wait=True)
        wait_for(lambda: all(r.state.final for r in refs), timeout=600)
        # What a later process finds: the same tasks found done, while the reader still reads.
        again = Pipeline(pipe.name, store=pipe.store.path, cluster=client)
        try:
            firsts2, steps2 = flaky_graph(again, n)
            watcher.refs += firsts2 + steps2
            assert again.run(timeout=600).executed == 0
        finally:
            again.close()
    assert not published.wrong(), published.wrong()[:10]
    assert not watcher.wrong, watcher.wrong[:10]
    assert all(r.state is State.SUCCEEDED for r in refs + watcher.refs)
    # every kind of transition was made (and checked): retries, final failures, runs, resumes
    made = Counter((run.state, run.error is not None) for _, run in published.records)
    for kind in [(State.WAITING, True), (State.PENDING, True), (State.RUNNING, False),
                 (State.FAILED, True), (State.UPSTREAM_FAILED, True), (State.SUCCEEDED, False)]:
        assert made[kind], (kind, made)
    assert sum(run.reason == "found done" for _, run in published.records) >= 2 * n
    assert sum(watcher.seen.values()) > 10 * len(watcher.refs)  # it read all along


def test_a_reader_sees_consistent_kills_pauses_and_resumes(
        pipe: Pipeline, published: Published, switch_often: None) -> None:
    """Tasks killed while running or queued, and a pause that takes queued tasks back."""

    @pipe.task(retries=1)
    def spin(i: int) -> int:
        if context().attempt == 1 and i % 2:
            raise ValueError(f"attempt 1 of spin({i}) fails on purpose")
        while True:  # until killed
            pass

    @pipe.task
    def quick(i: int) -> int:
        return i

    spinning = [spin(i) for i in range(4)]
    quicks = [quick(i) for i in range(20)]
    refs = spinning + quicks
    with Watcher(refs) as watcher:
        pipe.run(wait=False)
        wait_for(lambda: sum(r.state is State.RUNNING for r in spinning) == 2, timeout=300)
        pipe.pause()  # the queued ones go back to WAITING, their attempt not counted
        pipe.kill(spinning)  # running ones stop; waiting ones end KILLED at once
        wait_for(lambda: all(r.state.final for r in spinning), timeout=300)
        pipe.resume()
        pipe.run(quicks, timeout=600)
    assert not published.wrong(), published.wrong()[:10]
    assert not watcher.wrong, watcher.wrong[:10]
    assert all(r.state is State.KILLED for r in spinning)
    assert any(run.state is State.KILLED and run.worker for _, run in published.records)
    assert all(r.state is State.SUCCEEDED for r in quicks)


def test_tasks_killed_without_a_runner_get_whole_records(
        tmp_path: Path, published: Published) -> None:
    """Kill from a process with no runner (the store's states are changed directly, then the
    refs'): each record is replaced whole, as the runner's kills are."""
    pipe = Pipeline("offline-kill", store=tmp_path / ".nbpipe")

    @pipe.task
    def first() -> int:
        return 1

    @pipe.task
    def second(x: int) -> int:
        return x

    a = first()
    b = second(a)
    try:
        pipe.pause()
        assert pipe.run().paused  # registered, and nothing starts: no runner anywhere
        pipe.kill(a)
        run_a, run_b = a.run_state, b.run_state
        assert run_a.state is State.KILLED and "killed" in run_a.error
        assert run_b.state is State.UPSTREAM_FAILED and run_b.error.startswith("upstream task")
        assert all(getattr(r, f) is None for r in (run_a, run_b)
                   for f in ("traceback", "exception", "result_file"))
    finally:
        pipe.resume()
        pipe.close()
    assert not published.wrong(), published.wrong()[:10]
