"""Two hosts, one pipeline, a PostgreSQL store: processes that share nothing but the database
URL and the results folder (each in a folder of its own and, where ``unshare`` can give it one,
under a host name of its own) see the same states live, and one runner runs the pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, wait_for
from test_store_engines import fresh_schema, postgres_url, reap, write

pytestmark = pytest.mark.ci_required


def _own_hostnames() -> bool:
    """Whether a process can get a host name of its own here (root, a UTS namespace)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--uts", "sh", "-c", "hostname nbpipe-probe"],
                           capture_output=True, timeout=60)
    return probe.returncode == 0


class Host:
    """A simulated host: its own working folder and host name; the store by URL only."""

    def __init__(self, name: str, folder: Path, url: str, results: Path, named: bool):
        self.name, self.folder, self.named = name, folder, named
        folder.mkdir()
        # Nothing of the test's environment but what any process needs: no store folder, no
        # cluster address -- only where the store is.
        self.env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"),
                    "PYTHONPATH": str(ROOT), "NBPIPE_STORE": url, "NBPIPE_RESULTS": str(results),
                    "XDG_DATA_HOME": str(folder / "xdg")}

    def command(self, *argv: str) -> list[str]:
        if not self.named:
            return list(argv)
        line = " ".join(f"'{a}'" for a in argv)
        return ["unshare", "--uts", "sh", "-c", f"hostname {self.name} && exec {line}"]

    def start(self, *argv: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(*argv), cwd=self.folder, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)

    def run(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*argv), cwd=self.folder, env=self.env, text=True,
                              capture_output=True, timeout=timeout)

    def nbpipe(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "nbpipe.cli", *args)


PIPELINE = """
import os, sys, time
from nbpipe import Pipeline

pipe = Pipeline("survey", cluster={"kind": "local", "workers": 1})
GATE = os.path.join(os.environ["NBPIPE_RESULTS"], "gate")


@pipe.task
def first() -> int:
    return 41


@pipe.task
def gated(x: int) -> int:
    while not os.path.exists(GATE):
        time.sleep(0.05)
    return x + 1


if __name__ == "__main__":
    ref = gated(first())
    if sys.argv[1:] == ["second"]:
        try:
            pipe.run()
        except Exception as exc:
            print("REFUSED", type(exc).__name__, exc, flush=True)
        watching = Pipeline("survey")  # as a second notebook that only looks at the pipeline
        print("SEEN", {t.label: t.state for t in watching.tasks()}, flush=True)
        sys.exit(0)
    summary = pipe.run()
    print("SUMMARY", summary.executed, ref.result(), flush=True)
"""

WATCH = """
import sys
from nbpipe.store import Store

store = Store()
pid = store.pipeline_id("survey", create=False)
since = int(sys.argv[1])
print("WOKEN", store.wait_for_events(pid, since, 300), flush=True)
"""


def test_a_runner_on_one_host_and_the_cli_and_a_script_on_another_share_one_pipeline(
        tmp_path: Path) -> None:
    named = _own_hostnames()
    with fresh_schema(postgres_url()) as url:
        results = tmp_path / "shared-results"  # the file system every host mounts
        a = Host("node-a", tmp_path / "a", url, results, named)
        b = Host("node-b", tmp_path / "b", url, results, named)
        write(a.folder / "survey.py", PIPELINE)
        write(b.folder / "survey.py", PIPELINE)
        runner = a.start(sys.executable, "survey.py")
        try:
            def seen() -> dict[str, str]:
                out = b.nbpipe("tasks", "survey", "--json")
                return {r["label"]: r["state"] for r in json.loads(out.stdout)} if \
                    out.returncode == 0 else {}

            # live, from the other host: the first task done, the second running
            wait_for(lambda: seen() == {"first": "SUCCEEDED", "gated(x=<first>)": "RUNNING"},
                     timeout=300, step=0.2)
            second = b.run(sys.executable, "survey.py", "second")
            assert second.returncode == 0, second.stderr[-3000:]
            host = "node-a" if named else os.uname().nodename
            assert f"REFUSED PipelineBusy pipeline 'survey' is already being run by pid " \
                   f"{runner.pid} on {host}" in second.stdout, second.stdout + second.stderr[-2000:]
            assert "'gated(x=<first>)': 'RUNNING'" in second.stdout  # the same states there
            events = b.nbpipe("events", "survey", "--json").stdout  # one JSON line per event
            since = max(json.loads(line)["id"] for line in events.splitlines())
            watcher = b.start(sys.executable, "-c", WATCH, str(since))
            (results / "gate").write_text("open")
            out, err = runner.communicate(timeout=300)
            assert "SUMMARY 2 42" in out, err[-3000:]
            woke, werr = watcher.communicate(timeout=300)
            assert "WOKEN True" in woke, werr[-3000:]
        finally:
            reap(runner)
        assert seen() == {"first": "SUCCEEDED", "gated(x=<first>)": "SUCCEEDED"}
        # the other host runs the same pipeline now: nothing is computed again, its values come
        # from the shared results folder
        again = b.run(sys.executable, "survey.py")
        assert again.returncode == 0, again.stderr[-3000:]
        assert "SUMMARY 0 42" in again.stdout
        # the results folder names its database: the command line needs nothing else
        plain = subprocess.run([sys.executable, "-m", "nbpipe.cli", "--store", str(results),
                                "tasks", "survey", "--json"], capture_output=True, text=True,
                               timeout=180, env={**b.env, "NBPIPE_STORE": "", "NBPIPE_RESULTS": ""})
        assert {r["state"] for r in json.loads(plain.stdout)} == {"SUCCEEDED"}, plain.stderr
