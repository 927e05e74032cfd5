"""AID (jbl.aid): the hypergradient solve stops at its tolerance."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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
  new_params, new_state = jax.jit(_tx_step(
      tx, diagnostics=("linear_residual",)))(params, state, None)
  jax.block_until_ready(new_params)
  assert len(products) <= d + 6    # inner step, f-grad, cross product, HVPs
  # Same hypergradient as the exact implicit one at the new y.
  y1 = new_params.y
  v = jnp.linalg.solve(a, y1 - 1.0)
  exact = params.x + v         # grad_x f - J_xy^T v with J_xy = -I
  np.testing.assert_allclose(new_params.x, params.x - 0.1 * exact,
                             rtol=1e-9)
  assert float(new_state.diagnostics["linear_residual"]) <= 1e-10


def _aid_problem(dtype):
  f = lambda x, y, batch: jnp.sum(x ** 2) + jnp.sum((y - 1.0) ** 2)
  g = lambda x, y, batch: jnp.sum((y - x) ** 2)
  params = jbl.BilevelParams(jnp.ones(2, dtype), jnp.zeros(2, dtype))
  return f, g, params


def _aid(f, g, **kw):
  return jbl.aid(f, g, upper_optimizer=optax.sgd(0.1),
                 lower_optimizer=optax.sgd(0.5), inner_steps=2,
                 linear_steps=2, **kw)


def test_default_tol_follows_the_dtype():
  from jaxbilevel._src import aid as aid_src  # pylint: disable=import-outside-toplevel
  assert aid_src.default_tol(jnp.float32) == 1e-10
  assert aid_src.default_tol(jnp.float64) == 1e-10
  assert aid_src.default_tol(jnp.bfloat16) == 1e-10
  assert aid_src.default_tol(jnp.float16) == float(jnp.finfo(jnp.float16).tiny)
  # float32: the default is today's 1e-10, so the iterates are unchanged.
  f, g, p32 = _aid_problem(jnp.float32)
  default, _, hist = jbl.run(_aid(f, g), p32, num_steps=3, diagnostics=True)
  explicit, _, _ = jbl.run(_aid(f, g, tol=1e-10), p32, num_steps=3)
  np.testing.assert_array_equal(default.x, explicit.x)
  np.testing.assert_allclose(hist["tol"], 1e-10, rtol=1e-6)
  # float16: 1e-10 would underflow; the default is the smallest normal number
  # and the run takes exact steps x <- x - 0.1 (4x - 2) from x = 1.
  f, g, p16 = _aid_problem(jnp.float16)
  params, _, hist = jbl.run(_aid(f, g), p16, num_steps=3, diagnostics=True)
  assert params.x.dtype == jnp.float16
  x = 1.0
  for _ in range(3):
    x -= 0.1 * (4 * x - 2)
  np.testing.assert_allclose(np.asarray(params.x, np.float32), [x, x],
                             rtol=2e-3)
  np.testing.assert_allclose(hist["tol"], 6.1035e-05, rtol=1e-3)


def test_a_tol_that_underflows_is_named():
  f, g, p16 = _aid_problem(jnp.float16)
  tx = _aid(f, g, tol=1e-9)
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"tol = 1e-09 underflows to 0 in float16, the "
                           r"dtype of the parameters: use a larger value"):
    tx.update(None, tx.init(p16), p16)
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"tol = 1e-09 underflows to 0 in float16"):
    jbl.run(tx, p16, num_steps=2)
