"""Baselines on closed-form problems: BOME (A7a), FO-BLO / UFO-BLO (A9),
F2SA and AID / ITD (A8), ALRIGHT (A2), with their documented guards.

The problem labels and golden values are those of docs/problems.md.

A cross-method suite (the methods that came from other papers' code, checked
against closed forms and their authors' settings): it stays one file, beside
the files of the modules (test_<module>.py).
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbilevel as jbl
from jaxbilevel import problems

_L_H = 1.21542  # largest eigenvalue of the A8 hyper-Hessian


# ---------------------------------------------------------------------------
# A7a: BOME on the coreset toy.
# ---------------------------------------------------------------------------


def test_bome_coreset_reaches_projection_from_all_official_starts():
  prob = problems.coreset()

  @jax.jit
  @jax.vmap
  def run(y0):
    tx = jbl.bome(prob.f, prob.g, eta=0.5, upper_optimizer=optax.sgd(0.05),
                  lower_optimizer=optax.sgd(0.05), value_steps=10, eps=1e-4)
    params, _, hist = jbl.scan_run(
        tx, jbl.BilevelParams(jnp.zeros(4), y0), num_steps=5000,
        diagnostics=True)
    return params, hist["multiplier"]

  params, lam = run(jnp.asarray(prob.info["starts"]))
  y_star = prob.info["y_star"]
  for i in range(3):
    # The infimum (1.8, 0.4) is approached only as x_1, x_3 -> -inf: after
    # the official 5000 iterations the end points lie 0.017 / 0.024 / 0.018
    # from it, and within 3e-3 of the end point (1.817, 0.385) of docs/problems.md.
    assert np.linalg.norm(np.asarray(params.y[i]) - y_star) <= 2.5e-2
    np.testing.assert_allclose(np.asarray(params.y[i]),
                               prob.info["bome_end_point"], atol=5e-3)
    weights = np.asarray(jax.nn.softmax(params.x[i]))
    np.testing.assert_allclose(weights, prob.info["weights_star"], atol=1e-2)
  assert np.all(np.isfinite(np.asarray(lam)))


def test_bome_denominator_guard_at_a_lower_optimal_point():
  f = lambda x, y, batch: (x - 1.0) ** 2 + (y - 2.0) ** 2
  g = lambda x, y, batch: 0.5 * (y - x) ** 2
  params = jbl.BilevelParams(jnp.asarray(0.5), jnp.asarray(0.5))  # y = y*(x)

  def first_step(eps):
    tx = jbl.bome(f, g, eta=0.5, upper_optimizer=optax.sgd(0.1),
                  lower_optimizer=optax.sgd(0.1), value_steps=5, eps=eps)
    _, state = tx.update(None, tx.init(params), params, diagnostics=True)
    return state.diagnostics

  guarded = first_step(1e-8)
  assert float(guarded["multiplier"]) == 0.0  # grad q = 0: no barrier, no NaN
  assert np.isfinite(float(guarded["upper_grad_norm"]))
  assert np.isnan(float(first_step(0.0)["multiplier"]))  # what the guard prevents


def test_bome_value_rule_and_warm_started_inner_loop():
  prob = problems.quadratic_a8()
  for kwargs in (dict(phi_rule="value"), dict(value_start="previous")):
    tx = jbl.bome(prob.f, prob.g, eta=0.5, upper_optimizer=optax.sgd(0.02),
                  lower_optimizer=optax.sgd(0.02),
                  value_optimizer=optax.sgd(0.45), **kwargs)
    params, _, hist = jbl.run(tx, prob.params0, num_steps=3000,
                              diagnostics=True)
    assert np.all(np.isfinite(hist["multiplier"]))
    # An O(1/lambda) neighbourhood of x* (BOME with constant steps).
    assert np.linalg.norm(np.asarray(params.x) - prob.info["x_star"]) < 0.1


# ---------------------------------------------------------------------------
# A9: FO-BLO converges to the wrong point; UFO-BLO is unbiased.
# ---------------------------------------------------------------------------


def _maml(estimator=None, probability=None, key=0):
  prob = problems.maml_counterexample()
  common = dict(upper_optimizer=optax.sgd(2.0),
                lower_optimizer=optax.sgd(prob.info["alpha"]),
                inner_steps=prob.info["num_inner_steps"],
                inner_start=prob.info["init"])
  if estimator is None:
    return prob, jbl.fo_blo(prob.f, prob.g, **common)
  return prob, jbl.ufo_blo(prob.f, prob.g, key=jax.random.PRNGKey(key),
                           correction_probability=probability,
                           estimator=estimator, **common)


def test_fo_blo_converges_to_the_first_order_fixed_point_not_x_star():
  prob, tx = _maml()
  params, _, _ = jbl.run(tx, prob.params0, num_steps=400)
  np.testing.assert_allclose(float(params.x), prob.info["x_fo"], atol=1e-5)
  assert abs(float(params.x) - prob.info["x_star"]) > 9.0
  assert abs(prob.info["F_prime"](float(params.x))) > 0.4  # not stationary
  # The exact meta-gradient (UFO-BLO with q = 1) reaches x*.
  prob, exact = _maml("bernoulli", probability=1.0)
  params, _, _ = jbl.run(exact, prob.params0, num_steps=400)
  np.testing.assert_allclose(float(params.x), prob.info["x_star"], atol=1e-5)


@pytest.mark.parametrize("estimator,probability", [("bernoulli", 0.2),
                                                   ("telescope", None)])
def test_ufo_blo_estimate_is_unbiased(estimator, probability):
  prob = problems.maml_counterexample()
  x = 1.5
  params = jbl.BilevelParams(jnp.asarray(x), jnp.zeros(2))

  @jax.jit
  @jax.vmap
  def estimate(key):
    tx = jbl.ufo_blo(prob.f, prob.g, upper_optimizer=optax.sgd(1.0),
                     lower_optimizer=optax.sgd(prob.info["alpha"]),
                     inner_steps=prob.info["num_inner_steps"], key=key,
                     correction_probability=probability, estimator=estimator,
                     inner_start=prob.info["init"])
    updates, _ = tx.update(None, tx.init(params), params)
    return -updates.x  # sgd(1.0): the update is minus the estimate

  samples = np.asarray(estimate(jax.random.split(jax.random.PRNGKey(3),
                                                 4000)))
  exact = prob.info["F_prime"](x)
  first_order = prob.info["F_prime_first_order"](x)
  stderr = samples.std() / np.sqrt(samples.size)
  assert samples.std() > 0  # it is random
  assert abs(samples.mean() - exact) <= 4 * stderr
  assert abs(first_order - exact) > 20 * stderr  # FO-BLO's bias is visible
  # Same key, same estimate.
  again = np.asarray(estimate(jax.random.split(jax.random.PRNGKey(3), 4000)))
  np.testing.assert_array_equal(samples, again)


def test_fo_blo_validation():
  prob = problems.maml_counterexample()
  tx = jbl.fo_blo(prob.f, prob.g, upper_optimizer=optax.sgd(1.0),
                  lower_optimizer=optax.sgd(0.2), inner_steps=5)
  with pytest.raises(jbl.BilevelValidationError, match="inner_start"):
    tx.update(None, tx.init(prob.params0), prob.params0)
  with pytest.raises(jbl.BilevelValidationError,
                     match="correction_probability"):
    jbl.ufo_blo(prob.f, prob.g, upper_optimizer=optax.sgd(1.0),
                lower_optimizer=optax.sgd(0.2), inner_steps=5,
                key=jax.random.PRNGKey(0), correction_probability=1.5)
  with pytest.raises(jbl.BilevelValidationError, match="estimator"):
    jbl.ufo_blo(prob.f, prob.g, upper_optimizer=optax.sgd(1.0),
                lower_optimizer=optax.sgd(0.2), inner_steps=5,
                key=jax.random.PRNGKey(0), estimator="antithetic")


# ---------------------------------------------------------------------------
# A8: F2SA, AID and ITD against the closed form.
# ---------------------------------------------------------------------------


def test_f2sa_constant_multiplier_converges_to_reduced_penalty_minimiser():
  prob = problems.quadratic_a8()
  coeffs = prob.info["coefficients"]
  tx = jbl.f2sa(prob.f, prob.g, gamma=100.0, scale_lower=True,
                upper_optimizer=optax.sgd(1 / _L_H),
                lower_optimizer=optax.sgd(1 / prob.info["lower_lipschitz"]))
  params, state, _ = jbl.run(tx, prob.params0, num_steps=2000)
  np.testing.assert_allclose(np.asarray(params.x),
                             coeffs.argmin_f_gamma(100.0), atol=1e-9)
  gap = np.linalg.norm(np.asarray(params.x) - prob.info["x_star"])
  np.testing.assert_allclose(gap, 3.27e-3, rtol=0.05)  # O(1/lambda) bias
  np.testing.assert_allclose(np.asarray(state.y_g),
                             coeffs.y_star(np.asarray(params.x)), atol=1e-9)


def test_f2sa_increasing_multiplier_shrinks_the_bias():
  prob = problems.quadratic_a8()
  tx = jbl.f2sa(prob.f, prob.g, gamma=1.0, gamma_increment=0.05,
                gamma_max=1000.0, scale_lower=True,
                upper_optimizer=optax.sgd(1 / _L_H),
                lower_optimizer=optax.sgd(1 / prob.info["lower_lipschitz"]))
  params, state, hist = jbl.run(tx, prob.params0, num_steps=20000,
                                diagnostics=True)
  assert float(state.gamma) == 1000.0
  np.testing.assert_allclose(hist["gamma"][:3], [1.0, 1.05, 1.1])
  gap = np.linalg.norm(np.asarray(params.x) - prob.info["x_star"])
  np.testing.assert_allclose(gap, 3.27e-4, rtol=0.05)  # A8 golden


def test_f2sa_schedule_presets_follow_their_formulas():
  s = jbl.f2sa_schedules("benchopt", inner_steps=10, lower_step_size=0.1,
                         value_step_size=0.2, outer_ratio=2.0, gamma=3.0,
                         gamma_delta=0.5)
  k = 4
  np.testing.assert_allclose(float(s.lower(10 * k + 7)), 0.1 * 5 ** (-5 / 7),
                             rtol=1e-6)
  np.testing.assert_allclose(float(s.value(10 * k)), 0.2 * 5 ** (-4 / 7),
                             rtol=1e-6)
  np.testing.assert_allclose(float(s.upper(k)), 0.05 * 5 ** (-4 / 7),
                             rtol=1e-6)
  np.testing.assert_allclose(float(s.gamma_increment(k)), 0.5 * 5 ** (-1 / 7),
                             rtol=1e-6)
  assert s.gamma == 3.0
  p = jbl.f2sa_schedules("paper", inner_steps=10, lower_step_size=0.1,
                         value_step_size=0.2)
  lam = lambda k: 0.2 * (k + 1) ** (-4 / 7) / (2 * 0.1 * (k + 1) ** (-5 / 7))
  np.testing.assert_allclose(p.gamma, lam(0), rtol=1e-6)
  np.testing.assert_allclose(float(p.gamma_increment(k)),
                             lam(k + 1) - lam(k), rtol=1e-4)
  np.testing.assert_allclose(float(p.upper(k)), 0.1 * 5 ** (-5 / 7),
                             rtol=1e-6)
  # The presets plug into f2sa and run.
  prob = problems.quadratic_a8()
  tx = jbl.f2sa(prob.f, prob.g, gamma=p.gamma,
                gamma_increment=p.gamma_increment,
                upper_optimizer=optax.sgd(p.upper),
                lower_optimizer=optax.sgd(p.lower),
                value_optimizer=optax.sgd(p.value))
  _, state, hist = jbl.run(tx, prob.params0, num_steps=50, diagnostics=True)
  assert np.all(np.isfinite(hist["f"]))
  np.testing.assert_allclose(float(state.gamma), lam(50),
                             rtol=1e-4)


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_aid_converges_to_x_star(solver):
  prob = problems.quadratic_a8()
  lg = prob.info["lower_lipschitz"]
  tx = jbl.aid(prob.f, prob.g, upper_optimizer=optax.sgd(1 / _L_H),
               lower_optimizer=optax.sgd(1 / lg), inner_steps=10,
               solver=solver, linear_steps=10 if solver == "cg" else 50,
               neumann_step=1 / lg)
  params, _, hist = jbl.run(tx, prob.params0, num_steps=600,
                            diagnostics=True)
  np.testing.assert_allclose(np.asarray(params.x), prob.info["x_star"],
                             atol=1e-9)
  np.testing.assert_allclose(hist["f"][-1], prob.info["h_star"], atol=1e-9)
  if solver == "cg":
    assert hist["linear_residual"][-1] < 1e-10


def test_aid_first_direction_is_the_exact_hypergradient():
  prob = problems.quadratic_a8()
  lg = prob.info["lower_lipschitz"]
  tx = jbl.aid(prob.f, prob.g, upper_optimizer=optax.sgd(1.0),
               lower_optimizer=optax.sgd(1 / lg), inner_steps=200)
  updates, _ = tx.update(None, tx.init(prob.params0), prob.params0)
  np.testing.assert_allclose(-np.asarray(updates.x),
                             [0.897959184, 0.571428571], atol=1e-9)


def test_itd_converges_and_checkpointing_changes_nothing():
  prob = problems.quadratic_a8()
  lg = prob.info["lower_lipschitz"]
  runs = []
  for kwargs in (dict(), dict(checkpoint=True)):
    tx = jbl.itd(prob.f, prob.g, upper_optimizer=optax.sgd(1 / _L_H),
                 lower_optimizer=optax.sgd(1 / lg), inner_steps=50, **kwargs)
    params, _, _ = jbl.run(tx, prob.params0, num_steps=300)
    runs.append(np.asarray(params.x))
  np.testing.assert_allclose(runs[0], prob.info["x_star"], atol=1e-9)
  np.testing.assert_allclose(runs[1], runs[0], rtol=1e-12)


def _a8_unroll(c, eta, steps, x, start_map):
  """y_T and dy_T/dx of T SGD steps on A8's g from y_0 = start_map @ x.

  y_T = M^T y_0 - eta sum_j M^j (C^T x + a), M = I - eta A: affine in x.
  """
  m = np.eye(2) - eta * c.A
  s = sum(np.linalg.matrix_power(m, j) for j in range(steps))
  jac = np.linalg.matrix_power(m, steps) @ start_map - eta * s @ c.C.T
  return jac @ np.asarray(x) - eta * s @ c.a, jac


@pytest.mark.parametrize("start", ["cold", "init_zero", "init_linear"])
def test_itd_restarted_unroll_matches_closed_form(start):
  """Restarted unrolls differentiate the same T-step map, through init too."""
  prob = problems.quadratic_a8()
  c = prob.info["coefficients"]
  eta, steps = 0.3, 5
  start_map = (np.array([[0.5, -1.0], [0.25, 2.0]]) if start == "init_linear"
               else np.zeros((2, 2)))
  kwargs = (dict(inner_start="initial") if start == "cold" else
            dict(inner_start=lambda x, y: jnp.asarray(start_map) @ x))
  tx = jbl.itd(prob.f, prob.g, upper_optimizer=optax.sgd(1.0),
               lower_optimizer=optax.sgd(eta), inner_steps=steps, **kwargs)
  x = jnp.asarray([0.7, -0.2])
  # params.y is ignored by every restarted start (cold: the zeros of init).
  y = jnp.zeros(2) if start == "cold" else jnp.asarray([3.0, -4.0])
  params = jbl.BilevelParams(x, y)
  updates, _ = tx.update(None, tx.init(params), params)
  y_t, jac = _a8_unroll(c, eta, steps, x, start_map)
  exact = 0.1 * np.asarray(x) + jac.T @ (y_t - c.y_t)
  np.testing.assert_allclose(-np.asarray(updates.x), exact, atol=1e-12)
  np.testing.assert_allclose(np.asarray(y + updates.y), y_t, atol=1e-12)


def test_aid_init_restarts_every_inner_solve():
  """init=...: each step solves from init(x, y) with a fresh inner state."""
  prob = problems.quadratic_a8()
  c = prob.info["coefficients"]
  eta, steps = 0.3, 4
  tx = jbl.aid(prob.f, prob.g, upper_optimizer=optax.sgd(0.5),
               lower_optimizer=optax.sgd(eta), inner_steps=steps,
               inner_start=lambda x, y: jnp.zeros_like(y))
  warm = jbl.aid(prob.f, prob.g, upper_optimizer=optax.sgd(0.5),
                 lower_optimizer=optax.sgd(eta), inner_steps=steps)
  params = jbl.BilevelParams(jnp.asarray([0.7, -0.2]),
                             jnp.asarray([3.0, -4.0]))
  state = tx.init(params)
  for _ in range(2):
    x = params.x
    updates, state = tx.update(None, state, params)
    y_t, _ = _a8_unroll(c, eta, steps, x, np.zeros((2, 2)))
    np.testing.assert_allclose(np.asarray(params.y + updates.y), y_t,
                               atol=1e-12)
    exact = jbl.hypergradient.implicit_hypergradient(prob.f, prob.g, x,
                                                     jnp.asarray(y_t))
    np.testing.assert_allclose(-np.asarray(updates.x) / 0.5, exact,
                               atol=1e-10)
    params = optax.apply_updates(params, updates)
  # The default warm start continues from params.y instead.
  params0 = jbl.BilevelParams(jnp.asarray([0.7, -0.2]),
                              jnp.asarray([3.0, -4.0]))
  updates, _ = warm.update(None, warm.init(params0), params0)
  y_warm = np.linalg.matrix_power(np.eye(2) - eta * c.A, steps) @ [3.0, -4.0]
  y_warm = y_warm + _a8_unroll(c, eta, steps, params0.x, np.zeros((2, 2)))[0]
  np.testing.assert_allclose(np.asarray(params0.y + updates.y), y_warm,
                             atol=1e-12)


def test_aid_and_itd_init_validation():
  prob = problems.quadratic_a8()
  common = dict(upper_optimizer=optax.sgd(1.0),
                lower_optimizer=optax.sgd(0.3), inner_steps=3)
  for method in (jbl.aid, jbl.itd):
    with pytest.raises(jbl.BilevelValidationError,
                       match="inner_start must be one of .* or a callable"):
      method(prob.f, prob.g, inner_start=0.0, **common)
    tx = method(prob.f, prob.g, inner_start=lambda x, y: jnp.zeros(3),
                **common)
    with pytest.raises(jbl.BilevelValidationError, match=r"init\(x, y\)"):
      tx.update(None, tx.init(prob.params0), prob.params0)


# ---------------------------------------------------------------------------
# A2: ALRIGHT on the DPO/SFT toy.
# ---------------------------------------------------------------------------


def _minimise(fn, start, steps=30000, lr=0.5):
  @jax.jit
  def run(p):
    step = lambda p, _: (p - lr * jax.grad(fn)(p), None)
    return jax.lax.scan(step, p, None, length=steps)[0]
  return np.asarray(run(jnp.asarray(start)))


def test_alright_lies_between_the_single_objective_optima():
  prob = problems.dpo_sft_toy(jnp.float64)
  f = lambda p: prob.f(p[0], p[1])
  g = lambda p: prob.g(p[0], p[1])
  start = np.array([5.0, -9.9])
  opt_f = _minimise(f, start)
  opt_g = _minimise(g, start)
  opt_mix = _minimise(lambda p: 0.5 * f(p) + 0.5 * g(p), start)

  @jax.jit
  @jax.vmap
  def run(probability):
    tx = jbl.alright(prob.f, prob.g, probability=probability,
                     upper_optimizer=optax.sgd(0.05),
                     lower_optimizer=optax.sgd(0.05),
                     key=jax.random.PRNGKey(0))
    params, _, hist = jbl.scan_run(tx, prob.params0, num_steps=20000,
                                   record=lambda p, s: jnp.stack(p),
                                   diagnostics=True)
    return params, hist["record"][10000:].mean(axis=0), hist["upper_step"]

  params, averaged, upper_steps = run(jnp.asarray([0.5, 1.0, 0.0]))
  mid = np.asarray(averaged[0])
  # The sampling probability is respected.
  assert abs(float(np.mean(upper_steps[0])) - 0.5) < 0.02
  assert float(np.mean(upper_steps[1])) == 1.0
  assert float(np.mean(upper_steps[2])) == 0.0
  # lambda = 1 / 0: plain SGD on one objective, its optimum.
  np.testing.assert_allclose(np.asarray(jnp.stack(jax.tree.map(
      lambda v: v[1], params))), opt_f, atol=1e-3)
  np.testing.assert_allclose(np.asarray(jnp.stack(jax.tree.map(
      lambda v: v[2], params))), opt_g, atol=1e-3)
  # lambda = 1/2: between the optima, near the mixture's minimiser.
  assert float(f(opt_f)) < float(f(mid)) < float(f(opt_g))
  assert float(g(opt_g)) < float(g(mid)) < float(g(opt_f))
  np.testing.assert_allclose(mid, opt_mix, atol=0.1)


def test_alright_lower_only_g_steps_freeze_x():
  prob = problems.dpo_sft_toy(jnp.float64)
  tx = jbl.alright(prob.f, prob.g, probability=0.0, g_updates="lower",
                   upper_optimizer=optax.adam(0.1),
                   lower_optimizer=optax.sgd(0.1), key=jax.random.PRNGKey(0))
  params, state, _ = jbl.run(tx, prob.params0, num_steps=20)
  assert float(params.x) == float(prob.params0.x)
  assert float(params.y) != float(prob.params0.y)
  assert int(state.upper_state[0].count) == 0  # adam never stepped


# ---------------------------------------------------------------------------
# Documentation contract.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["aid", "alright", "bome", "f2sa",
                                    "fo_blo", "itd", "ufo_blo"])
def test_docstring_states_cost_and_references(method):
  doc = inspect.getdoc(getattr(jbl, method))
  assert "Cost per" in doc
  assert "References:" in doc and "Examples:" in doc
  assert "gradient" in doc.split("Cost per")[1].split("\n\n")[0]
