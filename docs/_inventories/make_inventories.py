"""Writes the intersphinx inventories that docs/conf.py links against.

Why these files exist: the API site links the types it names (``jax.Array``,
``optax.OptState``, ``numpy.ndarray``, ``dict``, ...) to the documentation of
JAX, optax, NumPy, flax and Python through ``sphinx.ext.intersphinx``, and it
is built with ``nitpicky = True``, so every cross-reference must resolve.
Intersphinx normally downloads each project's ``objects.inv``, but CI (and
the machines the project is developed on) have no network access besides the
package registries. The inventories are therefore committed: small
``objects.inv`` files (Sphinx inventory format, version 2) that list exactly
the objects the site refers to, each with its address on the project's own
documentation site. ``docs/conf.py`` points ``intersphinx_mapping`` at them,
so the build reads them and never goes online.

When to re-run: when the nitpicky build (``python -m sphinx -W --keep-going -n
-b html docs docs/_build/html``) reports ``reference target not found`` for a
name of one of these projects, add the name with its address to ``OBJECTS``
below and run, from the repository root::

  python docs/_inventories/make_inventories.py

and commit the rewritten ``*.inv`` files. The script needs only the standard
library. Addresses follow each site's layout: JAX documents classes on
``_autosummary/<name>.html`` pages and the ``jax.sharding`` module on one
page; optax groups its API by topic
(``api/transformations.html#optax.OptState``); NumPy has one
``reference/generated/<name>.html`` page per object; flax documents NNX by
topic (``api_reference/flax.nnx/state.html#flax.nnx.State``); Python
documents the built-in types in ``library/stdtypes.html`` and
``library/functions.html``, the built-in exceptions in
``library/exceptions.html`` and each module on its ``library/<module>.html``
page.
"""

import pathlib
import zlib

# project -> (version, [(name, role, address), ...]). The address is relative
# to the project's documentation root, which docs/conf.py gives in
# ``intersphinx_mapping`` (e.g. https://docs.jax.dev/en/latest/); "$" stands
# for the name.
OBJECTS = {
    "python": ("3", [
        ("bool", "py:class", "library/functions.html#$"),
        ("dict", "py:class", "library/stdtypes.html#$"),
        ("float", "py:class", "library/functions.html#$"),
        ("int", "py:class", "library/functions.html#$"),
        ("str", "py:class", "library/stdtypes.html#$"),
        ("tuple", "py:class", "library/stdtypes.html#$"),
        ("FileNotFoundError", "py:exception", "library/exceptions.html#$"),
    ]),
    "jax": ("latest", [
        ("jax.Array", "py:class", "_autosummary/$.html#$"),
        ("jax.sharding.Mesh", "py:class", "jax.sharding.html#$"),
        ("jax.sharding.NamedSharding", "py:class", "jax.sharding.html#$"),
    ]),
    "optax": ("latest", [
        ("optax.GradientTransformationExtraArgs", "py:class",
         "api/transformations.html#$"),
        ("optax.OptState", "py:class", "api/transformations.html#$"),
    ]),
    "numpy": ("stable", [
        ("numpy.ndarray", "py:class", "reference/generated/$.html#$"),
    ]),
    "flax": ("latest", [
        ("flax.nnx.State", "py:class", "api_reference/flax.nnx/state.html#$"),
    ]),
}


def inventory(project: str, version: str, objects) -> bytes:
  """The bytes of an ``objects.inv`` (version 2) listing ``objects``."""
  header = (f"# Sphinx inventory version 2\n# Project: {project}\n"
            f"# Version: {version}\n"
            "# The remainder of this file is compressed using zlib.\n")
  # name domain:role priority address display-name ("-": the name itself).
  body = "".join(f"{name} {role} 1 {address.replace('$', name)} -\n"
                 for name, role, address in sorted(objects))
  return header.encode() + zlib.compress(body.encode(), 9)


def main():
  here = pathlib.Path(__file__).resolve().parent
  for project, (version, objects) in OBJECTS.items():
    path = here / f"{project}.inv"
    path.write_bytes(inventory(project, version, objects))
    print(f"wrote {path} ({len(objects)} objects)")


if __name__ == "__main__":
  main()
