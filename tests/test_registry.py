"""The method table (``jbl.METHODS``) against the methods it describes.

Every public method is in the table and every entry is a public method; each
property of an entry is checked against what the method does on a scalar
problem: its state and diagnostics, ``gamma`` (a penalty constant, also
``"auto"``), its random key, its coupled constraint, its value tracker, and
whether its step takes second derivatives of ``g`` (run with a ``g`` whose
second derivative raises). The documentation's generated tables must be the
table's.
"""

import importlib.util
import inspect
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbilevel as jbl
from jaxbilevel._src import registry

_ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = list(jbl.METHODS)
_P0 = jbl.BilevelParams(x=jnp.array(0.0), y=jnp.array(0.0))
_KEY = jax.random.PRNGKey(0)


def _f(x, y, batch=None):
  del batch
  return 0.5 * (x - 1.0) ** 2 + 0.5 * (y - 2.0) ** 2


def _g(x, y, batch=None):
  """argmin_y g(x, y) = x / 1.5: not the start x of FO-BLO's inner loop."""
  del batch
  return 0.5 * (y - x) ** 2 + 0.25 * y ** 2


def _c_inactive(x, y, batch=None):
  del x, batch
  return jnp.atleast_1d(y - 10.0)


def _c_active(x, y, batch=None):  # y <= 0.5 cuts off the solutions' y ~ 1
  del x, batch
  return jnp.atleast_1d(y - 0.5)


# A value for each argument that some method requires besides the shared
# call (MethodInfo.required_arguments). A new method whose required argument
# is not here fails test_every_method_builds_from_the_shared_call.
_REQUIRED_VALUES = {"gamma": 2.0, "c": _c_inactive, "dual_step_size": 0.1,
                    "key": _KEY}


def _build(name, f=_f, g=_g, **kwargs):
  info = jbl.METHODS[name]
  missing = set(info.required_arguments) - set(_REQUIRED_VALUES) - set(kwargs)
  assert not missing, (
      f"{name} requires {sorted(missing)}: give a value in _REQUIRED_VALUES "
      "of tests/test_registry.py")
  required = {k: _REQUIRED_VALUES[k] for k in info.required_arguments}
  required.update(kwargs)
  args = (f, g) + ((required.pop("c"),) if "c" in required else ())
  return info.constructor(*args, upper_optimizer=optax.sgd(0.1),
                          lower_optimizer=optax.sgd(0.1), **required)


# ---------------------------------------------------------------------------
# The table lists exactly the public methods.
# ---------------------------------------------------------------------------


def _is_method_constructor(obj):
  # The public constructors are wrapped by programs.bilevel_method, whose
  # signature records the method.
  return callable(obj) and hasattr(getattr(obj, "__signature__", None),
                                   "method")


def test_every_public_method_is_in_the_table_and_vice_versa():
  public = {name for name in jbl.__all__
            if _is_method_constructor(getattr(jbl, name))}
  # A general constructor (hypergradient_descent) has no entry of its own:
  # its presets do, one per adjoint.
  general = {m.preset_of for m in jbl.METHODS.values()} - {None}
  assert not general & set(jbl.METHODS)
  assert public == set(jbl.METHODS) | general, (
      "add the method to _ENTRIES in jaxbilevel/_src/registry.py",
      public ^ (set(jbl.METHODS) | general))
  for name, info in jbl.METHODS.items():
    assert info.name == name
    assert info.constructor is getattr(jbl, name)
    assert getattr(jbl, info.state.__name__) is info.state
    assert info.state.__name__ in jbl.__all__
    assert info.label and info.label != name


def test_the_shared_test_tables_cover_every_method():
  # The settings that other test files keep per method, keyed by the table:
  # a method of the table without them fails here, naming the file.
  import _helpers  # pylint: disable=g-import-not-at-top
  import test_bad_input  # pylint: disable=g-import-not-at-top
  assert set(_helpers.CASES) == set(jbl.METHODS), (
      "add the method's ridge settings to _SETTINGS in tests/_helpers.py")
  assert set(test_bad_input.METHODS) == set(jbl.METHODS), (
      "add a builder to METHODS in tests/test_bad_input.py")


def test_the_table_is_read_only():
  with pytest.raises(TypeError):
    jbl.METHODS["mine"] = jbl.METHODS["itd"]  # type: ignore[index]
  with pytest.raises(AttributeError):
    jbl.METHODS["itd"].needs_hvp = False  # type: ignore[misc]


def test_required_arguments_follow_the_signature():
  assert jbl.METHODS["pbgd_free"].required_arguments == ("gamma",)
  assert jbl.METHODS["pbgd_blocc"].required_arguments == (
      "c", "gamma", "dual_step_size")
  assert jbl.METHODS["ufo_blo"].required_arguments == ("key",)
  assert jbl.METHODS["itd"].required_arguments == ()


@pytest.mark.parametrize("name", NAMES)
def test_every_method_builds_from_the_shared_call(name):
  info = jbl.METHODS[name]
  tx = _build(name)
  params, state, hist = jbl.run(tx, _P0, num_steps=3, diagnostics=True)
  assert type(state) is info.state  # pylint: disable=unidiomatic-typecheck
  assert registry.method_of_state(state) is info
  # The diagnostics are exactly the listed ones.
  assert set(state.diagnostics) == set(info.diagnostics)
  assert len(set(info.diagnostics)) == len(info.diagnostics)
  assert info.diagnostics[:len(jbl.COMMON_DIAGNOSTICS)] == (
      jbl.COMMON_DIAGNOSTICS)
  for key in info.diagnostics:
    assert hist[key].shape == (3,) and np.all(np.isfinite(hist[key])), key
  np.testing.assert_allclose(hist["f"][0], 2.5)  # f(0, 0)
  assert float(params.x) != 0.0


# ---------------------------------------------------------------------------
# penalty, gamma_free.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_penalty_methods_record_their_penalty_weight(name):
  info = jbl.METHODS[name]
  weights = {"gamma", "multiplier"} & set(info.diagnostics)
  assert bool(weights) == info.penalty, (name, weights)
  if info.penalty:
    # The recorded weight is positive once g is off its minimum (BOME's
    # multiplier is 0 while it is at it, as at the start y = x = 0).
    _, _, hist = jbl.run(_build(name), _P0, num_steps=4, diagnostics=True)
    (weight,) = weights
    assert np.max(hist[weight]) > 0.0, (name, hist[weight])


@pytest.mark.parametrize("name", NAMES)
def test_gamma_is_an_argument_and_a_diagnostic_unless_gamma_free(name):
  info = jbl.METHODS[name]
  takes_gamma = "gamma" in inspect.signature(info.constructor).parameters
  assert takes_gamma == (not info.gamma_free)
  assert ("gamma" in info.diagnostics) == (not info.gamma_free)
  if info.gamma_free:
    with pytest.raises(TypeError, match="gamma"):
      _build(name, gamma=3.0)
    return
  assert info.penalty  # a gamma is a penalty constant (docs/vocabulary.md)
  runs = {}
  for gamma in (3.0, 7.0):
    params, _, hist = jbl.run(_build(name, gamma=gamma), _P0, num_steps=3,
                              diagnostics=True)
    np.testing.assert_array_equal(hist["gamma"], np.full(3, gamma))
    runs[gamma] = np.asarray([params.x, params.y])
  assert not np.allclose(runs[3.0], runs[7.0])  # gamma changes the iterates


@pytest.mark.parametrize("name", [n for n, m in jbl.METHODS.items()
                                  if not m.gamma_free])
def test_gamma_auto_grows_the_penalty(name):
  info = jbl.METHODS[name]
  settings = jbl.GammaContinuation(start=2.0, factor=2.0, max=8.0,
                                   patience=2, check_every=1)
  _, state, hist = jbl.run(_build(name, gamma=settings), _P0, num_steps=60,
                           diagnostics=("gamma",))
  assert isinstance(state, jbl.ContinuationState)
  assert type(state.inner_state) is info.state  # pylint: disable=unidiomatic-typecheck
  assert registry.method_of_state(state) is info
  assert hist["gamma"][0] == 2.0 and hist["gamma"][-1] == 8.0


# ---------------------------------------------------------------------------
# stochastic.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_stochastic_methods_take_a_key_and_depend_on_it(name):
  info = jbl.METHODS[name]
  assert ("key" in inspect.signature(info.constructor).parameters) == (
      info.stochastic)
  assert ("key" in info.state._fields) == info.stochastic
  if not info.stochastic:
    return
  xs = []
  for seed in (0, 1):
    params, state, _ = jbl.run(_build(name, key=jax.random.PRNGKey(seed)),
                               _P0, num_steps=10)
    xs.append(float(params.x))
    # The state carries the key forward: it is no longer the one given.
    assert not np.array_equal(jax.random.key_data(state.key),
                              jax.random.key_data(jax.random.PRNGKey(seed)))
  assert xs[0] != xs[1], (name, xs)


# ---------------------------------------------------------------------------
# constraints.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_constraint_methods_take_c_and_respect_it(name):
  info = jbl.METHODS[name]
  parameters = list(inspect.signature(info.constructor).parameters)
  assert ("c" in parameters) == info.constraints
  assert ("constraint_violation" in info.diagnostics) == info.constraints
  if not info.constraints:
    return
  assert parameters[:3] == ["f", "g", "c"]
  ys = {}
  for label, c in (("inactive", _c_inactive), ("active", _c_active)):
    params, _, hist = jbl.run(
        _build(name, c=c, gamma=4.0, dual_steps=20, primal_steps=3), _P0,
        num_steps=300, diagnostics=True)
    ys[label] = float(params.y)
  # With y <= 10 (inactive) y settles at 0.86 (PBGD-Free-CC) or more; y <= 0.5
  # holds it at the bound.
  assert ys["inactive"] > 0.8, ys
  assert ys["active"] < 0.5 + 0.05, ys
  assert hist["constraint_violation"][-1] < 0.05


# ---------------------------------------------------------------------------
# value_tracker.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_value_trackers_track_the_lower_solution(name):
  info = jbl.METHODS[name]
  assert ("y_g" in info.state._fields) == info.value_tracker
  if not info.value_tracker:
    return
  params, state, _ = jbl.run(_build(name), _P0, num_steps=300)
  # argmin_y g(x, y) = x / 1.5.
  np.testing.assert_allclose(float(state.y_g), float(params.x) / 1.5,
                             atol=1e-3)


# ---------------------------------------------------------------------------
# needs_hvp: a g whose first derivatives work and whose second raise.
# ---------------------------------------------------------------------------


class SecondDerivativeError(Exception):
  pass


@jax.custom_vjp
def _first_order_only(v):
  """Identity whose derivative raises: g's gradient is not differentiable."""
  return v


def _first_order_only_fwd(v):
  return v, None


def _first_order_only_bwd(residual, cotangent):
  del residual, cotangent
  raise SecondDerivativeError("a second derivative of g was taken")


_first_order_only.defvjp(_first_order_only_fwd, _first_order_only_bwd)


@jax.custom_vjp
def _g_core(x, y):
  return _g(x, y)


def _g_core_fwd(x, y):
  return _g_core(x, y), (x, y)


def _g_core_bwd(residual, cotangent):
  x, y = residual
  d, e = _first_order_only(y - x), _first_order_only(y)
  return -cotangent * d, cotangent * (d + 0.5 * e)


_g_core.defvjp(_g_core_fwd, _g_core_bwd)


def _g_first_order(x, y, batch=None):
  """_g, whose gradient works and whose gradient's derivative raises.

  Reverse-over-reverse differentiates ``_g_core_bwd`` and reaches
  ``_first_order_only``'s backward pass; forward mode (an HVP as the JVP of
  a gradient, or a JVP of g) is refused by JAX for a ``custom_vjp``.
  """
  del batch
  return _g_core(x, y)


def test_the_first_order_g_refuses_exactly_second_derivatives():
  x, y = jnp.array(0.3), jnp.array(-0.2)
  np.testing.assert_allclose(_g_first_order(x, y), _g(x, y))
  np.testing.assert_allclose(jax.grad(_g_first_order, (0, 1))(x, y),
                             jax.grad(_g, (0, 1))(x, y))
  grad_y = jax.grad(_g_first_order, 1)
  with pytest.raises(SecondDerivativeError):
    jax.grad(grad_y, 1)(x, y)
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(lambda v: grad_y(x, v), (y,), (jnp.array(1.0),))


@pytest.mark.parametrize("name", NAMES)
def test_needs_hvp_is_whether_the_step_differentiates_grad_g(name):
  info = jbl.METHODS[name]
  run = lambda g: jbl.run(_build(name, g=g), _P0, num_steps=3,
                          diagnostics=True)
  if info.needs_hvp:
    with pytest.raises((SecondDerivativeError, TypeError),
                       match="second derivative|forward-mode"):
      run(_g_first_order)
    return
  # Gradients only: the same iterates as with the ordinary g.
  params, state, hist = run(_g_first_order)
  plain_params, plain_state, plain_hist = run(_g)
  np.testing.assert_allclose(np.asarray([params.x, params.y]),
                             np.asarray([plain_params.x, plain_params.y]),
                             rtol=1e-12, atol=1e-12)
  for key in info.diagnostics:
    np.testing.assert_allclose(hist[key], plain_hist[key], rtol=1e-12,
                               atol=1e-12)
  del state, plain_state


# ---------------------------------------------------------------------------
# The documentation's tables are generated from the table.
# ---------------------------------------------------------------------------


def _method_tables():
  path = _ROOT / "docs" / "method_tables.py"
  spec = importlib.util.spec_from_file_location("_method_tables", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_docs_tables_are_the_registry():
  tables = _method_tables()
  assert tables.stale_pages() == [], (
      "the method tables in docs/ differ from jaxbilevel.METHODS: run "
      "python docs/method_tables.py")
  text = (_ROOT / "docs" / "choosing.md").read_text()
  for info in jbl.METHODS.values():
    assert f"| {info.label} | `jbl.{info.name}` |" in text


def test_every_method_has_a_row_in_the_cost_table():
  # docs/methods.md's per-method costs are written by hand (formulas the
  # table cannot generate); a method of the table must have its row.
  text = (_ROOT / "docs" / "methods.md").read_text()
  section = text[text.index("| method | direction |"):].split("\n\n", 1)[0]
  rows = [line for line in section.splitlines() if line.startswith("| ")]
  for info in jbl.METHODS.values():
    assert any(re.match(rf"\| {re.escape(info.label)}[ -]", row)
               for row in rows), (
                   f"add {info.label}'s costs to the table of docs/methods.md")


def test_the_shared_names_list_the_methods_with_the_property():
  # docs/vocabulary.md's "Shared names" lists, per name, the methods that
  # have it; these rows are the table's properties.
  text = (_ROOT / "docs" / "vocabulary.md").read_text()
  section = text.split("## Shared names\n", 1)[1].split("\n## ", 1)[0]
  rows = {}
  for line in section.splitlines():
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    if line.startswith("| `"):
      rows[cells[0]] = cells[2]
  expected = {
      "`gamma`": [n for n, m in jbl.METHODS.items() if not m.gamma_free],
      "`key`": [n for n, m in jbl.METHODS.items() if m.stochastic],
      "`state.y_g`": [n for n, m in jbl.METHODS.items() if m.value_tracker],
  }
  for row, names in expected.items():
    assert set(re.findall(r"`([a-z0-9_]+)`", rows[row])) == set(names), row


def test_the_generator_rewrites_a_stale_table(tmp_path, monkeypatch):
  tables = _method_tables()
  page = tmp_path / "vocabulary.md"
  original = (_ROOT / "docs" / "vocabulary.md").read_text()
  page.write_text(original.replace("| `itd` | |", "| `itd_old` | |"))
  monkeypatch.setattr(tables, "_DOCS", tmp_path)
  monkeypatch.setattr(tables, "TABLES",
                      {"vocabulary.md": tables.TABLES["vocabulary.md"]})
  assert tables.stale_pages() == ["vocabulary.md"]
  assert tables.main(["--check"]) == 1
  assert tables.main([]) == 0
  assert page.read_text() == original
  page.write_text("no markers")
  with pytest.raises(ValueError, match="BEGIN method-table: shared-call"):
    tables.rendered("vocabulary.md")
