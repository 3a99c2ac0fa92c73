"""The current pipeline of a script (``nbpipe.current``): where module-level ``@task`` calls
register, ``with pipe:`` and ``nbpipe.use``, and the pipelines closed when the process exits."""

from __future__ import annotations

from pathlib import Path

from conftest import run_script

TIMEOUT = 300  # a fresh interpreter importing nbpipe and dask, on a loaded machine


def test_module_level_tasks_go_to_a_pipeline_named_after_the_script(tmp_path: Path) -> None:
    result = run_script(tmp_path / "analysis.py", """
        from nbpipe import current_pipeline, task

        @task
        def one() -> int:
            return 1

        ref = one()
        print(current_pipeline().name, ref.pipeline is current_pipeline())
    """, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["analysis", "True"]
    assert (tmp_path / ".nbpipe").is_dir()  # the default store, beside the script


def test_with_and_use_choose_the_current_pipeline_and_nest(tmp_path: Path) -> None:
    result = run_script(tmp_path / "choose.py", """
        from nbpipe import Pipeline, current_pipeline, task, use

        @task
        def one() -> int:
            return 1

        outer, inner, chosen = Pipeline("outer"), Pipeline("inner"), Pipeline("chosen")
        with outer:
            with inner:
                print("in", current_pipeline().name, one().pipeline.name)
            print("out", current_pipeline().name, one().pipeline.name)
        print("after", current_pipeline().name)
        use(chosen)
        print("use", current_pipeline().name, one().pipeline.name)
        with outer:
            use(inner)  # use() replaces whatever `with` chose
            print("use-in-with", current_pipeline().name)
    """, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["in inner inner", "out outer outer", "after choose",
                                          "use chosen chosen", "use-in-with inner"]


def test_open_pipelines_are_listed_until_closed_and_closed_at_exit(tmp_path: Path) -> None:
    result = run_script(tmp_path / "opened.py", """
        import atexit
        from nbpipe import Pipeline
        from nbpipe.current import open_pipelines

        class Loud(Pipeline):
            def close(self):
                print("closed", self.name)
                super().close()

        a, b = Loud("a"), Loud("b")
        print(sorted(p.name for p in open_pipelines()))
        a.close()
        print(sorted(p.name for p in open_pipelines()))
        # (registered after nbpipe's own handler: runs before it, sees b still open)
        atexit.register(lambda: print("at exit", sorted(p.name for p in open_pipelines())))
    """, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["['a', 'b']", "closed a", "['b']", "at exit ['b']", "closed b"]
