"""Every public symbol has a docstring and an entry in the API pages (docs/api).

The Sphinx build itself (warnings as errors) runs in `.ci/run`; these checks
need no Sphinx and take well under a second.
"""

import importlib
import inspect
import pathlib
import re

import pytest

import jaxbilevel as jbl

_API = pathlib.Path(__file__).resolve().parent.parent / "docs" / "api"

# The public modules: the package, its public sub-modules (core and loaded on
# use) and the applications.
_MODULES = (
    ("jaxbilevel",)
    + tuple(f"jaxbilevel.{name}" for name in jbl.__all__
            if inspect.ismodule(getattr(jbl, name)))
    + tuple(f"jaxbilevel.{name}"
            for name in jbl._LAZY_SUBMODULES)  # pylint: disable=protected-access
    + ("jaxbilevel.llm",))

_DIRECTIVE = re.compile(
    r"^\.\. (module|currentmodule|automodule|autoclass|autofunction|data)::"
    r"\s+(\S+)", re.MULTILINE)


def _documented():
  """Full names that the API pages document, and the `.. data::` bodies."""
  names, data_bodies = set(), {}
  for page in sorted(_API.glob("*.rst")):
    text = page.read_text()
    module = None
    for match in _DIRECTIVE.finditer(text):
      kind, target = match.groups()
      if kind in ("module", "currentmodule"):
        module = target
      elif kind == "automodule":
        module = target
        names.add(target)
      else:
        full = f"{module}.{target}"
        names.add(full)
        if kind == "data":
          rest = text[match.end():].split("\n.. ", 1)[0]
          data_bodies[full] = rest.strip()
  return names, data_bodies


def _import(module_name):
  try:
    return importlib.import_module(module_name)
  except ImportError as e:  # an optional dependency is not installed
    pytest.skip(f"{module_name}: {e}")


def _public_names(module):
  if module.__name__ == "jaxbilevel.demo":  # a script: its docstring is its doc
    return []
  assert hasattr(module, "__all__"), f"{module.__name__} has no __all__"
  return list(module.__all__)


@pytest.mark.parametrize("module_name", _MODULES)
def test_module_has_a_docstring_and_a_page(module_name):
  module = _import(module_name)
  assert inspect.getdoc(module), f"{module_name} has no docstring"
  documented, _ = _documented()
  assert module_name in documented, (
      f"{module_name} has no `.. automodule::` in docs/api/*.rst")


@pytest.mark.parametrize("module_name", _MODULES)
def test_every_public_symbol_is_documented(module_name):
  module = _import(module_name)
  documented, data_bodies = _documented()
  missing_doc, missing_page = [], []
  for name in _public_names(module):
    obj = getattr(module, name)
    full = f"{module_name}.{name}"
    if inspect.ismodule(obj):
      if obj.__name__ not in documented:
        missing_page.append(full)
      continue
    if inspect.isclass(obj) or callable(obj):
      if not inspect.getdoc(obj) or obj.__doc__ is None:
        missing_doc.append(full)
      if full not in documented:
        missing_page.append(full)
    elif not data_bodies.get(full):  # a constant: described in the page
      missing_page.append(full)
  assert not missing_doc, f"no docstring: {missing_doc}"
  assert not missing_page, (
      f"not in docs/api/*.rst (add an autofunction/autoclass/data entry): "
      f"{missing_page}")


def test_applications_submodules_are_documented():
  documented, _ = _documented()
  apps = _import("jaxbilevel.applications")
  for name in apps.__all__:
    obj = getattr(apps, name)
    if inspect.ismodule(obj):
      assert inspect.getdoc(obj), obj.__name__
      assert obj.__name__ in documented, obj.__name__


def test_api_pages_name_only_existing_symbols():
  documented, _ = _documented()
  for full in sorted(documented):
    module_name, _, name = full.rpartition(".")
    if full.startswith("jaxbilevel.llm"):
      _import("jaxbilevel.llm")
    try:
      importlib.import_module(full)
      continue
    except ImportError:
      pass
    module = importlib.import_module(module_name)
    assert hasattr(module, name), f"docs/api names {full}, which does not exist"


def test_committed_inventories_are_what_the_script_writes():
  # docs/conf.py links JAX, optax, NumPy, flax and Python through the
  # intersphinx inventories committed in docs/_inventories (the build has no
  # network); they must be the output of the script that lists their objects.
  import importlib.util  # pylint: disable=g-import-not-at-top
  folder = _API.parent / "_inventories"
  spec = importlib.util.spec_from_file_location(
      "make_inventories", folder / "make_inventories.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  assert set(script.OBJECTS) == {"python", "jax", "optax", "numpy", "flax"}
  for project, (version, objects) in script.OBJECTS.items():
    committed = (folder / f"{project}.inv").read_bytes()
    assert committed == script.inventory(project, version, objects), (
        f"docs/_inventories/{project}.inv is out of date: run "
        "python docs/_inventories/make_inventories.py")
    assert objects, project
