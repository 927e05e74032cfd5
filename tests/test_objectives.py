"""Builders of bilevel objectives (jaxbilevel.objectives).

The penalties are pure and differentiable (problem A1 of docs/problems.md);
``accumulate``: k micro-batches give the full-batch values, gradients,
Hessian-vector products and bilevel steps (on the problem and methods of
test_combinators.py, in _helpers.py).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _helpers import assert_trees_close as _close
from _helpers import case_kwargs as _kwargs
from _helpers import plain as _plain
from _helpers import ridge_data as _data
from _helpers import ridge_f as f
from _helpers import ridge_g as g
from _helpers import RIDGE_PARAMS as PARAMS
from _helpers import steps_from_params as _steps
from _helpers import tree_distance as _distance
import jaxbilevel as jbl
from jaxbilevel import objectives
from jaxbilevel import problems


def test_objective_builders_are_pure_and_differentiable():
  prob = problems.negative_example(jnp.float64)
  lower = jbl.objectives.lower_penalized(prob.f, prob.g)
  gap = jbl.objectives.value_gap_penalty(prob.f, prob.g)
  gnp = jbl.objectives.grad_norm_penalty(prob.f, prob.g)
  x, gamma = 1.0, 15.0
  y_g = prob.info["y_g"](x)
  y_gam = prob.info["y_gamma"](x, gamma)
  # y_gamma* minimises f / gamma + g.
  assert abs(float(jax.grad(lower, argnums=1)(x, y_gam, gamma))) < 1e-12
  # The reduced-penalty gradient at the exact trackers is 2x + 10 (A1 in
  # docs/problems.md).
  np.testing.assert_allclose(jax.grad(gap)(x, y_gam, y_g, gamma), 12.0,
                             atol=1e-12)
  # vmap over gamma: gradient of F_gamma is 2x + 10 for every gamma.
  gammas = jnp.asarray([2.0, 15.0, 100.0])
  grads = jax.vmap(lambda gm: jax.grad(gap)(x, prob.info["y_gamma"](x, gm),
                                            y_g, gm))(gammas)
  np.testing.assert_allclose(grads, 12.0, atol=1e-10)
  # grad-norm penalty: f + gamma * (2 (y - x + 1))^2 and its y-derivative.
  np.testing.assert_allclose(gnp(1.0, 0.5, 2.0), 1.0 + 5.0 + 2.0 * 1.0,
                             atol=1e-12)
  eps = 1e-6
  fd = (gnp(1.0, 0.5 + eps, 2.0) - gnp(1.0, 0.5 - eps, 2.0)) / (2 * eps)
  np.testing.assert_allclose(jax.grad(gnp, argnums=1)(1.0, 0.5, 2.0), fd,
                             rtol=1e-7)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.jit(gap)(x, y_gam, y_g, gamma)


# ---------------------------------------------------------------------------
# Gradient accumulation inside one bilevel step
# ---------------------------------------------------------------------------


def _values_and_derivatives(h, x, y, batch):
  """h, both gradients, an HVP in y and the mixed derivative d/dx grad_y h."""
  v = jnp.asarray([0.3, -1.0, 0.5])
  grad_y = lambda x_, y_: jax.grad(h, 1)(x_, y_, batch)
  return {"value": h(x, y, batch),
          "grad_x": jax.grad(h, 0)(x, y, batch),
          "grad_y": grad_y(x, y),
          "hvp": jax.jvp(lambda y_: grad_y(x, y_), (y,), (v,))[1],
          "mixed": jax.jacfwd(grad_y, 0)(x, y)}


@pytest.mark.parametrize("k", [1, 4])
def test_accumulate_matches_full_batch_values_and_derivatives(k):
  batch = _data()

  @jax.jit
  def both(x, y, batch):
    return [(_values_and_derivatives(fn, x, y, batch),
             _values_and_derivatives(objectives.accumulate(fn, k), x, y,
                                     batch)) for fn in (f, g)]

  (f_full, f_acc), (g_full, g_acc) = both(*PARAMS, batch)
  _close(f_acc, f_full, rtol=1e-12, atol=1e-14)
  _close(g_acc, g_full, rtol=1e-12, atol=1e-14)
  assert float(jnp.abs(g_full["mixed"]).max()) > 1e-3  # g couples x and y


def test_accumulate_scans_over_checkpointed_micro_batches():
  acc = objectives.accumulate(g, num_microbatches=4)
  text = str(jax.make_jaxpr(jax.grad(acc, 1))(*PARAMS, _data()))
  assert "scan" in text and "length=4" in text
  assert "checkpoint" in text or "remat" in text


@pytest.mark.parametrize("name", ["pbgd_free", "alt_pbgd", "bome", "aid"])
def test_one_accumulated_bilevel_step_equals_the_full_batch_step(name):
  method, kw = _kwargs(name)
  kw.update(f=objectives.accumulate(f, 4), g=objectives.accumulate(g, 4))
  accumulated = _steps(method(**kw), 1, _data())
  full = _steps(_plain(name), 1, _data())
  _close(accumulated, full, rtol=1e-10, atol=1e-12)
  assert _distance(accumulated[0], PARAMS) > 1e-4


@pytest.mark.parametrize("k, batch, match", [
    (3, _data(), r"num_microbatches=3 does not divide the leading dimension "
                 r"8 of batch\['a'\] \(shape \(8, 3\)\)"),
    (0, _data(), r"num_microbatches must be >= 1, got 0"),
    (2.0, _data(), r"num_microbatches must be a Python int"),
    (2, {**_data(), "w": jnp.asarray(1.0)},
     r"batch\['w'\] is a scalar; every leaf of the batch needs a leading"),
    (2, None, r"batch has no array leaves"),
])
def test_accumulate_bad_input(k, batch, match):
  with pytest.raises(jbl.BilevelValidationError, match=match):
    objectives.accumulate(g, num_microbatches=k)(*PARAMS, batch)
