r"""Penalty continuation: ``gamma="auto"`` for every penalty method.

A penalty method solves :math:`\min_x F_\gamma(x)` in place of the bilevel
problem :math:`\min_x F(x) = f(x, y^*(x))`; the error is :math:`O(1/\gamma)`
(the penalised lower solution :math:`y_\gamma^*` sits
:math:`\|\nabla_y f\|/(\gamma\mu_g)` away from :math:`y^*`), so a small
:math:`\gamma` is biased and a large one is slow or unstable from the start.
Continuation runs the method at a growing :math:`\gamma`: it starts from a
value set by the problem's scale and multiplies it by ``factor`` each time the
lower stationarity :math:`m_t=\|\nabla_y g(x_{t+1}, y_{t+1})\|` at the
method's lower iterate has stopped falling (no relative decrease of ``tol``
over ``patience`` steps, checked every ``check_every`` steps), up to ``max``.
At a fixed :math:`\gamma`,
:math:`m_t` falls to its floor :math:`\|\nabla_y f(x, y_\gamma^*)\|/\gamma`;
only a larger :math:`\gamma` lowers that floor, and the lower gap
:math:`g(x,y_\gamma)-g(x,y^*(x))\le m_t^2/(2\mu_g)` with it.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbilevel._src import base

START_RATIO = 10.0
"""The default start is ``START_RATIO`` times the ratio of the lower gradients."""

START_RANGE = (1.0, 100.0)
"""The default start is clipped to this range."""

MAX_RATIO = 100.0
"""The default cap is ``MAX_RATIO`` times the start (V-PBGD: 10)."""


class GammaContinuation(NamedTuple):
  r"""Settings of the penalty continuation (``gamma=GammaContinuation(...)``).

  ``gamma="auto"`` is ``gamma=GammaContinuation()``. Every field may be a
  traced value (a sweep over settings compiles once), except that ``start``
  given or left to ``None`` is part of the program's structure.

  Attributes:
    start: the first :math:`\gamma`. ``None`` (default): set at the first
      step from the problem's scale, :math:`\gamma_0 =
      10\,\|\nabla_y f(x_0,y_0)\|/\|\nabla_y g(x_0,y_0)\|`, clipped to
      :math:`[1, 100]`: the f-term then weighs a tenth of the g-term in the
      penalised lower objective :math:`f/\gamma+g`, and :math:`\gamma_0` scales
      with f as the penalty's bias does.
    factor: :math:`\gamma \leftarrow \text{factor}\cdot\gamma` at each
      increase (> 1).
    max: the largest :math:`\gamma`; ``None`` (default): ``100 * start``
      (the error :math:`O(1/\gamma)` then falls a hundredfold), and
      ``10 * start`` for :func:`~jaxbilevel.v_pbgd`, whose joint x-direction
      :math:`\gamma[\nabla_x g(x,y)-\nabla_x g(x,\omega)]` multiplies the
      single-loop trackers' lag by :math:`\gamma` while its signal stays
      :math:`O(1)`: past about ten times the start, a larger :math:`\gamma`
      costs more in that noise than it gains in bias.
    patience: steps without a relative decrease of ``tol`` of the lower
      stationarity before :math:`\gamma` grows.
    tol: the relative decrease that counts as progress.
    check_every: the stationarity is measured (one extra gradient of ``g``)
      every ``check_every`` steps, so that it costs a tenth of a gradient per
      step by default; :math:`\gamma` grows only at those steps.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> f = lambda x, y, batch: jnp.sum((y - 1.0) ** 2) + 0.1 * jnp.sum(x ** 2)
    >>> g = lambda x, y, batch: jnp.sum((y - x) ** 2)
    >>> settings = jbl.GammaContinuation(start=10.0, max=80.0, patience=5)
    >>> tx = jbl.alt_pbgd(f, g, gamma=settings, upper_optimizer=optax.sgd(0.1),
    ...                   lower_optimizer=optax.sgd(0.2), inner_steps=5)
    >>> p0 = jbl.BilevelParams(x=jnp.zeros(3), y=jnp.zeros(3))
    >>> params, state, history = jbl.run(tx, p0, num_steps=400,
    ...                                  diagnostics=("gamma",))
    >>> sorted(set(history["gamma"].tolist()))
    [10.0, 20.0, 40.0, 80.0]

  References:
    H. Shen, T. Chen. *On Penalty-based Bilevel Gradient Descent Method*,
    ICML 2023, arXiv:2302.05185 (the :math:`O(1/\gamma)` error).
    J. Kwon, D. Kwon, S. Wright, R. Nowak. *A Fully First-Order Method for
    Stochastic Bilevel Optimization*, ICML 2023, arXiv:2301.10945 (a
    growing multiplier).
  """

  start: Optional[float] = None
  factor: float = 2.0
  max: Optional[float] = None
  patience: int = 100
  tol: float = 0.01
  check_every: int = 10


class ContinuationState(NamedTuple):
  """State of a penalty method run with ``gamma="auto"``.

  Attributes:
    inner_state: the method's own state (its diagnostics record ``gamma``).
    gamma: the penalty constant the next step uses.
    gamma_max: the cap (set with the start when ``start`` is ``None``).
    best: the lowest lower stationarity seen at this ``gamma``.
    stall: steps since ``best`` last fell by the relative ``tol``.
    phase: steps since the last check, modulo ``check_every`` (0: this step
      checks).
    started: whether the start has been set (it needs the first batch).
  """

  inner_state: optax.OptState
  gamma: jax.Array
  gamma_max: jax.Array
  best: jax.Array
  stall: jax.Array
  phase: jax.Array
  started: jax.Array


def is_continuation(gamma) -> bool:
  """Whether ``gamma`` asks for continuation (``"auto"`` or the settings)."""
  return isinstance(gamma, GammaContinuation) or (
      isinstance(gamma, str) and gamma == "auto")


def check_settings(gamma, method: str) -> GammaContinuation:
  """``gamma`` (``"auto"`` or :class:`GammaContinuation`) as checked settings."""
  settings = GammaContinuation() if isinstance(gamma, str) else gamma
  name = f"{method}: gamma=GammaContinuation(...)"
  if settings.start is not None:
    base.check_hyperparameter(settings.start, f"{name}.start")
  base.check_hyperparameter(settings.factor, f"{name}.factor")
  if base._is_concrete(settings.factor) and float(  # pylint: disable=protected-access
      np.asarray(settings.factor)) <= 1.0:
    raise base.BilevelValidationError(
        f"{name}.factor must be > 1 (gamma grows by it), got "
        f"{settings.factor}.")
  if settings.max is not None:
    base.check_hyperparameter(settings.max, f"{name}.max")
    if (settings.start is not None
        and base._is_concrete(settings.max)  # pylint: disable=protected-access
        and base._is_concrete(settings.start)  # pylint: disable=protected-access
        and float(np.asarray(settings.max)) < float(
            np.asarray(settings.start))):
      raise base.BilevelValidationError(
          f"{name}.max={settings.max} is below start={settings.start}; pass "
          "max >= start (or max=None for 100 * start).")
  if isinstance(settings.patience, numbers.Number):
    base.check_static_int(settings.patience, f"{name}.patience")
  if isinstance(settings.check_every, numbers.Number):
    base.check_static_int(settings.check_every, f"{name}.check_every")
  base.check_hyperparameter(settings.tol, f"{name}.tol", allow_zero=True)
  if base._is_concrete(settings.tol) and float(  # pylint: disable=protected-access
      np.asarray(settings.tol)) >= 1.0:
    raise base.BilevelValidationError(
        f"{name}.tol must be in [0, 1), got {settings.tol}.")
  return settings


def lower_stationarity(g, x, y, batch) -> jax.Array:
  r""":math:`\|\nabla_y g(x, y)\|`, the measure the continuation watches."""
  return optax.tree_utils.tree_norm(jax.grad(g, argnums=1)(x, y, batch))


def scale_start(f, g, x, y, batch, dtype) -> jax.Array:
  r"""The default start :math:`10\|\nabla_y f\|/\|\nabla_y g\|`, clipped to [1, 100]."""
  nf = optax.tree_utils.tree_norm(jax.grad(f, argnums=1)(x, y, batch))
  ng = optax.tree_utils.tree_norm(jax.grad(g, argnums=1)(x, y, batch))
  tiny = jnp.finfo(dtype).tiny
  ratio = START_RATIO * nf / jnp.maximum(ng, tiny)
  ratio = jnp.where(jnp.isfinite(ratio), ratio, START_RANGE[1])
  return jnp.clip(ratio, *START_RANGE).astype(dtype)


def penalty_continuation(
    build: Callable[[jax.Array], optax.GradientTransformationExtraArgs],
    settings: GammaContinuation, *, f, g, method: str,
    set_gamma: Optional[Callable] = None,
    max_ratio: float = MAX_RATIO,
) -> base.BilevelTransformation:
  r"""A penalty method whose :math:`\gamma` grows by continuation.

  Args:
    build: ``gamma -> transformation``, the method built with a (traced)
      penalty constant.
    settings: the :class:`GammaContinuation` settings (checked).
    f: upper objective (for the default start).
    g: lower objective (for the stationarity measure).
    method: the method's name, for messages.
    set_gamma: ``(inner_state, gamma) -> inner_state`` for a method that keeps
      its penalty in its state (F2SA's ``state.gamma``).
    max_ratio: the cap is ``max_ratio * start`` when ``settings.max`` is
      ``None``.

  Returns:
    A :class:`BilevelTransformation` over :class:`BilevelParams` with state
    :class:`ContinuationState`.
  """
  f = base.scalar_objective(f, "f")
  g = base.scalar_objective(g, "g")

  def init_fn(params):
    dtype = base.params_dtype(base.check_params(params, method))
    one = jnp.ones((), dtype)
    inner_state = build(one).init(params)
    if settings.start is None:
      gamma = one
      cap = jnp.zeros((), dtype)  # set with the start
    else:
      gamma = jnp.asarray(settings.start, dtype)
      cap = jnp.asarray(max_ratio * gamma if settings.max is None else
                        settings.max, dtype)
    return ContinuationState(
        inner_state=inner_state, gamma=gamma, gamma_max=cap,
        best=jnp.full((), jnp.finfo(dtype).max, dtype),
        stall=jnp.zeros((), jnp.int32), phase=jnp.zeros((), jnp.int32),
        started=jnp.asarray(settings.start is not None))

  def step_fn(params, state, *, batch=None, diagnostics=False, **extra_args):
    params = base.check_params(params, method)
    dtype = base.params_dtype(params)
    gamma, cap = state.gamma, state.gamma_max
    if settings.start is None:
      def first(_):
        start = scale_start(f, g, params.x, params.y, batch, dtype)
        return start, jnp.asarray(max_ratio * start if settings.max is None else
                                  jnp.maximum(settings.max, start), dtype)
      gamma, cap = jax.lax.cond(state.started, lambda _: (gamma, cap), first,
                                None)
    inner_state = state.inner_state
    if set_gamma is not None:
      inner_state = set_gamma(inner_state, gamma)
    new_params, inner_state = base.step(
        build(gamma), params, inner_state, batch=batch,
        diagnostics=diagnostics, **extra_args)
    # The measure and the growth rule run at every check_every-th step only
    # (a skipped branch under jit; both run under vmap, where lax.cond is a
    # select): other steps only count.
    tol = jnp.asarray(settings.tol, dtype)
    top = jnp.finfo(dtype).max  # the reset "best" (finite: states are checked)

    def checked(_):
      measure = lower_stationarity(g, new_params.x, new_params.y,
                                   batch).astype(dtype)
      improved = measure < state.best * (1 - tol)
      best = jnp.where(improved, measure, state.best)
      stall = jnp.where(improved, 0, state.stall + 1).astype(jnp.int32)
      grow = (stall >= settings.patience) & (gamma < cap)
      gamma_next = jnp.where(
          grow, jnp.minimum(gamma * jnp.asarray(settings.factor, dtype), cap),
          gamma).astype(dtype)
      # (Capped at patience: it stops counting once gamma is at its cap.)
      stall = jnp.where(grow, 0, jnp.minimum(stall, settings.patience))
      return (gamma_next, jnp.where(grow, top, best).astype(dtype),
              stall.astype(jnp.int32))

    def counted(_):
      return (gamma.astype(dtype), state.best,
              jnp.minimum(state.stall + 1, settings.patience).astype(
                  jnp.int32))

    gamma_next, best, stall = jax.lax.cond(state.phase == 0, checked,
                                           counted, None)
    new_state = ContinuationState(
        inner_state=inner_state, gamma=gamma_next.astype(dtype),
        gamma_max=cap.astype(dtype), best=best.astype(dtype), stall=stall,
        phase=jnp.where(state.phase + 1 >= settings.check_every, 0,
                        state.phase + 1).astype(jnp.int32),
        started=jnp.ones((), bool))
    return new_params, new_state

  return base.bilevel_transformation(init_fn, step_fn, method)


def penalty_method(method: str, *, check: Optional[Callable] = None,
                   fixed: Optional[dict] = None,
                   set_gamma: Optional[Callable] = None,
                   max_ratio: float = MAX_RATIO) -> Callable:
  """Decorator: a penalty method's constructor that also takes ``gamma="auto"``.

  With ``gamma`` a number, an array or a schedule the constructor runs as
  written. With ``"auto"`` or a :class:`GammaContinuation` it returns
  :func:`penalty_continuation` around the constructor called with the same
  arguments and a traced ``gamma``. Put it closest to the function, under
  ``programs.bilevel_method`` and ``base.renamed_arguments``.

  Args:
    method: the method's name, for messages.
    check: ``arguments -> None``, the checks of the other arguments that
      continuation makes at construction (the constraint ``c``, the
      arguments continuation replaces); ``arguments`` maps names to the
      values passed.
    fixed: arguments continuation sets whatever was passed (F2SA's
      ``scale_lower=True``).
    set_gamma: as in :func:`penalty_continuation`.
    max_ratio: as in :func:`penalty_continuation`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> f = lambda x, y, batch: jnp.sum((y - 1.0) ** 2) + jnp.sum(x ** 2)
    >>> g = lambda x, y, batch: jnp.sum((y - x) ** 2)
    >>> tx = jbl.pbgd_free(f, g, gamma="auto", upper_optimizer=optax.sgd(0.1),
    ...                    lower_optimizer=optax.sgd(0.2))
    >>> state = tx.init(jbl.BilevelParams(jnp.zeros(2), jnp.zeros(2)))
    >>> type(state).__name__, type(state.inner_state).__name__
    ('ContinuationState', 'PBGDFreeState')
  """
  def decorate(constructor):
    signature = inspect.signature(constructor)

    @functools.wraps(constructor)
    def wrapper(*args, **kwargs):
      if not is_continuation(kwargs.get("gamma")):
        return constructor(*args, **kwargs)
      try:
        arguments = dict(signature.bind(*args, **kwargs).arguments)
      except TypeError as err:  # as the call itself would raise it
        raise TypeError(f"{constructor.__name__}(): {err}") from None
      arguments["f"] = base.scalar_objective(arguments["f"], "f")
      arguments["g"] = base.scalar_objective(arguments["g"], "g")
      if check is not None:
        check(arguments)
      settings = check_settings(arguments["gamma"], method)
      return penalty_continuation(
          lambda gamma_: constructor(
              **{**arguments, **(fixed or {}), "gamma": gamma_}),
          settings, f=arguments["f"], g=arguments["g"], method=method,
          set_gamma=set_gamma, max_ratio=max_ratio)

    return wrapper

  return decorate
