"""ALT-PBGD (jbl.alt_pbgd): golden values and closed forms.

Problems and numbers from docs/problems.md: A1 (negative example), A2 (DPO/SFT
toy), A6 (smoothness toy), a random strongly convex quadratic, and random
quadratics over random nested-dict variables (property-based).
"""

from hypothesis import assume
from hypothesis import given
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _helpers import draw_coefficients as _draw_coefficients
from _helpers import draw_tree_problem as _draw_tree_problem
from _helpers import jacobian as _jacobian
from _helpers import PROPERTY_GAMMA as _GAMMA
from _helpers import PROPERTY_SETTINGS as _PROPERTY_SETTINGS
from _helpers import random_quadratic_x as _random_quadratic_x
import jaxbilevel as jbl
from jaxbilevel import problems

_sgd = optax.sgd


# ---------------------------------------------------------------------------
# A1: the negative example.
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Strongly convex quadratics: the gamma trend.
# ---------------------------------------------------------------------------


def test_random_quadratic_alt_pbgd_error_shrinks_with_gamma(quad):
  coeffs = quad.info["coefficients"]
  x_star = coeffs.x_star()
  errors = []
  for gamma in [1.0, 10.0, 100.0]:
    x = _random_quadratic_x(jbl.alt_pbgd, quad, gamma)
    np.testing.assert_allclose(x, coeffs.argmin_f_gamma(gamma), atol=1e-8)
    errors.append(np.linalg.norm(x - x_star))
  assert errors[0] > errors[1] > errors[2]
  # O(1 / gamma): a decade of gamma buys about a decade of accuracy.
  assert errors[2] < errors[1] / 5 and errors[1] < errors[0] / 3


@_PROPERTY_SETTINGS
@given(st.data())
def test_alt_pbgd_reaches_argmin_f_gamma_on_random_trees(data):
  seed, dim_x, dim_y, coeffs = _draw_coefficients(data)
  # F_gamma is quadratic; its Hessian fixes the step and the condition.
  hess = _jacobian(lambda x: coeffs.P @ x + coeffs.q + coeffs.B @ coeffs
                   .y_gamma(x, _GAMMA) + _GAMMA * coeffs.C @ (
                       coeffs.y_gamma(x, _GAMMA) - coeffs.y_star(x)), dim_x)
  eig = np.linalg.eigvalsh((hess + hess.T) / 2)
  assume(eig[0] > 0 and eig[-1] / eig[0] < 30)
  f, g, p0, unravel_x, lower_lr = _draw_tree_problem(data, seed, dim_x, dim_y)
  tx = jbl.alt_pbgd(f, g, gamma=_GAMMA,
                    upper_optimizer=optax.sgd(1.0 / eig[-1]),
                    lower_optimizer=optax.sgd(lower_lr), inner_steps=5)
  params, _, hist = jbl.run(tx, p0, num_steps=1500)
  assert jax.tree.structure(params.x) == jax.tree.structure(p0.x)
  assert hist["finite"].all()
  expected = unravel_x(jnp.asarray(coeffs.argmin_f_gamma(_GAMMA)))
  for got, want in zip(jax.tree.leaves(params.x), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, atol=1e-7, rtol=1e-7)
