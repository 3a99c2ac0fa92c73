"""The notebook layer in process, on an IPython InteractiveShell (as ipyparallel tests magics)."""

from __future__ import annotations

import itertools
from pathlib import Path

import dask
import pytest
from conftest import wait_for
from IPython.core.error import UsageError
from IPython.terminal.interactiveshell import TerminalInteractiveShell
from IPython.testing.globalipapp import start_ipython

from nbpipe import CycleError, OutputNotStored, State
from nbpipe.cellscope import analyze

_names = itertools.count()


@pytest.fixture
def shell(cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A shell with nbpipe loaded on the shared cluster, a fresh pipeline and store."""
    ip = start_ipython() or TerminalInteractiveShell.instance()  # one shell per process
    monkeypatch.setenv("NBPIPE_STORE", str(tmp_path / ".nbpipe"))
    monkeypatch.setenv("NBPIPE_PIPELINE", f"magics-{next(_names)}")
    monkeypatch.setenv("NBPIPE_WIDGETS", "0")
    with dask.config.set({"nbpipe.cluster": cluster.scheduler_address}):
        ip.run_line_magic("load_ext", "nbpipe")
        yield ip
        ip.run_line_magic("unload_ext", "nbpipe")
    for name in ("data", "mean", "std", "pi", "fractions", "x", "y", "total", "greeting"):
        ip.user_ns.pop(name, None)


def run(ip, source: str):
    result = ip.run_cell(source)
    if result.error_before_exec is not None:
        raise result.error_before_exec
    if result.error_in_exec is not None:
        raise result.error_in_exec
    return result.result


def session(ip):
    return ip._nbpipe_session


def test_loading_prints_a_banner_and_loading_twice_is_harmless(shell, capsys) -> None:
    from nbpipe.magics import load_ipython_extension

    first = session(shell)
    shell.run_line_magic("load_ext", "nbpipe")
    load_ipython_extension(shell)  # what %reload_ext does
    out = capsys.readouterr().out
    assert f"pipeline '{first.pipe.name}'" in out and "store" in out and "cluster" in out
    assert session(shell) is first


def test_the_design_scenario_runs_and_plain_cells_get_values(shell) -> None:
    run(shell, "%%task load --retries 2\nimport numpy as np\n"
               "data = np.random.default_rng(0).normal(size=10_000)")
    run(shell, "%%task stats\nmean, std = data.mean(), data.std()")
    run(shell, "from nbpipe import task\n"
               "@task(cores=1, memory='1GB')\n"
               "def fraction(seed: int, size: int = 10_000) -> float:\n"
               "    import numpy as np\n"
               "    xy = np.random.default_rng(seed).uniform(-1, 1, (2, size))\n"
               "    return float(((xy ** 2).sum(0) < 1).mean())\n"
               "fractions = [fraction(seed=i) for i in range(20)]")
    run(shell, "%%task pi\npi = 4 * sum(fractions) / len(fractions)")
    run(shell, "result = (mean, pi)")
    mean, pi = shell.user_ns["result"]
    assert abs(mean) < 0.05 and abs(pi - 3.14) < 0.05
    pipe = session(shell).pipe
    stats = pipe._by_label["stats"]
    assert [d.label for d in stats.deps] == ["load"]
    assert len(pipe._by_label["pi"].deps) == 20
    assert stats.func.outputs == ["mean", "std"]


def test_names_and_outputs_follow_python_scoping() -> None:
    scope = analyze(
        "import os\n"
        "total = sum(v for v in values)\n"
        "def helper(a):\n    local = a + offset\n    return local\n"
        "count += 1\n"
        "if (n := len(values)) > 2:\n    big = True\n"
        "tmp = 1\ndel tmp\n"
    )
    assert scope.reads == ["sum", "values", "count", "len", "offset"]
    assert scope.writes == ["total", "helper", "count", "n", "big"]


def test_captured_variables_enter_the_key(shell) -> None:
    run(shell, "factor = 2")
    run(shell, "%%task y\ny = factor * 21")
    first = session(shell).pipe._by_label["y"]
    assert first.result() == {"y": 42}
    run(shell, "factor = 3")
    run(shell, "%%task y\ny = factor * 21")
    second = session(shell).pipe._by_label["y"]
    assert second.key != first.key
    assert "argument `factor` changed" in second.reason
    run(shell, "value = y")
    assert shell.user_ns["value"] == 63


def test_rerunning_an_unchanged_cell_reuses_its_task(shell) -> None:
    run(shell, "%%task x\nx = 1")
    ref = session(shell).pipe._by_label["x"]
    ref.result()
    run(shell, "%%task x\nx = 1  # same code, new comment")
    assert session(shell).pipe._by_label["x"] is ref
    assert ref.attempts == 1


def test_assigning_an_output_in_a_plain_cell_overrides_it(shell) -> None:
    run(shell, "%%task x\nx = 1")
    run(shell, "x = 100")
    run(shell, "seen = x")
    assert shell.user_ns["seen"] == 100


def test_env_option_and_bash_cells_with_placeholders(shell) -> None:
    run(shell, "%%task x --env GREETING=hello\nimport os\nx = os.environ['GREETING']")
    run(shell, "%%task greeting --bash\necho {x} world")
    run(shell, "said = greeting")
    assert shell.user_ns["said"].strip() == "hello world"


def test_autorun_off_only_registers_until_pipeline_run(shell) -> None:
    shell.run_line_magic("pipeline", "autorun off")
    run(shell, "%%task x\nx = 5")
    ref = session(shell).pipe._by_label["x"]
    assert ref.state is State.WAITING
    shell.run_line_magic("pipeline", "run")
    assert ref.result() == {"x": 5}


def test_status_why_and_logs(shell, capsys) -> None:
    run(shell, "%%task x\nprint('computing x')\nx = 2")
    run(shell, "y = x")
    table = shell.run_line_magic("pipeline", "status")
    assert "x" in repr(table) and "SUCCEEDED" in repr(table)
    capsys.readouterr()
    shell.run_line_magic("pipeline", "why x")
    shell.run_line_magic("pipeline", "logs x")
    out = capsys.readouterr().out
    assert "x: new task" in out and "computing x" in out


def test_graph_shows_every_task(shell) -> None:
    run(shell, "%%task x\nx = 1")
    run(shell, "%%task y\ny = x + 1")
    graph = shell.run_line_magic("pipeline", "graph")
    assert '"x"' in graph.source or "label=x" in graph.source
    assert "->" in graph.source
    svg = graph.pipe(format="svg").decode()
    assert "<svg" in svg


def test_pull_loads_outputs_in_a_new_session(shell) -> None:
    run(shell, "%%task x\nx = 7")
    run(shell, "seen = x")
    shell.user_ns.pop("x", None)
    shell.run_line_magic("pipeline", "pull x")
    assert shell.user_ns["x"] == 7


def test_syntax_error_shows_cell_lines_and_registers_nothing(shell) -> None:
    with pytest.raises(SyntaxError) as info:
        run(shell, "%%task broken\nx = 1\ny = (2 +\n")
    assert info.value.filename == "<task broken>"
    assert info.value.lineno == 2  # the cell's own line
    assert session(shell).pipe.tasks() == []


def test_unknown_option_is_a_usage_error(shell) -> None:
    with pytest.raises(UsageError):
        shell.run_cell_magic("task", "x --retrys 2", "x = 1")


def test_undefined_name_is_a_name_error_before_anything_runs(shell) -> None:
    with pytest.raises(NameError, match="task 'x' reads 'nowhere'"):
        run(shell, "%%task x\nx = nowhere + 1")
    assert session(shell).pipe.tasks() == []


def test_cycle_between_cells_is_an_error_naming_it(shell) -> None:
    run(shell, "%%task a\na = 1")
    run(shell, "%%task b\nb = a + 1")
    with pytest.raises(CycleError, match="a -> b|b -> a"):
        run(shell, "%%task a\na = b + 1")


def test_an_unpicklable_value_is_left_out_and_reading_it_names_the_cell(shell) -> None:
    run(shell, "%%task locks\nimport threading\nlock = threading.Lock()\nn = 1")
    ref = session(shell).pipe._by_label["locks"]
    assert ref.result()["n"] == 1  # the task succeeded
    with pytest.raises(OutputNotStored, match="'lock' is not an output of %%task locks: it holds a "
                                              "_thread.lock, which cannot be stored"):
        ref.output("lock").result()


def test_task_error_traceback_points_into_the_cell(shell) -> None:
    run(shell, "%%task bad\nx = 1\nraise ValueError('boom')")
    ref = session(shell).pipe._by_label["bad"]
    with pytest.raises(ValueError, match="boom"):
        ref.result()
    assert 'File "<task bad>", line 2' in ref.traceback
    assert "raise ValueError('boom')" in ref.traceback


def test_after_option_adds_an_edge_without_data(shell) -> None:
    run(shell, "%%task first\nimport time\ntime.sleep(0.3)\nstarted = time.time()")
    run(shell, "%%task second --after first\nimport time\nstamp = time.time()")
    pipe = session(shell).pipe
    second = pipe._by_label["second"]
    assert second.deps == {pipe._by_label["first"]: "after"}
    run(shell, "order = (started, stamp)")
    started, stamp = shell.user_ns["order"]
    assert stamp > started


def test_another_cell_claiming_a_name_warns(shell, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbpipe.magics import NbpipeMagics

    cells = iter(["cell-a", "cell-b"])
    monkeypatch.setattr(NbpipeMagics, "_cell_id", lambda self: next(cells))
    run(shell, "%%task x\nx = 1")
    with pytest.warns(UserWarning, match="task 'x' was defined by another cell"):
        run(shell, "%%task x\nx = 2")


def test_use_is_refused_while_tasks_of_the_pipeline_run(shell, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    shell.user_ns["flag"] = str(flag)
    run(shell, "%%task spin\nimport os, time\nwhile not os.path.exists(flag):\n    time.sleep(0.02)\n"
               "spin = 1")
    pipe = session(shell).pipe
    ref = pipe._by_label["spin"]
    wait_for(lambda: ref.state is State.RUNNING)
    with pytest.raises(UsageError, match=r"1 task\(s\) are running; wait for them .* before "
                                         "switching to pipeline 'other'"):
        shell.run_line_magic("pipeline", "use other")
    assert session(shell).pipe is pipe
    flag.write_text("now")
    wait_for(lambda: ref.state is State.SUCCEEDED)
    shell.run_line_magic("pipeline", "use other")
    assert session(shell).pipe.name == "other" and "spin" not in session(shell).outputs


def test_kill_and_retry_through_the_pipeline_magic(shell, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    shell.user_ns["flag"] = str(flag)
    run(shell, "%%task spin\nimport os\nwhile not os.path.exists(flag):\n    pass\nspin = 1")
    ref = session(shell).pipe._by_label["spin"]
    wait_for(lambda: ref.state is State.RUNNING)
    shell.run_line_magic("pipeline", "kill spin")
    wait_for(lambda: ref.state.final, timeout=120)
    assert ref.state is State.KILLED
    flag.write_text("now")
    shell.run_line_magic("pipeline", "retry --failed")
    wait_for(lambda: ref.state is State.SUCCEEDED)


def test_no_cache_and_version_options(shell) -> None:
    run(shell, "%%task x --version 1\nx = 1")
    first = session(shell).pipe._by_label["x"]
    run(shell, "%%task x --version 2\nx = 1")
    assert session(shell).pipe._by_label["x"].key != first.key
    run(shell, "%%task y --no-cache\ny = 2")
    assert session(shell).pipe._by_label["y"].func.opts.cache is False


def test_cell_rich_output_is_kept_with_its_result_and_not_pulled() -> None:
    from nbpipe.cells import DISPLAY, CellRunner

    result = CellRunner("shown", "x = 2\ndisplay('hello')\nx * 21", ["x"])()
    assert result["x"] == 2
    assert [data["text/plain"] for data, _ in result[DISPLAY]] == ["'hello'", "42"]


def test_run_detach_hands_cells_to_a_runner_outside_the_kernel(shell) -> None:
    shell.run_line_magic("pipeline", "autorun off")
    run(shell, "%%task x\nx = 20")
    run(shell, "%%task y\ny = x + 1")
    shell.run_line_magic("pipeline", "run --detach")
    pipe = session(shell).pipe
    assert pipe._runner is None  # nothing runs in this kernel

    def states() -> set[str]:
        return {r["state"] for r in pipe.store.task_rows(pipe.pipeline_id).values()}

    wait_for(lambda: states() == {"SUCCEEDED"}, timeout=60)
    shell.run_line_magic("pipeline", "pull y")
    assert shell.user_ns["y"] == 21


def test_pipeline_cluster_switches_and_shows_pools_job_scripts_and_jobs(shell, cluster) -> None:
    pipe = session(shell).pipe
    view = shell.run_line_magic("pipeline", "cluster pbs cores=2 memory=4GB queue=short "
                                "'pools={big: {cores: 8, memory: 64GB}}'")
    text = repr(view)
    assert "cluster pbs (pools default, big)" in text
    assert "pool default: pbs jobs of 2 cores" in text and "pool big: pbs jobs of 8 cores" in text
    assert text.count("#PBS -q short") == 2 and "no batch jobs yet" in text
    assert "<pre>" in view._repr_html_()
    assert pipe.client.scheduler.address.startswith("tls://")
    with pytest.raises(UsageError, match="memory='lots' is not a size"):
        shell.run_line_magic("pipeline", "cluster pbs cores=1 memory=lots")
    # back to the shared cluster; tasks run there
    shell.run_line_magic("pipeline", f"cluster {cluster.scheduler_address}")
    assert pipe.client.scheduler.address == cluster.scheduler_address
    run(shell, "%%task\nx = 6 * 7")
    assert run(shell, "x") == 42
