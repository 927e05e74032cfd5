"""F2SA: fully first-order stochastic approximation (Kwon et al., 2023)."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple
import numbers
import warnings

import jax
import jax.numpy as jnp
import optax

from jaxbilevel._src import base
from jaxbilevel._src import continuation
from jaxbilevel._src import programs
from jaxbilevel._src import method_parts
from jaxbilevel._src import objectives

DIAGNOSTICS = base.COMMON_DIAGNOSTICS + ("gamma", "g_gap")
_PRESETS = ("benchopt", "paper")


class F2SAState(NamedTuple):
  """State of :func:`f2sa`.

  Attributes:
    count: number of outer steps taken (k).
    upper_state: state of the optimizer of ``x``.
    lower_state: state of the optimizer of ``y`` (tracks
      :math:`\\arg\\min_y \\mathcal L_{\\lambda_k}(x_k, y)`).
    value_state: state of the optimizer of the value tracker.
    y_g: the value tracker (:math:`z` in the paper), an estimate of
      :math:`y^*(x_k)` (report it for "distance to :math:`y^*(x)`" metrics;
      ``params.y`` is the Lagrangian tracker, as in current benchopt);
      formerly ``z`` (a deprecated alias for one release).
    gamma: the penalty weight :math:`\\lambda_k` used by the next step
      (formerly ``lagrange_multiplier``, a deprecated alias for one release).
    diagnostics: dict of scalars: ``f``, ``g`` at the incoming iterate,
      ``lower_grad_norm`` (:math:`\\|\\nabla_y g\\|` there),
      ``upper_grad_norm``, ``gamma`` (the penalty
      weight :math:`\\lambda_k` of the step) and ``g_gap``
      :math:`=g(x,y)-g(x,z)`.
  """

  count: jax.Array
  upper_state: optax.OptState
  lower_state: optax.OptState
  value_state: optax.OptState
  y_g: base.PyTree
  gamma: jax.Array
  diagnostics: dict

  z = base.deprecated_field("z", "y_g")
  lagrange_multiplier = base.deprecated_field("lagrange_multiplier", "gamma")


def _refuse_growth_with_auto(arguments):
  r"""Refuses ``gamma_increment`` and ``gamma_max`` with ``gamma="auto"``.

  Continuation grows gamma itself, with the lower objective
  :math:`f+\lambda g` scaled by :math:`1/(1+\lambda)` (``scale_lower``) so
  that the lower step size stays stable as :math:`\lambda` grows.
  """
  increment = arguments.get("gamma_increment", 0.0)
  if not (isinstance(increment, numbers.Number) and increment == 0) or (
      arguments.get("gamma_max") is not None):
    raise base.BilevelValidationError(
        "f2sa: gamma='auto' grows gamma itself; drop "
        "gamma_increment and gamma_max (cap it with "
        "jaxbilevel.GammaContinuation(max=...)).")


@programs.bilevel_method
@base.renamed_arguments("f2sa", {"lambda0": "gamma",
                                 "lambda_increment": "gamma_increment",
                                 "lambda_max": "gamma_max"})
@continuation.penalty_method(
    "f2sa", check=_refuse_growth_with_auto, fixed={"scale_lower": True},
    set_gamma=lambda state, gamma_: state._replace(
        gamma=gamma_))
def f2sa(f: base.Objective,
         g: base.Objective,
         *,
         gamma: base.ScalarOrSchedule,
         upper_optimizer: optax.GradientTransformation,
         lower_optimizer: optax.GradientTransformation,
         value_optimizer: Optional[optax.GradientTransformation] = None,
         inner_steps: int = 10,
         value_steps: Optional[int] = None,
         gamma_increment: base.ScalarOrSchedule = 0.0,
         gamma_max: Optional[base.ScalarOrSchedule] = None,
         scale_lower: bool = False,
         proj_x: Optional[base.Projection] = None,
         proj_y: Optional[base.Projection] = None,
         ) -> optax.GradientTransformationExtraArgs:
  r"""F2SA: two warm-started lower sequences and an increasing penalty.

  One ``update`` is one outer iteration (see :doc:`/methods`) on the
  Lagrangian :math:`\mathcal L_\lambda(x,y)=f(x,y)+\lambda(g(x,y)-v(x))`,
  whose multiplier :math:`\lambda_k` (the paper's name) is the penalty weight
  on :math:`g` that every penalty method of this library calls ``gamma``
  (:math:`\lambda_0` = ``gamma``, :math:`\delta_k` = ``gamma_increment``,
  :math:`\lambda_{\max}` = ``gamma_max``; see :doc:`/vocabulary`). The
  paper's :math:`\gamma_k` below is the step size of :math:`z`:

  .. math::

    z &\leftarrow z - \gamma_k \nabla_y g(x_k, z) \quad (T_z \text{ steps}) \\
    y &\leftarrow y - \alpha_k\big(\nabla_y f(x_k, y)
        + \lambda_k\nabla_y g(x_k, y)\big) \quad (T \text{ steps}) \\
    x_{k+1} &\leftarrow x_k - \xi\alpha_k\big(\nabla_x f(x_k,y)
        + \lambda_k(\nabla_x g(x_k,y) - \nabla_x g(x_k,z))\big) \\
    \lambda_{k+1} &\leftarrow \min(\lambda_k + \delta_k,\ \lambda_{\max})

  ``y`` and ``z`` carry over between outer iterations (warm starts), and so do
  their optimizer states. The step sizes :math:`\alpha_k` (``y``),
  :math:`\gamma_k` (``z``) and :math:`\xi\alpha_k` (``x``) are those of
  ``lower_optimizer``, ``value_optimizer`` and ``upper_optimizer`` (use optax
  schedules, e.g. from :func:`f2sa_schedules`); :math:`\lambda_k` lives in the
  state. The ``y`` steps and the ``x`` direction are gradients of
  :func:`jaxbilevel.objectives.value_gap_penalty` with :math:`\gamma=\lambda_k`
  and :math:`\hat y=z`. The ``z`` and ``y`` loops are independent given
  :math:`x_k`, so running them one after the other equals the interleaved
  pseudocode. Each call uses its ``batch`` for every oracle; draw
  independent batches per oracle by putting them under separate keys of the
  batch.

  ``scale_lower=True`` divides the ``y`` direction by :math:`1+\lambda_k`,
  i.e. :math:`\alpha_k=\mathrm{lr}/(1+\lambda_k)`, so that a fixed lower
  learning rate :math:`\approx 1/L_g` stays stable as :math:`\lambda_k` grows
  (as in the A8 test of :doc:`/problems`). With constant :math:`\lambda` the
  limit is the minimiser of the reduced penalty :math:`F_\lambda`, at
  distance :math:`O(1/\lambda)` from the bilevel solution.

  **Schedules (decision on the "(unverified)" items).** The paper's
  step-size/multiplier schedule could not be checked against the paper text
  (only its abstract was available), and the two reference readings disagree
  (our reconstruction of the paper's schedule, and the benchopt solver,
  which uses :math:`(k+1)^{-1/2}` steps and a constant :math:`\delta`). So nothing is
  hard-coded: :func:`f2sa` takes :math:`\lambda_0`, :math:`\delta_k` and
  :math:`\lambda_{\max}` explicitly (``gamma``, ``gamma_increment``,
  ``gamma_max``; defaults: constant :math:`\lambda`), and
  :func:`f2sa_schedules` builds either preset with every exponent an
  explicit argument. Tests check convergence against closed forms (problem
  A8 of :doc:`/problems`), not against either preset.

  Cost per outer iteration: :math:`T_z+T+2` g-gradients and :math:`T+1`
  f-gradients (``z`` loop: :math:`T_z` g-gradients; ``y`` loop: T pairs; ``x``
  direction: one backward of the penalty, two :math:`\nabla_x g` and one
  :math:`\nabla_x f`); no Hessian-vector products. Memory: ``y`` and ``z``.

  Args:
    f: upper objective ``f(x, y, batch) -> scalar``.
    g: lower objective ``g(x, y, batch) -> scalar`` (strongly convex in y).
    gamma: initial penalty weight :math:`\lambda_0>0` on :math:`g` (float or
      array; formerly ``lambda0``, a deprecated alias for one release);
      ``"auto"`` or :class:`jaxbilevel.GammaContinuation` grows it by
      continuation instead of ``gamma_increment`` (with ``scale_lower=True``;
      see :doc:`/choosing_gamma`).
    upper_optimizer: optax optimizer for ``x`` (step :math:`\xi\alpha_k`).
    lower_optimizer: optax optimizer for ``y`` (step :math:`\alpha_k`).
    value_optimizer: optax optimizer for ``z`` (step :math:`\gamma_k`;
      defaults to ``lower_optimizer`` with its own state).
    inner_steps: T, steps of ``y`` per outer step (static int).
    value_steps: :math:`T_z`, steps of the value tracker :math:`z` per outer
      step (static int; defaults to ``inner_steps``, the paper's single T).
    gamma_increment: :math:`\delta_k\ge0` (float, array or schedule of k;
      formerly ``lambda_increment``).
    gamma_max: optional cap :math:`\lambda_{\max}` (formerly
      ``lambda_max``).
    scale_lower: divide the ``y`` direction by :math:`1+\lambda_k`.
    proj_x: optional projection for ``x``.
    proj_y: optional projection for ``y`` and ``z``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` over :class:`BilevelParams`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> prob = jbl.problems.quadratic_a8(jnp.float32)
    >>> tx = jbl.f2sa(prob.f, prob.g, gamma=100.0, scale_lower=True,
    ...               upper_optimizer=optax.sgd(0.8),
    ...               lower_optimizer=optax.sgd(0.45))
    >>> params, state, history = jbl.run(tx, prob.params0, num_steps=500)
    >>> [round(float(v), 3) for v in params.x]   # argmin F_100 = (-2.408, -1.145)
    [-2.408, -1.145]

  References:
    J. Kwon, D. Kwon, S. Wright, R. Nowak. *A Fully First-Order Method for
    Stochastic Bilevel Optimization*, ICML 2023, arXiv:2301.10945.
  """
  f = base.scalar_objective(f, "f")
  g = base.scalar_objective(g, "g")
  gamma = base.check_hyperparameter(gamma, "gamma")
  if callable(gamma):
    raise base.BilevelValidationError(
        "f2sa: gamma is the initial penalty weight (a float or array); it "
        "grows through gamma_increment (which may be a schedule).")
  gamma_increment = base.check_hyperparameter(
      gamma_increment, "gamma_increment", allow_zero=True)
  if gamma_max is not None:
    gamma_max = base.check_hyperparameter(gamma_max, "gamma_max")
    if (not callable(gamma_max)
        and base._is_concrete(gamma)  # pylint: disable=protected-access
        and base._is_concrete(gamma_max)  # pylint: disable=protected-access
        and float(gamma_max) < float(gamma)):
      raise base.BilevelValidationError(
          f"f2sa: gamma_max={float(gamma_max)} is below gamma="
          f"{float(gamma)}, so the penalty would be clipped down at the "
          "first step. Pass gamma_max >= gamma (or gamma_max=None for no "
          "cap).")
  inner_steps = base.check_static_int(inner_steps, "inner_steps")
  value_steps = base.check_static_int(
      inner_steps if value_steps is None else value_steps, "value_steps")
  value_optimizer, proj_x, proj_y = base.level_arguments(
      upper_optimizer, lower_optimizer, value_optimizer, proj_x, proj_y)
  value_tracker = method_parts.ValueTracker(g, value_optimizer, value_steps,
                                            proj_y)
  # y tracks argmin_y f + lambda g (the Lagrangian's y-gradient), by default
  # scaled by 1 / (1 + lambda) with scale_lower.
  lower_scale = (lambda lam: 1.0 / (1.0 + lam)) if scale_lower else None
  lagrangian_tracker = method_parts.PenalizedTracker(
      f, g, lower_optimizer, inner_steps, proj_y,
      objective=_lower_lagrangian(f, g, lower_scale))
  upper_step = method_parts.ProjectedStep(upper_optimizer, proj_x)
  lagrangian = objectives.value_gap_penalty(f, g, has_aux=True)

  def init_fn(params):
    fields = base.init_state_fields(params, "f2sa", DIAGNOSTICS,
                                    upper_optimizer, lower_optimizer,
                                    value_optimizer)
    return F2SAState(
        **fields,
        gamma=_initial_gamma(
            gamma, gamma_max, base.params_dtype(params)))

  def step_fn(params, state, *, batch=None, diagnostics=False,
              **extra_args):
    del extra_args
    step = method_parts.begin(params, state, diagnostics, "f2sa", DIAGNOSTICS)
    lam = jnp.asarray(state.gamma, step.dtype)
    # z = y_g: T_z steps on g; y: T steps on f + lambda g (warm starts).
    y_g = value_tracker.update(step, state, batch)
    y = lagrangian_tracker.update(step, state, lam, batch)
    # x: grad_x f(x, y) + lambda (grad_x g(x, y) - grad_x g(x, y_g)).
    (_, aux), direction = jax.value_and_grad(lagrangian, has_aux=True)(
        step.x, y.iterate, y_g.iterate, lam, batch)
    x_next = upper_step.update(step, state, direction)
    # lambda_{k+1} = min(lambda_k + delta_k, lambda_max).
    lam_next = lam + step.hyperparameter(gamma_increment, "gamma_increment",
                                         allow_zero=True)
    if gamma_max is not None:
      lam_next = jnp.minimum(lam_next,
                             step.hyperparameter(gamma_max, "gamma_max"))
    penalty = method_parts.Part(lam_next, {"gamma": lam_next}, {})
    return step.finish(F2SAState, x_next, y, y_g, penalty, gamma=lam,
                       g_gap=aux["g_gap"])

  return base.bilevel_transformation(init_fn, step_fn, "f2sa")


def _lower_lagrangian(f, g, scale):
  """``(x, y, lam, batch) -> (value, {"f", "g"})`` with value ``f + lam g``.

  The Lagrangian's y-gradient without evaluating the constant
  :math:`g(x, y_g)` at every step (it would serve no gradient); multiplied by
  ``scale(lam)`` when ``scale`` is given (only then: even a factor of one
  costs a multiply per variable in every inner step, as XLA does not fold it
  into the gradient).
  """
  def objective(x, y, lam, batch):
    fv, gv = f(x, y, batch), g(x, y, batch)
    value = fv + jnp.asarray(lam, jnp.result_type(fv)) * gv
    if scale is not None:
      value = scale(lam) * value
    return value, {"f": fv, "g": gv}

  return objective


def _initial_gamma(gamma, gamma_max, dtype):
  """``gamma``, or NaN when a traced ``gamma_max`` is below it.

  Concrete values are checked when :func:`f2sa` is built; traced ones (a
  sweep) cannot be, so an invalid pair becomes a NaN penalty, which the run
  reports (as ``gamma``) instead of silently clipping it to ``gamma_max``.
  """
  lam = base.resolve_hyperparameter(gamma, jnp.zeros([], jnp.int32), dtype,
                                    name="gamma")
  if gamma_max is None or callable(gamma_max):
    return lam
  cap = jnp.asarray(gamma_max, dtype)
  return jnp.where(cap >= lam, lam, jnp.nan)


def _deprecated_schedule_field(old: str, new: str) -> property:
  """A read-only field alias ``old`` of :class:`F2SASchedules` that warns.

  ``base.deprecated_field`` would call it a state field; the warning is the
  same otherwise.
  """
  def get(self):
    warnings.warn(base._deprecation_message(  # pylint: disable=protected-access
        "F2SASchedules", f"the field {old}", new), DeprecationWarning,
                  stacklevel=2)
    return getattr(self, new)

  return property(get, doc=f"Deprecated alias of ``{new}``.")


class F2SASchedules(NamedTuple):
  """Step-size and penalty schedules for :func:`f2sa` (see :func:`f2sa_schedules`).

  Attributes:
    upper: schedule of the ``x`` learning rate (argument: outer step k).
    lower: schedule of the ``y`` learning rate (argument: the inner
      optimizer's step count; constant within an outer iteration).
    value: schedule of the ``y_g`` learning rate (same convention).
    gamma: initial penalty weight :math:`\\lambda_0` (pass as
      ``f2sa(gamma=)``; formerly ``lambda0``, a deprecated alias for one
      release).
    gamma_increment: schedule :math:`k\\mapsto\\delta_k` (pass as
      ``f2sa(gamma_increment=)``; formerly ``lambda_increment``).
  """

  upper: Callable
  lower: Callable
  value: Callable
  gamma: float
  gamma_increment: Callable

  lambda0 = _deprecated_schedule_field("lambda0", "gamma")
  lambda_increment = _deprecated_schedule_field("lambda_increment",
                                                "gamma_increment")


@base.renamed_arguments("f2sa_schedules", {
    "lambda0": "gamma", "lambda_delta": "gamma_delta",
    "lambda_exponent": "gamma_exponent", "lower_step": "lower_step_size",
    "value_step": "value_step_size"})
def f2sa_schedules(preset: str = "benchopt", *, inner_steps: int,
                   lower_step_size: float = 0.01,
                   value_step_size: Optional[float] = None,
                   outer_ratio: float = 1.0,
                   gamma: float = 1.0,
                   gamma_delta: float = 0.1,
                   exponents: Optional[Tuple[float, float, float]] = None,
                   gamma_exponent: Optional[float] = None,
                   offset: float = 1.0) -> F2SASchedules:
  r"""The two F2SA schedule presets (benchopt's and the paper's), all exponents explicit.

  With :math:`(a_y, a_z, a_x)` = ``exponents`` and :math:`k` the outer step
  (``offset`` :math:`k_0`):

  :math:`s_y` is ``lower_step_size`` and :math:`s_z` is ``value_step_size``
  (the base step sizes of the lower and value trackers; ``value_step_size``
  defaults to ``lower_step_size``).

  * ``"benchopt"`` (default exponents :math:`(5/7, 4/7, 4/7)`, λ exponent
    1/7): :math:`\alpha_k=s_y(k+k_0)^{-a_y}`, :math:`\gamma_k=s_z(k+k_0)^{-a_z}`,
    outer step :math:`(s_y/\rho)(k+k_0)^{-a_x}` with :math:`\rho` =
    ``outer_ratio``, :math:`\lambda_0` = ``gamma`` and
    :math:`\delta_k=\delta(k+k_0)^{-1/7}` with :math:`\delta` =
    ``gamma_delta`` (and ``gamma_exponent`` in place of 1/7 if given).
  * ``"paper"`` (default exponents :math:`(5/7, 4/7, 5/7)`): the same
    :math:`\alpha_k`, :math:`\gamma_k`, outer step :math:`\xi\alpha_k` with
    :math:`\xi=1/\rho`, and the penalty weight tied to the steps,
    :math:`\lambda_k=\gamma_k/(2\alpha_k)`, so :math:`\lambda_0` and
    :math:`\delta_k=\lambda_{k+1}-\lambda_k` follow (``gamma`` and
    ``gamma_delta`` are ignored).

  :math:`\lambda_k` is the penalty weight that :func:`f2sa` calls ``gamma``
  (the ``gamma*`` arguments and fields here); :math:`\gamma_k` is the
  paper's step size of :math:`y_g`. Old names (``lambda0``, ``lambda_delta``,
  ``lambda_exponent``, ``lower_step``, ``value_step``; fields ``lambda0``,
  ``lambda_increment``) work for one release with a ``DeprecationWarning``.

  Both readings are (unverified) against the paper (see :func:`f2sa`). The
  inner schedules are evaluated at ``count // inner_steps`` because an inner
  optax optimizer counts inner steps.

  The schedules compute in the default float dtype: float64 under
  ``jax_enable_x64`` (so they match a float64 reference such as benchopt's to
  rounding), float32 otherwise; optax casts a step size to the dtype of the
  updates.

  Returns:
    An :class:`F2SASchedules`; pass ``optax.sgd(s.lower)`` etc. to
    :func:`f2sa` together with ``gamma=s.gamma`` and
    ``gamma_increment=s.gamma_increment``.

  Examples:
    >>> from jaxbilevel import f2sa_schedules
    >>> s = f2sa_schedules("paper", inner_steps=10, lower_step_size=0.1,
    ...                    value_step_size=0.2)
    >>> round(float(s.gamma), 6)            # lambda_0 = gamma_0 / (2 alpha_0)
    1.0
    >>> round(float(s.lower(9)), 6), round(float(s.lower(10)), 6)
    (0.1, 0.060951)
  """
  if preset not in _PRESETS:
    raise base.BilevelValidationError(
        f"f2sa_schedules: preset must be one of {_PRESETS}, got {preset!r}.")
  inner_steps = base.check_static_int(inner_steps, "inner_steps")
  if value_step_size is None:
    value_step_size = lower_step_size
  if exponents is None:
    exponents = (5 / 7, 4 / 7, 4 / 7) if preset == "benchopt" else (
        5 / 7, 4 / 7, 5 / 7)
  a_y, a_z, a_x = exponents

  # The default float dtype: float64 under jax_enable_x64 (so the schedules
  # agree with a float64 reference to rounding), float32 otherwise.
  dtype = jnp.result_type(float)

  def decay(step, power):
    return lambda k: step * (jnp.asarray(k, dtype) + offset) ** (-power)

  def per_outer(schedule):
    return lambda count: schedule(jnp.asarray(count) // inner_steps)

  # alpha_k (y steps) and the paper's gamma_k (y_g steps, not the penalty).
  alpha, z_step = decay(lower_step_size, a_y), decay(value_step_size, a_z)
  upper = decay(lower_step_size / outer_ratio, a_x)
  if preset == "benchopt":
    power = 1 / 7 if gamma_exponent is None else gamma_exponent
    increment = decay(gamma_delta, power)
    lam0 = gamma
  else:
    lam = lambda k: z_step(k) / (2.0 * alpha(k))
    increment = lambda k: lam(jnp.asarray(k) + 1) - lam(k)
    lam0 = float(lam(0))
  return F2SASchedules(upper=upper, lower=per_outer(alpha),
                       value=per_outer(z_step), gamma=lam0,
                       gamma_increment=increment)
