"""The wheel carries the prebuilt sidebar and the server extension's config: users need no Node."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not (ROOT / "nbpipe" / "labextension" / "static" / "style.js").exists(),
    reason="the labextension is not built (make builds it with npm)",
)


def _without_node(env: dict[str, str]) -> dict[str, str]:
    """PATH without the directories that hold node or npm."""
    keep = [d for d in env.get("PATH", "").split(os.pathsep)
            if d and not (Path(d, "node").exists() or Path(d, "npm").exists())]
    return {**env, "PATH": os.pathsep.join(keep)}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    env = _without_node(dict(os.environ))
    assert shutil.which("node", path=env["PATH"]) is None
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True, env=env, timeout=600)
    return next(out.glob("nbpipe-*.whl"))


def test_the_wheel_holds_the_prebuilt_labextension_and_server_config(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    data = "nbpipe-0.1.0.data/data/"
    assert f"{data}share/jupyter/labextensions/nbpipe/package.json" in names
    assert f"{data}share/jupyter/labextensions/nbpipe/install.json" in names
    assert any(n.startswith(f"{data}share/jupyter/labextensions/nbpipe/static/remoteEntry.") for n in names)
    assert f"{data}etc/jupyter/jupyter_server_config.d/nbpipe.json" in names
    assert "nbpipe/server/handlers.py" in names


def test_installed_from_the_wheel_without_node_jupyterlab_lists_it_enabled_and_ok(
        wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"  # a clean environment of its own: ours is left alone
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    env = _without_node(dict(os.environ))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                    "--no-deps", "-q", str(wheel)], check=True, env=env, timeout=300)
    share = venv / "share" / "jupyter"
    assert (venv / "etc" / "jupyter" / "jupyter_server_config.d" / "nbpipe.json").is_file()
    listing = subprocess.run(
        [sys.executable, "-m", "jupyter", "labextension", "list"], capture_output=True, text=True,
        env={**env, "JUPYTER_PATH": str(share)}, timeout=120,
    )
    text = listing.stdout + listing.stderr
    section = text[text.index(str(share / "labextensions")):]
    first = section.splitlines()[1]
    assert "nbpipe" in first and "enabled" in first and "OK" in first, text
