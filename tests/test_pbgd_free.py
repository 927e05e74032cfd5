"""PBGD-Free (jbl.pbgd_free): golden values and closed forms.

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


# ---------------------------------------------------------------------------
# A2: the DPO / SFT toy.
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# A6: the smoothness toy.
# ---------------------------------------------------------------------------


def test_smoothness_pbgd_free_is_exact_when_f_ignores_y():
  prob = problems.smoothness_toy(jnp.float64)
  tx = jbl.pbgd_free(prob.f, prob.g, gamma=10.0, upper_optimizer=_sgd(0.5),
                     lower_optimizer=_sgd(0.25))
  params, _, _ = jbl.run(tx, prob.params0, num_steps=60)
  assert abs(float(params.x)) < 1e-12


# ---------------------------------------------------------------------------
# Strongly convex quadratics: the fixed point and its bias floor.
# ---------------------------------------------------------------------------


def test_random_quadratic_pbgd_free_fixed_point_and_bias_floor(quad):
  coeffs = quad.info["coefficients"]
  x_star = coeffs.x_star()
  x_bar = coeffs.pbgd_free_limit()  # gamma -> infinity
  to_limit, to_solution = [], []
  for gamma in [1.0, 10.0, 100.0]:
    x = _random_quadratic_x(jbl.pbgd_free, quad, gamma)
    np.testing.assert_allclose(x, coeffs.pbgd_free_limit(gamma), atol=1e-8)
    to_limit.append(np.linalg.norm(x - x_bar))
    to_solution.append(np.linalg.norm(x - x_star))
  # Its own limit is approached at O(1 / gamma) ...
  assert to_limit[0] > to_limit[1] > to_limit[2]
  assert to_limit[2] < to_limit[1] / 5
  # ... but that limit is not the bilevel solution: the bias does not vanish.
  floor = np.linalg.norm(x_bar - x_star)
  assert floor > 0.05
  np.testing.assert_allclose(to_solution[2], floor, rtol=0.05)


@_PROPERTY_SETTINGS
@given(st.data())
def test_pbgd_free_fixed_point_is_the_closed_form_on_random_trees(data):
  seed, dim_x, dim_y, coeffs = _draw_coefficients(data)
  # x <- x - lr (P x + q + B y_gamma(x)): a linear iteration with matrix M.
  mat = _jacobian(lambda x: coeffs.P @ x + coeffs.q + coeffs.B @ coeffs
                  .y_gamma(x, _GAMMA), dim_x)
  eig = np.linalg.eigvals(mat)
  assume(eig.real.min() > 0 and np.abs(eig).max() / eig.real.min() < 30)
  lr = float(np.min(eig.real / np.abs(eig) ** 2))
  f, g, p0, unravel_x, lower_lr = _draw_tree_problem(data, seed, dim_x, dim_y)
  tx = jbl.pbgd_free(f, g, gamma=_GAMMA, upper_optimizer=optax.sgd(lr),
                     lower_optimizer=optax.sgd(lower_lr), inner_steps=5)
  params, _, hist = jbl.run(tx, p0, num_steps=1500)
  assert hist["finite"].all()
  expected = unravel_x(jnp.asarray(coeffs.pbgd_free_limit(_GAMMA)))
  for got, want in zip(jax.tree.leaves(params.x), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, atol=1e-7, rtol=1e-7)


# ---------------------------------------------------------------------------
# An upper objective that ignores x is refused.
# ---------------------------------------------------------------------------


def test_pbgd_free_refuses_an_upper_objective_that_ignores_x():
  # Hyper-cleaning / regularization selection: x enters only through g.
  def f(x, y, batch):
    return jnp.sum((y - 1.0) ** 2)

  def g(x, y, batch):
    return jnp.sum(jnp.exp(x) * y ** 2) + jnp.sum((y - 2.0) ** 2)

  tx = jbl.pbgd_free(f, g, gamma=10.0, upper_optimizer=optax.sgd(0.1),
                     lower_optimizer=optax.sgd(0.1))
  params = jbl.BilevelParams(jnp.zeros(3), jnp.zeros(3))
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"does not depend on x.*identically zero.*"
                     r"jaxbilevel\.alt_pbgd"):
    jax.jit(tx.update)(None, tx.init(params), params)
  # ALT-PBGD handles the same problem and moves x.
  tx = jbl.alt_pbgd(f, g, gamma=10.0, upper_optimizer=optax.sgd(0.1),
                    lower_optimizer=optax.sgd(0.1), inner_steps=5)
  new, _, _ = jbl.run(tx, params, num_steps=20)
  assert float(jnp.linalg.norm(new.x)) > 1e-3
