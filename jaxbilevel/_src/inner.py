"""Inner loops: K optax steps on an objective, as a ``lax.scan``.

Every method's lower-level updates (and the upper step) go through
:func:`projected_step`; loops of such steps go through :func:`inner_solve`, a
``lax.scan`` of static length so that it can be reverse-differentiated.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxbilevel._src import base


class InnerTrace(NamedTuple):
  """Per-step record of an inner loop (leading axis = step).

  Attributes:
    value: objective value at the iterate *before* each step.
    grad_norm: norm of the gradient at that iterate.
    aux: the objective's auxiliary output at that iterate (stacked), or None.
  """

  value: jax.Array
  grad_norm: jax.Array
  aux: Any


def projected_step(optimizer: optax.GradientTransformation, grads, opt_state,
                   params, proj: Optional[base.Projection] = None):
  """One optax step followed by a projection.

  Args:
    optimizer: any optax gradient transformation (a chain is fine).
    grads: gradient at ``params``.
    opt_state: the optimizer's state.
    params: current variables.
    proj: projection applied after the step (identity if None). It must
      return the structure, shapes and dtypes of its input; anything else
      (e.g. a scalar for a vector, which the update would broadcast) raises
      a :class:`BilevelValidationError` when the step is traced.

  Returns:
    ``(new_params, new_opt_state)``.

  Raises:
    BilevelValidationError: if the optimizer cannot update ``params`` (its
      state belongs to other params, it needs extra arguments such as
      ``optax.lbfgs``, or a hyperparameter was given as a string) or the
      projection changes the structure, a shape or a dtype.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from jaxbilevel import projected_step
    >>> opt = optax.sgd(0.5)
    >>> y = jnp.array([1.0, -2.0])
    >>> new_y, _ = projected_step(opt, y, opt.init(y), y,
    ...                           lambda v: jnp.maximum(v, 0.0))
    >>> new_y.tolist()     # y - 0.5 y = (0.5, -1.0), then clipped at 0
    [0.5, 0.0]
  """
  try:
    updates, opt_state = optimizer.update(grads, opt_state, params)
  except (ValueError, TypeError) as err:
    if isinstance(err, base.BilevelValidationError):
      raise
    raise base.BilevelValidationError(
        _update_failure(optimizer, opt_state, params, err)) from err
  new_params = optax.apply_updates(params, updates)
  if proj is not None:
    new_params = base.checked_projection(proj, "the projection")(new_params)
  return new_params, opt_state


def _update_failure(optimizer, opt_state, params, err) -> str:
  """The message for an optimizer whose ``update`` raised ``err``."""
  name = "an optimizer (upper_optimizer, lower_optimizer or value_optimizer)"
  known = base.optimizer_failure(optimizer, err, name)
  if known is not None:
    return known
  try:
    expected = jax.tree.structure(jax.eval_shape(optimizer.init, params))
  except Exception:  # pylint: disable=broad-except
    expected = None
  if expected is None or expected != jax.tree.structure(opt_state):
    return (
        "an optimizer could not update the variables: the structure of state "
        "does not match params (was the state created by tx.init with "
        "differently structured params, or restored for another model?). "
        f"params: {jax.tree.structure(params)}. Original error: {err}")
  return (
      f"{name} failed to compute an update of params with structure "
      f"{jax.tree.structure(params)} (its state matches them, so the "
      f"optimizer's own arguments are the likely cause). Original error: "
      f"{err}")


def inner_solve(objective: Callable, y, opt_state, *,
                optimizer: optax.GradientTransformation, num_steps: int,
                proj: Optional[base.Projection] = None,
                has_aux: bool = False, grad_norm: bool = True,
                trace: str = "every"):
  r"""Runs ``num_steps`` projected optax steps on ``objective(y)``.

  .. math:: y \leftarrow \mathrm{Proj}(y + \mathrm{opt}(\nabla \mathrm{obj}(y)))

  The loop is a ``lax.scan`` of static length, so it is differentiable in
  reverse mode and compiles once whatever the values of the step sizes.

  Args:
    objective: ``y -> scalar`` (or ``y -> (scalar, aux)`` with ``has_aux``).
      Close over ``x``, ``gamma`` and the batch; they may be traced values.
    y: initial iterate (warm start).
    opt_state: the optimizer's state for ``y``.
    optimizer: the optax optimizer taking the steps.
    num_steps: number of steps (a static Python int >= 1).
    proj: projection after each step.
    has_aux: whether ``objective`` returns ``(value, aux)``.
    grad_norm: whether the trace records each step's gradient norm (a
      static bool; when False the trace's ``grad_norm`` is NaN and costs
      nothing).
    trace: ``"every"`` (the default) records every step; ``"first"`` records
      only the first step (the values at the incoming ``y``), which the loop
      then takes outside the ``lax.scan``: the later steps compute neither
      the objective's value (only its gradient), nor its auxiliary values,
      nor the gradient norm. Same iterates; the trace has length 1.

  Returns:
    ``(y, opt_state, trace)`` where ``trace`` is an :class:`InnerTrace`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from jaxbilevel import inner_solve
    >>> opt = optax.sgd(0.25)
    >>> y, _, trace = inner_solve(lambda y: (y - 3.0) ** 2, jnp.array(0.0),
    ...                           opt.init(0.0), optimizer=opt, num_steps=30)
    >>> round(float(y), 6)
    3.0
  """
  num_steps = base.check_static_int(num_steps, "num_steps")
  if trace not in ("every", "first"):
    raise base.BilevelValidationError(
        f"inner_solve: trace must be 'every' or 'first', got {trace!r}.")
  grad_fn = jax.value_and_grad(objective, has_aux=has_aux)

  def body(carry, _):
    y, state = carry
    out, grads = grad_fn(y)
    value, aux = out if has_aux else (out, None)
    y, state = projected_step(optimizer, grads, state, y, proj)
    norm = (optax.tree_utils.tree_norm(grads) if grad_norm
            else jnp.full((), jnp.nan, jnp.result_type(value)))
    return (y, state), InnerTrace(value, norm, aux)

  def untraced_body(carry, _):
    # The gradient only: a stacked record of every step would make XLA
    # compute each step's value, auxiliary values and norm.
    y, state = carry
    grads = jax.grad(objective, has_aux=has_aux)(y)
    if has_aux:
      grads = grads[0]
    return projected_step(optimizer, grads, state, y, proj), None

  if num_steps == 1 or trace == "first":
    # The first step outside the loop: one step needs no loop (which spares
    # a traced and compiled while loop per outer step, PBGD-Free's default
    # K = 1), and a record of the first step only leaves the rest untraced.
    (y, opt_state), step = body((y, opt_state), None)
    if num_steps > 1:
      (y, opt_state), _ = jax.lax.scan(untraced_body, (y, opt_state), None,
                                       length=num_steps - 1)
    return y, opt_state, jax.tree.map(lambda v: v[None], step)
  (y, opt_state), steps = jax.lax.scan(body, (y, opt_state), None,
                                       length=num_steps)
  return y, opt_state, steps


def first_step(trace: InnerTrace) -> InnerTrace:
  """The record of the first inner step (the values at the incoming iterate)."""
  return jax.tree.map(lambda v: v[0], trace)
