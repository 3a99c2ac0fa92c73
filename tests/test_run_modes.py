"""Deciding by hand and run modes, ported from the seeds: accepting a result after a cosmetic
edit (jobmon's update_task_status -s D), keeping SUCCEEDED results and re-running only FAILED
ones (desipipe), stopping at the first error (desipipe's stop_at_error), skipping by state or
label, adopting existing products (depio's IF_MISSING) and failing stale products (depio).

The scripts run on the session's cluster (kernel_env): what they check is the store's and the
runner's, not a cluster's, and a cluster of their own would cost a start per run."""

from __future__ import annotations

import inspect
import json
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Annotated

import pytest
from conftest import run_script
from helpers import nbpipe

from nbpipe import In, Out, Pipeline, State, TaskFunction, queries

TIMEOUT = 180


def _nbpipe(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return nbpipe(*args, "--store", str(store), timeout=TIMEOUT)


def _nbpipe_run(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``nbpipe run ARGS`` in ``folder`` (the script's), as a user types it there."""
    return nbpipe("run", *args, cwd=folder, timeout=TIMEOUT)


ACCEPT_SCRIPT = """
    import sys
    from nbpipe import Pipeline, queries
    pipe = Pipeline("flow")  # on the session's cluster: kernel_env
    MESSAGE = sys.argv[1]

    @pipe.task
    def scale(x: int) -> int:
        note = MESSAGE  # a global the task reads: its key changes with it (a cosmetic edit)
        return x * 10

    ref = scale(4)
    if sys.argv[2] == "accept":
        print("state before", ref.state.value)
        print("accepted", pipe.accept(ref))
        print("why", pipe.why(ref))
        node = next(n for n in queries.graph(pipe.store, "flow")["nodes"] if n["key"] == ref.key)
        print("outcome", node["outcome"])
        print("attempts", len(pipe.store.attempts(pipe.pipeline_id, ref.key)))
    elif sys.argv[2] == "retry":
        pipe.retry(ref, wait=True)
        print("attempts after retry", len(pipe.store.attempts(pipe.pipeline_id, ref.key)))
    summary = pipe.run()
    print("executed", summary.executed, "value", ref.result())
    pipe.close()
"""


def test_accept_keeps_the_last_successful_result_after_a_cosmetic_edit(tmp_path: Path,
                                                                      kernel_env: dict) -> None:
    script = tmp_path / "flow.py"
    first = run_script(script, ACCEPT_SCRIPT, "v1", "run", timeout=TIMEOUT)
    assert "executed 1 value 40" in first.stdout, first.stderr
    second = run_script(script, ACCEPT_SCRIPT, "v1 reworded", "accept", timeout=TIMEOUT)
    assert second.returncode == 0, second.stderr
    out = second.stdout
    assert "state before WAITING" in out
    assert "why accepted by hand on " in out
    assert "outcome accepted" in out
    assert "attempts 0" in out  # no attempt is invented
    assert "executed 0 value 40" in out  # nothing ran: the result was accepted
    events = _nbpipe(tmp_path / ".nbpipe", "events", "flow")
    assert "accepted by hand on" in events.stdout  # recorded, never silent
    # undo: retry runs it
    third = run_script(script, ACCEPT_SCRIPT, "v1 reworded", "retry", timeout=TIMEOUT)
    assert third.returncode == 0, third.stderr
    assert "attempts after retry 1" in third.stdout and "value 40" in third.stdout


def test_accept_without_an_earlier_success_is_an_error_naming_the_task(pipe: Pipeline) -> None:
    @pipe.task
    def never_ran(x: int) -> int:
        return x

    ref = never_ran(1)
    with pytest.raises(Exception, match=r"task 'never_ran\(x=1\)'.*no earlier successful run"):
        pipe.accept(ref)


def test_nbpipe_accept_from_the_command_line_then_why_and_a_rerun_that_executes_nothing(
        tmp_path: Path, kernel_env: dict) -> None:
    script = """
        import sys
        from nbpipe import Pipeline
        pipe = Pipeline("flow")
        MESSAGE = sys.argv[1]

        @pipe.task
        def scale(x: int) -> int:
            note = MESSAGE  # a global the task reads: its key changes with it
            return x * 10

        ref = scale(3)
        summary = pipe.run()
        print("executed", summary.executed, "value", ref.result())
        pipe.close()
    """
    first = run_script(tmp_path / "flow.py", script, "v1", timeout=TIMEOUT)
    assert first.returncode == 0, first.stderr
    assert "executed 1 value 30" in first.stdout
    # An edit registers the new definition (the script is stopped before it runs: --detach-free
    # way of registering is running it with the pipeline paused)
    store = tmp_path / ".nbpipe"
    assert _nbpipe(store, "pause", "flow").returncode == 0
    second = run_script(tmp_path / "flow.py", script.replace("print(", "pass  # print("), "v2",
                        timeout=TIMEOUT)
    assert second.returncode == 0, second.stderr
    assert _nbpipe(store, "resume", "flow", "--no-spawn").returncode == 0
    accepted = _nbpipe(store, "accept", "flow", "scale(x=3)")
    assert accepted.returncode == 0, accepted.stderr
    assert "accepted by hand on" in accepted.stdout
    why = _nbpipe(store, "why", "flow", "scale(x=3)")
    assert "accepted by hand on" in why.stdout
    third = run_script(tmp_path / "flow.py", script, "v2", timeout=TIMEOUT)
    assert third.returncode == 0, third.stderr
    assert "executed 0 value 30" in third.stdout


KEEP_SCRIPT = """
    import sys
    from nbpipe import Pipeline
    pipe = Pipeline("batch")  # on the session's cluster: kernel_env
    FIXED = sys.argv[1] == "fixed"

    @pipe.task
    def process(i: int) -> int:
        if i == 3 and not FIXED:
            raise ValueError(i)
        return i * i

    refs = process.map(range(5))
    summary = pipe.run()
    print("executed", summary.executed, "failed", summary.failed)
    if not summary.failed:
        print("values", [r.result() for r in refs])
        print("why", [pipe.why(r).split(" on ")[0] for r in refs])
    pipe.close()
"""


def test_keep_succeeded_reruns_only_failed_and_new_tasks(tmp_path: Path, kernel_env: dict) -> None:
    # desipipe: after fixing code, re-run only the FAILED tasks and keep the SUCCEEDED results.
    script = tmp_path / "batch.py"
    first = run_script(script, KEEP_SCRIPT, "broken", timeout=TIMEOUT)
    assert "executed 5 failed ['process(i=3)']" in first.stdout, first.stderr
    script.write_text(textwrap.dedent(KEEP_SCRIPT))
    fixed = _nbpipe_run(tmp_path, "--keep-succeeded", "batch.py", "fixed")
    assert fixed.returncode == 0, fixed.stderr
    assert "executed 1 failed []" in fixed.stdout  # only the one that failed ran
    assert "values [0, 1, 4, 9, 16]" in fixed.stdout
    assert fixed.stdout.count("accepted by hand (keep_succeeded)") == 4


def test_stop_on_failure_starts_nothing_new_after_the_first_failure(pipe: Pipeline) -> None:
    @pipe.task
    def gate() -> int:
        time.sleep(3)  # still running when boom fails: it finishes
        return 1

    @pipe.task
    def step(i: int, gate_value: int) -> int:
        return i + gate_value

    @pipe.task
    def boom() -> None:
        raise RuntimeError("first one fails")

    opened = gate()
    later = [step(i, opened) for i in range(5)]  # ready only after boom failed
    failed = boom()
    summary = pipe.run(stop_on_failure=True, timeout=TIMEOUT)
    assert failed.state is State.FAILED and opened.state is State.SUCCEEDED
    assert [r.state for r in later] == [State.KILLED] * 5
    assert all("stop_on_failure" in r.error and "'boom'" in r.error for r in later)
    assert all(pipe.store.attempts(pipe.pipeline_id, r.key) == [] for r in later)
    assert summary.counts == {"FAILED": 1, "SUCCEEDED": 1, "KILLED": 5}
    # a run without the mode runs them
    pipe.run(timeout=TIMEOUT)
    assert [r.state for r in later] == [State.SUCCEEDED] * 5


def test_stop_on_failure_from_the_command_line(tmp_path: Path, kernel_env: dict) -> None:
    (tmp_path / "flow.py").write_text(
        "import time\nfrom nbpipe import Pipeline\n"
        "pipe = Pipeline('flow')\n"
        "@pipe.task\ndef gate():\n    time.sleep(3)\n    return 1\n"
        "@pipe.task\ndef step(i, g):\n    return i\n"
        "@pipe.task\ndef boom():\n    raise RuntimeError('boom')\n"
        "g = gate()\nrefs = [step(i, g) for i in range(4)]\nboom()\npipe.run()\n")
    result = _nbpipe_run(tmp_path, "--stop-on-failure", "flow.py")
    assert result.returncode == 1, result.stderr
    listing = _nbpipe(tmp_path / ".nbpipe", "tasks", "flow", "--state", "KILLED", "--json")
    killed = json.loads(listing.stdout)
    assert killed and all("stop_on_failure" in t["error"] for t in killed)


def skip_tasks(pipe: Pipeline) -> tuple[TaskFunction, TaskFunction]:
    """The tasks of both skip tests (the command line's runs this very source in its script): a
    part that fails for i == 1, and what combines a part."""
    @pipe.task
    def part(i: int) -> int:
        if i == 1:
            raise RuntimeError("broken input")
        return i

    @pipe.task
    def combine(x: int) -> int:
        return x + 100

    return part, combine


def test_skip_leaves_tasks_out_by_state_and_by_label(pipe: Pipeline) -> None:
    part, combine = skip_tasks(pipe)
    parts = [part(i) for i in range(3)]
    pipe.run(timeout=TIMEOUT)
    assert parts[1].state is State.FAILED
    downstream = combine(parts[1])
    summary = pipe.run(skip="FAILED", timeout=TIMEOUT)  # what failed is not tried again
    assert parts[1].state is State.FAILED and downstream.state is State.WAITING
    assert len(pipe.store.attempts(pipe.pipeline_id, parts[1].key)) == 1
    assert summary.executed == 0
    other = combine(parts[0])
    pipe.run(skip=["combine(x=<part*"], timeout=TIMEOUT)
    assert other.state is State.WAITING


SKIP_SCRIPT = """
import sys
from nbpipe import Pipeline, TaskFunction
pipe = Pipeline("flow", cluster={"kind": "local", "workers": 1})

""" + inspect.getsource(skip_tasks) + """

part, combine = skip_tasks(pipe)


@pipe.task
def extra(i: int) -> int:
    return -i


parts = [part(i) for i in range(3)]
total = combine(parts[1])
more = [extra(i) for i in range(2)] if "more" in sys.argv else []
summary = pipe.run()
print("executed", summary.executed)
print("states", *[f"{r.label}={r.state.value}" for r in [*parts, total, *more]])
"""


def test_skip_from_the_command_line_by_state_glob_and_label(tmp_path: Path) -> None:
    (tmp_path / "flow.py").write_text(SKIP_SCRIPT)

    def nbpipe_run(*args: str) -> tuple[int, dict[str, str], str]:
        result = _nbpipe_run(tmp_path, *args)
        lines = result.stdout.splitlines()
        states = dict(w.rsplit("=", 1) for w in next(x for x in lines if x.startswith("states")).split()[1:])
        executed = next(x for x in lines if x.startswith("executed")).split()[1]
        return result.returncode, states, executed

    code, states, executed = nbpipe_run("flow.py")
    assert code == 1 and states.get("part(i=1)") == "FAILED" and executed == "4", states
    # what failed is not tried again, nor what waits on it; new tasks named by a glob wait too
    code, states, executed = nbpipe_run("--skip", "FAILED", "--skip", "extra*", "flow.py", "more")
    assert code == 0 and executed == "0", states
    assert states["extra(i=0)"] == states["extra(i=1)"] == "WAITING"
    failed = json.loads(_nbpipe(tmp_path / ".nbpipe", "show", "flow", "part(i=1)", "--json").stdout)
    assert len(failed["attempts"]) == 1 and "the previous run was FAILED" in failed["reason"]
    # by exact label: the other new task runs, the skipped one waits
    code, states, executed = nbpipe_run("--skip", "extra(i=1)", "--skip", "FAILED", "flow.py", "more")
    assert code == 0 and executed == "1", states
    assert states["extra(i=0)"] == "SUCCEEDED" and states["extra(i=1)"] == "WAITING"
    # without --skip the failure counts again: it is retried, fails, and the exit says so
    code, states, _ = nbpipe_run("flow.py", "more")
    assert code == 1 and states["extra(i=1)"] == "SUCCEEDED"


def test_trust_existing_adopts_existing_products_with_their_checksums(pipe: Pipeline, tmp_path: Path
                                                                     ) -> None:
    # depio IF_MISSING: a product made before nbpipe (or by hand) is not made again.
    product = tmp_path / "made-by-hand.txt"
    product.write_text("precious\n")
    ran = tmp_path / "ran"

    @pipe.task(trust_existing=True)
    def make(out: Annotated[Path, Out]) -> None:
        ran.write_text("yes")
        Path(out).write_text("remade\n")

    @pipe.task
    def use(path: Annotated[Path, In]) -> str:
        return Path(path).read_text()

    made = make(product)
    used = use(product)
    pipe.run(check=True, timeout=TIMEOUT)
    assert not ran.exists() and product.read_text() == "precious\n"
    assert made.state is State.SUCCEEDED and used.result() == "precious\n"
    why = pipe.why(made)
    assert why.startswith("adopted existing output file(s)") and str(product) in why
    assert "blake2b" in why
    node = next(n for n in queries.graph(pipe.store, pipe.name)["nodes"] if n["key"] == made.key)
    assert node["outcome"] == "adopted"


def test_without_trust_existing_an_existing_product_that_is_not_rewritten_fails(
        pipe: Pipeline, tmp_path: Path) -> None:
    # depio: a task that does not update its product fails, naming the path.
    product = tmp_path / "stale.txt"
    product.write_text("old\n")

    @pipe.task
    def lazy(out: Annotated[Path, Out]) -> None:
        if Path(out).exists():
            return  # "already there": the product is stale

    @pipe.task
    def diligent(out: Annotated[Path, Out]) -> None:
        Path(out).write_text("new\n")

    stale, fresh = lazy(product), diligent(tmp_path / "fresh.txt")
    (tmp_path / "fresh.txt").write_text("old\n")
    pipe.run(timeout=TIMEOUT)
    assert stale.state is State.FAILED
    assert "without updating its declared output file(s)" in stale.error
    assert str(product) in stale.error
    assert fresh.state is State.SUCCEEDED


def test_trust_existing_for_a_whole_run_from_the_command_line(tmp_path: Path, kernel_env: dict) -> None:
    (tmp_path / "a.txt").write_text("by hand\n")
    (tmp_path / "flow.py").write_text(
        "from pathlib import Path\nfrom typing import Annotated\nfrom nbpipe import Out, Pipeline\n"
        "pipe = Pipeline('flow')\n"
        "@pipe.task\ndef make(out: Annotated[Path, Out]) -> None:\n    Path('ran').write_text('yes')\n"
        "    Path(out).write_text('made')\n"
        "make(Path('a.txt').absolute())\npipe.run()\n")
    result = _nbpipe_run(tmp_path, "--trust-existing", "flow.py")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "ran").exists()
    assert (tmp_path / "a.txt").read_text() == "by hand\n"


def test_an_output_folder_whose_files_are_rewritten_is_not_stale(pipe: Pipeline, tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "a.txt").write_text("old")

    @pipe.task
    def refill(out: Annotated[Path, Out]) -> None:
        (Path(out) / "a.txt").write_text("new")  # the folder's own times do not change

    ref = refill(folder)
    pipe.run(check=True, timeout=TIMEOUT)
    assert ref.state is State.SUCCEEDED and (folder / "a.txt").read_text() == "new"


def test_events_carry_how_a_task_ended_while_it_is_still_so(pipe: Pipeline, tmp_path: Path) -> None:
    # what the sidebar's task list follows live (accepted by hand: the browser test)
    product = tmp_path / "made-by-hand.txt"
    product.write_text("precious\n")

    @pipe.task(trust_existing=True)
    def make(out: Annotated[Path, Out]) -> None:
        Path(out).write_text("remade\n")

    @pipe.task
    def plain() -> int:
        return 1

    adopted, ordinary = make(product), plain()
    pipe.run(timeout=TIMEOUT)

    def outcomes(key: str) -> list:
        return [e["outcome"] for e in queries.events(pipe.store, pipe.name)["events"]
                if e["key"] == key and e["state"] == "SUCCEEDED"]

    assert outcomes(adopted.key) == ["adopted"]
    assert outcomes(ordinary.key) == [None]

