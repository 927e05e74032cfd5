"""ITD: iterative (unrolled, reverse-mode) differentiation through the inner solve."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import jax
import optax

from jaxbilevel._src import base
from jaxbilevel._src import programs
from jaxbilevel._src import hypergradient
from jaxbilevel._src import inner

DIAGNOSTICS = base.COMMON_DIAGNOSTICS


class ITDState(NamedTuple):
  """State of :func:`itd`.

  Attributes:
    count: number of outer steps taken.
    upper_state: state of the upper optimizer (for ``x``).
    lower_state: state of the inner optimizer after the last unroll (the
      starting state of the next one when warm-started).
    y_init: the fixed starting point of the unroll (used when
      ``inner_start="initial"``).
    diagnostics: dict of scalars from the last step: ``f`` and ``g`` at
      :math:`(x_t, y_T)`, ``upper_grad_norm`` (norm of the hypergradient),
      ``lower_grad_norm`` (:math:`\\|\\nabla_y g(x_t, y_T)\\|`, the inner
      accuracy).
  """

  count: jax.Array
  upper_state: optax.OptState
  lower_state: optax.OptState
  y_init: base.PyTree
  diagnostics: dict


@programs.bilevel_method
@base.renamed_arguments("itd", {
    "warm_start": ("inner_start",
                   lambda v: "previous" if v else "initial"),
    "init": "inner_start"})
def itd(f: base.Objective,
        g: base.Objective,
        *,
        upper_optimizer: optax.GradientTransformation,
        lower_optimizer: optax.GradientTransformation,
        inner_steps: int = 10,
        inner_start: Union[str, Callable] = "previous",
        truncate: Optional[int] = None,
        checkpoint: Union[bool, int] = False,
        proj_x: Optional[base.Projection] = None,
        proj_y: Optional[base.Projection] = None,
        ) -> optax.GradientTransformationExtraArgs:
  r"""ITD: reverse-mode differentiation through T unrolled inner steps.

  One ``update`` is one outer iteration (see :doc:`/methods`):

  .. math::

    y_{t+1} &= \Phi(y_t, x) = \mathrm{Proj}_\mathcal{Y}\big(y_t +
        \mathrm{opt}(\nabla_y g(x, y_t))\big), \quad t = 0..T-1 \\
    x &\leftarrow \mathrm{Proj}_\mathcal{X}\Big(x - \eta\,
        \frac{d}{dx} f\big(x, y_T(x)\big)\Big)

  computed as ``jax.value_and_grad`` of ``x -> f(x, y_T(x))`` with
  :math:`y_T` from :func:`jaxbilevel.hypergradient.unrolled_solve` (a
  ``lax.scan`` of ``lower_optimizer`` steps). ``params.y`` becomes
  :math:`y_T`.

  The start of each unroll:

  * ``inner_start="previous"`` (default): the previous :math:`y_T`
    and inner optimizer state (standard; the hypergradient ignores the
    dependence of the start on earlier ``x``);
  * ``inner_start="initial"``: the initial ``params.y`` with a fresh optimizer
    state, every time;
  * ``inner_start=lambda x, y: ...``: :math:`y_0 = y_0(x, y)` with a
    fresh optimizer state, and the hypergradient *includes* the derivative
    through it (``inner_start=lambda x, y: x`` with ``y`` the adapted
    parameters is exact MAML).

  * ``truncate=K`` back-propagates through the last K steps only (T-RHG).
  * ``checkpoint=True`` rematerialises the unroll in :math:`\sqrt T` chunks so
    memory does not grow linearly in T (an int sets the chunk length).
  * Unrolling Adam/RMSProp needs ``eps_root > 0``: use
    :func:`jaxbilevel.hypergradient.unrollable_adam`; ``optax.adam``'s default ``eps_root=0`` gives NaN
    meta-gradients for coordinates with zero gradient history.

  Cost per outer iteration: T g-gradients forward, T (or K) pairs of
  (Hessian-vector product, cross product) backward, one f-gradient (both
  blocks), plus one g-gradient at :math:`y_T` only when the diagnostics are
  recorded. Memory:
  :math:`O(T d_y)` for the trajectory, :math:`O(K d_y)` truncated,
  :math:`O(\sqrt T d_y)` checkpointed.

  Args:
    f: upper objective ``f(x, y, batch) -> scalar``.
    g: lower objective ``g(x, y, batch) -> scalar``.
    upper_optimizer: optax optimizer for ``x``.
    lower_optimizer: the unrolled inner optax optimizer.
    inner_steps: T (static int).
    inner_start: where each unroll starts: ``"previous"`` (default),
      ``"initial"`` or a callable ``(x, y) -> y0``, differentiated through
      (see above; formerly ``warm_start=True``, ``warm_start=False`` and
      ``init``).
    truncate: K, number of final inner steps differentiated (static int or
      None for all).
    checkpoint: ``False``, ``True`` or a chunk length.
    proj_x: optional projection for ``x``.
    proj_y: optional projection for ``y`` (inside the unroll).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` over :class:`BilevelParams`.

  Examples:
    Ridge regression (problem A10 of :doc:`/problems`), ``x`` = log of the
    penalty:

    >>> import jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> ridge = jbl.problems.ridge(jnp.float32)
    >>> tx = jbl.itd(ridge.f, ridge.g, upper_optimizer=optax.sgd(1.0),
    ...              lower_optimizer=optax.sgd(0.5), inner_steps=200)
    >>> updates, state = tx.update(None, tx.init(ridge.params0), ridge.params0)
    >>> round(-float(updates.x), 4)     # dF/dlog(lambda) at lambda = 0.1
    0.045

  References:
    L. Franceschi, M. Donini, P. Frasconi, M. Pontil. *Forward and Reverse
    Gradient-Based Hyperparameter Optimization*, ICML 2017; R. Grazzi et al.,
    *On the Iteration Complexity of Hypergradient Computation*, ICML 2020.
  """
  f = base.scalar_objective(f, "f")
  g = base.scalar_objective(g, "g")
  inner_steps = base.check_static_int(inner_steps, "inner_steps")
  inner_start = base.check_start(inner_start, "itd", "inner_start",
                                 ("previous", "initial"))
  if truncate is not None:
    truncate = base.check_static_int(truncate, "truncate", minimum=0)
    if truncate > inner_steps:
      raise base.BilevelValidationError(
          f"itd: truncate={truncate} exceeds inner_steps={inner_steps}.")
  _, proj_x, proj_y = base.level_arguments(
      upper_optimizer, lower_optimizer, None, proj_x, proj_y)

  def init_fn(params):
    return ITDState(
        **base.init_state_fields(params, "itd", DIAGNOSTICS, upper_optimizer,
                                 lower_optimizer),
        y_init=params.y)

  def step_fn(params, state, *, batch=None, diagnostics=False,
              **extra_args):
    del extra_args
    params, dtype = base.begin_step(params, "itd",
                                      y_init=state.y_init)
    record = base.recorded_names(diagnostics, DIAGNOSTICS, "itd")
    x, y = params
    if inner_start == "previous":
      start = lambda x_: (y, state.lower_state)
    elif inner_start == "initial":
      start = lambda x_: (state.y_init, lower_optimizer.init(state.y_init))
    else:
      def start(x_):
        y0 = base.inner_start(inner_start, x_, y, "itd")
        return y0, lower_optimizer.init(y0)

    def upper_of_unroll(x_):
      y0, lower_state0 = start(x_)
      y_t, lower_state = hypergradient.unrolled_solve(
          g, x_, y0, batch, optimizer=lower_optimizer, num_steps=inner_steps,
          opt_state=lower_state0, proj=proj_y, truncate=truncate,
          checkpoint=checkpoint)
      return f(x_, y_t, batch), (y_t, lower_state)

    (f_t, (y_new, lower_state)), direction = jax.value_and_grad(
        upper_of_unroll, has_aux=True)(x)
    x_new, upper_state = inner.projected_step(
        upper_optimizer, direction, state.upper_state, x, proj_x)

    g_t, g_grad_norm = base.recorded_lower_value(g, x, y_new, batch)
    diag = base.diagnostics(
        dtype, record, f=f_t, g=g_t,
        upper_grad_norm=lambda: base.diagnostic_norm(direction),
        lower_grad_norm=g_grad_norm)
    new_state = ITDState(
        count=optax.safe_increment(state.count), upper_state=upper_state,
        lower_state=lower_state, y_init=state.y_init, diagnostics=diag)
    return base.BilevelParams(x_new, y_new), new_state

  return base.bilevel_transformation(init_fn, step_fn, "itd")
