"""The driver's unchecked fast path: new params taken from the method, history rows, diagnostics subsets."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbilevel as jbl
from jaxbilevel._src import base
from jaxbilevel._src import run as run_lib


def _problem():
  t = jnp.array([1.0, -2.0, 0.5])
  f = lambda x, y, batch: (0.5 * jnp.sum((y - t) ** 2)
                           + 0.05 * jnp.sum((x - 1.0) ** 2))
  g = lambda x, y, batch: 0.5 * jnp.sum((y - x) ** 2)
  p0 = jbl.BilevelParams(x=jnp.zeros(3), y=jnp.zeros(3))
  return f, g, p0


def _free(f, g, gamma=10.0):
  return jbl.pbgd_free(f, g, gamma=gamma, upper_optimizer=optax.adam(0.05),
                       lower_optimizer=optax.sgd(0.2))


def _manual(tx, params, num_steps, batch=None):
  """The optax loop a user would write: update, then apply_updates."""
  state = tx.init(params)
  for _ in range(num_steps):
    updates, state = tx.update(None, state, params, batch=batch)
    params = optax.apply_updates(params, updates)
  return params, state


def test_run_matches_the_optax_loop_for_every_penalty_method():
  f, g, p0 = _problem()
  common = dict(upper_optimizer=optax.sgd(0.05), lower_optimizer=optax.sgd(0.2))
  for tx in (_free(f, g),
             jbl.alt_pbgd(f, g, gamma=10.0, inner_steps=3, **common),
             jbl.v_pbgd(f, g, gamma=10.0, upper_optimizer=optax.sgd(0.05),
                        lower_optimizer=optax.sgd(0.02))):
    params, _, _ = jbl.run(tx, p0, num_steps=40)
    expected, _ = _manual(tx, p0, 40)
    # The driver uses the method's new iterates; the optax loop adds
    # new - old back to old: equal up to float32 rounding.
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_new_params_are_captured_only_from_a_bare_method():
  f, g, p0 = _problem()
  tx = _free(f, g)
  state = tx.init(p0)
  with base.capturing_new_params() as captured:
    updates, _ = tx.update(None, state, p0)
  new = base.captured_new_params(captured, p0, updates)
  np.testing.assert_allclose(new.x, p0.x + updates.x, atol=1e-7)
  np.testing.assert_allclose(new.y, p0.y + updates.y, atol=1e-7)
  # Updates changed by a wrapper, or other params: the driver falls back.
  scaled = jax.tree.map(lambda u: 0.5 * u, updates)
  assert base.captured_new_params(captured, p0, scaled) is None
  other = jbl.BilevelParams(x=jnp.ones(3), y=p0.y)
  assert base.captured_new_params(captured, other, updates) is None


def test_a_chain_after_the_method_is_applied_by_the_driver():
  f, g, p0 = _problem()
  tx = optax.chain(_free(f, g), optax.scale(0.5))
  params, _, _ = jbl.run(tx, p0, num_steps=30)
  expected, _ = _manual(tx, p0, 30)
  np.testing.assert_allclose(params.x, expected.x, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(params.y, expected.y, rtol=1e-5, atol=1e-7)
  unscaled, _, _ = jbl.run(_free(f, g), p0, num_steps=30)
  assert float(jnp.max(jnp.abs(params.x - unscaled.x))) > 1e-3


def test_apply_if_finite_still_skips_a_non_finite_step_under_run():
  f0, g, p0 = _problem()
  # f is NaN when batch["poison"] is 1: that step must leave params as they
  # were, although the method itself computed (NaN) new params.
  f = lambda x, y, batch: f0(x, y, batch) + jnp.where(
      batch["poison"] > 0, jnp.nan, 0.0) * jnp.sum(x)
  tx = jbl.apply_if_finite(_free(f, g), max_consecutive_errors=5)
  poison = jnp.array([0.0, 0.0, 1.0, 0.0])
  params, _, _ = jbl.run(tx, p0, num_steps=4, batches={"poison": poison})
  clean = jnp.array([0.0, 0.0, 0.0])
  expected, _, _ = jbl.run(tx, p0, num_steps=3, batches={"poison": clean})
  np.testing.assert_allclose(params.x, expected.x, rtol=1e-6, atol=1e-7)
  assert bool(jnp.all(jnp.isfinite(params.x)))


def test_compiled_init_equals_eager_init():
  f, g, p0 = _problem()
  for tx in (_free(f, g), jbl.f2sa(f, g, gamma=2.0, gamma_increment=0.5,
                                   upper_optimizer=optax.adam(0.01),
                                   lower_optimizer=optax.sgd(0.1))):
    eager, compiled = tx.init(p0), run_lib.init_state(tx, p0)
    assert jax.tree.structure(eager) == jax.tree.structure(compiled)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(compiled)):
      assert jnp.asarray(a).dtype == b.dtype
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_unchecked_chunks_number_their_steps(chunk_size):
  f, g, p0 = _problem()
  _, _, history = jbl.run(_free(f, g), p0, num_steps=25,
                          chunk_size=chunk_size)
  np.testing.assert_array_equal(history["step"], np.arange(25))
  for key in ("finite", "updates_finite", "state_finite"):
    assert history[key].shape == (25,) and history[key].all()


def test_diagnostics_by_name_record_only_those():
  f, g, p0 = _problem()
  tx = _free(f, g)
  _, state_all, all_ = jbl.run(tx, p0, num_steps=30, diagnostics=True)
  params, state_f, only_f = jbl.run(tx, p0, num_steps=30,
                                    diagnostics=("f",))
  assert "f" in only_f and "g" not in only_f and "gamma" not in only_f
  np.testing.assert_allclose(only_f["f"], all_["f"], rtol=1e-6)
  # The final state holds the last recorded values (and, for what is not
  # recorded, the values it started with).
  assert float(state_all.diagnostics["f"]) == pytest.approx(
      float(all_["f"][-1]))
  assert float(state_all.diagnostics["g"]) == pytest.approx(
      float(all_["g"][-1]))
  assert float(state_f.diagnostics["f"]) == pytest.approx(
      float(only_f["f"][-1]))
  assert float(state_f.diagnostics["g"]) == 0.0
  # scan_run and sweep take the same option; a string is one name.
  _, _, scanned = jbl.scan_run(tx, p0, num_steps=30, diagnostics="f")
  np.testing.assert_allclose(scanned["f"], all_["f"], rtol=1e-5)
  _, _, swept = jbl.sweep(lambda gamma: _free(f, g, gamma), p0,
                          {"gamma": jnp.array([10.0, 20.0])}, num_steps=30,
                          diagnostics=["f", "gamma"])
  np.testing.assert_allclose(swept["f"][0], all_["f"], rtol=1e-5)
  np.testing.assert_allclose(swept["gamma"][1], 20.0)
  assert swept["step"].shape == (2, 30)
  np.testing.assert_array_equal(swept["step"][1], np.arange(30))
  assert "g" not in swept


def test_diagnostics_option_errors_name_the_fix():
  f, g, p0 = _problem()
  tx = _free(f, g)
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"\['multiplier'\] not recorded.*records \['f'"):
    jbl.run(tx, p0, num_steps=3, diagnostics=("multiplier",))
  for bad in (3, (), [1.0]):
    with pytest.raises(jbl.BilevelValidationError,
                       match="diagnostics must be True, False or a non-empty"):
      jbl.run(tx, p0, num_steps=3, diagnostics=bad)


def test_a_nan_in_a_recorded_diagnostic_is_reported_by_name():
  f0, g, p0 = _problem()
  f = lambda x, y, batch: f0(x, y, batch) + 0.0 * jnp.log(x[0] - 5.0)
  with pytest.warns(RuntimeWarning, match="non-finite f at step 0"):
    jbl.run(_free(f, g), p0, num_steps=5, diagnostics=("f",))
