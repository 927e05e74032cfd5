"""Sphinx configuration of the jaxbilevel API reference site.

Build (warnings are errors, as in CI): ``sphinx-build -W --keep-going -b html
docs docs/_build/html``. Needs ``pip install -e ".[docs,examples,checkpoint]"``
(autodoc imports the optional modules).
"""

import os
import pathlib
import shutil
import sys

_DOCS = pathlib.Path(__file__).resolve().parent
_ROOT = _DOCS.parent
sys.path.insert(0, str(_ROOT))

# The notebooks live in notebooks/ at the repository root; the site renders
# copies of them (with their committed outputs, never executed here).
_NOTEBOOKS = _DOCS / "notebooks"
_NOTEBOOKS.mkdir(exist_ok=True)
for _nb in sorted((_ROOT / "notebooks").glob("*.ipynb")):
  shutil.copyfile(_nb, _NOTEBOOKS / _nb.name)

import jaxbilevel  # pylint: disable=g-import-not-at-top,wrong-import-position

project = "jaxbilevel"
author = "The jaxbilevel authors"
copyright = "The jaxbilevel authors"  # pylint: disable=redefined-builtin
release = jaxbilevel.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",  # Markdown pages (MyST) and notebooks.
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb",
                 ".ipynb": "myst-nb"}
exclude_patterns = ["_build", ".DS_Store", "README.md"]

# autodoc / napoleon: Google-style docstrings, signatures without type hints
# (they are in the docstrings' Args).
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# `Attributes:` sections as fields of the class, so that they do not clash with
# the attributes autodoc documents from the class itself.
napoleon_use_ivar = True
add_module_names = False

# MyST and notebooks: render the committed outputs; never execute.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"jaxbilevel {release}"
html_static_path = []

# A page of the site links only to pages of the site: a reference that does
# not resolve is a warning, and the CI build turns warnings into errors.
nitpicky = False
os.environ.setdefault("JAX_PLATFORMS", "cpu")
