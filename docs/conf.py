"""Sphinx configuration of nbpipe's documentation (MyST Markdown, Furo, autodoc).

Built with warnings as errors by ``make docs`` (part of ``make test``)::

    sphinx-build -W --keep-going -n -b html docs docs/_build/html
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the working tree's nbpipe, also without an install

import nbpipe  # noqa: E402

project = "nbpipe"
author = "nbpipe developers"
copyright = "2026, nbpipe developers"
release = version = nbpipe.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3  # links such as clusters.md#pools to a section

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# No intersphinx (the build runs offline): type annotations naming the standard library, Dask
# or typing helpers cannot be resolved, so nitpicky mode ignores references outside nbpipe.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(?!nbpipe\.).*"),
]

html_theme = "furo"
html_title = f"nbpipe {release}"
html_static_path: list[str] = []
html_show_sourcelink = False

# Pages other branches add later (issue 9). The "Running in production" toctree of index.md holds
# the marker below; each optional page that exists replaces it, the others are left out, so the
# build is warning-free before and after they land.
OPTIONAL_PAGES = ("errors", "reliability")
OPTIONAL_MARKER = "{optional-pages}"


def _optional_pages(app: object, docname: str, source: list[str]) -> None:
    if docname == root_doc:
        present = [p for p in OPTIONAL_PAGES if (Path(app.srcdir) / f"{p}.md").exists()]
        source[0] = source[0].replace(OPTIONAL_MARKER, "\n".join(present))


def _reread_index(app: object, env: object, added: set, changed: set, removed: set) -> list[str]:
    # index.md's toctree depends on which optional pages exist: read it again on every build
    return [root_doc]


def setup(app: object) -> dict[str, bool]:
    """Register the optional-pages hooks."""
    app.connect("source-read", _optional_pages)
    app.connect("env-get-outdated", _reread_index)
    return {"parallel_read_safe": True}
