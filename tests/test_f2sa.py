"""F2SA (jbl.f2sa, jbl.f2sa_schedules): schedules and a hand-written step.

The schedules equal their formulas in the default float dtype; one step
equals and costs a hand-written step (benchopt's structure). FLOPs are
XLA's cost analysis of the compiled step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from _helpers import compiled_flops as _compiled
from _helpers import inner_sgd as _inner_sgd
from _helpers import mlp_problem as _mlp
from _helpers import sgd_step as _sgd_step
from _helpers import tx_step as _tx_step
import jaxbilevel as jbl


# ---------------------------------------------------------------------------
# F2SA schedules: computed in the default float dtype.
# ---------------------------------------------------------------------------


def test_f2sa_schedules_are_float64_under_x64_and_equal_the_formulas():
  assert jax.config.jax_enable_x64  # tests/conftest.py
  b = jbl.f2sa_schedules("benchopt", inner_steps=10, lower_step_size=0.1,
                         value_step_size=0.2, outer_ratio=2.0, gamma=3.0,
                         gamma_delta=0.5, offset=1.0)
  for k in (0, 3, 4, 123):
    values = {"lower": (b.lower(10 * k + 7), 0.1 * (k + 1.0) ** (-5 / 7)),
              "value": (b.value(10 * k), 0.2 * (k + 1.0) ** (-4 / 7)),
              "upper": (b.upper(k), 0.05 * (k + 1.0) ** (-4 / 7)),
              "gamma_increment": (b.gamma_increment(k),
                                  0.5 * (k + 1.0) ** (-1 / 7))}
    for name, (got, want) in values.items():
      assert got.dtype == jnp.float64, name
      np.testing.assert_allclose(float(got), want, rtol=4e-16, err_msg=name)
  p = jbl.f2sa_schedules("paper", inner_steps=10, lower_step_size=0.1,
                         value_step_size=0.2)
  lam = lambda k: 0.2 * (k + 1.0) ** (-4 / 7) / (2 * 0.1 * (k + 1.0) ** (
      -5 / 7))
  np.testing.assert_allclose(p.gamma, lam(0), rtol=4e-16)
  for k in (0, 4, 99):
    got = p.gamma_increment(k)
    assert got.dtype == jnp.float64
    # A difference of two nearby values: relative rounding of lambda itself.
    np.testing.assert_allclose(float(got), lam(k + 1) - lam(k),
                               atol=4e-16 * lam(k + 1))
    np.testing.assert_allclose(float(p.upper(k)), 0.1 * (k + 1.0) ** (-5 / 7),
                               rtol=4e-16)


def test_f2sa_schedules_are_float32_without_x64():
  with jax.enable_x64(False):
    s = jbl.f2sa_schedules("benchopt", inner_steps=10, lower_step_size=0.1)
    assert s.lower(47).dtype == jnp.float32
    np.testing.assert_allclose(float(s.lower(47)), 0.1 * 5 ** (-5 / 7),
                               rtol=1e-6)


# ---------------------------------------------------------------------------
# One step against a hand-written one
# ---------------------------------------------------------------------------


_F2SA = dict(lam=3.0, lr_x=0.02, lr_y=0.05, lr_z=0.1, steps=4)


def _f2sa_hand_step(f, g):
  """One F2SA step in plain JAX (benchopt's structure, constant multiplier)."""
  c = _F2SA

  def step(params, z, batch):
    x, y = params
    lam = c["lam"]
    z = _inner_sgd(lambda z_: g(x, z_, batch), z, c["lr_z"], c["steps"])
    y = _inner_sgd(lambda y_: f(x, y_, batch) + lam * g(x, y_, batch), y,
                   c["lr_y"], c["steps"])
    fx = jax.grad(f)(x, y, batch)
    gx, gx_z = jax.grad(g)(x, y, batch), jax.grad(g)(x, z, batch)
    d_x = jax.tree.map(lambda a, b, e: a + lam * (b - e), fx, gx, gx_z)
    return jbl.BilevelParams(_sgd_step(x, d_x, c["lr_x"]), y), z

  return step


def test_f2sa_equals_and_costs_a_hand_written_step():
  f, g, params, data = _mlp()
  c = _F2SA
  tx = jbl.f2sa(f, g, gamma=c["lam"], inner_steps=c["steps"],
                upper_optimizer=optax.sgd(c["lr_x"]),
                lower_optimizer=optax.sgd(c["lr_y"]),
                value_optimizer=optax.sgd(c["lr_z"]))
  state = tx.init(params)
  ours, step = _compiled(_tx_step(tx), params, state, data)
  theirs, hand = _compiled(_f2sa_hand_step(f, g), params, params.y, data)
  assert ours <= 1.05 * theirs, (ours, theirs)
  ref, z = params, params.y
  for _ in range(3):
    params, state = step(params, state, data)
    ref, z = hand(ref, z, data)
  for a, b in zip(jax.tree.leaves((params, state.y_g)),
                  jax.tree.leaves((ref, z))):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
