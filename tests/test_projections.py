"""Projections (jaxbilevel.projections) and optax's projections as proj_x / proj_y."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbilevel as jbl


def test_optax_projections_work_as_proj_arguments():
  # The lower level min ||y - x||^2 over the unit ball: y*(x) = x / max(1, |x|).
  f = lambda x, y, batch: jnp.sum((y - jnp.array([3.0, 4.0])) ** 2) + 0.0 * jnp.sum(x)
  g = lambda x, y, batch: jnp.sum((y - x) ** 2)
  tx = jbl.pbgd_free(
      f, g, gamma=1e6, upper_optimizer=optax.sgd(0.0),
      lower_optimizer=optax.sgd(0.25), inner_steps=50,
      proj_y=lambda y: optax.projections.projection_l2_ball(y, 1.0))
  p0 = jbl.BilevelParams(jnp.array([6.0, 8.0]), jnp.zeros(2))
  params, _, _ = jbl.run(tx, p0, num_steps=2)
  np.testing.assert_allclose(params.y, [0.6, 0.8], atol=1e-4)
  proj = jbl.projections.nonnegative()
  np.testing.assert_array_equal(proj({"a": jnp.array([-1.0, 2.0])})["a"],
                                [0.0, 2.0])


@pytest.mark.parametrize("kwargs,name", [
    (dict(lower=np.nan), "lower"),
    (dict(upper=float("nan")), "upper"),
    (dict(lower=-1.0, upper=jnp.array([1.0, jnp.nan])), "upper"),
    (dict(lower={"a": jnp.array([0.0, jnp.nan])}), "lower"),
])
def test_box_refuses_nan_bounds(kwargs, name):
  with pytest.raises(jbl.BilevelValidationError,
                     match=rf"box\(\): {name} contains NaN .* Use {name}=None"):
    jbl.projections.box(**kwargs)
  # Infinite bounds are "no bound" and stay valid.
  proj = jbl.projections.box(lower=-jnp.inf, upper=1.0)
  np.testing.assert_array_equal(proj(jnp.array([-5.0, 3.0])), [-5.0, 1.0])
