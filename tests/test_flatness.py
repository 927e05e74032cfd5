"""Flatness diagnostics (docs/methods.md; problems A1 and A2 of docs/problems.md)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _helpers import blocc_toy_method as _blocc_toy_method
import jaxbilevel as jbl
from jaxbilevel import flatness
from jaxbilevel import problems


@functools.lru_cache(maxsize=None)
def dpo_sft_trajectory():
  """ALT-PBGD on the DPO/SFT toy: gamma 16, 10 + 10 inner SGD steps at 1e-2, 5 000 steps."""
  prob = problems.dpo_sft_toy(jnp.float64)
  tx = jbl.alt_pbgd(prob.f, prob.g, gamma=16.0,
                    upper_optimizer=optax.sgd(1e-2),
                    lower_optimizer=optax.sgd(1e-2), inner_steps=10)
  _, _, history = jbl.run(tx, prob.params0, num_steps=5000,
                          record=flatness.record_trackers)
  return prob, history


@functools.lru_cache(maxsize=None)
def negative_trajectory():
  """ALT-PBGD on the negative example (A1 in docs/problems.md), gamma 15."""
  prob = problems.negative_example(jnp.float64)
  box = jbl.projections.box(*prob.info["box"])
  tx = jbl.alt_pbgd(prob.f, prob.g, gamma=15.0,
                    upper_optimizer=optax.sgd(0.01),
                    lower_optimizer=optax.sgd(0.01), inner_steps=100,
                    inner_start="y_g", proj_x=box, proj_y=box)
  _, _, history = jbl.run(tx, prob.params0, num_steps=1000,
                          record=flatness.record_trackers)
  return prob, history


def test_dpo_sft_toy_is_flat_with_golden_values():
  prob, history = dpo_sft_trajectory()
  traj = flatness.trajectory_from_history(history, every=100,
                                          x0=prob.params0.x)
  assert traj[0].shape == (50,)
  report = flatness.flatness_report(prob.f, *traj, g=prob.g, gamma=16.0)
  for (c, alpha), (max_golden, mean_golden) in {
      (0.5, 1.5): (2.2e-4, 4.4e-6),
      (1.0, 1.5): (2.0e-4, 4.0e-6),
      (0.5, 1.2): (8.2e-5, 1.6e-6)}.items():
    max_d, mean_d = report.at(c, alpha)
    np.testing.assert_allclose(max_d, max_golden, rtol=0.1)
    np.testing.assert_allclose(mean_d, mean_golden, rtol=0.1)
  np.testing.assert_allclose(report.lipschitz_proxy.max(), 0.197, rtol=0.1)
  record = history["record"]
  np.testing.assert_allclose(abs(record["y_g"][-1] - record["y_gamma"][-1]),
                             0.1446, rtol=0.1)
  assert report.flat
  assert "FLAT: " in report.summary() and "expected to be small" in (
      report.summary())
  assert report.delta.shape == (50, 4, 4)
  assert np.all(report.delta >= 0)
  assert "dropped correction" in report.summary()
  assert report.bias_norm.shape == report.direction_norm.shape == (50,)


def test_negative_example_is_not_flat():
  prob, history = negative_trajectory()
  traj = flatness.trajectory_from_history(history, every=100,
                                          x0=prob.params0.x)
  report = flatness.flatness_report(prob.f, *traj, g=prob.g, gamma=15.0)
  assert not report.flat
  assert "NOT FLAT" in report.summary()
  # f is linear in y: |f(x, y_g) - f(x, y_gamma)| = 10 |y_g - y_gamma|, so
  # delta = 10 d - c d^alpha exactly, for every grid point.
  d = report.distance
  np.testing.assert_allclose(report.value_gap, 10 * d, rtol=1e-12)
  expected = np.maximum(
      10 * d[:, None, None] - report.c[None, :, None] * d[:, None, None] ** (
          report.alpha[None, None, :]), 0.0)
  np.testing.assert_allclose(report.delta, expected, rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(report.lipschitz_proxy, 10.0)
  # g = (y - x + 1)^2: b_gamma = gamma * 2 |y_gamma - y_g| (10 when exact).
  np.testing.assert_allclose(report.bias_norm, 2 * 15.0 * d, rtol=1e-12)
  np.testing.assert_allclose(report.direction_norm,
                             2 * np.abs(np.asarray(traj[0])), rtol=1e-12)
  # The residual is a sizeable fraction of the Lipschitz proxy.
  assert report.best[2] > 0.2 * 10.0


def test_batched_evaluation_and_unshifted_history_agree():
  prob, history = dpo_sft_trajectory()
  traj = flatness.trajectory_from_history(history, every=500)
  full = flatness.flatness_report(prob.f, *traj, c=(0.5,), alpha=(1.5,))
  chunked = flatness.flatness_report(prob.f, *traj, c=(0.5,), alpha=(1.5,),
                                     batch_size=3)
  np.testing.assert_allclose(full.delta, chunked.delta, rtol=1e-12)
  np.testing.assert_allclose(full.lipschitz_proxy, chunked.lipschitz_proxy,
                             rtol=1e-12)
  # Without x0 the recorded (next) iterate is used; with x0 it is shifted.
  shifted = flatness.trajectory_from_history(history, every=500, x0=5.0)
  np.testing.assert_allclose(shifted[0][0], 5.0)
  np.testing.assert_allclose(shifted[0][1:], history["record"]["x"][499:-1:500])
  np.testing.assert_allclose(traj[0], history["record"]["x"][::500])


def test_matches_flatness_residual_pointwise():
  prob, history = dpo_sft_trajectory()
  xs, y_gs, y_gams = flatness.trajectory_from_history(history, every=1000)
  report = flatness.flatness_report(prob.f, xs, y_gs, y_gams, c=(0.1, 2.0),
                                    alpha=(1.3,))
  for t in range(len(xs)):
    for i, c in enumerate((0.1, 2.0)):
      np.testing.assert_allclose(
          report.delta[t, i, 0],
          jbl.objectives.flatness_residual(prob.f, xs[t], y_gs[t], y_gams[t],
                                           c, 1.3), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(report.lipschitz_proxy[t], abs(
        jax.grad(prob.f, argnums=1)(xs[t], y_gs[t])), rtol=1e-12)


def test_pytree_trackers_from_pbgd_blocc_history():
  prob = problems.blocc_toy(1, jnp.float64)
  tx = _blocc_toy_method(jbl.pbgd_blocc, prob, dual_steps=10,
                         proj_x=jbl.projections.box(0.0, 3.0))
  _, _, history = jbl.run(tx, prob.params0, num_steps=20,
                          record=flatness.record_trackers)
  report = flatness.flatness_report(
      prob.f, *flatness.trajectory_from_history(history, every=5))
  assert report.delta.shape == (4, 4, 4)
  assert np.all(np.isfinite(report.delta))


def test_invalid_inputs_fail_clearly():
  f = lambda x, y, batch: x ** 2 + y
  xs = jnp.zeros(3)
  with pytest.raises(jbl.BilevelValidationError, match="samples"):
    flatness.flatness_report(f, xs, jnp.zeros(3), jnp.zeros(4))
  with pytest.raises(jbl.BilevelValidationError, match="alpha"):
    flatness.flatness_report(f, xs, xs, xs, alpha=(1.0,))
  with pytest.raises(jbl.BilevelValidationError, match="c must"):
    flatness.flatness_report(f, xs, xs, xs, c=())
  with pytest.raises(jbl.BilevelValidationError, match="leading"):
    flatness.flatness_report(f, jnp.zeros(()), xs, xs)
  with pytest.raises(jbl.BilevelValidationError, match="both g and gamma"):
    flatness.flatness_report(f, xs, xs, xs, g=f)
  with pytest.raises(jbl.BilevelValidationError, match="schedule"):
    flatness.flatness_report(f, xs, xs, xs, g=f, gamma=lambda t: 1.0)
  with pytest.raises(KeyError):
    flatness.flatness_report(f, xs, xs, xs).at(3.0, 1.5)
  with pytest.raises(jbl.BilevelValidationError, match="record_trackers"):
    flatness.trajectory_from_history({"f": np.zeros(3)})
  state = jbl.pbgd_free(f, f, gamma=1.0, upper_optimizer=optax.sgd(0.1),
                        lower_optimizer=optax.sgd(0.1)).init(
                            jbl.BilevelParams(jnp.zeros(()), jnp.zeros(())))
  with pytest.raises(jbl.BilevelValidationError, match="y_g"):
    flatness.record_trackers(jbl.BilevelParams(0.0, 0.0), state)
