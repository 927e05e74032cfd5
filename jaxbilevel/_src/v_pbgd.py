"""V-PBGD: joint gradient descent on the value-function penalty."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxbilevel._src import base
from jaxbilevel._src import continuation
from jaxbilevel._src import programs
from jaxbilevel._src import method_parts
from jaxbilevel._src import objectives

DIAGNOSTICS = base.COMMON_DIAGNOSTICS + ("gamma", "g_gap")


class VPBGDState(NamedTuple):
  """State of :func:`v_pbgd`.

  Attributes:
    count: number of outer steps taken.
    upper_state: state of the optimizer of ``x``.
    lower_state: state of the optimizer of ``y``.
    value_state: state of the optimizer of the value tracker.
    y_g: the value tracker (:math:`\\omega` in the paper), an estimate of
      :math:`y_g^*(x)`; formerly ``omega`` (a deprecated alias for one
      release).
    diagnostics: dict of scalars: ``f``, ``g`` at the incoming iterate,
      ``lower_grad_norm`` (:math:`\\|\\nabla_y g\\|` there),
      ``upper_grad_norm`` (:math:`\\|G_x\\|`), ``gamma`` and ``g_gap`` :math:`=g(x,y)-g(x,\\omega)`.
  """

  count: jax.Array
  upper_state: optax.OptState
  lower_state: optax.OptState
  value_state: optax.OptState
  y_g: base.PyTree
  diagnostics: dict

  omega = base.deprecated_field("omega", "y_g")


@programs.bilevel_method
# The cap of gamma="auto" is 10 x its start, not 100 x (GammaContinuation.max).
@continuation.penalty_method("v_pbgd", max_ratio=10.0)
def v_pbgd(f: base.Objective,
           g: base.Objective,
           *,
           gamma: base.ScalarOrSchedule,
           upper_optimizer: optax.GradientTransformation,
           lower_optimizer: optax.GradientTransformation,
           value_optimizer: Optional[optax.GradientTransformation] = None,
           value_steps: int = 1,
           normalize: bool = False,
           proj_x: Optional[base.Projection] = None,
           proj_y: Optional[base.Projection] = None,
           ) -> optax.GradientTransformationExtraArgs:
  r"""V-PBGD: a joint step on :math:`\tilde F_\gamma(x,y)=f+\gamma(g-v)` with a value tracker.

  One ``update`` is one outer iteration (see :doc:`/methods`):

  .. math::

    \omega &\leftarrow \mathrm{Proj}_\mathcal{Y}(\omega - \beta
        \nabla_y g(x_k, \omega)) \quad (T \text{ times, warm-started}) \\
    G_x &= \nabla_x f(x_k,y_k) + \gamma[\nabla_x g(x_k,y_k)
        - \nabla_x g(x_k,\omega)] \\
    G_y &= \nabla_y f(x_k,y_k) + \gamma \nabla_y g(x_k,y_k) \\
    (x_{k+1}, y_{k+1}) &\leftarrow \mathrm{Proj}((x_k,y_k) - \alpha (G_x, G_y))

  Both blocks come from one backward pass of
  :func:`jaxbilevel.objectives.value_gap_penalty` at :math:`(x_k, y_k)`; the
  two optimizers step simultaneously from the same point. The joint penalty
  has :math:`O(\gamma)` curvature, so the step must shrink like
  :math:`1/(L_f+\gamma L_g)` (e.g. :math:`\eta\lesssim 1/(1+2\gamma)` on the
  smoothness toy); contrast :func:`alt_pbgd`. ``normalize=True`` multiplies
  :math:`(G_x,G_y)` by :math:`\min(1/\gamma, 1)`, as in the authors'
  data-cleaning code, which keeps a fixed learning rate stable along a
  :math:`\gamma` ramp. ``gamma`` may be a schedule that starts at 0 (the
  authors ramp it linearly).

  Cost per outer iteration: :math:`T+2` g-gradients and one f-gradient (both
  blocks), no Hessian-vector products. Memory: ``y`` and :math:`\omega`.

  Args:
    f: upper objective ``f(x, y, batch) -> scalar``.
    g: lower objective ``g(x, y, batch) -> scalar``.
    gamma: penalty constant :math:`\gamma\ge0` (float, array or schedule);
      ``"auto"`` or :class:`jaxbilevel.GammaContinuation` grows it by
      continuation (see :doc:`/choosing_gamma`;
      the joint step then needs a step size stable at ``max``, or
      ``normalize=True``).
    upper_optimizer: optax optimizer for ``x`` (step :math:`\alpha`).
    lower_optimizer: optax optimizer for ``y``.
    value_optimizer: optax optimizer for :math:`\omega` (step :math:`\beta`;
      defaults to ``lower_optimizer`` with its own state).
    value_steps: :math:`T`, steps of the value tracker per outer step.
    normalize: scale the joint gradient by :math:`\min(1/\gamma,1)`.
    proj_x: optional projection for ``x``.
    proj_y: optional projection for ``y`` and :math:`\omega`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` over :class:`BilevelParams`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> f = lambda x, y, batch: 0.5 * x ** 2
    >>> g = lambda x, y, batch: (y - x) ** 2
    >>> tx = jbl.v_pbgd(f, g, gamma=10.0, upper_optimizer=optax.sgd(0.04),
    ...                 lower_optimizer=optax.sgd(0.04),
    ...                 value_optimizer=optax.sgd(0.25), value_steps=20)
    >>> params = jbl.BilevelParams(x=jnp.array(1.0), y=jnp.array(0.0))
    >>> params, state, history = jbl.run(tx, params, num_steps=2000)
    >>> abs(float(params.x)) < 1e-6
    True

  References:
    H. Shen, T. Chen. *On Penalty-based Bilevel Gradient Descent Method*,
    ICML 2023, arXiv:2302.05185.
  """
  f = base.scalar_objective(f, "f")
  g = base.scalar_objective(g, "g")
  gamma = base.check_hyperparameter(gamma, "gamma", allow_zero=True)
  value_steps = base.check_static_int(value_steps, "value_steps")
  value_optimizer, proj_x, proj_y = base.level_arguments(
      upper_optimizer, lower_optimizer, value_optimizer, proj_x, proj_y)
  value_tracker = method_parts.ValueTracker(g, value_optimizer, value_steps,
                                            proj_y)
  upper_step = method_parts.ProjectedStep(upper_optimizer, proj_x)
  lower_step = method_parts.ProjectedStep(lower_optimizer, proj_y, "y")
  penalty = objectives.value_gap_penalty(f, g, has_aux=True)

  def init_fn(params):
    return VPBGDState(
        **base.init_state_fields(params, "v_pbgd", DIAGNOSTICS, upper_optimizer,
                                 lower_optimizer, value_optimizer))

  def step_fn(params, state, *, batch=None, diagnostics=False,
              **extra_args):
    del extra_args
    step = method_parts.begin(params, state, diagnostics, "v_pbgd",
                              DIAGNOSTICS)
    gamma_t = step.hyperparameter(gamma, "gamma", allow_zero=True)
    # y_g: T steps on g (warm start, never reset).
    y_g = value_tracker.update(step, state, batch)
    # (G_x, G_y): the joint gradient of f + gamma (g(x, y) - g(x, y_g)).
    (_, aux), (grad_x, grad_y) = jax.value_and_grad(
        penalty, argnums=(0, 1), has_aux=True)(
            step.x, step.y, y_g.iterate, gamma_t, batch)
    if normalize:
      scale = jnp.minimum(1.0 / gamma_t, 1.0)
      grad_x, grad_y = jax.tree.map(lambda v: v * scale.astype(v.dtype),
                                    (grad_x, grad_y))
    # (x, y) <- Proj((x, y) - alpha (G_x, G_y)), both from (x_k, y_k).
    x_next = upper_step.update(step, state, grad_x)
    y_next = lower_step.update(step, state, grad_y)
    return step.finish(VPBGDState, x_next, y_next, y_g, gamma=gamma_t,
                       g_gap=aux["g_gap"], **base.incoming_record(
                           f, g, step.x, step.y, batch, f_value=aux["f"],
                           g_value=aux["g"]))

  return base.bilevel_transformation(init_fn, step_fn, "v_pbgd")
