r"""Hypergradients as pure functions: implicit (CG / Neumann) and unrolled.

These are the building blocks of :func:`jaxbilevel.aid`, :func:`jaxbilevel.itd`
and :func:`jaxbilevel.ufo_blo`, exposed standalone so that they can be used
inside any ``jax.grad``/``jax.jit``/``jax.vmap`` code (the role that jaxopt's
implicit differentiation used to play):

* second-order products of the lower objective: :func:`hvp`
  (:math:`\nabla^2_{yy} g\,v`, forward-over-reverse) and :func:`cross_vjp`
  (:math:`\nabla^2_{xy} g\,v`);
* linear solvers for :math:`Hv=b` as ``lax.scan`` loops of static length:
  :func:`conjugate_gradient` (early exit by masking, or a ``lax.while_loop``
  that stops at the tolerance when not differentiated) and :func:`neumann`;
  and a dense one for small lower levels, :func:`direct_solve`;
* :func:`implicit_hypergradient`: the implicit hypergradient at a given
  lower solution,
  :math:`\nabla_x f(x,y) - J_{xy}H^{-1}\nabla_y f(x,y)`;
* :func:`implicit_solution`: the identity on a lower solution whose derivative
  is the implicit one, so ``jax.grad`` of any function of it is the implicit
  hypergradient (a ``jax.custom_vjp``);
* :func:`unrolled_solve`: K optax steps on the lower objective, differentiable
  end to end (``lax.scan``), with truncation and optional checkpointing.

**Closure contract.** Every outer dependency of the lower objective must reach
it either as the explicit argument ``x``, through ``batch``, or as a value
that ``g`` closes over. The functions here take ``g``, ``x``, ``y`` and
``batch`` as explicit arguments, so they never hide traced values in Python
state; :func:`implicit_solution` additionally closure-converts ``g``
(``jax.closure_convert``), so traced values that ``g`` closes over (e.g. a
regularisation strength defined in the enclosing function being
differentiated) receive their implicit-function-theorem cotangent exactly like
``x`` does. The input ``y`` is treated as a *solution*, never as a function of
anything: it is wrapped in ``lax.stop_gradient`` and receives no gradient.
``g`` must be a pure function of ``(x, y, batch)`` and its closed-over values.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional, Union

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import optax
from optax import tree_utils as otu

from jaxbilevel._src import base
from jaxbilevel._src import inner
from jaxbilevel._src import tree as tree_lib

_SOLVERS = ("cg", "neumann", "direct")
_TRUNCATED_JACOBIANS = ("zero", "identity")


class LinearSolveResult(NamedTuple):
  """Output of :func:`conjugate_gradient` and :func:`neumann`.

  Attributes:
    solution: the approximate solution :math:`v` of :math:`Hv=b`.
    residual_norm: :math:`\\|b-Hv\\|` for the returned :math:`v`.
  """

  solution: base.PyTree
  residual_norm: jax.Array


# ---------------------------------------------------------------------------
# Second-order products of the lower objective.
# ---------------------------------------------------------------------------


def hvp(g: base.Objective, x, y, v, batch=None):
  r"""Hessian-vector product :math:`\nabla^2_{yy}g(x,y)\,v` (forward-over-reverse).

  Costs about two to three gradients of ``g``; never forms the Hessian.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbilevel import hypergradient
    >>> g = lambda x, y, batch: x * jnp.sum(y ** 2)
    >>> hypergradient.hvp(g, 3.0, jnp.ones(2), jnp.array([1.0, -1.0])).tolist()
    [6.0, -6.0]
  """
  grad_y = jax.grad(g, argnums=1)
  return jax.jvp(lambda y_: grad_y(x, y_, batch), (y,), (v,))[1]


def _lower_grad_vjp(g, x, y, batch, v, *consts):
  """Cotangents of ``(x, batch, *consts)`` for ``<grad_y g(x, y, batch), v>``."""
  grad_y = jax.grad(g, argnums=1)
  _, vjp = jax.vjp(lambda x_, b_, *c_: grad_y(x_, y, b_, *c_), x, batch,
                   *consts)
  return vjp(v)


def cross_vjp(g: base.Objective, x, y, v, batch=None):
  r"""The cross product :math:`J_{xy}v=\nabla_x\langle\nabla_y g(x,y),v\rangle`.

  One reverse pass through :math:`\nabla_y g` (the "cross product" of the
  cost tables in :doc:`/methods`); the result has the structure of ``x``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbilevel import hypergradient
    >>> g = lambda x, y, batch: jnp.sum((y - 2.0 * x) ** 2)
    >>> hypergradient.cross_vjp(g, jnp.zeros(2), jnp.zeros(2), jnp.ones(2)).tolist()
    [-4.0, -4.0]
  """
  return _lower_grad_vjp(g, x, y, batch, v)[0]


# ---------------------------------------------------------------------------
# Linear solvers (lax.scan of static length: reverse-differentiable).
# ---------------------------------------------------------------------------


def _scalar_like(value, tree):
  return jnp.asarray(value, dtype=tree_lib.tree_dtype(tree))


@base.renamed_arguments("conjugate_gradient", {"num_iters": "num_steps"})
def conjugate_gradient(matvec: Callable, b, *, num_steps: int,
                       tol=0.0, init=None,
                       differentiable: bool = True) -> LinearSolveResult:
  r"""Solves :math:`Hv=b` for a symmetric positive definite :math:`H` by CG.

  Plain conjugate gradient (not the normal equations, which would square the
  condition number), ``num_steps`` iterations in a ``lax.scan`` started from
  ``init`` (zero by default). Once the residual norm is ``<= tol`` (absolute)
  the remaining iterations are masked no-ops: the
  loop length stays static, so the solver is ``jit``/``vmap``/reverse-mode
  friendly, and no division by a vanishing curvature produces NaN.

  With ``differentiable=False`` the same iterations run in a
  ``lax.while_loop`` that stops at the tolerance, so a solve that converges
  early costs fewer matrix-vector products (the result is the same); use it
  when nothing reverse-differentiates through the solve (``jit``, ``vmap``
  and forward mode still work).

  Args:
    matvec: ``v -> H v`` on pytrees shaped like ``b``.
    b: right-hand side (any pytree of floating arrays).
    num_steps: number of iterations (static int, at most the number of
      matrix-vector products; formerly ``num_iters``).
    tol: absolute tolerance on :math:`\|b-Hv\|` (float or traced array).
      A NaN ``tol`` gives a NaN solution and residual.
    init: optional starting point (costs one extra product).
    differentiable: keep the static-length scan (reverse-differentiable);
      False stops at the tolerance in a ``lax.while_loop``.

  Returns:
    A :class:`LinearSolveResult`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbilevel import hypergradient
    >>> h = jnp.array([[4.0, 1.0], [1.0, 3.0]])
    >>> res = hypergradient.conjugate_gradient(lambda v: h @ v,
    ...                                        jnp.array([1.0, 2.0]), num_steps=2)
    >>> [round(float(v), 6) for v in res.solution]   # (1/11, 7/11)
    [0.090909, 0.636364]
  """
  num_steps = base.check_static_int(num_steps, "num_steps")
  tol2 = _scalar_like(tol, b) ** 2
  if init is None:
    v = otu.tree_zeros_like(b)
    r = b
  else:
    v = init
    r = otu.tree_sub(b, matvec(init))
  rs = otu.tree_vdot(r, r)

  def body(carry, _):
    v, r, p, rs = carry
    active = rs > tol2  # always True in the while_loop (its condition)
    hp = matvec(p)
    curvature = otu.tree_vdot(p, hp)
    safe = jnp.where(active, curvature, jnp.ones_like(curvature))
    alpha = jnp.where(active, rs / safe, jnp.zeros_like(rs))
    v = otu.tree_add_scale(v, alpha, p)
    r = otu.tree_add_scale(r, -alpha, hp)
    rs_new = otu.tree_vdot(r, r)
    beta = jnp.where(active, rs_new / jnp.where(active, rs, 1), 0)
    p = otu.tree_add_scale(r, beta, p)
    return (v, r, p, jnp.where(active, rs_new, rs)), None

  if differentiable:
    (v, _, _, rs), _ = jax.lax.scan(body, (v, r, r, rs), None,
                                    length=num_steps)
  else:
    # Stops at the tolerance: no product is spent after convergence (the
    # scan above masks them, for reverse mode's sake).
    def cond(carry):
      i, (_, _, _, rs) = carry
      return (i < num_steps) & (rs > tol2)

    _, (v, _, _, rs) = jax.lax.while_loop(
        cond, lambda carry: (carry[0] + 1, body(carry[1], None)[0]),
        (jnp.zeros((), jnp.int32), (v, r, r, rs)))
  # A NaN tolerance (an invalid traced tol, see resolve_hyperparameter) makes
  # the test rs > tol^2 false, so CG would stop at once and return a finite,
  # wrong v; a NaN result instead lets the run report it.
  invalid = jnp.isnan(tol2)
  v = jax.tree.map(lambda t: jnp.where(invalid, jnp.nan, t), v)
  return LinearSolveResult(v, jnp.where(invalid, jnp.nan, jnp.sqrt(rs)))


@base.renamed_arguments("neumann", {"num_terms": "num_steps"})
def neumann(matvec: Callable, b, *, num_steps: int,
            step) -> LinearSolveResult:
  r"""Approximates :math:`H^{-1}b` by the truncated Neumann series.

  .. math:: v = \eta_N \sum_{j=0}^{K-1} (I - \eta_N H)^j b,

  which converges when :math:`0<\eta_N\le 1/L` (``L`` the largest eigenvalue
  of :math:`H`). The residual :math:`b-Hv=(I-\eta_N H)^K b` is the next term of
  the series, so it is returned at no extra cost. ``K`` products with
  :math:`H`.

  Args:
    matvec: ``v -> H v``.
    b: right-hand side.
    num_steps: number K of terms (static int; formerly ``num_terms``).
    step: :math:`\eta_N` (float or traced array).

  Returns:
    A :class:`LinearSolveResult`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbilevel import hypergradient
    >>> res = hypergradient.neumann(lambda v: 2.0 * v, jnp.array([1.0]),
    ...                             num_steps=30, step=0.25)
    >>> round(float(res.solution[0]), 6)   # 1 / 2
    0.5
  """
  num_steps = base.check_static_int(num_steps, "num_steps")
  step = _scalar_like(step, b)

  def body(carry, _):
    total, term = carry
    total = otu.tree_add(total, term)
    term = otu.tree_add_scale(term, -step, matvec(term))
    return (total, term), None

  (total, term), _ = jax.lax.scan(body, (otu.tree_zeros_like(b), b), None,
                                  length=num_steps)
  return LinearSolveResult(otu.tree_scale(step, total), otu.tree_norm(term))


def direct_solve(matvec: Callable, b) -> LinearSolveResult:
  r"""Solves :math:`Hv=b` exactly by forming :math:`H` densely.

  :math:`H` is the Jacobian of the linear map ``matvec`` (``jax.jacfwd``
  over the flattened ``b``: :math:`d` matrix-vector products, batched), and
  the system is solved by ``jnp.linalg.solve`` (LU, :math:`O(d^3)`). For
  small lower levels only: the memory is :math:`O(d^2)`. Differentiable in
  forward and reverse mode.

  Args:
    matvec: ``v -> H v`` on pytrees shaped like ``b`` (linear).
    b: right-hand side (any pytree of floating arrays).

  Returns:
    A :class:`LinearSolveResult` (the residual :math:`\|b-Hv\|` from the
    dense :math:`H`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbilevel import hypergradient
    >>> h = jnp.array([[4.0, 1.0], [1.0, 3.0]])
    >>> res = hypergradient.direct_solve(lambda v: h @ v, jnp.array([1.0, 2.0]))
    >>> [round(float(v), 6) for v in res.solution]   # (1/11, 7/11)
    [0.090909, 0.636364]
  """
  flat_b, unravel = ravel_pytree(b)
  flat_matvec = lambda v: ravel_pytree(matvec(unravel(v)))[0]
  h = jax.jacfwd(flat_matvec)(jnp.zeros_like(flat_b))
  v = jnp.linalg.solve(h, flat_b)
  return LinearSolveResult(unravel(v), jnp.linalg.norm(flat_b - h @ v))


class _SolveConfig(NamedTuple):
  solver: str
  linear_steps: int


def check_solver(solver, linear_steps, neumann_step, where):
  """Validates the linear-solver arguments of the implicit hypergradient."""
  if solver not in _SOLVERS:
    raise base.BilevelValidationError(
        f"{where}: solver must be one of {_SOLVERS}, got {solver!r}.")
  linear_steps = base.check_static_int(linear_steps, "linear_steps")
  if solver == "neumann":
    if neumann_step is None:
      raise base.BilevelValidationError(
          f"{where}: solver='neumann' needs neumann_step (eta_N <= 1/L_g, the "
          "inverse of the largest eigenvalue of the lower Hessian).")
    base.check_hyperparameter(neumann_step, "neumann_step")
  return _SolveConfig(solver, linear_steps)


def _solve_lower_hessian(g, x, y, b, batch, config: _SolveConfig, tol,
                         neumann_step, *consts,
                         differentiable=True) -> LinearSolveResult:
  """Solves ``grad^2_yy g(x, y) v = b`` with the configured solver."""
  matvec = lambda v: hvp(lambda x_, y_, b_: g(x_, y_, b_, *consts), x, y, v,
                         batch)
  if config.solver == "direct":
    return direct_solve(matvec, b)
  if config.solver == "neumann":
    return neumann(matvec, b, num_steps=config.linear_steps,
                   step=neumann_step)
  # The hand-written CG, not jax.scipy.sparse.linalg.cg: jax's spends one
  # Hessian-vector product more per solve (the residual of its zero start)
  # and returns no residual (the recorded linear_residual would cost one
  # more), 4% more FLOPs per AID step on benchmarks/overhead.py's quadratic;
  # and its derivative is that of the exact solve, not of the K iterations
  # that implicit_solution differentiates.
  return conjugate_gradient(matvec, b, num_steps=config.linear_steps,
                            tol=tol, differentiable=differentiable)


# ---------------------------------------------------------------------------
# Implicit hypergradient (implicit function theorem; docs/methods.md).
# ---------------------------------------------------------------------------


class ImplicitInfo(NamedTuple):
  """Auxiliary output of :func:`implicit_hypergradient` with ``has_aux=True``.

  Attributes:
    value: :math:`f(x, y)`.
    v: the solution of :math:`Hv=\\nabla_y f(x,y)`.
    residual_norm: :math:`\\|\\nabla_y f - Hv\\|`.
  """

  value: jax.Array
  v: base.PyTree
  residual_norm: jax.Array


@base.renamed_arguments("implicit_hypergradient",
                        {"num_iters": "linear_steps"})
def implicit_hypergradient(f: base.Objective, g: base.Objective, x, y,
                           batch=None, *, solver: str = "cg",
                           linear_steps: int = 10, tol=1e-10,
                           neumann_step=None, has_aux: bool = False,
                           differentiable: bool = True):
  r"""The implicit hypergradient at a given lower solution.

  .. math::

    H v = \nabla_y f(x, y), \qquad
    \nabla\phi(x) \approx \nabla_x f(x, y) - \nabla^2_{xy} g(x, y)\, v,

  with :math:`H=\nabla^2_{yy}g(x,y)` applied by forward-over-reverse
  Hessian-vector products and the system solved by ``linear_steps`` steps of
  conjugate gradient (``solver="cg"``), of the Neumann series
  (``solver="neumann"``, step ``neumann_step``) or exactly with the dense
  Hessian (``solver="direct"``, :func:`direct_solve`: small lower levels). ``y`` should be (close to)
  :math:`y^*(x)`; it is treated as a constant (``lax.stop_gradient``).

  Everything is an explicit argument and every loop is a ``lax.scan`` of
  static length, so the function can itself be ``jit``-ed, ``vmap``-ed over
  ``tol``/``neumann_step``/data, and differentiated (forward or reverse mode)
  with respect to ``x`` and ``batch`` *at fixed* ``y``; see the module
  docstring for the closure contract.

  Cost: one f-gradient (both blocks), ``linear_steps`` Hessian-vector products
  and one cross product :math:`J_{xy}v` (``"direct"``: :math:`d_y` products
  and a dense :math:`O(d_y^3)` solve). Memory: about four copies of ``y``
  (CG), two (Neumann) or :math:`d_y^2` numbers (direct).

  Args:
    f: upper objective ``f(x, y, batch) -> scalar``.
    g: lower objective ``g(x, y, batch) -> scalar`` (strongly convex in ``y``
      near ``y``: the lower Hessian must be positive definite).
    x: upper variables.
    y: lower solution.
    batch: passed to ``f`` and ``g``.
    solver: ``"cg"``, ``"neumann"`` or ``"direct"``.
    linear_steps: CG iterations or Neumann terms (static int; ignored by
      ``"direct"``; formerly ``num_iters``), as in :func:`jaxbilevel.aid`.
    tol: CG early-exit tolerance on the residual norm (absolute).
    neumann_step: :math:`\eta_N\le1/L_g` (required for ``"neumann"``).
    has_aux: also return an :class:`ImplicitInfo`.
    differentiable: False lets CG stop at ``tol`` in a ``lax.while_loop``
      (fewer Hessian-vector products, same result) when the hypergradient
      is not reverse-differentiated with respect to ``x`` or ``batch``.

  Returns:
    The hypergradient (structure of ``x``), or ``(hypergradient, info)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbilevel import hypergradient
    >>> g = lambda x, y, batch: 0.5 * jnp.sum((y - x) ** 2)   # y*(x) = x
    >>> f = lambda x, y, batch: 0.5 * jnp.sum((y - 1.0) ** 2)
    >>> hypergradient.implicit_hypergradient(f, g, jnp.zeros(2),
    ...                                      jnp.zeros(2)).tolist()
    [-1.0, -1.0]
  """
  config = check_solver(solver, linear_steps, neumann_step,
                         "implicit_hypergradient")
  f = base.scalar_objective(f, "f")
  g = base.scalar_objective(g, "g")
  y = jax.lax.stop_gradient(y)
  value, (grad_x, grad_y) = jax.value_and_grad(f, argnums=(0, 1))(x, y, batch)
  result = _solve_lower_hessian(g, x, y, grad_y, batch, config, tol,
                                neumann_step, differentiable=differentiable)
  hypergrad = otu.tree_sub(grad_x, cross_vjp(g, x, y, result.solution, batch))
  if has_aux:
    return hypergrad, ImplicitInfo(value, result.solution,
                                   result.residual_norm)
  return hypergrad


def _zero_cotangent(tree):
  """Zero cotangents (float0 for integer leaves) for a custom_vjp input."""
  def zero(leaf):
    if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      return jnp.zeros_like(leaf)
    return jnp.zeros(jnp.shape(leaf), jax.dtypes.float0)
  return jax.tree.map(zero, tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _implicit_identity(g, config, x, y, batch, tol, neumann_step, *consts):
  del g, config, x, batch, tol, neumann_step, consts
  return y


def _implicit_identity_fwd(g, config, x, y, batch, tol, neumann_step,
                           *consts):
  del g, config
  return y, (x, y, batch, tol, neumann_step, consts)


def _implicit_identity_bwd(g, config, residuals, y_bar):
  x, y, batch, tol, neumann_step, consts = residuals
  # Adjoint system H w = y_bar (H is symmetric), then minus the cross terms.
  w = _solve_lower_hessian(g, x, y, y_bar, batch, config, tol, neumann_step,
                           *consts).solution
  x_bar, batch_bar, *consts_bar = _lower_grad_vjp(g, x, y, batch, w, *consts)
  neg = lambda tree: jax.tree.map(
      lambda t: -t if jnp.issubdtype(t.dtype, jnp.inexact) else t, tree)
  return (neg(x_bar), _zero_cotangent(y), neg(batch_bar),
          _zero_cotangent(tol), _zero_cotangent(neumann_step),
          *[neg(c) for c in consts_bar])


_implicit_identity.defvjp(_implicit_identity_fwd, _implicit_identity_bwd)


@base.renamed_arguments("implicit_solution", {"num_iters": "linear_steps"})
def implicit_solution(g: base.Objective, x, y, batch=None, *,
                      solver: str = "cg", linear_steps: int = 10, tol=1e-10,
                      neumann_step=None):
  r"""Marks ``y`` as :math:`y^*(x)=\arg\min_y g(x,y)` for reverse-mode autodiff.

  Returns ``y`` unchanged. Under ``jax.grad`` (reverse mode), the cotangent
  :math:`\bar y` of the result is pulled back by the implicit function
  theorem,

  .. math::

    H w = \bar y, \qquad \bar x = -\nabla^2_{xy} g(x,y)\,w

  (and likewise for ``batch`` and for traced values that ``g`` closes over),
  so ``jax.grad(lambda x: f(x, implicit_solution(g, x, solve(x))))`` is the
  implicit hypergradient whatever solver produced ``y`` (closed form, any
  optax loop, a black box). The input ``y`` gets a zero cotangent: the solver
  is never differentiated. This is a first-order rule: forward mode
  (``jax.jvp``) is not supported (``jax.custom_vjp``; use
  :func:`implicit_hypergradient` there), and differentiating the result once
  more treats ``y`` as a constant, so second derivatives miss the terms of
  :math:`dy^*/dx`.

  Closures: ``g`` is closure-converted, so values it closes over that are
  being differentiated receive their implicit cotangent (see the module
  docstring).

  Args:
    g: lower objective ``g(x, y, batch) -> scalar``.
    x: upper variables (the quantity differentiated).
    y: a lower solution (e.g. the output of an inner solver).
    batch: passed to ``g``; floating leaves receive cotangents.
    solver: ``"cg"``, ``"neumann"`` or ``"direct"`` for the adjoint system.
    linear_steps: CG iterations or Neumann terms (static int; formerly
      ``num_iters``).
    tol: CG tolerance.
    neumann_step: Neumann step (required for ``"neumann"``).

  Returns:
    ``y``, with the implicit derivative attached.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbilevel import hypergradient
    >>> def val_loss(lam):
    ...   g = lambda lam, w, batch: jnp.sum((w - 1.0) ** 2) + lam * jnp.sum(w ** 2)
    ...   w = jnp.ones(2) / (1.0 + lam)              # closed-form lower solution
    ...   w = hypergradient.implicit_solution(g, lam, w)
    ...   return jnp.sum(w)
    >>> round(float(jax.grad(val_loss)(1.0)), 6)     # d/dlam 2 / (1 + lam)
    -0.5
  """
  config = check_solver(solver, linear_steps, neumann_step,
                        "implicit_solution")
  g = base.scalar_objective(g, "g")
  y = jax.lax.stop_gradient(y)
  converted, consts = jax.closure_convert(g, x, y, batch)
  step = jnp.zeros((), tree_lib.tree_dtype(y)) if neumann_step is None else (
      _scalar_like(neumann_step, y))
  return _implicit_identity(converted, config, x, y, batch,
                            _scalar_like(tol, y), step, *consts)


# ---------------------------------------------------------------------------
# Unrolled (ITD) solve.
# ---------------------------------------------------------------------------


def unrollable_adam(learning_rate: base.ScalarOrSchedule, b1: float = 0.9,
                    b2: float = 0.999, eps: float = 1e-8,
                    eps_root: float = 1e-8) -> optax.GradientTransformation:
  r"""``optax.adam`` with ``eps_root > 0``, safe to differentiate through.

  Adam's update contains :math:`\sqrt{\hat v}`, whose derivative is infinite
  at :math:`\hat v=0`; ``optax.adam``'s default ``eps_root=0`` then gives NaN
  meta-gradients for every coordinate with zero gradient history (see the
  ITD section of :doc:`/methods`). Use this (or pass ``eps_root`` yourself) as the
  inner optimizer of :func:`unrolled_solve` and :func:`jaxbilevel.itd`.
  """
  if not eps_root > 0:
    raise base.BilevelValidationError(
        f"unrollable_adam: eps_root must be > 0 to differentiate through "
        f"Adam, got {eps_root}.")
  return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root)


def _chunk_length(checkpoint, length):
  if checkpoint is True:
    return max(1, math.isqrt(length))
  return base.check_static_int(checkpoint, "checkpoint")


def _differentiated_steps(g, x, y, opt_state, batch, optimizer, length, proj,
                          checkpoint):
  """``length`` optax steps on ``g(x, .)``, optionally rematerialised in chunks."""
  def steps(carry, x, batch, n):
    y, state, _ = inner.inner_solve(lambda y_: g(x, y_, batch), carry[0],
                                    carry[1], optimizer=optimizer,
                                    num_steps=n, proj=proj,
                                    grad_norm=False)
    return y, state

  carry = (y, opt_state)
  if length == 0:
    return carry
  if not checkpoint:
    return steps(carry, x, batch, length)
  chunk = min(_chunk_length(checkpoint, length), length)
  num_chunks, rest = divmod(length, chunk)
  chunk_fn = jax.checkpoint(functools.partial(steps, n=chunk))
  carry, _ = jax.lax.scan(lambda c, _: (chunk_fn(c, x, batch), None), carry,
                          None, length=num_chunks)
  if rest:
    carry = jax.checkpoint(functools.partial(steps, n=rest))(carry, x, batch)
  return carry


def _cut(y, opt_state, y0, truncated_jacobian):
  """The iterate where back-propagation stops (value unchanged)."""
  y_cut = jax.lax.stop_gradient(y)
  if truncated_jacobian == "identity":  # d y_cut / d y0 := I (first order)
    y_cut = otu.tree_add(y_cut, otu.tree_sub(y0, jax.lax.stop_gradient(y0)))
  return y_cut, jax.lax.stop_gradient(opt_state)


def _masked_truncation(g, x, y0, opt_state, batch, optimizer, num_steps, proj,
                       truncate, truncated_jacobian):
  """Truncation at a traced step: the cut is selected inside the scan."""
  start = num_steps - jnp.asarray(truncate, jnp.int32)
  grad_y = jax.grad(g, argnums=1)

  def cut_at(j, y, state):  # truncate == num_steps means no cut at all
    y_cut, s_cut = _cut(y, state, y0, truncated_jacobian)
    return tree_lib.tree_select(jnp.logical_and(j == start, start > 0),
                                (y_cut, s_cut), (y, state))

  def body(carry, j):
    y, state = cut_at(j, *carry)
    y, state = inner.projected_step(optimizer, grad_y(x, y, batch), state, y,
                                    proj)
    return (y, state), None

  (y, state), _ = jax.lax.scan(body, (y0, opt_state),
                               jnp.arange(num_steps, dtype=jnp.int32))
  return cut_at(jnp.asarray(num_steps, jnp.int32), y, state)


def unrolled_solve(g: base.Objective, x, y0, batch=None, *,
                   optimizer: optax.GradientTransformation, num_steps: int,
                   opt_state: Optional[optax.OptState] = None,
                   proj: Optional[base.Projection] = None,
                   truncate: Optional[Union[int, jax.Array]] = None,
                   truncated_jacobian: str = "zero",
                   checkpoint: Union[bool, int] = False):
  r"""``num_steps`` optax steps on ``g(x, .)`` from ``y0``, differentiable end to end.

  .. math:: y_{t+1} = \mathrm{Proj}\big(y_t + \mathrm{opt}(\nabla_y g(x, y_t))\big),
     \quad t = 0..T-1

  The loop is a ``lax.scan`` (via :func:`jaxbilevel.inner_solve`), so
  ``jax.grad(lambda x: f(x, unrolled_solve(g, x, y0, ...)[0]))`` is the ITD
  (reverse-mode unrolled) hypergradient, including the dependence of ``y0``
  on ``x`` if there is one (MAML's :math:`\varphi_0=x`).

  * ``truncate=K`` back-propagates through the last ``K`` steps only (T-RHG).
    The iterate :math:`y_{T-K}` is cut: its Jacobian with respect to
    ``y0`` is replaced by zero (``truncated_jacobian="zero"``, the
    stop-gradient of truncated back-propagation) or by the identity
    (``"identity"``, the first-order/FO-MAML approximation
    :math:`\partial y_{T-K}/\partial y_0 := I`); the dependence of the first
    :math:`T-K` steps on ``x`` through ``g`` is dropped in both cases. A
    static ``K`` runs the first :math:`T-K` steps without recording anything
    (memory :math:`O(K d_y)`); a traced ``K`` (e.g. sampled) selects the cut
    inside the loop (memory :math:`O(T d_y)`).
  * ``checkpoint=True`` rematerialises the differentiated steps in chunks of
    :math:`\lceil\sqrt T\rceil` steps (``jax.checkpoint`` around a nested
    scan), so reverse-mode memory grows like :math:`O(\sqrt T d_y)` instead of
    :math:`O(T d_y)`, for about one extra forward pass; an int sets the chunk
    length.

  When unrolling Adam or RMSProp, use ``eps_root > 0``
  (:func:`unrollable_adam`), otherwise coordinates with zero gradient history
  give NaN meta-gradients.

  Cost: ``num_steps`` g-gradients forward; under reverse mode ``K``
  (Hessian-vector product, cross product) pairs backward.

  Args:
    g: lower objective ``g(x, y, batch) -> scalar``.
    x: upper variables (may be traced / differentiated).
    y0: starting point (may depend on ``x``).
    batch: passed to ``g``.
    optimizer: the inner optax optimizer.
    num_steps: T (static int >= 1).
    opt_state: the optimizer's starting state (``optimizer.init(y0)`` if None).
    proj: projection after each step.
    truncate: number of final steps to differentiate through (``None``: all).
    truncated_jacobian: ``"zero"`` or ``"identity"`` (see above).
    checkpoint: ``False``, ``True`` or a chunk length.

  Returns:
    ``(y_T, opt_state_T)``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from jaxbilevel import hypergradient
    >>> g = lambda x, y, batch: 0.5 * (y - x) ** 2     # y*(x) = x
    >>> def outer(x):
    ...   y, _ = hypergradient.unrolled_solve(g, x, 0.0, optimizer=optax.sgd(0.5),
    ...                                       num_steps=10)
    ...   return y
    >>> round(float(jax.grad(outer)(1.0)), 6)        # 1 - 0.5 ** 10
    0.999023
  """
  num_steps = base.check_static_int(num_steps, "num_steps")
  if truncated_jacobian not in _TRUNCATED_JACOBIANS:
    raise base.BilevelValidationError(
        f"unrolled_solve: truncated_jacobian must be one of "
        f"{_TRUNCATED_JACOBIANS}, got {truncated_jacobian!r}.")
  g = base.scalar_objective(g, "g")
  if opt_state is None:
    opt_state = optimizer.init(y0)
  if truncate is None:
    truncate = num_steps
  if isinstance(truncate, (bool,)) or (
      not isinstance(truncate, int) and jnp.ndim(truncate) != 0):
    raise base.BilevelValidationError(
        f"unrolled_solve: truncate must be None, an int or a scalar integer "
        f"array, got {truncate!r}.")
  if not isinstance(truncate, int):
    if checkpoint:
      raise base.BilevelValidationError(
          "unrolled_solve: checkpoint needs a static (Python int) truncate.")
    return _masked_truncation(g, x, y0, opt_state, batch, optimizer,
                              num_steps, proj, truncate, truncated_jacobian)
  if not 0 <= truncate <= num_steps:
    raise base.BilevelValidationError(
        f"unrolled_solve: truncate must be in [0, num_steps={num_steps}], got "
        f"{truncate}.")
  y, state = y0, opt_state
  if truncate < num_steps:
    # The first T - K steps record nothing: all their inputs are constants.
    frozen = jax.lax.stop_gradient((x, y0, opt_state, batch))
    y, state = _differentiated_steps(g, frozen[0], frozen[1], frozen[2],
                                     frozen[3], optimizer,
                                     num_steps - truncate, proj, False)
    y, state = _cut(y, state, y0, truncated_jacobian)
  return _differentiated_steps(g, x, y, state, batch, optimizer, truncate,
                               proj, checkpoint)
