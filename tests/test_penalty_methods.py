"""Golden values and closed forms for PBGD-Free, ALT-PBGD and V-PBGD.

Problems and numbers from docs/problems.md: A1 (negative example), A2 (DPO/SFT
toy), A6 (smoothness toy), A8 and a random strongly convex quadratic.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbilevel as jbl
from jaxbilevel import problems


def _sgd(lr):
  return optax.sgd(lr)


# ---------------------------------------------------------------------------
# A1: the negative example.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [5.0, 15.0, 100.0])
def test_negative_example_pbgd_free_converges_to_zero_not_minus_five(gamma):
  prob = problems.negative_example(jnp.float64)
  box = jbl.projections.box(*prob.info["box"])
  tx = jbl.pbgd_free(prob.f, prob.g, gamma=gamma,
                     upper_optimizer=_sgd(0.01), lower_optimizer=_sgd(0.01),
                     inner_steps=100, proj_x=box, proj_y=box)
  params, _, hist = jbl.run(tx, prob.params0, num_steps=3000,
                            diagnostics=True)
  assert abs(float(params.x)) <= 1e-3
  assert abs(float(params.x) - prob.info["x_star"]) > 4.9
  # The lower iterate tracks y_gamma*(0) = -1 - 5 / gamma.
  np.testing.assert_allclose(float(params.y), -1.0 - 5.0 / gamma, atol=1e-6)
  assert hist["upper_grad_norm"][-1] < 1e-3


def test_negative_example_alt_pbgd_with_accurate_inner_solves_reaches_minus_five():
  prob = problems.negative_example(jnp.float64)
  box = jbl.projections.box(*prob.info["box"])
  # Inner contraction 1 - 2 * 0.25 = 0.5 per step: 40 steps are exact to 1e-12.
  tx = jbl.alt_pbgd(prob.f, prob.g, gamma=15.0, upper_optimizer=_sgd(0.1),
                    lower_optimizer=_sgd(0.25), inner_steps=40,
                    inner_start="y_g", proj_x=box, proj_y=box)
  params, state, _ = jbl.run(tx, prob.params0, num_steps=300)
  assert abs(float(params.x) + 5.0) <= 1e-2
  np.testing.assert_allclose(float(params.x), -5.0, atol=1e-8)
  np.testing.assert_allclose(float(state.y_g), -6.0, atol=1e-8)
  np.testing.assert_allclose(float(params.y), -6.0 - 1.0 / 3.0, atol=1e-8)


def test_negative_example_alt_pbgd_truncation_golden():
  """The authors' protocol: 100 inner steps at 0.01, y_gamma restarted from y_g."""
  prob = problems.negative_example(jnp.float64)
  box = jbl.projections.box(*prob.info["box"])
  tx = jbl.alt_pbgd(prob.f, prob.g, gamma=15.0, upper_optimizer=_sgd(0.01),
                    lower_optimizer=_sgd(0.01), inner_steps=100,
                    value_steps=100, inner_start="y_g", proj_x=box,
                    proj_y=box)
  params, state, _ = jbl.run(tx, prob.params0, num_steps=3000)
  np.testing.assert_allclose(float(params.x), -4.336902, atol=1e-6)
  np.testing.assert_allclose(float(state.y_g), -5.336902, atol=1e-6)
  np.testing.assert_allclose(float(params.y), -5.626029, atol=1e-6)
  # Truncation bias: fixed point -5 (1 - (1 - 2 eta_y)^K).
  np.testing.assert_allclose(float(params.x), -5.0 * (1 - 0.98 ** 100),
                             atol=1e-9)


# ---------------------------------------------------------------------------
# A2: the DPO / SFT toy.
# ---------------------------------------------------------------------------


def test_dpo_sft_objectives_match_closed_forms():
  prob = problems.dpo_sft_toy(jnp.float64)
  pts = jnp.asarray([[5.0, -9.9], [-6.167815, 6.199888], [0.3, 2.0]])
  for x, y in pts:
    np.testing.assert_allclose(prob.f(x, y, None),
                               prob.info["f_closed"](x, y), rtol=1e-12)
    np.testing.assert_allclose(prob.g(x, y, None),
                               prob.info["g_closed"](x, y), rtol=1e-12)
  # Golden objective values at the bilevel solution.
  x, y = prob.info["x_star"], prob.info["y_star"]
  np.testing.assert_allclose(float(prob.f(x, y, None)), 1.272180, atol=1e-5)
  np.testing.assert_allclose(float(prob.g(x, y, None)), 1.108433, atol=1e-5)


def test_dpo_sft_pbgd_free_trajectory_goldens():
  prob = problems.dpo_sft_toy(jnp.float64)
  tx = jbl.pbgd_free(prob.f, prob.g, gamma=16.0, upper_optimizer=_sgd(1e-2),
                     lower_optimizer=_sgd(1e-2), inner_steps=2)
  params, state, hist = jbl.run(tx, prob.params0, num_steps=1000)
  np.testing.assert_allclose([float(params.x), float(params.y)],
                             [-0.30440, -2.92792], atol=1e-4)
  params, state, hist = jbl.run(tx, params, state=state, num_steps=39000,
                                diagnostics=True)
  np.testing.assert_allclose([float(params.x), float(params.y)],
                             [-7.1639, 6.6435], atol=1e-4)
  np.testing.assert_allclose(hist["f"][-1], 1.2922, atol=1e-4)
  np.testing.assert_allclose(hist["g"][-1], 1.3708, atol=1e-4)
  assert int(state.count) == 40000


@pytest.mark.parametrize("gamma", [4.0, 16.0, 64.0])
def test_dpo_sft_pbgd_free_limit_is_independent_of_gamma(gamma):
  prob = problems.dpo_sft_toy(jnp.float64)
  tx = jbl.pbgd_free(prob.f, prob.g, gamma=gamma, upper_optimizer=_sgd(1e-2),
                     lower_optimizer=_sgd(1e-2), inner_steps=2)
  params, _, _ = jbl.run(tx, prob.params0, num_steps=40000)
  assert abs(float(params.x) - prob.info["pbgd_free_limit"]) <= 1e-2
  # The bias floor |x_bar - x*| ~ 0.996 does not shrink with gamma.
  np.testing.assert_allclose(abs(float(params.x) - prob.info["x_star"]),
                             0.996, atol=1e-2)
  np.testing.assert_allclose(float(params.y),
                             prob.info["y_gamma_at_free_limit"][gamma],
                             atol=2e-3)


def test_dpo_sft_alt_pbgd_goldens_and_solution():
  prob = problems.dpo_sft_toy(jnp.float64)
  tx = jbl.alt_pbgd(prob.f, prob.g, gamma=16.0, upper_optimizer=_sgd(1e-2),
                    lower_optimizer=_sgd(1e-2), inner_steps=10)
  params, state, _ = jbl.run(tx, prob.params0, num_steps=5000)
  np.testing.assert_allclose(float(params.x), -6.0312, atol=1e-4)
  np.testing.assert_allclose(float(params.y), 5.9513, atol=1e-4)
  np.testing.assert_allclose(float(state.y_g), 6.0958, atol=1e-4)
  np.testing.assert_allclose(float(prob.f(params.x, params.y, None)), 1.2530,
                             atol=1e-4)
  np.testing.assert_allclose(float(prob.g(params.x, params.y, None)), 1.0758,
                             atol=1e-4)
  params, state, hist = jbl.run(tx, params, state=state, num_steps=35000,
                                diagnostics=True)
  assert abs(float(params.x) - prob.info["x_star"]) <= 0.05
  np.testing.assert_allclose(float(params.x), prob.info["argmin_F_gamma"][16.0],
                             atol=1e-4)
  assert hist["g_gap"][-1] > 0  # y_gamma trades lower value for upper value


# ---------------------------------------------------------------------------
# A6: the smoothness toy.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [1.0, 10.0, 100.0, 1000.0])
def test_smoothness_alt_pbgd_outer_step_does_not_shrink_with_gamma(gamma):
  prob = problems.smoothness_toy(jnp.float64)
  tx = jbl.alt_pbgd(prob.f, prob.g, gamma=gamma, upper_optimizer=_sgd(1.5),
                    lower_optimizer=_sgd(0.25), inner_steps=30)
  params, _, hist = jbl.run(tx, prob.params0, num_steps=100,
                            diagnostics=True)
  # x_{t+1} = (1 - eta) x_t with eta = 1.5: |x_t| = 0.5^t.
  assert abs(float(params.x)) < 1e-12
  np.testing.assert_allclose(hist["upper_grad_norm"][:5],
                             0.5 ** np.arange(5), rtol=1e-6)


def test_smoothness_joint_v_pbgd_step_must_shrink_like_one_over_gamma():
  prob = problems.smoothness_toy(jnp.float64)
  gamma = 10.0
  lam = prob.info["joint_lambda_max"](gamma)
  np.testing.assert_allclose(lam, 40.5062, atol=1e-4)
  np.testing.assert_allclose(2.0 / lam, 0.0494, atol=1e-4)

  def run_v(eta):
    tx = jbl.v_pbgd(prob.f, prob.g, gamma=gamma, upper_optimizer=_sgd(eta),
                    lower_optimizer=_sgd(eta),
                    value_optimizer=_sgd(0.25), value_steps=40)
    params, _, _ = jbl.run(tx, prob.params0, num_steps=400,
                           on_nonfinite="ignore")
    return float(params.x)

  assert abs(run_v(0.04)) < 1e-3  # eta < 2 / lambda_max: converges
  assert not abs(run_v(0.06)) < 1e3  # eta > 2 / lambda_max: diverges
  # ALT-PBGD's step 1.5 would make the joint method explode.
  assert not abs(run_v(1.5)) < 1e3


def test_smoothness_pbgd_free_is_exact_when_f_ignores_y():
  prob = problems.smoothness_toy(jnp.float64)
  tx = jbl.pbgd_free(prob.f, prob.g, gamma=10.0, upper_optimizer=_sgd(0.5),
                     lower_optimizer=_sgd(0.25))
  params, _, _ = jbl.run(tx, prob.params0, num_steps=60)
  assert abs(float(params.x)) < 1e-12


# ---------------------------------------------------------------------------
# Strongly convex quadratics: closed forms and the gamma trend.
# ---------------------------------------------------------------------------


def test_a8_closed_forms():
  prob = problems.quadratic_a8()
  coeffs = prob.info["coefficients"]
  np.testing.assert_allclose(coeffs.x_star(), [-2.4112868747, -1.1457887986],
                             atol=1e-8)
  np.testing.assert_allclose(coeffs.y_star(np.zeros(2)),
                             [-0.857142857, 1.428571429], atol=1e-8)
  np.testing.assert_allclose(coeffs.argmin_f_gamma(10.0), [-2.37992, -1.13811],
                             atol=1e-5)
  np.testing.assert_allclose(coeffs.argmin_f_gamma(100.0),
                             [-2.40811, -1.14502], atol=1e-5)
  x = coeffs.x_star()
  np.testing.assert_allclose(
      float(prob.f(jnp.asarray(x), jnp.asarray(coeffs.y_star(x)), None)),
      0.4777682770, atol=1e-8)


def _lower_lr(prob, gamma):
  return 1.0 / (prob.info["lower_lipschitz"] + 1.0 / gamma)


@pytest.fixture(scope="module")
def quad():
  return problems.random_quadratic(seed=3, dim_x=3, dim_y=4)


def test_random_quadratic_alt_pbgd_error_shrinks_with_gamma(quad):
  coeffs = quad.info["coefficients"]
  x_star = coeffs.x_star()
  errors = []
  for gamma in [1.0, 10.0, 100.0]:
    tx = jbl.alt_pbgd(quad.f, quad.g, gamma=gamma, upper_optimizer=_sgd(0.3),
                      lower_optimizer=_sgd(_lower_lr(quad, gamma)),
                      inner_steps=20)
    params, _, _ = jbl.run(tx, quad.params0, num_steps=1500)
    np.testing.assert_allclose(params.x, coeffs.argmin_f_gamma(gamma),
                               atol=1e-8)
    errors.append(np.linalg.norm(params.x - x_star))
  assert errors[0] > errors[1] > errors[2]
  # O(1 / gamma): a decade of gamma buys about a decade of accuracy.
  assert errors[2] < errors[1] / 5 and errors[1] < errors[0] / 3


def test_random_quadratic_v_pbgd_error_shrinks_with_gamma(quad):
  coeffs = quad.info["coefficients"]
  x_star = coeffs.x_star()
  errors = []
  for gamma in [1.0, 4.0, 16.0]:
    eta = 0.5 / (2.0 + gamma * quad.info["lower_lipschitz"] * 1.5)
    tx = jbl.v_pbgd(quad.f, quad.g, gamma=gamma, upper_optimizer=_sgd(eta),
                    lower_optimizer=_sgd(eta),
                    value_optimizer=_sgd(_lower_lr(quad, 1e9)), value_steps=5)
    params, _, _ = jbl.run(tx, quad.params0, num_steps=30000)
    # V-PBGD's fixed point is also the minimiser of F_gamma.
    np.testing.assert_allclose(params.x, coeffs.argmin_f_gamma(gamma),
                               atol=1e-6)
    errors.append(np.linalg.norm(params.x - x_star))
  assert errors[0] > errors[1] > errors[2]


def test_random_quadratic_pbgd_free_fixed_point_and_bias_floor(quad):
  coeffs = quad.info["coefficients"]
  x_star = coeffs.x_star()
  x_bar = coeffs.pbgd_free_limit()  # gamma -> infinity
  to_limit, to_solution = [], []
  for gamma in [1.0, 10.0, 100.0]:
    tx = jbl.pbgd_free(quad.f, quad.g, gamma=gamma, upper_optimizer=_sgd(0.3),
                       lower_optimizer=_sgd(_lower_lr(quad, gamma)),
                       inner_steps=20)
    params, _, _ = jbl.run(tx, quad.params0, num_steps=1500)
    np.testing.assert_allclose(params.x, coeffs.pbgd_free_limit(gamma),
                               atol=1e-8)
    to_limit.append(np.linalg.norm(params.x - x_bar))
    to_solution.append(np.linalg.norm(params.x - x_star))
  # Its own limit is approached at O(1 / gamma) ...
  assert to_limit[0] > to_limit[1] > to_limit[2]
  assert to_limit[2] < to_limit[1] / 5
  # ... but that limit is not the bilevel solution: the bias does not vanish.
  floor = np.linalg.norm(x_bar - x_star)
  assert floor > 0.05
  np.testing.assert_allclose(to_solution[2], floor, rtol=0.05)


def test_gamma_schedule_is_evaluated_per_step():
  prob = problems.smoothness_toy(jnp.float64)
  schedule = optax.linear_schedule(0.0, 2.0, transition_steps=4)
  tx = jbl.v_pbgd(prob.f, prob.g, gamma=schedule,
                  upper_optimizer=_sgd(0.01), lower_optimizer=_sgd(0.01))
  _, _, hist = jbl.run(tx, prob.params0, num_steps=6, diagnostics=True)
  np.testing.assert_allclose(hist["gamma"], [0.0, 0.5, 1.0, 1.5, 2.0, 2.0])


def test_projections_keep_iterates_in_the_box():
  prob = problems.negative_example(jnp.float64)
  box = jbl.projections.box(*prob.info["box"])
  tx = jbl.v_pbgd(prob.f, prob.g, gamma=15.0, upper_optimizer=_sgd(0.5),
                  lower_optimizer=_sgd(0.5), proj_x=box, proj_y=box)
  _, _, hist = jbl.run(
      tx, prob.params0, num_steps=50,
      record=lambda p, s: jnp.stack([p.x, p.y, s.y_g]))
  rec = hist["record"]
  assert rec.min() >= -8.0 and rec.max() <= 1.5
  assert np.isclose(rec.min(), -8.0)  # the lower bound is active
