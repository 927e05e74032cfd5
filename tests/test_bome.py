"""BOME (jbl.bome): its step equals a hand-written one at benchopt's cost.

BOME's two directions come from two reverse passes (benchopt's oracle
count). FLOPs are XLA's cost analysis of the compiled step (a loop body
counted once, the same loops in both programs).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import tree_utils as otu

from _helpers import compiled_flops as _compiled
from _helpers import inner_sgd as _inner_sgd
from _helpers import mlp_problem as _mlp
from _helpers import sgd_step as _sgd_step
from _helpers import tx_step as _tx_step
import jaxbilevel as jbl
from jaxbilevel import objectives


_BOME = dict(eta=0.5, lr_x=0.05, lr_y=0.1, alpha=0.2, steps=3, eps=1e-8)


def _bome_tx(f, g):
  c = _BOME
  return jbl.bome(f, g, eta=c["eta"], eps=c["eps"], value_steps=c["steps"],
                  upper_optimizer=optax.sgd(c["lr_x"]),
                  lower_optimizer=optax.sgd(c["lr_y"]),
                  value_optimizer=optax.sgd(c["alpha"]))


def _bome_hand_step(f, g, directions):
  """One BOME step in plain JAX; ``directions``: how (grad f, grad q) are taken.

  ``"benchopt"``: three gradients as in benchopt's BOME (f on both blocks,
  g on both blocks at y, g's x-block at y_hat). ``"jvp"``: the previous
  jaxbilevel formula, a forward derivative in gamma at 0 of
  grad(f + gamma q).
  """
  c = _BOME
  penalty = objectives.value_gap_penalty(f, g)

  def step(params, batch):
    x, y = params
    y_hat = _inner_sgd(lambda y_: g(x, y_, batch), y, c["alpha"], c["steps"])
    if directions == "benchopt":
      grad_f = jax.grad(f, argnums=(0, 1))(x, y, batch)
      gx, gy = jax.grad(g, argnums=(0, 1))(x, y, batch)
      gx_hat = jax.grad(g)(x, y_hat, batch)
      grad_q = (otu.tree_sub(gx, gx_hat), gy)
    else:
      grad_f, grad_q = jax.jvp(
          lambda gam: jax.grad(penalty, argnums=(0, 1))(x, y, y_hat, gam,
                                                        batch),
          (jnp.zeros(()),), (jnp.ones(()),))
    q_sq = otu.tree_vdot(grad_q, grad_q)
    lam = jnp.maximum(c["eta"] * q_sq - otu.tree_vdot(grad_f, grad_q),
                      0.0) / (q_sq + c["eps"])
    d_x, d_y = otu.tree_add_scale(grad_f, lam, grad_q)
    return jbl.BilevelParams(_sgd_step(x, d_x, c["lr_x"]),
                             _sgd_step(y, d_y, c["lr_y"]))

  return step


def test_bome_equals_the_old_formula_at_benchopt_flops():
  f, g, params, data = _mlp()
  tx = _bome_tx(f, g)
  state = tx.init(params)
  # (The multiplier is computed by the step anyway: recording it is free.)
  ours, step = _compiled(_tx_step(tx, diagnostics=("multiplier",)), params,
                         state, data)
  benchopt, hand = _compiled(_bome_hand_step(f, g, "benchopt"), params, data)
  old_flops, old = _compiled(_bome_hand_step(f, g, "jvp"), params, data)
  # Two reverse passes: benchopt's count; the forward derivative of the
  # old formula cost a gradient more.
  assert ours <= 1.05 * benchopt, (ours, benchopt)
  assert old_flops > 1.2 * benchopt, (old_flops, benchopt)
  ref = bench = params
  for _ in range(4):
    params, state = step(params, state, data)
    ref, bench = old(ref, data), hand(bench, data)
  assert float(state.diagnostics["multiplier"]) > 0  # the barrier is active
  for a, b, c in zip(jax.tree.leaves(params), jax.tree.leaves(ref),
                     jax.tree.leaves(bench)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a, c, rtol=1e-10, atol=1e-12)
