"""`import jaxbilevel` loads the core only; optional modules load on use."""

import subprocess
import sys

import pytest

import jaxbilevel as jbl

# Packages that only the optional modules (applications, flax helpers,
# checkpointing, data loaders, plotting) may import.
_OPTIONAL = ("flax", "sklearn", "orbax", "matplotlib", "pandas", "tokenizers",
             "safetensors", "torch")


def _modules_after(code: str) -> list[str]:
  """The modules (full dotted names) loaded after running `code` afresh."""
  script = (f"{code}\nimport sys\n"
            "print(sorted(sys.modules))")
  out = subprocess.run([sys.executable, "-c", script], check=True,
                       capture_output=True, text=True, timeout=300)
  return eval(out.stdout.strip().splitlines()[-1])  # pylint: disable=eval-used


def test_core_import_loads_no_optional_dependency():
  loaded = _modules_after("import jaxbilevel")
  assert [m for m in loaded if m.split(".")[0] in _OPTIONAL] == []
  assert {"jax", "optax", "numpy"} <= set(loaded)
  # Neither the applications nor the LLM material is part of the core.
  assert [m for m in loaded if m.startswith(("jaxbilevel.applications",
                                             "jaxbilevel.llm"))] == []


def test_star_import_loads_no_optional_dependency():
  loaded = _modules_after("from jaxbilevel import *")
  assert [m for m in loaded if m.split(".")[0] in _OPTIONAL] == []


@pytest.mark.parametrize("name", jbl._LAZY_SUBMODULES)  # pylint: disable=protected-access
def test_lazy_submodule_is_reachable_as_attribute(name):
  module = getattr(jbl, name)
  assert module.__name__ == f"jaxbilevel.{name}"
  assert name in dir(jbl)
  assert name not in jbl.__all__


def test_flax_utils_attribute_imports_flax_on_use():
  loaded = _modules_after("import jaxbilevel as jbl\njbl.flax_utils")
  assert "flax" in loaded


def test_unknown_attribute_raises_attribute_error():
  with pytest.raises(AttributeError, match="no attribute 'not_a_method'"):
    jbl.not_a_method  # pylint: disable=pointless-statement


def test_all_lists_importable_names_once():
  assert len(set(jbl.__all__)) == len(jbl.__all__)
  for name in jbl.__all__:
    assert hasattr(jbl, name), name
