"""ALRIGHT: alternating single-objective steps on a weighted bi-objective."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxbilevel._src import base
from jaxbilevel._src import programs
from jaxbilevel._src import inner
from jaxbilevel._src import tree as tree_lib

DIAGNOSTICS = base.COMMON_DIAGNOSTICS + ("probability", "upper_step")
_G_UPDATES = ("both", "lower")


class ALRIGHTState(NamedTuple):
  """State of :func:`alright`.

  Attributes:
    count: number of steps taken.
    upper_state: state of the optimizer of ``x``.
    lower_state: state of the optimizer of ``y``.
    key: the PRNG key of the next draw (split at every step).
    diagnostics: dict of scalars: ``f`` and ``g`` at the incoming iterate,
      ``lower_grad_norm`` (:math:`\\|\\nabla_y g\\|` there),
      ``upper_grad_norm`` (the x-block of the sampled objective's gradient),
      ``probability`` (:math:`\\lambda`) and ``upper_step`` (1 if the step
      was on ``f``, 0 if on ``g``).
  """

  count: jax.Array
  upper_state: optax.OptState
  lower_state: optax.OptState
  key: jax.Array
  diagnostics: dict


@programs.bilevel_method
def alright(f: base.Objective,
            g: base.Objective,
            *,
            probability: base.ScalarOrSchedule = 0.5,
            upper_optimizer: optax.GradientTransformation,
            lower_optimizer: optax.GradientTransformation,
            key: jax.Array,
            g_updates: str = "both",
            proj_x: Optional[base.Projection] = None,
            proj_y: Optional[base.Projection] = None,
            ) -> optax.GradientTransformationExtraArgs:
  r"""ALRIGHT: each step, one optimizer step on ``f`` (prob. λ) or on ``g``.

  Not a bilevel method: it targets the weighted bi-objective
  :math:`\min_{x,y}\ \lambda f(x,y)+(1-\lambda)g(x,y)` (e.g. DPO and SFT) by
  alternating single-objective steps (see :doc:`/methods`):

  .. math::

    i \sim \mathrm{Bernoulli}(\lambda):\quad
    (x, y) \leftarrow
    \begin{cases}
      (x, y) + \mathrm{opt}(\nabla f(x, y)) & i = 1 \ (\text{e.g. DPO}) \\
      (x, y) + \mathrm{opt}(\nabla g(x, y)) & i = 0 \ (\text{e.g. SFT})
    \end{cases}

  Each level keeps one optimizer state across both kinds of step. In
  expectation this is SGD on the :math:`\lambda`-mixture, so its iterates
  settle near the mixture's minimiser, between the single-objective optima.
  ``g_updates="lower"`` makes ``g`` steps update ``y`` only (``x`` and its
  optimizer state untouched), as in the PBGD-Free LLM comparisons where an
  SFT step trains the head only. Only the sampled objective is
  differentiated (``lax.cond``). The draw uses the PRNG ``key`` stored in the
  state (split every step): a run is deterministic for a given key. Feed
  ``f`` and ``g`` loaders of equal length, or the sampling weights drift.
  MAXRIGHT (argmax of the weighted gaps) is not implemented.

  Cost per step: one gradient of the sampled objective (both blocks); recorded
  diagnostics add a forward pass of ``f`` and a gradient of ``g`` in ``y``. Memory: nothing beyond
  the optimizer states and the key.

  Args:
    f: first objective ``f(x, y, batch)`` (the upper/DPO objective).
    g: second objective ``g(x, y, batch)`` (the lower/SFT objective).
    probability: :math:`\lambda\in[0,1]`, the probability of an ``f`` step
      (float, array or schedule). Default 0.5, the authors' default
      (Fernando et al., 2024): equal weight on both objectives.
    upper_optimizer: optax optimizer for ``x``.
    lower_optimizer: optax optimizer for ``y``.
    key: a ``jax.random`` key.
    g_updates: ``"both"`` (default) or ``"lower"``.
    proj_x: optional projection for ``x``.
    proj_y: optional projection for ``y``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` over :class:`BilevelParams`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> f = lambda x, y, batch: (x - 1.0) ** 2 + (y - 1.0) ** 2
    >>> g = lambda x, y, batch: (x + 1.0) ** 2 + (y + 1.0) ** 2
    >>> tx = jbl.alright(f, g, probability=0.5, upper_optimizer=optax.sgd(0.01),
    ...                  lower_optimizer=optax.sgd(0.01),
    ...                  key=jax.random.PRNGKey(0))
    >>> p0 = jbl.BilevelParams(x=jnp.array(3.0), y=jnp.array(3.0))
    >>> params, state, history = jbl.run(tx, p0, num_steps=2000)
    >>> abs(float(params.x)) < 0.3     # the mixture's minimiser is (0, 0)
    True

  References:
    H. Fernando, H. Shen, P. Ram, Y. Zhou, H. Samulowitz, N. Baracaldo,
    T. Chen. *Mitigating Forgetting in LLM Supervised Fine-Tuning and
    Preference Learning*, arXiv:2410.15483.
  """
  f = base.scalar_objective(f, "f")
  g = base.scalar_objective(g, "g")
  probability = base.check_hyperparameter(probability, "probability",
                                          allow_zero=True)
  if not callable(probability) and base._is_concrete(probability) and float(  # pylint: disable=protected-access
      probability) > 1.0:
    raise base.BilevelValidationError(
        f"alright: probability must be in [0, 1], got {float(probability)}.")
  if g_updates not in _G_UPDATES:
    raise base.BilevelValidationError(
        f"alright: g_updates must be one of {_G_UPDATES}, got {g_updates!r}.")
  if key is None:
    raise base.BilevelValidationError(
        "alright: key must be a jax.random key (e.g. jax.random.PRNGKey(0)).")
  _, proj_x, proj_y = base.level_arguments(
      upper_optimizer, lower_optimizer, None, proj_x, proj_y)
  grad_f = jax.grad(f, argnums=(0, 1))
  grad_g = jax.grad(g, argnums=(0, 1))

  def init_fn(params):
    return ALRIGHTState(
        **base.init_state_fields(params, "alright", DIAGNOSTICS,
                                 upper_optimizer, lower_optimizer),
        key=key)

  def step_fn(params, state, *, batch=None, diagnostics=False,
              **extra_args):
    del extra_args
    params, dtype = base.begin_step(params, "alright")
    record = base.recorded_names(diagnostics, DIAGNOSTICS, "alright")
    x, y = params
    lam = base.resolve_hyperparameter(probability, state.count, dtype,
                                      allow_zero=True, name="probability")
    lam = jnp.where(lam <= 1, lam, jnp.nan)

    key, draw_key = jax.random.split(state.key)
    on_f = jax.random.bernoulli(draw_key, lam)
    grad_x, grad_y = jax.lax.cond(on_f, lambda: grad_f(x, y, batch),
                                  lambda: grad_g(x, y, batch))
    x_new, upper_state = inner.projected_step(
        upper_optimizer, grad_x, state.upper_state, x, proj_x)
    y_new, lower_state = inner.projected_step(
        lower_optimizer, grad_y, state.lower_state, y, proj_y)
    if g_updates == "lower":  # a g step leaves x and its optimizer untouched
      x_new, upper_state = tree_lib.tree_select(
          on_f, (x_new, upper_state), (x, state.upper_state))
    if callable(probability) or not base._is_concrete(probability):  # pylint: disable=protected-access
      # A traced or scheduled probability outside [0, 1] is NaN here, and a
      # NaN draw silently picks g: the new iterates are made NaN instead, so
      # that jbl.run and jbl.sweep flag the step, as for every other method.
      valid = ~jnp.isnan(lam)
      x_new, y_new = jax.tree.map(lambda v: jnp.where(valid, v, jnp.nan),
                                  (x_new, y_new))

    diag = base.diagnostics(
        dtype, record, **base.incoming_record(f, g, x, y, batch),
        upper_grad_norm=lambda: base.diagnostic_norm(grad_x),
        probability=lam, upper_step=on_f)
    new_state = ALRIGHTState(
        count=optax.safe_increment(state.count), upper_state=upper_state,
        lower_state=lower_state, key=key, diagnostics=diag)
    return base.BilevelParams(x_new, y_new), new_state

  return base.bilevel_transformation(init_fn, step_fn, "alright")
