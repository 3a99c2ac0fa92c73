"""Shared fixtures: one real LocalCluster for the session, a fresh store per test; and how the
tests are shared out between pytest-xdist's workers (`make test` runs them on two)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

from nbpipe import Pipeline

ROOT = Path(__file__).resolve().parent.parent

pytest_plugins = ["pytest_jupyter.jupyter_server"]  # jp_fetch & co. for the server extension


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ci_required: a skip of this test fails the run when CI=true"
    )
    config.addinivalue_line(
        "markers", "soak: a long run (tests/test_reliability.py); NBPIPE_SOAK_TASKS sets its size"
    )
    config.addinivalue_line(
        "markers", "torture: random driver kills (tests/test_dataloss.py); NBPIPE_TORTURE_KILLS "
        "sets how many"
    )


# How `make test` shares the tests out between pytest-xdist's workers (`-n 2 --dist loadgroup`):
# in work units, each run whole on one worker in collection order. A unit is a module (its tests
# keep their order and its module-scoped fixtures are built once, as in a run on one process), or
# a group of tests that must never run beside each other on two workers, whatever module they are
# in: Slurm's queue is the machine's (the tests count what is left in it); each browser test
# starts JupyterLab and Chromium, and two of them on two cores spend their waits on each other;
# the wheel is built in the source tree; one PostgreSQL database serves every engine test (those
# with a parameter "postgres"). The units are made here rather than with xdist_group marks, which
# xdist 3.8 cannot apply under pytest 9.2 (it renames items through an attribute pytest dropped).
SHARED_GROUPS = {
    "test_slurm.py": "slurm",
    "test_sidebar_browser.py": "browser",
    "test_packaging.py": "wheel",
}
POSTGRES_PARAM = re.compile(r"[\[-]postgres(?:ql)?[\]-]")
# The slowest units are handed out first, so no long one starts last while the other worker sits
# idle: the browser tests (~7 min of CI's ~36), then the slowest modules timed on this machine
# (test_cli ~4x and test_content_keys ~2.5x any other of the first ten). `make test` prints the
# 30 slowest tests: keep this list in step with them.
SLOWEST_FIRST = (
    "test_sidebar_browser.py",
    "test_cli.py",
    "test_content_keys.py",
)


def work_unit(nodeid: str) -> str:
    """The work unit of the test ``nodeid`` under xdist: a shared group's name or its module.

    >>> work_unit("tests/test_slurm.py::test_x"), work_unit("tests/test_cli.py::test_y[a]")
    ('slurm', 'tests/test_cli.py')
    """
    if nodeid.rfind("@") > nodeid.rfind("]"):  # an xdist_group mark, where xdist can apply it
        return nodeid.rsplit("@", 1)[1]
    module = nodeid.split("::", 1)[0]
    if module.rsplit("/", 1)[-1] in SHARED_GROUPS:
        return SHARED_GROUPS[module.rsplit("/", 1)[-1]]
    if POSTGRES_PARAM.search(nodeid):
        return "postgres"
    return module


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # (xdist's hook; before its own answer)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """``--dist loadgroup`` shares the tests out by :func:`work_unit`, in collection order."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # keep SLOWEST_FIRST's order, not "most tests first"
    return WorkUnitScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, the slowest modules first (every worker sorts the same way). A run in
    one process keeps the order the files are in."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a module


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    """In CI, a skipped test that CI must run (Slurm, browser) is a failure."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)  # fixtures see how the test went
    if report.skipped and os.environ.get("CI") and item.get_closest_marker("ci_required"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where it must run: {report.longrepr}"


@pytest.fixture(scope="session", autouse=True)
def private_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep the tests' stores out of the user's registry of known stores."""
    path = tmp_path_factory.mktemp("xdg-data")
    os.environ["XDG_DATA_HOME"] = str(path)
    return path


@pytest.fixture(scope="session")
def cluster() -> LocalCluster:
    """Two worker processes with one thread each, shared by the tests."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as lc:
        yield lc


@pytest.fixture
def client(cluster: LocalCluster) -> Client:
    """A client of the shared cluster."""
    with Client(cluster) as c:
        yield c


@pytest.fixture
def kernel_env(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Kernels and scripts this test starts use the session's cluster (no cluster of their own to
    start), show no widgets and keep their store beside their notebook or script; the
    environment they get, for ``subprocess.run(env=...)``."""
    monkeypatch.setenv("NBPIPE_WIDGETS", "0")
    monkeypatch.setenv("DASK_NBPIPE__CLUSTER", cluster.scheduler_address)
    monkeypatch.delenv("NBPIPE_STORE", raising=False)
    monkeypatch.delenv("NBPIPE_PIPELINE", raising=False)
    return dict(os.environ)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A store directory of the test's own."""
    return tmp_path / ".nbpipe"


@pytest.fixture
def pipe(request: pytest.FixtureRequest, store: Path, client: Client) -> Pipeline:
    """A pipeline named after the test, on the shared cluster, in a fresh store."""
    p = Pipeline(request.node.name[:60], store=store, cluster=client)
    yield p
    p.close()


def wait_for(predicate, timeout: float = 120.0, step: float = 0.05) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    raise AssertionError("condition not reached in time")


def run_script(path: Path, source: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Write ``source`` to ``path`` and run it in a fresh Python process (cwd = its folder)."""
    path.write_text(textwrap.dedent(source))
    return subprocess.run(
        [sys.executable, str(path), *args], cwd=path.parent, capture_output=True, text=True,
        timeout=timeout,
    )
