"""Sphinx configuration of the jaxbilevel API reference site.

Build (warnings are errors, as in CI): ``python -m sphinx -W --keep-going -b
html docs docs/_build/html``. Needs ``pip install -e
".[docs,examples,checkpoint]"`` (autodoc imports the optional modules). The
build is nitpicky (every cross-reference must resolve) and needs no network:
links to JAX, optax, NumPy, flax and Python come from the inventories in
``_inventories/``.
"""

import os
import pathlib
import shutil
import sys

_DOCS = pathlib.Path(__file__).resolve().parent
_ROOT = _DOCS.parent
sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(_DOCS))  # method_tables.py

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
    "sphinx.ext.intersphinx",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",  # Markdown pages (MyST) and notebooks.
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb",
                 ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "_inventories", ".DS_Store", "README.md"]

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

# Every cross-reference must resolve (nitpicky): a reference that does not is
# a warning, and the CI build turns warnings into errors. Names of JAX, optax,
# NumPy, flax and Python link to those projects' documentation through
# intersphinx, read from the inventories committed in _inventories/ (the
# build has no network access; docs/_inventories/make_inventories.py writes
# them and says when to re-run it).
nitpicky = True
intersphinx_mapping = {
    project_name: (url, str(_DOCS / "_inventories" / f"{project_name}.inv"))
    for project_name, url in (
        ("python", "https://docs.python.org/3/"),
        ("jax", "https://docs.jax.dev/en/latest/"),
        ("optax", "https://optax.readthedocs.io/en/latest/"),
        ("numpy", "https://numpy.org/doc/stable/"),
        ("flax", "https://flax.readthedocs.io/en/latest/"),
    )
}

# napoleon writes the type of an `Attributes:` entry from the class's
# annotation, under the name that the annotation's object reports. Two of
# those names are not the public ones; they are rewritten in the rendered
# field types (`:vartype`) so that the reader sees, and the link goes to,
# the public name.
_PUBLIC_TYPE_NAMES = {
    # jax.Array's class reports the qualified name jax.jaxlib._jax.Array; JAX
    # documents it as jax.Array (linked through intersphinx).
    "jax.jaxlib._jax.Array": "jax.Array",
    # jaxbilevel's private alias of typing.Any for "any pytree of arrays"
    # (jaxbilevel._src.base.PyTree), named as in JAX's documentation.
    "base.PyTree": "pytree",
}
# A pytree is a concept of JAX (https://docs.jax.dev/en/latest/pytrees.html),
# not a class: no documentation has an object to link it to.
nitpick_ignore = [("py:class", "pytree")]


def _public_type_names(app, what, name, obj, options, lines):
  del app, what, name, obj, options  # Unused.
  for i, line in enumerate(lines):
    if line.lstrip().startswith((":vartype ", ":type:", ":type ")):
      head, sep, type_name = line.partition(": ")
      for private, public in _PUBLIC_TYPE_NAMES.items():
        type_name = type_name.replace(private, public)
      lines[i] = head + sep + type_name


def _method_tables_are_current(app):
  """Warns (an error under -W) while a table made from jbl.METHODS is stale.

  The method tables of choosing.md and vocabulary.md are written by
  docs/method_tables.py from the method table (jaxbilevel/_src/registry.py).
  """
  del app  # Unused.
  import method_tables  # pylint: disable=g-import-not-at-top
  from sphinx.util import logging as sphinx_logging  # pylint: disable=g-import-not-at-top
  for page in method_tables.stale_pages():
    sphinx_logging.getLogger(__name__).warning(
        "docs/%s: the method tables differ from jaxbilevel.METHODS; run "
        "python docs/method_tables.py", page)


def setup(app):
  # After napoleon (priority 500), which writes the `:vartype` fields.
  app.connect("autodoc-process-docstring", _public_type_names, priority=600)
  app.connect("builder-inited", _method_tables_are_current)


os.environ.setdefault("JAX_PLATFORMS", "cpu")
