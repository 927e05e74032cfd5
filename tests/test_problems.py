"""The closed-form test problems (jaxbilevel.problems, docs/problems.md)."""

import jax.numpy as jnp
import numpy as np

from jaxbilevel import problems


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
