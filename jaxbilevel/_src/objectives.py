"""Pure builders of penalized objectives from ``(f, g)``.

Each builder takes the upper objective ``f(x, y, batch)`` and the lower
objective ``g(x, y, batch)`` and returns a pure function of explicit
arguments (no hidden state, the penalty constant is an argument), usable with
``jax.grad``, ``jax.jit`` and ``jax.vmap``. With ``has_aux=True`` the returned
function gives ``(value, aux)`` where ``aux`` holds the values of ``f`` and
``g`` at the evaluated point, so methods obtain their diagnostics from the same
forward pass.

Notation: see the methods guide, ``docs/methods.md``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxbilevel._src import base
from jaxbilevel._src import tree as tree_lib


def _cast(value, like):
  return jnp.asarray(value, dtype=jnp.result_type(like))


def lower_penalized(f: base.Objective, g: base.Objective, *,
                    has_aux: bool = False) -> Callable:
  r"""The scaled lower-level penalized objective :math:`\gamma^{-1}f + g`.

  Its minimiser in ``y`` is :math:`y_\gamma^*(x)`, the same as that of
  :math:`f + \gamma g`, but the scaling keeps the lower step size
  :math:`O(1/L_g)` whatever :math:`\gamma` is (:doc:`/methods`).

  Args:
    f: upper objective ``f(x, y, batch) -> scalar``.
    g: lower objective ``g(x, y, batch) -> scalar``.
    has_aux: if True the function returns ``(value, {"f": f, "g": g})``.

  Returns:
    ``fn(x, y, gamma, batch=None)``.

  Examples:
    >>> import jax
    >>> from jaxbilevel import objectives
    >>> f = lambda x, y, batch: x ** 2 + 10.0 * y
    >>> g = lambda x, y, batch: (y - x + 1.0) ** 2
    >>> h = objectives.lower_penalized(f, g)
    >>> float(jax.grad(h, argnums=1)(2.0, 1.0, 10.0))  # 10/10 + 2 * 0
    1.0
  """
  f = base.scalar_objective(f, "f")
  g = base.scalar_objective(g, "g")

  def fn(x, y, gamma, batch=None):
    fv = f(x, y, batch)
    gv = g(x, y, batch)
    value = fv / _cast(gamma, fv) + gv
    return (value, {"f": fv, "g": gv}) if has_aux else value

  return fn


def value_gap_penalty(f: base.Objective, g: base.Objective, *,
                      has_aux: bool = False) -> Callable:
  r"""The value-gap penalty :math:`f(x,y) + \gamma(g(x,y) - g(x,\hat y_g))`.

  ``y_g`` is an estimate of the lower solution :math:`y_g^*(x)` and enters
  through a stop-gradient, so by Danskin's theorem (G1 in :doc:`/methods`)

  * :math:`\nabla_x` of this function is the reduced-penalty gradient (G2 in
    :doc:`/methods`),
    :math:`\nabla_x f(x,y) + \gamma[\nabla_x g(x,y) - \nabla_x g(x,y_g)]`;
  * :math:`\nabla_y` of it is :math:`\nabla_y f + \gamma \nabla_y g`.

  With ``y`` the penalized solution it is the reduced penalty
  :math:`F_\gamma(x)`; as a function of ``(x, y)`` it is the joint penalty
  :math:`\tilde F_\gamma(x, y)` of V-PBGD. F2SA's Lagrangian is the same
  function with :math:`\lambda` in place of :math:`\gamma`.

  Args:
    f: upper objective ``f(x, y, batch) -> scalar``.
    g: lower objective ``g(x, y, batch) -> scalar``.
    has_aux: if True the function returns
      ``(value, {"f": f(x,y), "g": g(x,y), "g_gap": g(x,y) - g(x,y_g)})``.

  Returns:
    ``fn(x, y, y_g, gamma, batch=None)``.

  Examples:
    >>> import jax
    >>> from jaxbilevel import objectives
    >>> f = lambda x, y, batch: x ** 2 + 10.0 * y
    >>> g = lambda x, y, batch: (y - x + 1.0) ** 2
    >>> pen = objectives.value_gap_penalty(f, g)
    >>> x, y_g = 1.0, 0.0           # y_g = y_g*(x) = x - 1
    >>> y_gam = x - 1 - 5 / 15.0    # y_gamma*(x) for gamma = 15
    >>> round(float(jax.grad(pen)(x, y_gam, y_g, 15.0)), 6)  # 2x + 10
    12.0
  """
  f = base.scalar_objective(f, "f")
  g = base.scalar_objective(g, "g")

  def fn(x, y, y_g, gamma, batch=None):
    fv = f(x, y, batch)
    gv = g(x, y, batch)
    gap = gv - g(x, jax.lax.stop_gradient(y_g), batch)
    value = fv + _cast(gamma, fv) * gap
    return (value, {"f": fv, "g": gv, "g_gap": gap}) if has_aux else value

  return fn


def grad_norm_penalty(f: base.Objective, g: base.Objective, *,
                      has_aux: bool = False) -> Callable:
  r"""The gradient-norm penalty :math:`f + \gamma\|\nabla_y g(x,y)\|^2`.

  This is the penalty of G-PBGD (Shen & Chen, 2023). Differentiating it
  involves second derivatives of ``g`` (one Hessian-vector product).

  Args:
    f: upper objective ``f(x, y, batch) -> scalar``.
    g: lower objective ``g(x, y, batch) -> scalar``.
    has_aux: if True returns ``(value, {"f", "g", "grad_norm_sq"})``.

  Returns:
    ``fn(x, y, gamma, batch=None)``.

  Examples:
    >>> from jaxbilevel import objectives
    >>> f = lambda x, y, batch: 0.0 * x + y
    >>> g = lambda x, y, batch: (y - x) ** 2
    >>> pen = objectives.grad_norm_penalty(f, g)
    >>> float(pen(0.0, 1.0, 2.0))  # 1 + 2 * (2 * 1) ** 2
    9.0
  """
  f = base.scalar_objective(f, "f")
  g = base.scalar_objective(g, "g")

  def fn(x, y, gamma, batch=None):
    fv = f(x, y, batch)
    gv, gy = jax.value_and_grad(g, argnums=1)(x, y, batch)
    sq = sum(jnp.vdot(leaf, leaf).real for leaf in jax.tree.leaves(gy))
    value = fv + _cast(gamma, fv) * sq
    return (value, {"f": fv, "g": gv, "grad_norm_sq": sq}) if has_aux else value

  return fn


def accumulate(fn: base.Objective, num_microbatches: int) -> base.Objective:
  r"""The mean of ``fn`` over micro-batches, for gradient accumulation.

  Splits every leaf of ``batch`` along its leading axis into
  ``num_microbatches`` equal micro-batches :math:`B_1, \dots, B_k` and
  returns

  .. math::

    \bar f(x, y, B) = \frac{1}{k} \sum_{i=1}^k f(x, y, B_i),

  which equals ``fn(x, y, batch)`` when ``fn`` is a mean over the examples of
  the batch. Wrap both ``f`` and ``g`` and every gradient, Hessian-vector
  product or unrolled derivative that a method takes of them (both levels,
  inner loops included) is accumulated inside one bilevel step: this is the
  bilevel counterpart of ``optax.MultiSteps``, which cannot be used because
  a bilevel method computes its updates itself.

  The sum runs in a ``jax.lax.scan`` over ``jax.checkpoint``-ed evaluations
  of ``fn``, so reverse-mode derivatives keep the activations of one
  micro-batch at a time (each is recomputed in the backward pass) and
  higher derivatives (AID's Hessian-vector products) work through it. Cost:
  one extra forward evaluation per micro-batch in each backward pass.

  Args:
    fn: an objective ``fn(x, y, batch) -> scalar`` that averages over the
      leading axis of the batch.
    num_microbatches: :math:`k`, a Python int that divides the leading
      dimension of every leaf of ``batch``.

  Returns:
    ``fn_acc(x, y, batch)``, the mean of ``fn`` over the micro-batches.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbilevel import objectives
    >>> g = lambda x, y, batch: jnp.mean((batch["a"] * y - x) ** 2)
    >>> batch = {"a": jnp.arange(8.0)}
    >>> g4 = objectives.accumulate(g, num_microbatches=4)
    >>> bool(jnp.allclose(g4(1.0, 0.5, batch), g(1.0, 0.5, batch)))
    True
    >>> bool(jnp.allclose(jax.grad(g4, argnums=1)(1.0, 0.5, batch),
    ...                   jax.grad(g, argnums=1)(1.0, 0.5, batch)))
    True
  """
  fn = base.scalar_objective(fn, "fn")
  num_microbatches = base.check_static_int(num_microbatches,
                                           "num_microbatches")
  checkpointed = jax.checkpoint(fn)

  def split(path, leaf):
    shape = jnp.shape(leaf)
    where = f"batch{jax.tree_util.keystr(path)}"
    if not shape:
      raise base.BilevelValidationError(
          f"accumulate: {where} is a scalar; every leaf of the batch needs a "
          "leading (example) axis to split into num_microbatches="
          f"{num_microbatches} micro-batches. Put per-run constants in a "
          "closure instead of the batch.")
    if shape[0] % num_microbatches:
      raise base.BilevelValidationError(
          f"accumulate: num_microbatches={num_microbatches} does not divide "
          f"the leading dimension {shape[0]} of {where} (shape {shape}). "
          "Pick num_microbatches among the divisors of the batch size, or "
          "trim the batch.")
    return jnp.reshape(leaf, (num_microbatches, shape[0] // num_microbatches)
                       + shape[1:])

  def accumulated(x, y, batch=None):
    if not jax.tree.leaves(batch):
      raise base.BilevelValidationError(
          "accumulate: batch has no array leaves to split into "
          f"num_microbatches={num_microbatches} micro-batches; pass the "
          "batch (e.g. jbl.run(..., batch=data)).")
    micro = jax.tree_util.tree_map_with_path(split, batch)

    def body(total, micro_batch):
      return total + checkpointed(x, y, micro_batch), None

    first = jax.tree.map(lambda leaf: leaf[0], micro)
    out = jax.eval_shape(fn, x, y, first)
    zero = jnp.zeros(out.shape, out.dtype)
    total, _ = jax.lax.scan(body, zero, micro)
    return total / jnp.asarray(num_microbatches, total.dtype)

  accumulated.__name__ = getattr(fn, "__name__", "fn")
  accumulated.__wrapped__ = fn
  return accumulated


def flatness_residual(f: base.Objective, x, y_g, y_gamma, c, alpha,
                      batch=None) -> jax.Array:
  r"""The flatness residual estimate along a trajectory (Jiang et al., 2025).

  See the flatness section of :doc:`/methods`.

  :math:`\hat\delta(x)=\max\{|f(x,y_g)-f(x,y_\gamma)|-c\|y_g-y_\gamma\|^\alpha,0\}`.

  Pure in all arguments, so it can be ``vmap``-ed over a grid of
  ``(c, alpha)`` or over a trajectory.

  Args:
    f: upper objective.
    x: upper variables.
    y_g: estimate of the lower solution.
    y_gamma: estimate of the penalized lower solution.
    c: flatness modulus.
    alpha: flatness exponent.
    batch: passed to ``f``.

  Returns:
    The scalar residual.

  Examples:
    >>> from jaxbilevel import objectives
    >>> f = lambda x, y, batch: x ** 2 + 10.0 * y
    >>> round(float(objectives.flatness_residual(f, 0.0, -1.0, -1.5, 1.0, 1.5)), 5)
    4.64645
  """
  f = base.scalar_objective(f, "f")
  diff = jnp.abs(f(x, y_g, batch) - f(x, y_gamma, batch))
  dist = tree_lib.tree_norm(tree_lib.tree_sub(y_g, y_gamma))
  return jnp.maximum(diff - c * dist ** alpha, 0.0)

