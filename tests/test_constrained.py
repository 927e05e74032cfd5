"""Coupled-constraint lower levels (jaxbilevel.constrained): the primal-dual
solver and the multiplier-aware value gradient (G4 in docs/methods.md).

The polyhedral problem with exact answers is in _helpers.py (shared with
test_pbgd_blocc.py, which tests the methods built on this module).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _helpers import central_difference
from _helpers import exact_f_gamma
from _helpers import exact_lower
from _helpers import exact_penalized
from _helpers import poly_c
from _helpers import poly_f
from _helpers import poly_g
from _helpers import X_MIXED
import jaxbilevel as jbl
from jaxbilevel import constrained


def _solve_lower(x, dual_steps=400):
  opt = optax.sgd(0.5)
  y0 = jnp.zeros(3)
  return constrained.primal_dual_solve(
      lambda y: poly_g(x, y), lambda y: poly_c(x, y), y0, jnp.zeros(4),
      opt.init(y0), optimizer=opt, dual_step_size=0.2, dual_steps=dual_steps,
      primal_steps=3)


def test_primal_dual_solve_finds_the_mixed_active_set():
  y, mu, _, trace = _solve_lower(jnp.asarray(X_MIXED))
  y_star, mu_star, _ = exact_lower(X_MIXED)
  assert np.all(mu_star[[0, 2]] > 0.1) and np.all(mu_star[[1, 3]] == 0)
  np.testing.assert_allclose(y, y_star, atol=1e-6)
  np.testing.assert_allclose(mu, mu_star, atol=1e-6)
  assert trace.violation.shape == (400,)
  assert float(trace.violation[-1]) < 1e-6
  assert float(trace.violation[0]) > 0.1  # the start y = 0 is infeasible
  assert float(trace.complementarity[-1]) < 1e-6
  assert trace.inner.value.shape == (400, 3)


def test_multiplier_floor_keeps_inactive_multipliers_at_the_floor():
  x = jnp.asarray(X_MIXED)
  opt = optax.sgd(0.5)
  _, mu, _, _ = constrained.primal_dual_solve(
      lambda y: poly_g(x, y), lambda y: poly_c(x, y), jnp.zeros(3),
      jnp.zeros(4), opt.init(jnp.zeros(3)), optimizer=opt,
      dual_step_size=0.2, dual_steps=400, primal_steps=3,
      multiplier_floor=1e-5)
  mu = np.asarray(mu)
  np.testing.assert_allclose(mu[[1, 3]], 1e-5, rtol=1e-12)
  np.testing.assert_allclose(mu[[0, 2]], exact_lower(X_MIXED)[1][[0, 2]],
                             atol=1e-4)


def test_value_function_grad_matches_finite_differences_on_the_active_set():
  x = jnp.asarray(X_MIXED)
  v = lambda z: exact_lower(z)[2]
  expected = central_difference(v, X_MIXED)
  y_star, mu_star, _ = exact_lower(X_MIXED)
  exact = constrained.value_function_grad(poly_g, poly_c, x, y_star, mu_star)
  np.testing.assert_allclose(exact, expected, atol=1e-7)
  y, mu, _, _ = _solve_lower(x)
  np.testing.assert_allclose(
      constrained.value_function_grad(poly_g, poly_c, x, y, mu), expected,
      atol=1e-5)
  # The partial derivative alone misses B^T mu_g.
  partial = jax.grad(poly_g)(x, y_star)
  assert np.linalg.norm(partial - expected) > 0.1


@pytest.mark.parametrize("gamma", [3.0, 10.0, 100.0])
def test_coupled_penalty_gradient_is_the_reduced_penalty_gradient(gamma):
  x = jnp.asarray(X_MIXED)
  y_g, mu_g, _ = exact_lower(X_MIXED)
  y_f, mu_f = exact_penalized(X_MIXED, gamma)
  penalty = constrained.coupled_value_gap_penalty(poly_f, poly_g, poly_c)
  value, grad = jax.value_and_grad(penalty)(x, y_f, mu_f, y_g, mu_g, gamma)
  np.testing.assert_allclose(value, exact_f_gamma(X_MIXED, gamma), rtol=1e-12)
  np.testing.assert_allclose(
      grad, central_difference(lambda z: exact_f_gamma(z, gamma), X_MIXED),
      atol=1e-6)


# --- problem A5 of docs/problems.md -------------------------------------------


def test_multiplier_identity_a5():
  prob = jbl.problems.multiplier_identity(jnp.float64)
  c, v = prob.info["c"], prob.info["v"]
  # At x = 1: grad_x g = -4, mu_g = 2, grad v = 2 (exact saddle point).
  assert float(jax.grad(prob.g)(1.0, 3.0)) == -4.0
  np.testing.assert_allclose(
      constrained.value_function_grad(prob.g, c, 1.0, 3.0, jnp.array([2.0])),
      2.0, atol=1e-12)

  def maxmin(x):
    opt = optax.sgd(0.1)
    y, mu, _, _ = constrained.primal_dual_solve(
        lambda y: prob.g(x, y), lambda y: c(x, y), jnp.asarray(0.0),
        jnp.zeros(1), opt.init(0.0), optimizer=opt, dual_step_size=0.1,
        dual_steps=500, primal_steps=2)
    return y, mu

  y, mu = maxmin(1.0)
  np.testing.assert_allclose([y, mu[0]], [3.0, 2.0], atol=1e-3)
  np.testing.assert_allclose(
      constrained.value_function_grad(prob.g, c, 1.0, y, mu), 2.0, atol=1e-3)
  xs = jnp.linspace(-1.5, 2.0, 8)
  expected = jax.vmap(jax.grad(v))(xs)
  np.testing.assert_allclose(expected[0], 0.0)  # x = -1.5: inactive
  exact = jax.vmap(lambda x: constrained.value_function_grad(
      prob.g, c, x, prob.info["y_g"](x), prob.info["mu_g"](x)[None]))(xs)
  np.testing.assert_allclose(exact, expected, atol=1e-12)
  ys, mus = jax.vmap(maxmin)(xs)
  approx = jax.vmap(lambda x, y, mu: constrained.value_function_grad(
      prob.g, c, x, y, mu))(xs, ys, mus)
  np.testing.assert_allclose(approx, expected, atol=1e-3)
  np.testing.assert_allclose(
      constrained.value_function_grad(prob.g, c, -1.0, -2.0, jnp.zeros(1)),
      0.0)


# --- validation -------------------------------------------------------------


def test_primal_dual_solve_validation():
  opt = optax.sgd(0.1)
  solve = lambda mu, **kw: constrained.primal_dual_solve(
      lambda y: jnp.sum(y ** 2), lambda y: y - 1.0, jnp.zeros(2), mu,
      opt.init(jnp.zeros(2)), optimizer=opt,
      **{"dual_step_size": 0.1, "dual_steps": 2, "primal_steps": 1, **kw})
  with pytest.raises(jbl.BilevelValidationError, match="equal 1-D"):
    solve(jnp.zeros(3))
  with pytest.raises(jbl.BilevelValidationError, match="1-D vector"):
    solve(jnp.zeros(()))
  with pytest.raises(jbl.BilevelValidationError, match="dual_step_size"):
    solve(jnp.zeros(2), dual_step_size=-1.0)
  with pytest.raises(jbl.BilevelValidationError, match="schedule"):
    solve(jnp.zeros(2), dual_step_size=lambda t: 0.1)
  with pytest.raises(jbl.BilevelValidationError, match="primal_steps"):
    solve(jnp.zeros(2), primal_steps=0)
