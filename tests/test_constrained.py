"""Coupled constraints: primal-dual solver, the multiplier-aware value gradient
(G4 in docs/methods.md), PBGD-BLOCC and PBGD-Free-CC."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbilevel as jbl
from jaxbilevel import constrained
from jaxbilevel import datasets
from jaxbilevel import svm

# ---------------------------------------------------------------------------
# A polyhedral problem with a non-trivial active set and exact answers.
#   g(x, y) = 1/2 |y - (M x + m)|^2   s.t.   c(x, y) = A y - (B x + b) <= 0,
#   f(x, y) = 1/2 |y - y_t|^2 + rho/2 |x|^2,   x in R^2, y in R^3, 4 constraints.
# y_g is the projection of p = Mx + m onto {A y <= B x + b}; y_F (the saddle of
# f / gamma + g + mu^T c) is the projection of q = (p + y_t / gamma) / (1 +
# 1 / gamma), with scaled multipliers (1 + 1 / gamma) times those of q's
# projection. Exact solutions by enumerating active sets.
# ---------------------------------------------------------------------------

M = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
M_OFF = np.array([0.5, -0.2, 0.3])
A = np.array([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 1.0], [-1.0, 0, 1.0]])
B = np.array([[0.5, 0], [0, 0.5], [0.3, 0.3], [0, -0.2]])
B_OFF = np.array([0.2, 0.4, 0.5, 0.3])
Y_T = np.array([1.0, 1.5, 1.0])
RHO = 0.5


def poly_g(x, y, batch=None):
  del batch
  return 0.5 * jnp.sum((y - (M @ x + M_OFF)) ** 2)


def poly_f(x, y, batch=None):
  del batch
  return 0.5 * jnp.sum((y - Y_T) ** 2) + 0.5 * RHO * jnp.sum(x ** 2)


def poly_c(x, y, batch=None):
  del batch
  return A @ y - (B @ x + B_OFF)


def _project(p, r):
  """Projection of p onto {A y <= r} and its multipliers (active-set enumeration)."""
  for size in range(4):
    for active in itertools.combinations(range(4), size):
      mu = np.zeros(4)
      if active:
        rows = A[list(active)]
        mu_a = np.linalg.solve(rows @ rows.T, rows @ p - r[list(active)])
        if np.any(mu_a < -1e-12):
          continue
        mu[list(active)] = mu_a
      y = p - A.T @ mu
      if np.all(A @ y <= r + 1e-10):
        return y, mu
  raise AssertionError("no KKT point found")


def exact_lower(x):
  p, r = M @ x + M_OFF, B @ x + B_OFF
  y, mu = _project(p, r)
  return y, mu, 0.5 * np.sum((y - p) ** 2)


def exact_penalized(x, gamma):
  p, r = M @ x + M_OFF, B @ x + B_OFF
  scale = 1.0 + 1.0 / gamma
  y, mu = _project((p + Y_T / gamma) / scale, r)
  return y, scale * mu


def exact_f_gamma(x, gamma):
  y_f, _ = exact_penalized(x, gamma)
  _, _, v = exact_lower(x)
  p = M @ x + M_OFF
  return (0.5 * np.sum((y_f - Y_T) ** 2) + 0.5 * RHO * x @ x
          + gamma * (0.5 * np.sum((y_f - p) ** 2) - v))


def central_difference(fun, x, h=1e-6):
  return np.array([(fun(x + h * e) - fun(x - h * e)) / (2 * h)
                   for e in np.eye(len(x))])


X_MIXED = np.array([0.3, 0.2])  # constraints 0 and 2 active, 1 and 3 not.
F_GAMMA_ARGMIN = np.array([-0.0914221, 0.89729121])  # gamma = 10


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


# --- problems A4 and A5 of docs/problems.md ------------------------------------


@pytest.mark.parametrize("variant,runs", [(1, 20), (2, 200)])
def test_blocc_toys_land_on_local_minimisers(variant, runs):
  prob = jbl.problems.blocc_toy(variant, jnp.float64)
  rng = np.random.RandomState(variant)
  x0, y0 = rng.uniform(0, 3.5, runs), rng.uniform(-5, 8.5, runs)
  mu0 = rng.uniform(0, 10, runs)

  @jax.jit
  @jax.vmap
  def solve(x0, y0, mu0):
    tx = jbl.pbgd_blocc(prob.f, prob.g, prob.info["c"], gamma=5.0,
                        upper_optimizer=optax.sgd(0.01),
                        lower_optimizer=optax.sgd(0.1), dual_step_size=0.1,
                        dual_steps=20, primal_steps=1,
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
  tx = jbl.pbgd_free_cc(prob.f, prob.g, prob.info["c"], gamma=5.0,
                        upper_optimizer=optax.sgd(0.01),
                        lower_optimizer=optax.sgd(0.1), dual_step_size=0.1,
                        dual_steps=20, primal_steps=1,
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


# --- the SVM problem (on the shipped sample) -----------------------------------


def _svm_sample():
  z, labels = datasets.load_fourclass(datasets.sample_path("fourclass"))
  split = datasets.train_val_test_split(z, labels, seed=0, n_train=16,
                                        n_val=8)
  data = svm.SVMData.from_split(split, jnp.float64)
  return data, svm.initial_params(16, 2, seed=0, dtype=jnp.float64)


def _svm_method(method, **kw):
  return method(svm.upper_objective, svm.lower_objective, svm.constraint,
                gamma=15.0, upper_optimizer=optax.sgd(0.005),
                lower_optimizer=optax.sgd(0.005), dual_step_size=0.001,
                dual_steps=4, primal_steps=3,
                multiplier_floor=svm.MULTIPLIER_FLOOR, num_constraints=16,
                proj_x=svm.project_margins, **kw)


def test_svm_updates_match_the_authors_closed_forms():
  data, params = _svm_sample()
  # PBGD-Free-CC: the upper step is the shrinkage C <- max((1 - eta) C, 1e-4).
  tx = _svm_method(jbl.pbgd_free_cc)
  updates, state = tx.update(None, tx.init(params), params, batch=data)
  np.testing.assert_allclose(params.x + updates.x, 0.995 * params.x,
                             rtol=1e-12)
  assert float(jnp.min(state.mu_F)) >= svm.MULTIPLIER_FLOOR
  # PBGD-BLOCC: grad_C c = -I, so the direction is C + gamma (mu_g - mu_F).
  tx = _svm_method(jbl.pbgd_blocc)
  updates, state = tx.update(None, tx.init(params), params, batch=data)
  direction = params.x + 15.0 * (state.mu_g - state.mu_F)
  np.testing.assert_allclose(
      params.x + updates.x,
      jnp.maximum(params.x - 0.005 * direction, svm.C_FLOOR), rtol=1e-12)


def test_svm_fit_stops_by_the_validation_rule():
  data, params = _svm_sample()
  result = jax.jit(lambda p, d: svm.fit(_svm_method(jbl.pbgd_free_cc), p, d,
                                        max_epochs=30, tol=1e-5))(params, data)
  assert 1 <= int(result.epochs) <= 30
  assert 0.0 <= float(result.test_accuracy) <= 1.0
  np.testing.assert_allclose(result.val_loss,
                             svm.validation_loss(result.params.y, data))
  # A huge tolerance stops after one epoch.
  one = svm.fit(_svm_method(jbl.pbgd_free_cc), params, data, tol=1e9)
  assert int(one.epochs) == 1


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
  update = jax.jit(tx.update)
  for _ in range(2):
    updates, state = update(None, state, params, unknown=1.0, batch=None)
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
