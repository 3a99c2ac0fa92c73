"""The Jupyter server extension: nbpipe's REST API for the JupyterLab sidebar.

Enabled on install (``jupyter-config/jupyter_server_config.d/nbpipe.json``); ``jupyter
server extension list`` shows it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["_jupyter_server_extension_points", "_load_jupyter_server_extension"]


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "nbpipe.server"}]


def _load_jupyter_server_extension(server_app: Any) -> None:
    """Register the handlers (imported here: the rest of nbpipe never needs tornado)."""
    from .handlers import setup_handlers

    setup_handlers(server_app.web_app)
    server_app.log.info("nbpipe: REST API at %snbpipe/api/", server_app.web_app.settings["base_url"])
