"""PBGD-Free: the value-function-free, single-loop penalty method."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import optax

from jaxbilevel._src import base
from jaxbilevel._src import continuation
from jaxbilevel._src import programs
from jaxbilevel._src import method_parts

DIAGNOSTICS = base.COMMON_DIAGNOSTICS + ("gamma",)


class PBGDFreeState(NamedTuple):
  """State of :func:`pbgd_free`.

  Attributes:
    count: number of outer steps taken.
    upper_state: state of the upper optimizer (for ``x``).
    lower_state: state of the lower optimizer (for ``y``).
    diagnostics: dict of scalars from the last step: ``f`` and ``g`` at the
      incoming iterate, ``lower_grad_norm`` (:math:`\\|\\nabla_y g\\|`
      there), ``upper_grad_norm`` (norm of :math:`\\nabla_x f`) and
      ``gamma``.
  """

  count: jax.Array
  upper_state: optax.OptState
  lower_state: optax.OptState
  diagnostics: dict


def upper_direction(f, x, y, batch, method: str):
  """:math:`\\nabla_x f(x, y)`; raises if ``f`` provably ignores ``x``."""

  def independent():
    raise base.BilevelValidationError(
        f"{method}: the upper objective f does not depend on x, so the upper "
        "direction grad_x f(x, y) is identically zero and x would never move. "
        "This is the case when x enters only through the lower objective "
        "(data hyper-cleaning weights, regularization strengths). PBGD-Free "
        "drops the value-function correction gamma*(grad_x g(x, y_gamma) - "
        "grad_x g(x, y_g)), which is then the whole hypergradient: use "
        "jaxbilevel.alt_pbgd, which keeps it (or jaxbilevel.v_pbgd).")

  return base.checked_gradient(lambda x_: f(x_, y, batch), x, independent)


@programs.bilevel_method
@continuation.penalty_method("pbgd_free")
def pbgd_free(f: base.Objective,
              g: base.Objective,
              *,
              gamma: base.ScalarOrSchedule,
              upper_optimizer: optax.GradientTransformation,
              lower_optimizer: optax.GradientTransformation,
              inner_steps: int = 1,
              proj_x: Optional[base.Projection] = None,
              proj_y: Optional[base.Projection] = None,
              ) -> optax.GradientTransformationExtraArgs:
  r"""PBGD-Free: K lower steps on :math:`f/\gamma + g`, then one upper step on :math:`\nabla_x f`.

  Each call of ``update`` performs one outer iteration of Algorithm 1 of
  Jiang et al. (2025):

  .. math::

    y &\leftarrow \mathrm{Proj}_\mathcal{Y}\big(y - \eta_y
        \nabla_y[\gamma^{-1} f + g](x_t, y)\big)
        \quad (K \text{ times, warm-started}) \\
    x_{t+1} &\leftarrow \mathrm{Proj}_\mathcal{X}\big(x_t - \eta
        \nabla_x f(x_t, y)\big)

  where the plain gradient steps are replaced by the two optax optimizers
  (separate states per level). The update is *alternating*: the upper step
  is taken at the new ``y``; each update's batch is used by both the lower
  and the upper step (the authors' minibatch protocol). Nothing is
  accumulated across calls: one ``update`` is one outer iteration.

  PBGD-Free drops the value-function correction
  :math:`\gamma[\nabla_x g(x,y^*_\gamma)-\nabla_x g(x,y^*_g)]` of the reduced
  penalty gradient. This is exact when ``f`` is flat in ``y`` and biased
  otherwise; the bias does not shrink as :math:`\gamma` grows
  (bias G5 of :doc:`/methods`; see also :doc:`/choosing`). If ``f`` does
  not depend on ``x`` at all the direction is identically zero; this is detected when ``update`` is
  first traced and raises an error that points to :func:`alt_pbgd`.

  Cost per outer iteration: ``inner_steps`` evaluations of
  :math:`(\nabla_y f,\nabla_y g)` and one :math:`\nabla_x f`; no
  Hessian-vector products. Memory: ``x``, one copy of ``y`` and the optimizer
  states (no second lower-level copy).

  Args:
    f: upper objective ``f(x, y, batch) -> scalar``.
    g: lower objective ``g(x, y, batch) -> scalar``.
    gamma: penalty constant :math:`\gamma > 0`: a float, an array (may be
      traced, for sweeps) or a schedule ``step -> gamma``; ``"auto"`` or
      :class:`jaxbilevel.GammaContinuation` grows it by continuation (see
      :doc:`/choosing_gamma`).
    upper_optimizer: optax optimizer for ``x`` (any chain).
    lower_optimizer: optax optimizer for ``y`` (any chain).
    inner_steps: number K of lower steps per outer iteration (static int).
    proj_x: optional projection for ``x`` (see :mod:`jaxbilevel.projections`).
    proj_y: optional projection for ``y``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Its ``update(updates,
    state, params, *, batch=None)`` takes ``updates=None`` (the method
    computes the updates of both levels itself; any other value raises
    :class:`BilevelValidationError`), takes ``params`` as a
    :class:`BilevelParams` and returns the change of both levels; unknown
    keyword arguments are ignored.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> f = lambda x, y, batch: jnp.sum(x ** 2) + 0.1 * jnp.sum(y)
    >>> g = lambda x, y, batch: jnp.sum((y - x) ** 2)
    >>> tx = jbl.pbgd_free(f, g, gamma=10.0, upper_optimizer=optax.sgd(0.1),
    ...                    lower_optimizer=optax.sgd(0.2), inner_steps=2)
    >>> params = jbl.BilevelParams(x=jnp.ones(2), y=jnp.zeros(2))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(None, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> [round(float(v), 6) for v in params.x]
    [0.8, 0.8]

  References:
    L. Jiang, Q. Xiao, L. Chen, T. Chen. *Beyond Value Functions:
    Single-Loop Bilevel Optimization under Flatness Conditions*, NeurIPS
    2025, arXiv:2507.20400.
  """
  f = base.scalar_objective(f, "f")
  g = base.scalar_objective(g, "g")
  gamma = base.check_hyperparameter(gamma, "gamma")
  inner_steps = base.check_static_int(inner_steps, "inner_steps")
  _, proj_x, proj_y = base.level_arguments(
      upper_optimizer, lower_optimizer, None, proj_x, proj_y)
  penalized_tracker = method_parts.PenalizedTracker(
      f, g, lower_optimizer, inner_steps, proj_y)
  upper_step = method_parts.ProjectedStep(upper_optimizer, proj_x)

  def init_fn(params):
    return PBGDFreeState(
        **base.init_state_fields(params, "pbgd_free", DIAGNOSTICS,
                                 upper_optimizer, lower_optimizer))

  def step_fn(params, state, *, batch=None, diagnostics=False,
              **extra_args):
    del extra_args
    step = method_parts.begin(params, state, diagnostics, "pbgd_free",
                              DIAGNOSTICS)
    gamma_t = step.hyperparameter(gamma, "gamma")
    # K lower steps on f / gamma + g, warm-started from the previous y.
    y_gamma = penalized_tracker.update(step, state, gamma_t, batch)
    # One upper step on grad_x f at the new y (the gamma-term is dropped).
    direction = upper_direction(f, step.x, y_gamma.iterate, batch,
                                "pbgd_free")
    x_next = upper_step.update(step, state, direction)
    return step.finish(PBGDFreeState, x_next, y_gamma, gamma=gamma_t)

  return base.bilevel_transformation(init_fn, step_fn, "pbgd_free")
