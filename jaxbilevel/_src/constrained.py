r"""Coupled-constraint lower levels: the primal-dual inner solver and multiplier-aware gradients.

The lower problem is

.. math:: \min_{y\in\mathcal Y} g(x,y)\quad\text{s.t.}\quad c(x,y)\le 0,

with ``c(x, y, batch) -> (m,)`` a vector of constraints coupled in ``x`` and
``y`` and :math:`\mathcal Y` a simple set handled by a projection. The sign
convention (as in Jiang et al., NeurIPS 2024): constraints are :math:`c\le0`,
multipliers :math:`\mu\ge0` and the Lagrangian is :math:`+\mu^\top c`.

Pieces shared by :func:`jaxbilevel.pbgd_blocc` and
:func:`jaxbilevel.pbgd_free_cc`:

* :func:`check_constraint` wraps ``c`` so that a non-vector output fails
  clearly at trace time;
* :func:`primal_dual_solve` is the warm-started MaxMin solver: alternating
  gradient descent on :math:`y` and projected ascent on :math:`\mu`;
* :func:`value_function_grad` is the coupled value-function gradient,
  :math:`\nabla v(x)=\nabla_x g(x,y_g)+\langle\mu_g,\nabla_x c(x,y_g)\rangle`;
* :func:`coupled_value_gap_penalty` is the function whose x-gradient is the
  reduced-penalty gradient of the coupled problem (direction G4 of the
  methods guide, ``docs/methods.md``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxbilevel._src import base
from jaxbilevel._src import inner

Constraint = Callable[[base.PyTree, base.PyTree, Any], jax.Array]


class PrimalDualTrace(NamedTuple):
  """Record of a :func:`primal_dual_solve` (leading axis = dual round).

  Attributes:
    inner: the :class:`~jaxbilevel.InnerTrace` of the primal steps, with
      leading axes ``(dual_steps, primal_steps)``; its ``value`` is the
      Lagrangian.
    violation: :math:`\\max_i \\max(c_i(y), 0)` at the primal iterate of each
      round (before the multiplier step).
    complementarity: :math:`|\\mu^\\top c(y)|` after each multiplier step.
  """

  inner: inner.InnerTrace
  violation: jax.Array
  complementarity: jax.Array


def check_constraint(c: Constraint, name: str = "c") -> Constraint:
  """Wraps ``c`` so that it must return a 1-D floating vector (checked at trace time).

  Args:
    c: the constraint ``c(x, y, batch) -> (m,)``, feasible where ``c <= 0``.
    name: the argument's name, used in error messages.

  Returns:
    The wrapped constraint (unchanged values).
  """
  def shape_error(shape):
    if len(shape) == 1:
      return None
    return ("a 1-D vector of constraint values (one per constraint, feasible "
            f"where <= 0), but it returned shape {shape}. Use jnp.atleast_1d "
            "for a single constraint and .ravel() for a matrix of "
            "constraints.")

  return base.checked_output(
      c, name, expects="1-D array of constraint values (feasible where <= 0)",
      floating="floating values", what="the constraint",
      shape_error=shape_error, marker="_jaxbilevel_constraint")


def _dot(mu, values):
  """:math:`\\mu^\\top c` in the dtype of ``values``."""
  return jnp.vdot(jnp.asarray(mu, jnp.result_type(values)), values)


def primal_dual_solve(objective: Callable, constraint: Callable, y, mu,
                      opt_state, *, optimizer: optax.GradientTransformation,
                      dual_step_size, dual_steps: int, primal_steps: int,
                      proj: Optional[base.Projection] = None,
                      multiplier_floor=0.0, has_aux: bool = False,
                      grad_norm: bool = True):
  r"""Warm-started MaxMin: alternating descent on ``y`` and projected ascent on :math:`\mu`.

  Approximates a saddle point of :math:`L(y,\mu)=h(y)+\mu^\top c(y)` over
  :math:`y\in\mathcal Y`, :math:`\mu\ge0` (as in the BLOCC authors'
  ``minmax_opt``; see the PBGD-BLOCC section of :doc:`/methods`):

  .. math::

    &\text{repeat } T \text{ times:} \\
    &\quad y \leftarrow \mathrm{Proj}_\mathcal{Y}(y + \mathrm{opt}(\nabla_y
        L(y,\mu))) \quad (T_y \text{ times}) \\
    &\quad \mu \leftarrow \max(\mu + \eta_2\, c(y),\ \mu_{\min})

  Both loops are ``lax.scan`` of static length (the authors' early exits on
  gradient norms below 1e-4 are not reproduced: every round runs), so the
  solver compiles once whatever the step sizes and is reverse-differentiable.
  The floor :math:`\mu_{\min}` is 0 in the textbook method; the authors' SVM
  code uses 1e-5.

  Cost: :math:`TT_y` gradients of :math:`h` plus :math:`T(T_y+1)` evaluations
  of ``c`` (one constraint VJP per primal step).

  Args:
    objective: ``y -> scalar`` (or ``y -> (scalar, aux)`` with ``has_aux``);
      close over ``x``, the penalty and the batch (they may be traced).
    constraint: ``y -> (m,)``, feasible where ``<= 0``.
    y: initial primal iterate (warm start).
    mu: initial multipliers, shape ``(m,)``, ``>= 0``.
    opt_state: state of ``optimizer`` for ``y``.
    optimizer: optax optimizer of the primal steps (e.g. ``optax.sgd(eta1)``).
    dual_step_size: :math:`\eta_2 > 0` (a float or a traced scalar).
    dual_steps: :math:`T`, rounds of (primal steps, one multiplier step).
    primal_steps: :math:`T_y`, primal steps per round.
    proj: projection onto :math:`\mathcal Y` after each primal step.
    multiplier_floor: :math:`\mu_{\min}\ge0`.
    has_aux: whether ``objective`` returns ``(value, aux)``.
    grad_norm: whether the trace records the primal gradient norms (static;
      NaN when False).

  Returns:
    ``(y, mu, opt_state, trace)`` with ``trace`` a :class:`PrimalDualTrace`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from jaxbilevel import constrained
    >>> # min (y - 2)^2  s.t.  y - 1 <= 0: y* = 1, mu* = 2.
    >>> opt = optax.sgd(0.1)
    >>> y, mu, _, _ = constrained.primal_dual_solve(
    ...     lambda y: (y - 2.0) ** 2, lambda y: jnp.atleast_1d(y - 1.0),
    ...     jnp.array(0.0), jnp.zeros(1), opt.init(0.0), optimizer=opt,
    ...     dual_step_size=0.1, dual_steps=300, primal_steps=1)
    >>> round(float(y), 4), round(float(mu[0]), 4)
    (1.0, 2.0)
  """
  dual_steps = base.check_static_int(dual_steps, "dual_steps")
  primal_steps = base.check_static_int(primal_steps, "primal_steps")
  if callable(dual_step_size) or callable(multiplier_floor):
    raise base.BilevelValidationError(
        "primal_dual_solve: dual_step_size and multiplier_floor must be "
        "numbers or scalar arrays (evaluate a schedule before the call).")
  base.check_hyperparameter(dual_step_size, "dual_step_size")
  base.check_hyperparameter(multiplier_floor, "multiplier_floor",
                            allow_zero=True)
  if jnp.ndim(mu) != 1:
    raise base.BilevelValidationError(
        f"primal_dual_solve: the multipliers must be a 1-D vector, got shape "
        f"{jnp.shape(mu)}.")
  c_shape = jnp.shape(constraint(y))  # traced only; unused values are pruned
  if len(c_shape) != 1 or c_shape != jnp.shape(mu):
    raise base.BilevelValidationError(
        f"primal_dual_solve: the constraint returns shape {c_shape} but the "
        f"multipliers have shape {jnp.shape(mu)}; they must be equal 1-D "
        "shapes (one multiplier per constraint).")

  def lagrangian(y_, mu_):
    out = objective(y_)
    value, aux = out if has_aux else (out, None)
    return value + _dot(mu_, constraint(y_)), aux

  def round_fn(carry, _):
    y_, mu_, state = carry
    y_, state, trace = inner.inner_solve(
        lambda v: lagrangian(v, mu_), y_, state, optimizer=optimizer,
        num_steps=primal_steps, proj=proj, has_aux=True, grad_norm=grad_norm)
    values = constraint(y_)
    eta2 = jnp.asarray(dual_step_size, values.dtype)
    floor = jnp.asarray(multiplier_floor, values.dtype)
    mu_ = jnp.maximum(mu_ + eta2 * values, floor).astype(mu_.dtype)
    if not has_aux:
      trace = trace._replace(aux=None)
    return (y_, mu_, state), PrimalDualTrace(
        trace, jnp.max(jnp.maximum(values, 0.0)),
        jnp.abs(_dot(mu_, values)))

  (y, mu, opt_state), trace = jax.lax.scan(round_fn, (y, mu, opt_state),
                                           None, length=dual_steps)
  return y, mu, opt_state, trace


def first_primal_step(trace: PrimalDualTrace) -> inner.InnerTrace:
  """The record of the very first primal step (values at the incoming iterate)."""
  return jax.tree.map(lambda v: v[0, 0], trace.inner)


def value_function_grad(g: base.Objective, c: Constraint, x, y_g, mu_g,
                        batch=None):
  r"""The gradient of the coupled value function :math:`v(x)=\min_{c(x,y)\le0} g(x,y)`.

  .. math:: \nabla v(x)=\nabla_x g(x,y_g)+\langle\mu_g,\nabla_x c(x,y_g)\rangle

  at a saddle point :math:`(y_g,\mu_g)` of :math:`g+\mu^\top c` (BLOCC,
  Jiang et al. 2024). The partial derivative :math:`\nabla_x g` alone is
  wrong as soon as a constraint is active.

  Args:
    g: lower objective ``g(x, y, batch) -> scalar``.
    c: constraint ``c(x, y, batch) -> (m,)``.
    x: upper variables.
    y_g: the lower solution (or an estimate).
    mu_g: its multipliers, shape ``(m,)``.
    batch: passed to ``g`` and ``c``.

  Returns:
    :math:`\nabla v(x)`, with the structure of ``x``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbilevel import constrained
    >>> g = lambda x, y, batch: (y - 2 * x) ** 2
    >>> c = lambda x, y, batch: jnp.atleast_1d(3 * x - y)
    >>> # At x = 1: y_g = 3, mu_g = 2, so grad v = -4 + 2 * 3 = 2.
    >>> float(constrained.value_function_grad(g, c, 1.0, 3.0, jnp.array([2.0])))
    2.0
  """
  g = base.scalar_objective(g, "g")
  c = check_constraint(c)
  y_g = jax.lax.stop_gradient(y_g)
  mu_g = jax.lax.stop_gradient(mu_g)
  return jax.grad(lambda x_: g(x_, y_g, batch) + _dot(mu_g, c(x_, y_g, batch)))(
      x)


def coupled_value_gap_penalty(f: base.Objective, g: base.Objective,
                              c: Constraint, *, has_aux: bool = False):
  r"""The coupled penalty whose x-gradient is the multiplier-aware reduced-penalty gradient.

  .. math::

    f(x,y_F)+\gamma\,[g(x,y_F)+\tilde\mu_F^\top c(x,y_F)]
      -\gamma\,[g(x,y_g)+\mu_g^\top c(x,y_g)]

  with :math:`(y_F,\tilde\mu_F)` the saddle point of the scaled problem
  :math:`\gamma^{-1}f+g+\tilde\mu^\top c` and :math:`(y_g,\mu_g)` that of
  :math:`g+\mu^\top c`. Multipliers and :math:`y_g` enter through
  stop-gradients, so :math:`\nabla_x` of this function is

  .. math::

    \nabla F_\gamma(x)=\nabla_x f(x,y_F)+\gamma\nabla_x g(x,y_F)
      +\langle\mu_F,\nabla_x c(x,y_F)\rangle
      -\gamma[\nabla_x g(x,y_g)+\langle\mu_g,\nabla_x c(x,y_g)\rangle],

  :math:`\mu_F=\gamma\tilde\mu_F`. At exact saddle points the multiplier
  terms vanish by complementary slackness and the value is
  :math:`F_\gamma(x)`.

  Args:
    f: upper objective.
    g: lower objective.
    c: constraint ``c(x, y, batch) -> (m,)``.
    has_aux: if True also return ``{"f", "g", "g_gap"}`` at ``y_F``
      (``g_gap`` :math:`=g(x,y_F)-g(x,y_g)`).

  Returns:
    ``fn(x, y_F, mu_F, y_g, mu_g, gamma, batch=None)``.
  """
  f = base.scalar_objective(f, "f")
  g = base.scalar_objective(g, "g")
  c = check_constraint(c)

  def fn(x, y_f, mu_f, y_g, mu_g, gamma, batch=None):
    mu_f = jax.lax.stop_gradient(mu_f)
    y_g = jax.lax.stop_gradient(y_g)
    mu_g = jax.lax.stop_gradient(mu_g)
    fv = f(x, y_f, batch)
    gamma = jnp.asarray(gamma, jnp.result_type(fv))
    g_f = g(x, y_f, batch)
    g_g = g(x, y_g, batch)
    lag_f = g_f + _dot(mu_f, c(x, y_f, batch))
    lag_g = g_g + _dot(mu_g, c(x, y_g, batch))
    value = fv + gamma * (lag_f - lag_g)
    return (value, {"f": fv, "g": g_f, "g_gap": g_f - g_g}) if has_aux else (
        value)

  return fn


def init_multipliers(c: Constraint, params: base.BilevelParams,
                     num_constraints: Optional[int], method: str) -> jax.Array:
  """Zero multipliers, one per constraint, in the dtype of ``params``.

  The number of constraints is ``num_constraints`` if given, otherwise the
  length of ``c(params.x, params.y, None)`` (evaluated abstractly).
  """
  dtype = base.params_dtype(params)
  if num_constraints is not None:
    m = base.check_static_int(num_constraints, "num_constraints")
    return jnp.zeros((m,), dtype)
  try:
    shape = jax.eval_shape(lambda: c(params.x, params.y, None)).shape
  except base.BilevelValidationError:
    raise
  except Exception as err:  # c needs a batch: the shape cannot be inferred.
    raise base.BilevelValidationError(
        f"{method}: could not infer the number of constraints by calling "
        f"c(params.x, params.y, batch=None) ({type(err).__name__}: {err}). "
        "Pass num_constraints=m to the constructor.") from err
  return jnp.zeros(shape, dtype)


class SaddleSettings(NamedTuple):
  """Validated settings of one primal-dual solve inside a method.

  Attributes:
    optimizer: optax optimizer of the primal steps.
    dual_step_size: :math:`\\eta_2` (float, array or schedule).
    dual_steps: :math:`T`.
    primal_steps: :math:`T_y`.
    multiplier_floor: :math:`\\mu_{\\min}` (float or array).
  """

  optimizer: optax.GradientTransformation
  dual_step_size: base.ScalarOrSchedule
  dual_steps: int
  primal_steps: int
  multiplier_floor: Any

  @classmethod
  def create(cls, optimizer, dual_step_size, dual_steps, primal_steps,
             multiplier_floor, prefix: str = ""):
    """Checks the settings (names in messages are prefixed by ``prefix``)."""
    return cls(
        optimizer,
        base.check_hyperparameter(dual_step_size, prefix + "dual_step_size"),
        base.check_static_int(dual_steps, prefix + "dual_steps"),
        base.check_static_int(primal_steps, prefix + "primal_steps"),
        base.check_hyperparameter(multiplier_floor, "multiplier_floor",
                                  allow_zero=True))

  def solve(self, objective, constraint, y, mu, opt_state, count, dtype,
            proj, has_aux=False, grad_norm=True):
    """Runs :func:`primal_dual_solve` with these settings at step ``count``."""
    return primal_dual_solve(
        objective, constraint, y, mu, opt_state, optimizer=self.optimizer,
        dual_step_size=base.resolve_hyperparameter(self.dual_step_size, count,
                                                   dtype,
                                                   name="dual_step_size"),
        dual_steps=self.dual_steps, primal_steps=self.primal_steps, proj=proj,
        multiplier_floor=base.resolve_hyperparameter(
            self.multiplier_floor, count, dtype, allow_zero=True,
            name="multiplier_floor"),
        has_aux=has_aux, grad_norm=grad_norm)
