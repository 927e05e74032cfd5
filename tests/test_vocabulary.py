"""One vocabulary across methods (docs/vocabulary.md).

Every method is built from the same shared call plus only the arguments no
paper fixes; the defaults the papers fix equal their explicit values; old
names still work with a DeprecationWarning that names the new one and give
identical iterates; each method's diagnostics keys are the documented ones.

A cross-method suite: it stays one file, beside the files of the modules
(test_<module>.py).
"""

import inspect
import pathlib
import re
import warnings

import jax
import jax.numpy as jnp

import numpy as np
import optax
import pytest

import jaxbilevel as jbl

_DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "vocabulary.md"
_KEY = jax.random.PRNGKey(0)
_P0 = jbl.BilevelParams(x=jnp.array(0.0), y=jnp.array(0.0))


def _f(x, y, batch=None):
  del batch
  return 0.5 * (x - 1.0) ** 2 + 0.5 * (y - 2.0) ** 2


def _g(x, y, batch=None):
  del batch
  return 0.5 * (y - x) ** 2


def _c(x, y, batch=None):  # y <= 10: inactive near the solution
  del x, batch
  return jnp.atleast_1d(y - 10.0)


def _hyper_objective(x):
  """F(x) = f(x, y*(x)) with y*(x) = x; minimised at x* = 1.5."""
  return 0.5 * (x - 1.0) ** 2 + 0.5 * (x - 2.0) ** 2


def _shared():
  return dict(upper_optimizer=optax.sgd(0.1), lower_optimizer=optax.sgd(0.1))


# A value for each argument that no paper fixes (a method's
# required_arguments in jbl.METHODS); c is positional. F2SA starts from a
# larger penalty, which it needs to reach the check's progress in 20 steps.
_VALUES = {"gamma": 2.0, "c": _c, "dual_step_size": 0.1, "key": _KEY}
_OVERRIDES = {"f2sa": dict(gamma=10.0)}


def _extra(name):
  required = jbl.METHODS[name].required_arguments
  unknown = set(required) - set(_VALUES)
  assert not unknown, (
      f"{name} requires {sorted(unknown)}: give a value in _VALUES of "
      "tests/test_vocabulary.py")
  return {k: _OVERRIDES.get(name, {}).get(k, _VALUES[k]) for k in required}


# The arguments that no paper fixes, besides the shared call, for every
# method of the table.
_EXTRA = {name: _extra(name) for name in jbl.METHODS}
_SHARED_NAMES = {"f", "g", "upper_optimizer", "lower_optimizer"}


def _markdown_table(heading):
  """Rows of the first table under ``## heading`` in docs/vocabulary.md."""
  text = _DOC.read_text()
  section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
  rows = [line for line in section.splitlines() if line.startswith("| `")]
  return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def _names(cell):
  return set(re.findall(r"`([^`]+)`", cell))


def _build(name, **kwargs):
  extra = dict(_EXTRA[name])
  args = (_f, _g) + ((extra.pop("c"),) if "c" in extra else ())
  return getattr(jbl, name)(*args, **{**_shared(), **extra, **kwargs})


def test_required_arguments_are_the_documented_few():
  documented = {row[0].strip("`"): _names(row[1])
                for row in _markdown_table("The shared call")}
  assert set(documented) == set(_EXTRA)
  for name in _EXTRA:
    params = inspect.signature(getattr(jbl, name)).parameters
    required = {k for k, p in params.items()
                if p.default is inspect.Parameter.empty}
    assert required - _SHARED_NAMES == documented[name] == set(_EXTRA[name]), (
        name)


@pytest.mark.parametrize("name", sorted(_EXTRA))
def test_every_method_runs_from_the_shared_call(name):
  tx = _build(name)
  params, state, hist = jbl.run(tx, _P0, num_steps=20, diagnostics=True)
  # Every method lowers F(x) = f(x, y*(x)) from F(0) = 2.5 (min 0.25).
  assert float(_hyper_objective(params.x)) < 2.5 - 0.3, name
  # Its diagnostics are exactly the documented ones, all finite.
  documented = {row[0].strip("`"): _names(row[1])
                for row in _markdown_table("Diagnostics")}
  assert set(state.diagnostics) == documented[name]
  assert set(jbl.COMMON_DIAGNOSTICS) <= documented[name]
  for key in documented[name]:
    assert np.all(np.isfinite(hist[key])), (name, key)


def test_gamma_means_a_penalty_constant_only():
  for name in [n for n, m in jbl.METHODS.items() if not m.gamma_free]:
    _, _, hist = jbl.run(_build(name, gamma=7.0), _P0, num_steps=2,
                         diagnostics=True)
    np.testing.assert_array_equal(hist["gamma"], [7.0, 7.0])
  # F2SA's penalty weight on g grows by gamma_increment: still a gamma.
  _, _, hist = jbl.run(_build("f2sa", gamma=3.0, gamma_increment=0.5), _P0,
                       num_steps=3, diagnostics=True)
  np.testing.assert_allclose(hist["gamma"], [3.0, 3.5, 4.0])
  # BOME's multiplier is computed by the step (0 while g is at its minimum,
  # as at the start y = x = 0), not set: not a gamma.
  _, _, hist = jbl.run(_build("bome"), _P0, num_steps=2, diagnostics=True)
  assert "gamma" not in hist
  assert hist["multiplier"][0] == 0.0 and hist["multiplier"][1] > 0.0
  _, _, hist = jbl.run(_build("alright", probability=0.25), _P0, num_steps=2,
                       diagnostics=True)
  np.testing.assert_array_equal(hist["probability"], [0.25, 0.25])


def _final(tx, steps=3):
  params, state, _ = jbl.run(tx, _P0, num_steps=steps)
  return np.asarray([params.x, params.y]), state


@pytest.mark.parametrize("name, default, explicit", [
    ("bome", {}, dict(eta=0.5)),
    ("alright", {}, dict(probability=0.5)),
    ("fo_blo", {}, dict(inner_steps=5)),
    ("ufo_blo", {}, dict(inner_steps=5, correction_probability=0.2)),
    ("f2sa", dict(inner_steps=4), dict(inner_steps=4, value_steps=4)),
])
def test_defaults_are_the_papers_values(name, default, explicit):
  np.testing.assert_array_equal(_final(_build(name, **default))[0],
                                _final(_build(name, **explicit))[0])


def test_switching_from_alt_pbgd_to_f2sa_is_one_changed_name():
  # The call of docs/vocabulary.md: only the method's name changes, and
  # gamma means the same penalty weight on g. With a constant penalty both
  # converge to argmin F_gamma, F_gamma(x) = (x - 1)^2 / 2 + c (x - 2)^2 / 2
  # with c = gamma / (1 + gamma): x = (1 + 2c) / (1 + c) = 31 / 21 at 10.
  call = dict(gamma=10.0, upper_optimizer=optax.sgd(0.1),
              lower_optimizer=optax.sgd(0.1))
  for method in ("alt_pbgd", "f2sa"):
    params, _, hist = jbl.run(getattr(jbl, method)(_f, _g, **call), _P0,
                              num_steps=300, diagnostics=True)
    np.testing.assert_array_equal(hist["gamma"], np.full(300, 10.0))
    np.testing.assert_allclose(float(params.x), 31 / 21, atol=1e-6,
                               err_msg=method)


def _f2sa_final(**kwargs):
  tx = jbl.f2sa(_f, _g, inner_steps=2, **_shared(), **kwargs)
  params, state, hist = jbl.run(tx, _P0, num_steps=4, diagnostics=True)
  return (np.asarray([params.x, params.y]), np.asarray(state.y_g),
          float(state.gamma), hist["gamma"])


def test_f2sa_old_penalty_names_warn_and_give_identical_iterates():
  new = _f2sa_final(gamma=3.0, gamma_increment=0.5, gamma_max=4.2)
  with pytest.warns(DeprecationWarning) as caught:
    old = _f2sa_final(lambda0=3.0, lambda_increment=0.5, lambda_max=4.2)
  messages = {str(w.message) for w in caught}
  for old_name, new_name in [("lambda0", "gamma"),
                             ("lambda_increment", "gamma_increment"),
                             ("lambda_max", "gamma_max")]:
    assert any(f"argument {old_name} is deprecated" in m
               and f"use {new_name} instead" in m for m in messages), old_name
  for a, b in zip(old, new):
    np.testing.assert_array_equal(a, b)
  # The names matter: ramp 3.0, 3.5, 4.0, then capped at 4.2.
  np.testing.assert_array_equal(new[3], [3.0, 3.5, 4.0, 4.2])
  assert new[2] == 4.2


def test_f2sa_schedules_old_names_warn_and_give_the_same_schedules():
  new = jbl.f2sa_schedules("benchopt", inner_steps=10, gamma=3.0,
                           gamma_delta=0.5, gamma_exponent=0.25)
  with pytest.warns(DeprecationWarning) as caught:
    old = jbl.f2sa_schedules("benchopt", inner_steps=10, lambda0=3.0,
                             lambda_delta=0.5, lambda_exponent=0.25)
  messages = " ".join(str(w.message) for w in caught)
  for old_name, new_name in [("lambda0", "gamma"),
                             ("lambda_delta", "gamma_delta"),
                             ("lambda_exponent", "gamma_exponent")]:
    assert (f"argument {old_name} is deprecated and will be removed in the "
            f"next release; use {new_name} instead") in messages
  assert old.gamma == new.gamma == 3.0
  for k in (0, 3, 17):
    assert float(old.gamma_increment(k)) == float(new.gamma_increment(k))
    np.testing.assert_allclose(float(new.gamma_increment(k)),
                               0.5 * (k + 1.0) ** -0.25, rtol=1e-12)
  assert "gamma" in type(new)._fields and "lambda0" not in type(new)._fields
  with pytest.warns(DeprecationWarning, match="field lambda0 .*use gamma "):
    assert new.lambda0 == new.gamma
  with pytest.warns(DeprecationWarning,
                    match="field lambda_increment .*use gamma_increment"):
    assert new.lambda_increment is new.gamma_increment


def test_f2sa_value_steps_is_its_own_loop():
  one, _ = _final(_build("f2sa", inner_steps=3, value_steps=1))
  three, _ = _final(_build("f2sa", inner_steps=3))
  assert not np.allclose(one, three)


_ZERO_START = lambda x, y: jnp.zeros_like(y)

# (method, old keywords, new keywords, the new name the warning names)
_RENAMED = [
    ("alt_pbgd", dict(y_gamma_start="y_g"), dict(inner_start="y_g"),
     "inner_start"),
    ("bome", dict(inner_steps=3), dict(value_steps=3), "value_steps"),
    ("bome", dict(inner_start="current"), dict(value_start="y"),
     "value_start"),
    ("bome", dict(inner_start="previous"), dict(value_start="previous"),
     "value_start"),
    ("aid", dict(init=_ZERO_START), dict(inner_start=_ZERO_START),
     "inner_start"),
    ("itd", dict(warm_start=False), dict(inner_start="initial"),
     "inner_start"),
    ("itd", dict(warm_start=True), dict(inner_start="previous"),
     "inner_start"),
    ("itd", dict(init=_ZERO_START), dict(inner_start=_ZERO_START),
     "inner_start"),
    ("fo_blo", dict(init=_ZERO_START), dict(inner_start=_ZERO_START),
     "inner_start"),
    ("ufo_blo", dict(probability=0.5), dict(correction_probability=0.5),
     "correction_probability"),
    ("ufo_blo", dict(init=_ZERO_START), dict(inner_start=_ZERO_START),
     "inner_start"),
]


@pytest.mark.parametrize("name, old, new, new_name", _RENAMED)
def test_old_names_warn_and_give_identical_results(name, old, new, new_name):
  with pytest.warns(DeprecationWarning, match=f"use {new_name}"):
    tx_old = _build(name, **old)
  with warnings.catch_warnings():
    # Warned once, when built: the run rebuilds it inside its program
    # without repeating the warning.
    warnings.simplefilter("error", DeprecationWarning)
    old_result, _ = _final(tx_old)
  new_result, _ = _final(_build(name, **new))
  np.testing.assert_array_equal(old_result, new_result)


def test_the_start_option_changes_the_iterates():
  # Guards the renames above against a no-op mapping.
  warm, _ = _final(_build("itd", inner_start="previous", inner_steps=2))
  cold, _ = _final(_build("itd", inner_start="initial", inner_steps=2))
  assert not np.allclose(warm, cold)
  fresh, _ = _final(_build("bome", value_steps=2))
  carried, _ = _final(_build("bome", value_steps=2, value_start="previous"))
  assert not np.allclose(fresh, carried)


@pytest.mark.parametrize("name, old", [("v_pbgd", "omega"), ("bome", "y_hat"),
                                       ("f2sa", "z")])
def test_old_state_fields_warn_and_alias_y_g(name, old):
  _, state = _final(_build(name))
  with pytest.warns(DeprecationWarning, match=f"state field {old} .*use y_g"):
    value = getattr(state, old)
  np.testing.assert_array_equal(value, state.y_g)
  assert old not in type(state)._fields


def test_f2sa_state_gamma_and_schedule_step_sizes_renamed():
  _, state = _final(_build("f2sa"))
  with pytest.warns(DeprecationWarning,
                    match="state field lagrange_multiplier .*use gamma"):
    value = state.lagrange_multiplier
  np.testing.assert_array_equal(value, state.gamma)
  assert "lagrange_multiplier" not in type(state)._fields
  new = jbl.f2sa_schedules("paper", inner_steps=10, lower_step_size=0.1,
                           value_step_size=0.2)
  with pytest.warns(DeprecationWarning) as caught:
    old = jbl.f2sa_schedules("paper", inner_steps=10, lower_step=0.1,
                             value_step=0.2)
  messages = " ".join(str(w.message) for w in caught)
  for old_name in ("lower_step", "value_step"):
    assert f"argument {old_name} is deprecated" in messages
    assert f"use {old_name}_size instead" in messages
  for k in (0, 9, 10, 55):
    for field in ("lower", "value", "upper"):
      assert float(getattr(old, field)(k)) == float(getattr(new, field)(k))
  assert float(new.value(0)) == pytest.approx(0.2)
  assert float(new.lower(0)) == pytest.approx(0.1)


def test_an_old_name_with_its_new_one_is_an_error():
  with pytest.warns(DeprecationWarning), pytest.raises(
      jbl.BilevelValidationError, match="both inner_steps .* and value_steps"):
    _build("bome", inner_steps=2, value_steps=3)
  with pytest.warns(DeprecationWarning), pytest.raises(
      jbl.BilevelValidationError, match="both init .* and inner_start"):
    _build("itd", warm_start=False, init=_ZERO_START)
  with pytest.warns(DeprecationWarning), pytest.raises(
      jbl.BilevelValidationError, match="both lambda0 .* and gamma"):
    _build("f2sa", lambda0=3.0)


@pytest.mark.parametrize("call", [
    lambda: jbl.f2sa_schedules(lambda0=1.0, inner_steps=2),  # one decorator
    lambda: _build("itd", warm_start=False),  # two decorators
    lambda: _build("bome", inner_start="current"),
    lambda: _build("alt_pbgd", y_gamma_start="y_g"),
], ids=["f2sa_schedules", "itd", "bome", "alt_pbgd"])
def test_deprecation_warnings_point_at_the_callers_line(call):
  # The warning is attributed to this file (the line that calls the
  # builder), not to jaxbilevel's decorators or to sys:1, so Python's default
  # filters (which show DeprecationWarning in __main__ code) show it.
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    call()
  deprecations = [w for w in caught
                  if issubclass(w.category, DeprecationWarning)]
  assert deprecations
  assert all(w.filename == __file__ for w in deprecations), [
      (w.filename, w.lineno) for w in deprecations]


@pytest.mark.parametrize("name, old, hint", [
    ("itd", dict(warm_start=False), "use inner_start='initial' instead"),
    ("itd", dict(warm_start=True), "use inner_start='previous' instead"),
    ("bome", dict(inner_start="current"), "use value_start='y' instead"),
    ("bome", dict(inner_start="previous"),
     "use value_start='previous' instead"),
    ("itd", dict(init=_ZERO_START), "use inner_start instead"),
])
def test_converted_deprecations_name_the_new_value(name, old, hint):
  with pytest.warns(DeprecationWarning, match=re.escape(hint)):
    _build(name, **old)


@pytest.mark.parametrize("fn, old, new", [
    (lambda **kw: jbl.hypergradient.conjugate_gradient(
        lambda v: 2.0 * v, jnp.ones(2), **kw), "num_iters", "num_steps"),
    (lambda **kw: jbl.hypergradient.neumann(
        lambda v: 2.0 * v, jnp.ones(2), step=0.25, **kw), "num_terms",
     "num_steps"),
    (lambda **kw: jbl.hypergradient.implicit_hypergradient(
        _f, _g, jnp.array(0.5), jnp.array(0.5), **kw), "num_iters",
     "linear_steps"),
    (lambda **kw: jbl.hypergradient.implicit_solution(
        _g, jnp.array(0.5), jnp.array(0.5), **kw), "num_iters",
     "linear_steps"),
])
def test_renamed_loop_lengths_of_the_solver_functions(fn, old, new):
  with pytest.warns(DeprecationWarning, match=f"argument {old} .*use {new}"):
    with_old = fn(**{old: 3})
  for a, b in zip(jax.tree.leaves(with_old), jax.tree.leaves(fn(**{new: 3})),
                  strict=True):
    np.testing.assert_array_equal(a, b)


def test_loop_lengths_follow_the_naming_rule():
  # docs/vocabulary.md, "Loop lengths": a function that runs one loop takes
  # num_steps; a method names each of its loops <loop>_steps. No *_iters,
  # *_terms or num_<loop> besides num_steps.
  modules = [jbl, jbl.hypergradient, jbl.constrained, jbl.objectives,
             jbl.evaluation, jbl.flatness]
  bad = []
  for module in modules:
    for name in getattr(module, "__all__", dir(module)):
      obj = getattr(module, name, None)
      if not callable(obj) or isinstance(obj, type):
        continue
      try:
        params = inspect.signature(obj).parameters
      except (TypeError, ValueError):
        continue
      for p in params:
        if p.endswith(("_iters", "_terms")) or (
            p.startswith("num_") and p not in (
                "num_steps", "num_constraints", "num_microbatches")):
          bad.append(f"{module.__name__}.{name}({p}=)")
  assert not bad, bad
