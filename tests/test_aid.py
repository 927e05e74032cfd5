"""AID (jbl.aid): the hypergradient solve stops at its tolerance."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from _helpers import tx_step as _tx_step
import jaxbilevel as jbl


def test_aid_hypergradient_solve_stops_at_tolerance():
  # A quadratic lower level: CG is exact after d products, so with
  # linear_steps = 50 > d the tolerance-stopped solve does d, not 50.
  d = 6
  a = jnp.diag(jnp.linspace(1.0, 2.0, d))
  products = []

  def g(x, y, batch):
    jax.debug.callback(lambda: products.append(1))  # one per HVP's forward
    return 0.5 * y @ a @ y - x @ y

  f = lambda x, y, batch: 0.5 * jnp.sum((y - 1.0) ** 2) + 0.5 * x @ x
  tx = jbl.aid(f, g, upper_optimizer=optax.sgd(0.1),
               lower_optimizer=optax.sgd(0.5), inner_steps=1,
               linear_steps=50, tol=1e-10)
  params = jbl.BilevelParams(jnp.ones(d), jnp.zeros(d))
  state = tx.init(params)
  new_params, new_state = jax.jit(_tx_step(tx))(params, state, None)
  jax.block_until_ready(new_params)
  assert len(products) <= d + 6    # inner step, f-grad, cross product, HVPs
  # Same hypergradient as the exact implicit one at the new y.
  y1 = new_params.y
  v = jnp.linalg.solve(a, y1 - 1.0)
  exact = params.x + v         # grad_x f - J_xy^T v with J_xy = -I
  np.testing.assert_allclose(new_params.x, params.x - 0.1 * exact,
                             rtol=1e-9)
  assert float(new_state.diagnostics["linear_residual"]) <= 1e-10
