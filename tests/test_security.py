"""Security: the REST API needs Jupyter's authentication and XSRF, refuses every path out of the
server root, stores are private to the user, batch clusters speak TLS, no dashboard is proxied,
and no user-controlled text is evaluated.

TLS over a real Slurm is also checked end to end in tests/test_slurm.py
(``test_pipeline_runs_on_slurm_workers_over_tls_and_leaves_no_job``: a client without the
certificates is refused); the job scripts of every batch kind in tests/test_clusters.py.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from tornado.httpclient import HTTPClientError

from nbpipe import Pipeline
from nbpipe.pools import PoolCluster, parse_pools
from nbpipe.server.handlers import HANDLERS
from nbpipe.specs import spawn, write_specs

PACKAGE = Path(__file__).resolve().parent.parent / "nbpipe"
STORE = "analysis/.nbpipe"


def job(x: int) -> int:
    """A task body."""
    return x + 1


@pytest.fixture
def jp_server_config() -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"nbpipe.server": True}}}


@pytest.fixture
def project(jp_root_dir: Path, client) -> Path:
    """A store inside the root (analysis/.nbpipe) and a real store outside it (../outside)."""
    folder = jp_root_dir / "analysis"
    folder.mkdir()
    (folder / "run.ipynb").write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4,
                                                  "nbformat_minor": 5}))
    for store in (folder / ".nbpipe", jp_root_dir.parent / "outside" / ".nbpipe"):
        pipe = Pipeline("run", store=store, cluster=client)
        pipe.task(job)(1)
        pipe.run(check=True)
        pipe.close()
    (jp_root_dir.parent / "outside" / "secret.ipynb").write_text("{}")
    (folder / "link").symlink_to(jp_root_dir.parent / "outside")
    return folder


def _requests() -> list[tuple[str, str, dict[str, Any]]]:
    """(method, handler, valid arguments) for every handler of the API."""
    valid = {"store": STORE, "pipeline": "run"}
    args = {"pipelines": {"path": "analysis"}, "graph": valid, "events": valid,
            "task": {**valid, "task": "job"}, "cluster": valid,
            "command": {**valid, "verb": "pause"}, "export": {"path": "analysis/run.ipynb"}}
    out = []
    for name, cls in HANDLERS:
        for method in ("GET", "POST"):
            if method.lower() in vars(cls):
                out.append((method, name, args[name]))
    return out


async def _call(jp_fetch, method: str, name: str, args: dict[str, Any], **kw: Any) -> Any:
    if method == "GET":
        return await jp_fetch("nbpipe", "api", name, params=args, **kw)
    return await jp_fetch("nbpipe", "api", name, method="POST", body=json.dumps(args), **kw)


# -- authentication and XSRF --------------------------------------------------------------------


def test_every_handler_method_requires_jupyter_authentication() -> None:
    for name, cls in HANDLERS:
        for method in ("get", "post", "put", "delete", "patch"):
            fn = vars(cls).get(method)
            if fn is not None:  # tornado.web.authenticated wraps it (functools.wraps)
                assert fn.__code__.co_qualname == "authenticated.<locals>.wrapper", (name, method)


@pytest.mark.parametrize("token", ["", "token wrong-token"])
async def test_requests_without_a_valid_token_are_refused(jp_fetch, project, token: str) -> None:
    for method, name, args in _requests():
        with pytest.raises(HTTPClientError) as info:
            await _call(jp_fetch, method, name, args, headers={"Authorization": token})
        assert info.value.code in (401, 403), (method, name, info.value.code)
    # and with the token, the same requests succeed: the refusals were for the token
    for method, name, args in _requests():
        if name != "export":  # writes a script; shown below
            response = await _call(jp_fetch, method, name, args)
            assert response.code == 200, (method, name)


async def test_posts_with_the_login_cookie_but_no_xsrf_token_are_refused(
        jp_serverapp, project, http_server_client, jp_base_url) -> None:
    token = jp_serverapp.identity_provider.token
    login = await http_server_client.fetch(f"{jp_base_url}api/contents?{urlencode({'token': token})}",
                                           raise_error=False)
    cookies = "; ".join(c.split(";")[0] for c in login.headers.get_list("Set-Cookie"))
    assert "username-" in cookies
    for method, name, args in _requests():
        if method != "POST":
            continue
        refused = await http_server_client.fetch(f"{jp_base_url}nbpipe/api/{name}", method="POST",
                                                 body=json.dumps(args), headers={"Cookie": cookies},
                                                 raise_error=False)
        assert refused.code == 403 and b"XSRF" in refused.body.upper(), name
    assert not (project / "run.py").exists()  # the refused export wrote nothing


# -- path traversal -----------------------------------------------------------------------------

#: Every path-like parameter of the API: (method, handler, parameter, the other arguments).
PATH_PARAMETERS = [
    ("GET", "pipelines", "path", {}),
    ("GET", "graph", "store", {"pipeline": "run"}),
    ("GET", "events", "store", {"pipeline": "run"}),
    ("GET", "task", "store", {"pipeline": "run", "task": "job"}),
    ("GET", "cluster", "store", {"pipeline": "run"}),
    ("POST", "command", "store", {"pipeline": "run", "verb": "pause"}),
    ("POST", "export", "path", {}),
]


def _outside(parameter: str, name: str) -> list[str]:
    """Ways to name the store (or notebook) outside the root, relative to the root."""
    target = "secret.ipynb" if name == "export" else ".nbpipe"
    return [f"../outside/{target}", f"analysis/../../outside/{target}",
            f"analysis/link/{target}", f"./analysis/link/../../../outside/{target}"]


@pytest.mark.parametrize(("method", "name", "parameter", "others"), PATH_PARAMETERS,
                         ids=[f"{m}-{n}-{p}" for m, n, p, _ in PATH_PARAMETERS])
async def test_paths_out_of_the_root_are_refused(jp_fetch, project, jp_root_dir: Path, method: str,
                                                 name: str, parameter: str, others: dict) -> None:
    for value in _outside(parameter, name):
        with pytest.raises(HTTPClientError) as info:
            await _call(jp_fetch, method, name, {**others, parameter: value})
        assert info.value.code == 403, (value, info.value.code)
        assert "outside the server root" in json.loads(info.value.response.body)["message"]
    # an absolute path is read below the root, so the real store outside is never reached
    absolute = str(jp_root_dir.parent / "outside" / ("secret.ipynb" if name == "export" else ".nbpipe"))
    try:
        answer = await _call(jp_fetch, method, name, {**others, parameter: absolute})
    except HTTPClientError as exc:
        assert exc.code in (403, 404), exc.code
    else:  # only the folder listing answers, and with nothing
        assert name == "pipelines" and json.loads(answer.body) == []


async def test_percent_encoded_dots_are_refused_too(jp_serverapp, project, http_server_client,
                                                    jp_base_url) -> None:
    headers = {"Authorization": f"token {jp_serverapp.identity_provider.token}"}
    for query in ("store=%2e%2e%2foutside%2f.nbpipe&pipeline=run",
                  "store=%2E%2E/outside/.nbpipe&pipeline=run",
                  "store=analysis%2f%2e%2e%2f%2e%2e%2foutside%2f.nbpipe&pipeline=run"):
        answer = await http_server_client.fetch(f"{jp_base_url}nbpipe/api/graph?{query}",
                                                headers=headers, raise_error=False)
        assert answer.code == 403, (query, answer.code, answer.body)


async def test_pipelines_of_a_folder_never_list_stores_out_of_the_root(jp_fetch, project) -> None:
    response = await jp_fetch("nbpipe", "api", "pipelines", params={"path": ""})
    stores = {p["store"] for p in json.loads(response.body)}
    assert stores == {STORE}  # not analysis/link/.nbpipe, whose real path is outside


async def test_export_refuses_a_script_symlinked_out_of_the_root(jp_fetch, project,
                                                                 jp_root_dir: Path) -> None:
    victim = jp_root_dir.parent / "outside" / "victim.py"
    victim.write_text("# mine\n")
    (project / "run.py").symlink_to(victim)
    with pytest.raises(HTTPClientError) as info:
        await jp_fetch("nbpipe", "api", "export", method="POST",
                       body=json.dumps({"path": "analysis/run.ipynb"}))
    assert info.value.code == 403
    assert victim.read_text() == "# mine\n"


# -- no dashboard proxy -------------------------------------------------------------------------


def _patterns(router: Any) -> list[str]:
    out = []
    for rule in router.rules:
        if hasattr(rule.target, "rules"):
            out += _patterns(rule.target)
        elif getattr(rule.matcher, "regex", None) is not None:
            out.append(rule.matcher.regex.pattern)
    return out


async def test_the_extension_adds_only_its_api_routes_and_no_dashboard_proxy(jp_serverapp) -> None:
    ours = [p for p in _patterns(jp_serverapp.web_app.default_router) if "nbpipe" in p]
    assert sorted(p[p.index("nbpipe/"):] for p in ours) == sorted(f"nbpipe/api/{n}$" for n, _ in HANDLERS)
    assert not any(word in p for p in ours for word in ("dashboard", "proxy", "status", "bokeh"))
    # no handler of nbpipe forwards requests anywhere: each only answers from the store
    for _, cls in HANDLERS:
        assert cls.__module__ == "nbpipe.server.handlers"
        assert not any(base.__name__.startswith(("Proxy", "WebSocket")) for base in cls.__mro__)


def test_dashboards_of_clusters_nbpipe_starts_listen_on_this_machine_only() -> None:
    from nbpipe.cluster import connect

    connection = connect({"kind": "local", "workers": 1})
    try:
        assert connection.dashboard is not None
        assert connection.dashboard.startswith("http://127.0.0.1:"), connection.dashboard
    finally:
        connection.close()


# -- TLS ----------------------------------------------------------------------------------------


def test_batch_clusters_use_tls_by_default_with_private_certificates(tmp_path: Path) -> None:
    store = tmp_path / ".nbpipe"
    store.mkdir(mode=0o700)
    cluster = PoolCluster(parse_pools({"kind": "slurm", "cores": 1, "memory": "1GB"}, store),
                          store_dir=store)
    try:
        assert cluster.address.startswith("tls://")
        script = cluster.job_script()
        assert "--tls-key" in script and "--tls-cert" in script and "--tls-ca-file" in script
        certificates = list((store / "tls").iterdir())
        assert certificates, "the certificates the workers read"
        assert _mode(store / "tls") == 0o700
        for path in certificates:
            assert _mode(path) == 0o600, (path, oct(_mode(path)))
    finally:
        cluster.close()


# -- private files ------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_a_real_runs_store_is_private_to_the_user(tmp_path: Path, client, monkeypatch) -> None:
    old = os.umask(0o022)  # the usual umask: group and others may read what is not protected
    try:
        store = tmp_path / ".nbpipe"
        pipe = Pipeline("private", store=store, cluster=client)
        refs = [pipe.task(job)(i) for i in range(3)]
        pipe.run(check=True)
        waiting = pipe.task(job, version=2)(9)  # a spec, as a detached runner would get
        pipe.resolve([waiting])
        write_specs(pipe, [waiting])
        pipe.close()
        monkeypatch.setenv("DASK_NBPIPE__CLUSTER", client.scheduler.address)
        pid = spawn(pipe.store, "nothing-here")  # a spawn log (the runner exits: no such pipeline)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        from nbpipe.store import registry_path

        files = [p for p in store.rglob("*") if p.is_file()]
        kinds = {p.suffix or p.name for p in files}
        assert {".sqlite", ".pkl", ".lock", ".log"} <= kinds, kinds
        assert _mode(store) == 0o700
        for path in store.rglob("*"):
            expected = 0o700 if path.is_dir() else 0o600
            assert _mode(path) == expected, (path, oct(_mode(path)))
        assert all(r.result_file is not None for r in refs)
        assert _mode(registry_path()) == 0o600
    finally:
        os.umask(old)


# -- no eval of user-controlled text ------------------------------------------------------------

#: Calls of eval/exec that run the user's own code in the user's own process, on purpose.
ALLOWED_EXEC = {
    # a %%task cell's code is the user's own, run in their own kernel or worker (a notebook
    # cell would run it the same way); nothing read from files, the store or HTTP reaches it
    ("cells.py", "exec"), ("cells.py", "eval"),
}


def _dangerous_calls() -> set[tuple[str, str]]:
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
                    found.add((path.name, func.id))
                if isinstance(func, ast.Attribute) and func.attr in ("load", "load_all", "unsafe_load",
                                                                     "full_load") \
                        and isinstance(func.value, ast.Name) and func.value.id == "yaml":
                    found.add((path.name, f"yaml.{func.attr}"))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == "yaml" and node.attr in ("Loader", "UnsafeLoader", "FullLoader"):
                found.add((path.name, f"yaml.{node.attr}"))
    return found


def test_no_eval_exec_or_unsafe_yaml_on_user_controlled_input() -> None:
    assert _dangerous_calls() == ALLOWED_EXEC


def test_the_scan_finds_what_it_looks_for(tmp_path: Path, monkeypatch) -> None:
    """The scan is not blind: planted calls are found."""
    (tmp_path / "bad.py").write_text("import yaml\neval(x)\nyaml.load(s, Loader=yaml.Loader)\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    assert _dangerous_calls() == {("bad.py", "eval"), ("bad.py", "yaml.load"), ("bad.py", "yaml.Loader")}
