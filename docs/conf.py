"""Sphinx configuration: myst for markdown, executed MyST notebooks, autosummary API pages, numpydoc docstrings.

``sphinx-build -W -b html docs docs/_build/html`` executes the tutorials (``docs/tutorials``) on the real data sets,
found in ``SPADE_SD_DATA_DIR`` or downloaded, and fails on any warning or any error in a notebook. Executed
notebooks are cached (``docs/_build/.jupyter_cache``): only a changed notebook runs again.
"""

import os
import socket
from pathlib import Path

project = "spade_sd"
author = "spade_sd developers"
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx_autodoc_typehints",
]
templates_path = ["_templates"]
autosummary_generate = True
autodoc_member_order = "bysource"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
# a docstring's Attributes section as fields: the class template documents each attribute itself, once
napoleon_use_ivar = True
myst_enable_extensions = ["colon_fence", "dollarmath"]
html_theme = "sphinx_book_theme"
html_title = "spade_sd"
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

# the tutorials train small models on real data: minutes per notebook on a CPU, so a cell may take a while
nb_execution_mode = "cache"
nb_execution_timeout = 1800
nb_execution_raise_on_error = True
# myst-nb's default cache sits beside the output folder: in docs/ itself for ``sphinx-build docs docs/_build``
nb_execution_cache_path = str(Path(__file__).resolve().parent / "_build" / ".jupyter_cache")
nb_execution_show_tb = True
nb_merge_streams = True

_INVENTORIES = {
    "python": ("https://docs.python.org/3", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "spatialdata": ("https://spatialdata.scverse.org/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "torch": ("https://pytorch.org/docs/stable/", None),
}


def _online(host: str = "docs.python.org", timeout: float = 3.0) -> bool:
    """Whether the inventories can be fetched: an offline build must not fail ``-W`` on a failed download."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


# links to other projects' docs are made when online; SPADE_SD_DOCS_INTERSPHINX=0 or 1 forces the choice
_forced = os.environ.get("SPADE_SD_DOCS_INTERSPHINX")
_use_inventories = _forced == "1" if _forced in ("0", "1") else _online()
intersphinx_mapping = _INVENTORIES if _use_inventories else {}
