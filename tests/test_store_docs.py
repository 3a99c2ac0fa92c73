"""The PostgreSQL section of docs/store.md, run as printed: its shell lines, its nbpipe.yaml and
its script, against the test server (``NBPIPE_TEST_POSTGRES``; in CI a skip is a failure).

The page's URL names the database ``.ci/postgres-up`` makes (``nbpipe_test`` on this host); the
test gives libpq the rest as a user would (``PGPASSWORD``, ``PGPORT``), and a schema of the
test's own through ``PGOPTIONS`` so it meets no other test's pipelines.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import urllib.parse
import uuid
from pathlib import Path

import pytest
from conftest import ROOT
from test_store_engines import postgres_url

pytestmark = pytest.mark.ci_required

PAGE = ROOT / "docs" / "store.md"
SECTION = "## A store shared across hosts: PostgreSQL"


def blocks(kind: str) -> list[str]:
    """The ``kind`` blocks of the PostgreSQL section of docs/store.md, in order."""
    text = PAGE.read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + 1)
    return re.findall(rf"^```{kind}\n(.*?)^```", text[start:end], re.S | re.M)


def cluster_yaml() -> str:
    """The nbpipe.yaml of docs/clusters.md for a store shared by several hosts (in a list item)."""
    found = [textwrap.dedent(block) for block in re.findall(
        r"^( *)```yaml\n(.*?)^\1```", (ROOT / "docs" / "clusters.md").read_text(), re.S | re.M)
        for block in [block[1]] if "postgresql://" in block]
    assert len(found) == 1
    return found[0]


def test_the_section_shows_one_shell_session_one_config_and_one_script() -> None:
    assert [len(blocks(k)) for k in ("bash", "yaml", "py")] == [1, 1, 1]
    # what the page says the URL names is what the server of the tests is
    assert "postgresql://nbpipe@localhost/nbpipe_test" in blocks("bash")[0]


MAKE_SQLITE_STORE = """
from nbpipe import Pipeline

pipe = Pipeline("survey", cluster={"kind": "local", "workers": 1})


@pipe.task
def square(x: int) -> int:
    return x * x


if __name__ == "__main__":
    values = [square(i) for i in range(4)]
    print(pipe.run().executed, [v.result() for v in values])
"""


def test_the_documented_shell_config_and_script_move_a_store_into_postgresql_and_run_nothing_again(
        tmp_path: Path) -> None:
    import psycopg

    server = urllib.parse.urlsplit(postgres_url())
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               "HOME": str(tmp_path), "PYTHONPATH": str(ROOT),
               "PGPASSWORD": urllib.parse.unquote(server.password or ""),
               "PGPORT": str(server.port or 5432), "PGOPTIONS": f"-csearch_path={schema}"}
        project = tmp_path / "survey"
        project.mkdir()
        # a folder store with the script's results, made the ordinary way
        (project / "make.py").write_text(MAKE_SQLITE_STORE)
        made = subprocess.run([sys.executable, "make.py"], cwd=project, env=env,
                              capture_output=True, text=True, timeout=600)
        assert made.stdout.strip() == "4 [0, 1, 4, 9]", made.stderr[-3000:]
        shell = subprocess.run(["bash", "-euo", "pipefail", "-c", blocks("bash")[0]], cwd=project,
                               env=env, capture_output=True, text=True, timeout=600)
        assert shell.returncode == 0, shell.stderr[-3000:]
        assert "verified" in shell.stdout and "SUCCEEDED" in shell.stdout, shell.stdout
        assert (tmp_path / "survey-results" / "database.json").exists()
        # the documented nbpipe.yaml and script: nothing is computed again from the copy
        (project / "nbpipe.yaml").write_text(blocks("yaml")[0])
        (project / "script.py").write_text(blocks("py")[0])
        (project / ".nbpipe").rename(project / "old-store")  # the script must not find it
        again = subprocess.run([sys.executable, "script.py"], cwd=project, env=env,
                               capture_output=True, text=True, timeout=600)
        assert again.stdout.strip() == "0 [0, 1, 4, 9]", again.stderr[-3000:]
        assert not (project / ".nbpipe").exists()
        # docs/clusters.md's nbpipe.yaml for several hosts names the same store
        (project / "nbpipe.yaml").write_text(cluster_yaml())
        third = subprocess.run([sys.executable, "script.py"], cwd=project, env=env,
                               capture_output=True, text=True, timeout=600)
        assert third.stdout.strip() == "0 [0, 1, 4, 9]", third.stderr[-3000:]
        # the command line in the project folder finds the store through nbpipe.yaml too
        listing = subprocess.run([sys.executable, "-m", "nbpipe.cli", "tasks", "survey", "--json"],
                                 cwd=project, env=env, capture_output=True, text=True, timeout=300)
        assert listing.returncode == 0, listing.stderr[-3000:]
        assert listing.stdout.count('"SUCCEEDED"') == 4
    finally:
        with psycopg.connect(postgres_url(), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
