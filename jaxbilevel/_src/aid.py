"""AID: approximate implicit differentiation (conjugate gradient or Neumann)."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from jaxbilevel._src import base
from jaxbilevel._src import programs
from jaxbilevel._src import hypergradient
from jaxbilevel._src import inner

DIAGNOSTICS = base.COMMON_DIAGNOSTICS + ("linear_residual", "tol")


class AIDState(NamedTuple):
  """State of :func:`aid`.

  Attributes:
    count: number of outer steps taken.
    upper_state: state of the upper optimizer (for ``x``).
    lower_state: state of the inner optimizer (for ``y``) after the last
      inner solve; the start of the next one unless ``inner_start`` is a
      callable.
    diagnostics: dict of scalars from the last step: ``f`` and ``g`` at
      :math:`(x_t, y_{t+1})` (the point where the hypergradient is taken),
      ``upper_grad_norm`` (norm of the hypergradient), ``lower_grad_norm``
      (norm of :math:`\\nabla_y g` at the start of the inner solve),
      ``linear_residual``
      :math:`\\|\\nabla_y f - Hv\\|` and ``tol`` (the CG tolerance of
      the step: NaN when a traced or scheduled ``tol`` was negative, so that
      the run reports it by name).
  """

  count: jax.Array
  upper_state: optax.OptState
  lower_state: optax.OptState
  diagnostics: dict


def default_tol(dtype) -> float:
  """The CG tolerance of :func:`aid` when ``tol=None``, for parameters of ``dtype``.

  1e-10 (float32, float64, bfloat16), or the smallest normal number of
  ``dtype`` where 1e-10 would underflow to 0 (float16: 6.1e-5).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbilevel._src import aid
    >>> aid.default_tol(jnp.float32), round(aid.default_tol(jnp.float16), 9)
    (1e-10, 6.1035e-05)
  """
  return max(1e-10, float(jnp.finfo(dtype).tiny))


@programs.bilevel_method
@base.renamed_arguments("aid", {"init": "inner_start"})
def aid(f: base.Objective,
        g: base.Objective,
        *,
        upper_optimizer: optax.GradientTransformation,
        lower_optimizer: optax.GradientTransformation,
        inner_steps: int = 10,
        solver: str = "cg",
        linear_steps: int = 10,
        tol: Optional[base.ScalarOrSchedule] = None,
        neumann_step: Optional[base.ScalarOrSchedule] = None,
        inner_start: Union[str, Callable] = "previous",
        proj_x: Optional[base.Projection] = None,
        proj_y: Optional[base.Projection] = None,
        ) -> optax.GradientTransformationExtraArgs:
  r"""AID: K inner steps on ``g``, then an implicit hypergradient step on ``x``.

  One ``update`` is one outer iteration (see :doc:`/methods`):

  .. math::

    y &\leftarrow \mathrm{Proj}_\mathcal{Y}(y - \eta_y\nabla_y g(x_t, y))
        \quad (T \text{ steps from } y \text{ or from } y_0(x_t, y)) \\
    H v &= \nabla_y f(x_t, y), \quad H = \nabla^2_{yy} g(x_t, y)
        \quad (K \text{ CG steps from } v_0 = 0, \text{ or } K
        \text{ Neumann terms}) \\
    x_{t+1} &\leftarrow \mathrm{Proj}_\mathcal{X}\big(x_t - \eta\,
        [\nabla_x f(x_t, y) - \nabla^2_{xy} g(x_t, y)\, v]\big)

  The inner loop is :func:`jaxbilevel.inner_solve` with
  ``lower_optimizer``. By default it is warm-started: it starts from the
  previous ``y`` with the previous optimizer state (``inner_start="previous"``).
  ``inner_start=lambda x, y: ...`` restarts every inner solve from
  ``inner_start(x_t, y)`` with a fresh optimizer
  state instead. Use this when consecutive outer steps see different lower
  problems, e.g. the tasks of meta-learning (iMAML: ``inner_start=lambda x, y:
  zeros``, the offsets from the meta-parameters). The hypergradient is the
  implicit one at the inner solution, so it ignores how the start depends on
  ``x``. The hypergradient is :func:`jaxbilevel.hypergradient.implicit_hypergradient`
  at the new ``y`` (a constant: the inner loop is not differentiated).
  Hessian-vector products are forward-over-reverse; CG stops (a
  ``lax.while_loop``: no product is spent after convergence) once the
  residual norm is below ``tol``. The sign convention is
  :math:`v\approx+H^{-1}\nabla_y f` with :math:`-J_{xy}v` (AmIGO, stocBiO).
  Requires a lower Hessian that is positive definite at the iterates
  (strongly convex lower level); Neumann needs
  ``neumann_step`` :math:`\le 1/L_g`.

  Cost per outer iteration: ``inner_steps`` g-gradients (y-block), one
  f-gradient (both blocks), ``linear_steps`` Hessian-vector products and one
  cross product :math:`J_{xy}v`, plus one forward pass of ``g`` when the
  diagnostics are recorded. Memory: about four lower-level vectors (CG) or two (Neumann)
  besides ``x``, ``y`` and the optimizer states.

  Args:
    f: upper objective ``f(x, y, batch) -> scalar``.
    g: lower objective ``g(x, y, batch) -> scalar``.
    upper_optimizer: optax optimizer for ``x``.
    lower_optimizer: optax optimizer of the inner solve.
    inner_steps: T, inner steps per outer iteration (static int).
    solver: ``"cg"`` (default) or ``"neumann"``.
    linear_steps: K, CG iterations or Neumann terms (static int).
    tol: CG early-exit tolerance on the residual norm (float, array or
      schedule). Default ``None``: 1e-10, or, for parameters whose dtype
      cannot hold 1e-10 (float16), the smallest normal number of that dtype
      (6.1e-5 for float16); either way CG stops early only at convergence to
      rounding level.
    neumann_step: :math:`\eta_N` (required for ``solver="neumann"``).
    inner_start: ``"previous"`` (default: warm-start from the previous ``y``
      and optimizer state) or a callable ``(x, y) -> y0``, the start of every
      inner solve (with a fresh ``lower_optimizer`` state); formerly
      ``init``.
    proj_x: optional projection for ``x``.
    proj_y: optional projection for ``y`` (applied after each inner step).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` over :class:`BilevelParams`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> prob = jbl.problems.quadratic_a8(jnp.float32)
    >>> tx = jbl.aid(prob.f, prob.g, upper_optimizer=optax.sgd(0.8),
    ...              lower_optimizer=optax.sgd(0.45), inner_steps=10)
    >>> params, state, history = jbl.run(tx, prob.params0, num_steps=200)
    >>> [round(float(v), 4) for v in params.x]    # x* = (-2.4113, -1.1458)
    [-2.4113, -1.1458]

  References:
    R. Grazzi, L. Franceschi, M. Pontil, S. Salzo. *On the Iteration
    Complexity of Hypergradient Computation*, ICML 2020, arXiv:2006.16218.
  """
  f = base.scalar_objective(f, "f")
  g = base.scalar_objective(g, "g")
  inner_steps = base.check_static_int(inner_steps, "inner_steps")
  linear_steps = base.check_static_int(linear_steps, "linear_steps")
  if tol is not None:
    tol = base.check_hyperparameter(tol, "tol", allow_zero=True)
  hypergradient.check_solver(solver, linear_steps, neumann_step, "aid")
  inner_start = base.check_start(inner_start, "aid", "inner_start",
                                 ("previous",))
  _, proj_x, proj_y = base.level_arguments(
      upper_optimizer, lower_optimizer, None, proj_x, proj_y)

  def init_fn(params):
    return AIDState(
        **base.init_state_fields(params, "aid", DIAGNOSTICS, upper_optimizer,
                                 lower_optimizer))

  def step_fn(params, state, *, batch=None, diagnostics=False,
              **extra_args):
    del extra_args
    params, dtype = base.begin_step(params, "aid")
    record = base.recorded_names(diagnostics, DIAGNOSTICS, "aid")
    x, y = params
    tol_t = base.resolve_hyperparameter(
        default_tol(dtype) if tol is None else tol, state.count, dtype,
        allow_zero=True, name="tol")
    step_t = None if solver == "cg" else base.resolve_hyperparameter(
        neumann_step, state.count, dtype, name="neumann_step")

    # T inner steps on g, from the previous y (warm start) or from
    # inner_start(x, y).
    if not callable(inner_start):
      y0, lower_state0 = y, state.lower_state
    else:
      y0 = base.inner_start(inner_start, x, y, "aid")
      lower_state0 = lower_optimizer.init(y0)
    y_new, lower_state, trace = inner.inner_solve(
        lambda y_: g(x, y_, batch), y0, lower_state0,
        optimizer=lower_optimizer, num_steps=inner_steps, proj=proj_y,
        grad_norm="lower_grad_norm" in record)
    # Implicit hypergradient at the new y: K HVPs and one cross product.
    direction, info = hypergradient.implicit_hypergradient(
        f, g, x, y_new, batch, solver=solver, num_iters=linear_steps,
        tol=tol_t, neumann_step=step_t, has_aux=True,
        differentiable=False)  # nothing differentiates through the step
    x_new, upper_state = inner.projected_step(
        upper_optimizer, direction, state.upper_state, x, proj_x)

    diag = base.diagnostics(
        dtype, record, f=info.value,
        g=lambda: g(x, y_new, batch),  # at the new y: only for the record
        upper_grad_norm=lambda: base.diagnostic_norm(direction),
        lower_grad_norm=inner.first_step(trace).grad_norm,
        linear_residual=info.residual_norm,
        tol=tol_t)
    new_state = AIDState(
        count=optax.safe_increment(state.count), upper_state=upper_state,
        lower_state=lower_state, diagnostics=diag)
    return base.BilevelParams(x_new, y_new), new_state

  return base.bilevel_transformation(init_fn, step_fn, "aid")
