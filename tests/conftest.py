"""Shared fixtures: one real LocalCluster for the session, a fresh store per test."""

from __future__ import annotations

import os
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
