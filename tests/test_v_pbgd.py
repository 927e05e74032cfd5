"""V-PBGD (jbl.v_pbgd): the step size it needs, its fixed point, schedules, projections.

Problems and numbers from docs/problems.md: A1 (negative example), A6
(smoothness toy) and a random strongly convex quadratic.
"""

import jax.numpy as jnp
import numpy as np
import optax

from _helpers import lower_lr as _lower_lr
import jaxbilevel as jbl
from jaxbilevel import problems

_sgd = optax.sgd


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
