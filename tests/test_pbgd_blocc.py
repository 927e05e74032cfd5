"""PBGD-BLOCC and PBGD-Free-CC (jbl.pbgd_blocc, jbl.pbgd_free_cc): coupled constraints.

On the polyhedral problem with exact answers (in _helpers.py) and the BLOCC
toys (A4 of docs/problems.md); traced hyperparameters, dtypes and
validation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _helpers import blocc_toy_method as _blocc_toy_method
from _helpers import central_difference
from _helpers import exact_f_gamma
from _helpers import exact_lower
from _helpers import exact_penalized
from _helpers import F_GAMMA_ARGMIN
from _helpers import poly_c
from _helpers import poly_f
from _helpers import poly_g
from _helpers import RHO
from _helpers import X_MIXED
import jaxbilevel as jbl


def test_pbgd_blocc_reaches_the_reduced_penalty_minimiser():
  tx = jbl.pbgd_blocc(poly_f, poly_g, poly_c, gamma=10.0,
                      upper_optimizer=optax.sgd(0.3),
                      lower_optimizer=optax.sgd(0.5), dual_step_size=0.2,
                      dual_steps=20, primal_steps=3)
  params0 = jbl.BilevelParams(jnp.zeros(2), jnp.zeros(3))
  params, state, hist = jbl.run(tx, params0, num_steps=300, diagnostics=True)
  np.testing.assert_allclose(params.x, F_GAMMA_ARGMIN, atol=1e-6)
  np.testing.assert_allclose(
      central_difference(lambda z: exact_f_gamma(z, 10.0), F_GAMMA_ARGMIN), 0,
      atol=1e-6)
  y_g, mu_g, _ = exact_lower(np.asarray(params.x))
  y_f, mu_f = exact_penalized(np.asarray(params.x), 10.0)
  np.testing.assert_allclose(state.y_g, y_g, atol=1e-6)
  np.testing.assert_allclose(params.y, y_f, atol=1e-6)
  np.testing.assert_allclose(state.mu_g, mu_g, atol=1e-6)
  np.testing.assert_allclose(state.mu_F, mu_f, atol=1e-6)
  # Non-trivial active set at the limit: three active, one inactive.
  assert np.all(mu_g[[0, 2, 3]] > 0.3) and mu_g[1] == 0.0
  assert float(hist["constraint_violation"][-1]) < 1e-7
  assert float(hist["upper_grad_norm"][-1]) < 1e-6
  np.testing.assert_allclose(hist["gamma"], 10.0)
  # Without the multiplier terms the direction would be wrong at the limit.
  wrong = (jax.grad(poly_f)(params.x, params.y)
           + 10.0 * (jax.grad(poly_g)(params.x, params.y)
                     - jax.grad(poly_g)(params.x, state.y_g)))
  assert float(jnp.linalg.norm(wrong)) > 0.1


# --- problem A4 of docs/problems.md -------------------------------------------


@pytest.mark.parametrize("variant,runs", [(1, 20), (2, 200)])
def test_blocc_toys_land_on_local_minimisers(variant, runs):
  prob = jbl.problems.blocc_toy(variant, jnp.float64)
  rng = np.random.RandomState(variant)
  x0, y0 = rng.uniform(0, 3.5, runs), rng.uniform(-5, 8.5, runs)
  mu0 = rng.uniform(0, 10, runs)

  @jax.jit
  @jax.vmap
  def solve(x0, y0, mu0):
    tx = _blocc_toy_method(jbl.pbgd_blocc, prob, dual_steps=20,
                           proj_x=jbl.projections.box(*prob.info["box"]))
    params0 = jbl.BilevelParams(jnp.clip(x0, 0.0, 3.0), y0)
    state0 = tx.init(params0)._replace(mu_g=jnp.full((1,), 0.1),
                                       mu_F=mu0[None])
    params, state, _ = jbl.scan_run(tx, params0, num_steps=500, state=state0)
    return params.x, params.y, state.mu_g[0]

  x, y_f, mu_g = (np.asarray(v) for v in solve(x0, y0, mu0))
  minimisers = np.asarray(prob.info["minimisers"])
  distance = np.abs(x[:, None] - minimisers[None]).min(axis=1)
  assert distance.max() < 1e-3
  assert np.abs(x - y_f).max() < 1e-3
  np.testing.assert_allclose(mu_g, 2 * x, atol=1e-3)  # mu_g* = 2x
  # The global minimiser is among the limits.
  assert np.any(np.abs(x - prob.info["x_star"]) < 1e-3)


# --- PBGD-Free-CC -----------------------------------------------------------


def _free_cc_direction(gamma, multiplier_term):
  """The upper direction of one PBGD-Free-CC step started at exact saddle points."""
  y_f, mu_f = exact_penalized(X_MIXED, gamma)
  tx = jbl.pbgd_free_cc(poly_f, poly_g, poly_c, gamma=gamma,
                        upper_optimizer=optax.sgd(1.0),
                        lower_optimizer=optax.sgd(0.5), dual_step_size=0.2,
                        dual_steps=5, primal_steps=2,
                        multiplier_term=multiplier_term)
  params = jbl.BilevelParams(jnp.asarray(X_MIXED), jnp.asarray(y_f))
  state = tx.init(params)._replace(mu_F=jnp.asarray(mu_f))
  updates, state = tx.update(None, state, params)
  np.testing.assert_allclose(updates.y, 0.0, atol=1e-12)  # a saddle point
  return -np.asarray(updates.x)


def test_multiplier_term_decision():
  """Against the exact gradient of F_gamma (G4 in docs/methods.md): without the
  term the error stays O(1); with it, it grows like gamma."""
  gammas = [10.0, 100.0, 1000.0]
  errors = {True: [], False: []}
  for gamma in gammas:
    exact = central_difference(lambda z, g=gamma: exact_f_gamma(z, g), X_MIXED)
    for term in (True, False):
      errors[term].append(
          np.linalg.norm(_free_cc_direction(gamma, term) - exact))
  # The default (code) direction is grad_x f = rho x; its error is the bias
  # b_gamma, which converges to a constant as gamma grows.
  np.testing.assert_allclose(_free_cc_direction(10.0, False), RHO * X_MIXED,
                             rtol=1e-12)
  assert errors[False][2] < 1.05 * errors[False][1]
  assert errors[False][2] > 0.95 * errors[False][1]
  # Keeping only gamma <mu_F, grad_x c> leaves gamma B^T mu_g uncancelled.
  np.testing.assert_allclose(errors[True][2] / errors[True][1], 10.0,
                             rtol=0.05)
  assert errors[True][0] > errors[False][0]


def test_pbgd_free_cc_fixed_point_on_blocc_toy():
  # y_F = x (the constraint stays active), so the fixed point solves
  # d/dx f(x, y)|_{y = x} = 0 rather than phi'(x) = 0.
  prob = jbl.problems.blocc_toy(1, jnp.float64)
  tx = _blocc_toy_method(jbl.pbgd_free_cc, prob, dual_steps=20,
                         proj_x=jbl.projections.box(0.0, 3.0))
  params, state, hist = jbl.run(tx, prob.params0, num_steps=1500,
                                diagnostics=True)
  partial = lambda x: jax.grad(prob.f)(x, x)
  lo, hi = 0.0, float(params.x) + 0.05
  assert partial(lo) < 0 < partial(hi)
  for _ in range(60):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if partial(mid) < 0 else (lo, mid)
  np.testing.assert_allclose(params.x, lo, atol=1e-6)
  np.testing.assert_allclose(params.y, params.x, atol=1e-6)
  np.testing.assert_allclose(state.mu_F[0], 2 * params.x + jnp.exp(
      2 - params.x) / (2 + jnp.cos(4 * params.x)) / 5.0, atol=1e-6)
  # The bias: not a minimiser of phi (phi' != 0 there).
  assert abs(float(jax.grad(prob.info["phi"])(params.x))) > 0.5
  assert set(hist) >= set(jbl.COMMON_DIAGNOSTICS) | {"constraint_violation"}


# --- contract: traced hyperparameters, dtypes, validation -------------------


METHODS = {
    "pbgd_blocc": jbl.pbgd_blocc,
    "pbgd_free_cc": jbl.pbgd_free_cc,
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_vmap_sweep_over_traced_hyperparameters_compiles_once(name):
  traces = []
  params0 = jbl.BilevelParams(jnp.asarray(X_MIXED), jnp.zeros(3))

  @jax.jit
  @jax.vmap
  def sweep(gamma, lr, eta2):
    traces.append(None)
    tx = METHODS[name](poly_f, poly_g, poly_c, gamma=gamma,
                       upper_optimizer=optax.sgd(lr),
                       lower_optimizer=optax.sgd(0.5), dual_step_size=eta2,
                       dual_steps=5, primal_steps=2)
    params, _, hist = jbl.scan_run(tx, params0, num_steps=5, diagnostics=True)
    return params.x, hist["f"]

  args = (jnp.array([5.0, 10.0]), jnp.array([0.1, 0.3]), jnp.array([0.1,
                                                                    0.2]))
  xs, fs = sweep(*args)
  sweep(*(a * 1.5 for a in args))
  assert len(traces) == 1 and sweep._cache_size() == 1  # pylint: disable=protected-access
  for i in range(2):
    tx = METHODS[name](poly_f, poly_g, poly_c, gamma=float(args[0][i]),
                       upper_optimizer=optax.sgd(float(args[1][i])),
                       lower_optimizer=optax.sgd(0.5),
                       dual_step_size=float(args[2][i]), dual_steps=5,
                       primal_steps=2)
    single, _, hist = jbl.scan_run(tx, params0, num_steps=5,
                                   diagnostics=True)
    np.testing.assert_allclose(xs[i], single.x, rtol=1e-10)
    np.testing.assert_allclose(fs[i], hist["f"], rtol=1e-10)
  assert not np.allclose(xs[0], xs[1])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_float32_is_preserved_and_extra_args_ignored(name):
  def c(x, y, batch):
    return poly_c(x, y, batch).astype(jnp.float32)

  tx = METHODS[name](poly_f, poly_g, c, gamma=10.0,
                     upper_optimizer=optax.adam(0.01),
                     lower_optimizer=optax.sgd(0.5), dual_step_size=0.2,
                     dual_steps=3, primal_steps=2, multiplier_floor=1e-5)
  params = jbl.BilevelParams(jnp.zeros(2, jnp.float32),
                             jnp.zeros(3, jnp.float32))
  state = tx.init(params)
  update = jax.jit(tx.update, static_argnames="diagnostics")
  for _ in range(2):
    updates, state = update(None, state, params, unknown=1.0, batch=None,
                            diagnostics=True)
    params = optax.apply_updates(params, updates)
  for leaf in jax.tree.leaves((params, state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  assert set(state.diagnostics) >= set(jbl.COMMON_DIAGNOSTICS)
  assert all(np.isfinite(float(v)) for v in state.diagnostics.values())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_invalid_inputs_fail_clearly(name):
  build = lambda c, **kw: METHODS[name](
      poly_f, poly_g, c, gamma=10.0, upper_optimizer=optax.sgd(0.1),
      lower_optimizer=optax.sgd(0.1),
      **{"dual_step_size": 0.1, "dual_steps": 2, "primal_steps": 1, **kw})
  params = jbl.BilevelParams(jnp.zeros(2), jnp.zeros(3))
  scalar_c = lambda x, y, batch: jnp.sum(y) - 1.0
  with pytest.raises(jbl.BilevelValidationError, match="1-D vector"):
    build(scalar_c).init(params)
  matrix_c = lambda x, y, batch: jnp.ones((2, 2))
  tx = build(matrix_c, num_constraints=4)
  with pytest.raises(jbl.BilevelValidationError, match="1-D vector"):
    tx.update(None, tx.init(params), params)
  tx = build(poly_c, num_constraints=3)  # wrong count: multipliers mismatch
  with pytest.raises(jbl.BilevelValidationError, match="shape"):
    tx.update(None, tx.init(params), params)
  needs_batch = lambda x, y, batch: poly_c(x, y) * batch["scale"]
  with pytest.raises(jbl.BilevelValidationError, match="num_constraints"):
    build(needs_batch).init(params)
  tx = build(needs_batch, num_constraints=4)
  updates, _ = tx.update(None, tx.init(params), params,
                         batch={"scale": 1.0})
  assert np.all(np.isfinite(updates.x))
  with pytest.raises(jbl.BilevelValidationError, match="dual_steps"):
    build(poly_c, dual_steps=2.0)
  with pytest.raises(jbl.BilevelValidationError, match="dual_step_size"):
    build(poly_c, dual_step_size=-0.1)
  with pytest.raises(jbl.BilevelValidationError, match="multiplier_floor"):
    build(poly_c, multiplier_floor=-1.0)
  with pytest.raises(jbl.BilevelValidationError, match="callable"):
    build(None)


def test_pbgd_free_cc_specific_validation():
  params = jbl.BilevelParams(jnp.zeros(2), jnp.zeros(3))
  with pytest.raises(jbl.BilevelValidationError, match="multiplier_term"):
    jbl.pbgd_free_cc(poly_f, poly_g, poly_c, gamma=1.0,
                     upper_optimizer=optax.sgd(0.1),
                     lower_optimizer=optax.sgd(0.1), dual_step_size=0.1,
                     multiplier_term="yes")
  flat_in_x = lambda x, y, batch: jnp.sum(y ** 2)
  tx = jbl.pbgd_free_cc(flat_in_x, poly_g, poly_c, gamma=1.0,
                        upper_optimizer=optax.sgd(0.1),
                        lower_optimizer=optax.sgd(0.1), dual_step_size=0.1)
  with pytest.raises(jbl.BilevelValidationError, match="pbgd_blocc"):
    tx.update(None, tx.init(params), params)
  # With the multiplier term the direction reads x through c: allowed.
  tx = jbl.pbgd_free_cc(flat_in_x, poly_g, poly_c, gamma=1.0,
                        upper_optimizer=optax.sgd(0.1),
                        lower_optimizer=optax.sgd(0.1), dual_step_size=0.1,
                        multiplier_term=True)
  tx.update(None, tx.init(params), params)
