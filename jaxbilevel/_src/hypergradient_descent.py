r"""Hypergradient descent: inner steps on ``g``, then a step along a hypergradient.

One method, :func:`hypergradient_descent`, whose ``adjoint=`` (a value of
:mod:`jaxbilevel.adjoints`) says how the lower solve is differentiated.
:func:`jaxbilevel.aid`, :func:`jaxbilevel.itd`, :func:`jaxbilevel.fo_blo` and
:func:`jaxbilevel.ufo_blo` are presets of it, one adjoint each:

* ``aid``: ``Implicit(solver, linear_steps, tol, neumann_step)``;
* ``itd``: ``Unrolled(truncate, checkpoint)``;
* ``fo_blo``: ``FirstOrder()``;
* ``ufo_blo``: ``FirstOrder(correction=estimator, correction_probability)``
  and ``key``.

The skeleton of a step is written once here (:func:`build`): check the
params, compute the hypergradient estimate and the new lower iterate with the
adjoint's rule, take the upper optimizer's projected step, record the
diagnostics. The adjoint fixes what the state keeps (the state class of its
preset, so that states and checkpoints are those of the presets) and which
diagnostics the step records.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from jaxbilevel._src import adjoints
from jaxbilevel._src import base
from jaxbilevel._src import hypergradient
from jaxbilevel._src import inner
from jaxbilevel._src import programs

IMPLICIT_DIAGNOSTICS = base.COMMON_DIAGNOSTICS + ("linear_residual", "tol")
UNROLLED_DIAGNOSTICS = base.COMMON_DIAGNOSTICS
FIRST_ORDER_DIAGNOSTICS = base.COMMON_DIAGNOSTICS
CORRECTED_DIAGNOSTICS = base.COMMON_DIAGNOSTICS + ("correction_norm",
                                                   "correction_draw")

# Where each adjoint's inner solve may start (docs/vocabulary.md,
# ``inner_start``).
_STARTS = {
    adjoints.Implicit: ("previous",),
    adjoints.Unrolled: ("previous", "initial"),
    adjoints.FirstOrder: ("x", "previous"),
}


class AIDState(NamedTuple):
  """State of :func:`jaxbilevel.aid` and of the ``Implicit`` adjoint.

  Attributes:
    count: number of outer steps taken.
    upper_state: state of the upper optimizer (for ``x``).
    lower_state: state of the inner optimizer (for ``y``) after the last
      inner solve; the start of the next one unless ``inner_start`` is a
      callable.
    diagnostics: dict of scalars from the last step: ``f``, ``g`` and
      ``lower_grad_norm`` (:math:`\\|\\nabla_y g\\|`) at the incoming
      :math:`(x_t, y_t)`, ``upper_grad_norm`` (norm of the hypergradient),
      ``linear_residual``
      :math:`\\|\\nabla_y f - Hv\\|` and ``tol`` (the CG tolerance of
      the step: NaN when a traced or scheduled ``tol`` was negative, so that
      the run reports it by name).
  """

  count: jax.Array
  upper_state: optax.OptState
  lower_state: optax.OptState
  diagnostics: dict


class ITDState(NamedTuple):
  """State of :func:`jaxbilevel.itd` and of the ``Unrolled`` adjoint.

  Attributes:
    count: number of outer steps taken.
    upper_state: state of the upper optimizer (for ``x``).
    lower_state: state of the inner optimizer after the last unroll (the
      starting state of the next one when warm-started).
    y_init: the fixed starting point of the unroll (used when
      ``inner_start="initial"``).
    diagnostics: dict of scalars from the last step: ``f``, ``g`` and
      ``lower_grad_norm`` (:math:`\\|\\nabla_y g\\|`) at the incoming
      :math:`(x_t, y_t)`, ``upper_grad_norm`` (norm of the hypergradient).
  """

  count: jax.Array
  upper_state: optax.OptState
  lower_state: optax.OptState
  y_init: base.PyTree
  diagnostics: dict


class FOBLOState(NamedTuple):
  """State of :func:`jaxbilevel.fo_blo` and of the ``FirstOrder`` adjoint.

  Attributes:
    count: number of outer steps taken.
    upper_state: state of the optimizer of ``x``.
    diagnostics: dict of scalars: ``f``, ``g`` and ``lower_grad_norm``
      (:math:`\\|\\nabla_y g\\|`) at the incoming :math:`(x_t, y_t)`
      (``params.y``, not the adapted :math:`y_r`), ``upper_grad_norm`` (norm
      of the meta-gradient estimate).
  """

  count: jax.Array
  upper_state: optax.OptState
  diagnostics: dict


class UFOBLOState(NamedTuple):
  """State of :func:`jaxbilevel.ufo_blo` and of ``FirstOrder`` with a correction.

  Attributes:
    count: number of outer steps taken.
    upper_state: state of the optimizer of ``x``.
    key: the PRNG key of the next draw (split at every step).
    diagnostics: as :class:`FOBLOState`, plus ``correction_norm`` (norm of
      the added correction) and ``correction_draw`` (the Bernoulli draw
      :math:`\\xi`, or the sampled truncation length K).
  """

  count: jax.Array
  upper_state: optax.OptState
  key: jax.Array
  diagnostics: dict


def _corrected(adjoint) -> bool:
  return (isinstance(adjoint, adjoints.FirstOrder)
          and adjoint.correction is not None)


def diagnostics_of(adjoint) -> tuple:
  """The diagnostics a step with ``adjoint`` records (those of its preset).

  Examples:
    >>> import jaxbilevel as jbl
    >>> from jaxbilevel._src import hypergradient_descent as hd
    >>> hd.diagnostics_of(jbl.adjoints.Implicit())[4:]
    ('linear_residual', 'tol')
  """
  if isinstance(adjoint, adjoints.Implicit):
    return IMPLICIT_DIAGNOSTICS
  if isinstance(adjoint, adjoints.Unrolled):
    return UNROLLED_DIAGNOSTICS
  return CORRECTED_DIAGNOSTICS if _corrected(adjoint) else (
      FIRST_ORDER_DIAGNOSTICS)


def state_type_of(adjoint) -> type:
  """The class of the state of a method with ``adjoint`` (its preset's).

  Examples:
    >>> import jaxbilevel as jbl
    >>> from jaxbilevel._src import hypergradient_descent as hd
    >>> hd.state_type_of(jbl.adjoints.Unrolled()).__name__
    'ITDState'
  """
  if isinstance(adjoint, adjoints.Implicit):
    return AIDState
  if isinstance(adjoint, adjoints.Unrolled):
    return ITDState
  return UFOBLOState if _corrected(adjoint) else FOBLOState


class _Estimate(NamedTuple):
  """What an adjoint's rule returns to the skeleton of the step."""

  direction: base.PyTree   # the hypergradient estimate (structure of x)
  y: base.PyTree           # the new lower iterate, params.y of the output
  incoming: dict           # by-products at (x_t, y_t): base.incoming_record
  fields: dict             # the state fields the rule updates
  extra: dict              # the adjoint's own diagnostics


class _Setup(NamedTuple):
  """The checked arguments that a rule needs."""

  f: base.Objective
  g: base.Objective
  lower_optimizer: optax.GradientTransformation
  inner_steps: int
  inner_start: Union[str, Callable]
  proj_y: base.Projection
  method: str
  prefix: str


def _implicit_rule(adjoint: adjoints.Implicit, s: _Setup):
  """AID: T inner steps (not differentiated), then the implicit hypergradient."""
  f, g = s.f, s.g

  def estimate(x, y, state, batch, record, dtype):
    tol_t = base.resolve_hyperparameter(
        adjoints.default_tol(dtype) if adjoint.tol is None else adjoint.tol,
        state.count, dtype, allow_zero=True, name=f"{s.prefix}tol")
    step_t = None if adjoint.solver != "neumann" else (
        base.resolve_hyperparameter(adjoint.neumann_step, state.count, dtype,
                                    name=f"{s.prefix}neumann_step"))
    # T inner steps on g, from the previous y and optimizer state (warm
    # start) or from inner_start(x, y) with a fresh state.
    warm = not callable(s.inner_start)
    if warm:
      y0, lower_state0 = y, state.lower_state
    else:
      y0 = base.inner_start(s.inner_start, x, y, s.method)
      lower_state0 = s.lower_optimizer.init(y0)
    # Warm-started, the first inner step is at (x_t, y_t): its value and
    # gradient norm are the record's g and lower_grad_norm.
    peel = warm and bool({"g", "lower_grad_norm"} & record)
    y_new, lower_state, trace = inner.inner_solve(
        lambda y_: g(x, y_, batch), y0, lower_state0,
        optimizer=s.lower_optimizer, num_steps=s.inner_steps, proj=s.proj_y,
        grad_norm=peel and "lower_grad_norm" in record,
        trace="first" if peel else "every")
    # The implicit hypergradient at the new y: the linear solve and one
    # cross product; nothing differentiates through the step.
    direction, info = hypergradient.implicit_hypergradient(
        f, g, x, y_new, batch, solver=adjoint.solver,
        linear_steps=adjoint.linear_steps, tol=tol_t, neumann_step=step_t,
        has_aux=True, differentiable=False)
    first = inner.first_step(trace)
    return _Estimate(
        direction, y_new,
        incoming=dict(g_value=first.value, lower_grad_norm=first.grad_norm)
        if peel else {},
        fields=dict(lower_state=lower_state),
        extra=dict(linear_residual=info.residual_norm, tol=tol_t))

  return estimate


def _unrolled_rule(adjoint: adjoints.Unrolled, s: _Setup):
  """ITD: ``jax.value_and_grad`` of ``x -> f(x, y_T(x))`` through the unroll."""
  f, g = s.f, s.g

  def estimate(x, y, state, batch, record, dtype):
    del record, dtype
    if s.inner_start == "previous":
      start = lambda x_: (y, state.lower_state)
    elif s.inner_start == "initial":
      start = lambda x_: (state.y_init, s.lower_optimizer.init(state.y_init))
    else:
      def start(x_):  # differentiated through (MAML)
        y0 = base.inner_start(s.inner_start, x_, y, s.method)
        return y0, s.lower_optimizer.init(y0)

    def upper_of_unroll(x_):
      y0, lower_state0 = start(x_)
      y_t, lower_state = hypergradient.unrolled_solve(
          g, x_, y0, batch, optimizer=s.lower_optimizer,
          num_steps=s.inner_steps, opt_state=lower_state0, proj=s.proj_y,
          truncate=adjoint.truncate, checkpoint=adjoint.checkpoint)
      return f(x_, y_t, batch), (y_t, lower_state)

    (_, (y_new, lower_state)), direction = jax.value_and_grad(
        upper_of_unroll, has_aux=True)(x)
    return _Estimate(direction, y_new, incoming={},
                     fields=dict(lower_state=lower_state), extra={})

  return estimate


def _first_order_start(start, params, method):
  """The inner problem's start: ``x`` (MAML), ``y`` or ``start(x, y)``."""
  if callable(start):
    return lambda x, y: base.inner_start(start, x, y, method)
  if start == "previous":
    return lambda x, y: y
  base.check_same_structure(
      params.x, params.y, "params.x", "params.y",
      f"{method} (inner_start='x': the inner problem starts at "
      "y0 = x, as in MAML; pass inner_start='previous' to warm-start from "
      "the previous y, or inner_start=lambda x, y: ...)")
  return lambda x, y: jax.tree.map(lambda a, b: a.astype(b.dtype), x, y)


def _bernoulli(adjoint, s: _Setup):
  """UFO-BLO's Bernoulli correction ``(xi / q) (g_BLO - g_FO)``."""
  q = adjoint.correction_probability

  def correction(grad_at, g_fo, draw_key, count, dtype):
    q_t = base.resolve_hyperparameter(
        q, count, dtype, name=f"{s.prefix}correction_probability")
    q_t = jnp.where(q_t <= 1, q_t, jnp.nan)
    xi = jax.random.bernoulli(draw_key, q_t)
    exact = jax.lax.cond(xi, lambda: grad_at(s.inner_steps), lambda: g_fo)
    delta = jax.tree.map(lambda e, a: (e - a) / q_t.astype(a.dtype), exact,
                         g_fo)
    return delta, xi

  return correction


def _telescope(adjoint, s: _Setup):
  """UFO-BLO's telescoping correction ``r (g_K - g_{K-1})``."""
  del adjoint

  def correction(grad_at, g_fo, draw_key, count, dtype):
    del g_fo, count
    k = jax.random.randint(draw_key, (), 1, s.inner_steps + 1)
    g_k, g_km1 = grad_at(k), grad_at(k - 1)
    delta = jax.tree.map(lambda a, b: s.inner_steps * (a - b), g_k, g_km1)
    return delta, k.astype(dtype)

  return correction


def _first_order_rule(adjoint: adjoints.FirstOrder, s: _Setup):
  """FO-BLO: ``d y_r / d y0 := I``; with UFO-BLO's correction when asked."""
  f, g = s.f, s.g
  correction = {None: None, "bernoulli": _bernoulli,
                "telescope": _telescope}[adjoint.correction]
  correction = None if correction is None else correction(adjoint, s)

  def objective(x, y, batch, start, truncate, truncated_jacobian):
    y_r, _ = hypergradient.unrolled_solve(
        g, x, start(x, y), batch, optimizer=s.lower_optimizer,
        num_steps=s.inner_steps, proj=s.proj_y, truncate=truncate,
        truncated_jacobian=truncated_jacobian)
    return f(x, y_r, batch), y_r

  meta_gradient = jax.value_and_grad(objective, has_aux=True)

  def estimate(x, y, state, batch, record, dtype):
    del record
    start = _first_order_start(s.inner_start, base.BilevelParams(x, y),
                               s.method)
    # r inner steps recorded by nothing, d y_r / d y0 := I.
    (_, y_r), direction = meta_gradient(x, y, batch, start, 0, "identity")
    fields, extra = {}, {}
    if correction is not None:
      key, draw_key = jax.random.split(state.key)
      delta, draw = correction(
          lambda trunc: meta_gradient(x, y, batch, start, trunc,
                                      "identity")[1],
          direction, draw_key, state.count, dtype)
      direction = jax.tree.map(jnp.add, direction, delta)
      fields = dict(key=key)
      extra = dict(correction_norm=lambda: base.diagnostic_norm(delta),
                   correction_draw=draw)
    return _Estimate(direction, y_r, incoming={}, fields=fields,
                     extra=extra)

  return estimate


_RULES = {
    adjoints.Implicit: _implicit_rule,
    adjoints.Unrolled: _unrolled_rule,
    adjoints.FirstOrder: _first_order_rule,
}


def build(f: base.Objective, g: base.Objective, *, adjoint,
          upper_optimizer: optax.GradientTransformation,
          lower_optimizer: optax.GradientTransformation, inner_steps: int,
          inner_start: Union[str, Callable], key: Optional[jax.Array],
          proj_x: Optional[base.Projection],
          proj_y: Optional[base.Projection], method: str,
          prefix: str) -> base.BilevelTransformation:
  """The transformation of :func:`hypergradient_descent` and of its presets.

  ``method`` names the method in messages and checks; ``prefix`` is how the
  adjoint's fields are named in them (``"adjoint."``, or ``""`` for a preset
  whose arguments are the fields).
  """
  f = base.scalar_objective(f, "f")
  g = base.scalar_objective(g, "g")
  inner_steps = base.check_static_int(inner_steps, "inner_steps")
  adjoint = adjoints.check_adjoint(adjoint, method, inner_steps,
                                   prefix=prefix)
  kind = type(adjoint)
  inner_start = base.check_start(inner_start, method, "inner_start",
                                 _STARTS[kind])
  corrected = _corrected(adjoint)
  if corrected and key is None:
    raise base.BilevelValidationError(
        f"{method}: key must be a jax.random key (e.g. "
        "jax.random.PRNGKey(0)).")
  if not corrected and key is not None:
    raise base.BilevelValidationError(
        f"{method}: key is used only by a randomized adjoint "
        "(jaxbilevel.adjoints.FirstOrder with a correction); drop key=, or "
        f"set the correction (adjoint is {adjoint!r}).")
  _, proj_x, proj_y = base.level_arguments(
      upper_optimizer, lower_optimizer, None, proj_x, proj_y)
  names = diagnostics_of(adjoint)
  state_type = state_type_of(adjoint)
  keeps_lower_state = not isinstance(adjoint, adjoints.FirstOrder)
  estimate = _RULES[kind](adjoint, _Setup(
      f, g, lower_optimizer, inner_steps, inner_start, proj_y, method,
      prefix))

  def init_fn(params):
    fields = base.init_state_fields(
        params, method, names, upper_optimizer,
        lower_optimizer if keeps_lower_state else None)
    if state_type is ITDState:
      fields["y_init"] = params.y
    if state_type is UFOBLOState:
      fields["key"] = key
    return state_type(**fields)

  def step_fn(params, state, *, batch=None, diagnostics=False,
              **extra_args):
    del extra_args
    trackers = dict(y_init=state.y_init) if state_type is ITDState else {}
    params, dtype = base.begin_step(params, method, **trackers)
    record = base.recorded_names(diagnostics, names, method)
    x, y = params
    est = estimate(x, y, state, batch, record, dtype)
    x_new, upper_state = inner.projected_step(
        upper_optimizer, est.direction, state.upper_state, x, proj_x)
    diag = base.diagnostics(
        dtype, record, **base.incoming_record(f, g, x, y, batch,
                                              **est.incoming),
        upper_grad_norm=lambda: base.diagnostic_norm(est.direction),
        **est.extra)
    new_state = state._replace(
        count=optax.safe_increment(state.count), upper_state=upper_state,
        diagnostics=diag, **est.fields)
    return base.BilevelParams(x_new, est.y), new_state

  return base.bilevel_transformation(init_fn, step_fn, method)


@programs.bilevel_method
def hypergradient_descent(
    f: base.Objective,
    g: base.Objective,
    *,
    adjoint: Union[adjoints.Implicit, adjoints.Unrolled, adjoints.FirstOrder],
    upper_optimizer: optax.GradientTransformation,
    lower_optimizer: optax.GradientTransformation,
    inner_steps: int = 10,
    inner_start: Union[str, Callable] = "previous",
    key: Optional[jax.Array] = None,
    proj_x: Optional[base.Projection] = None,
    proj_y: Optional[base.Projection] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""T inner steps on ``g``, then a step on ``x`` along ``adjoint``'s hypergradient.

  One ``update`` is one outer iteration (see :doc:`/methods`):

  .. math::

    y &\leftarrow \mathrm{Proj}_\mathcal{Y}(y + \mathrm{opt}(\nabla_y
        g(x_t, y))) \quad (T \text{ steps from the start}) \\
    x_{t+1} &\leftarrow \mathrm{Proj}_\mathcal{X}\big(x_t + \mathrm{opt}(
        \widehat{\nabla\phi}(x_t))\big), \qquad \phi(x) = f(x, y^*(x))

  where the hypergradient estimate :math:`\widehat{\nabla\phi}` is given by
  ``adjoint``, a value of :mod:`jaxbilevel.adjoints`:

  * :class:`~jaxbilevel.adjoints.Implicit` (``solver="cg"``, ``"neumann"``
    or ``"direct"``): the implicit function theorem at the last inner iterate
    (AID; :func:`jaxbilevel.aid` is this method with it);
  * :class:`~jaxbilevel.adjoints.Unrolled` (``truncate``, ``checkpoint``):
    reverse mode through the T inner steps (ITD; :func:`jaxbilevel.itd`);
  * :class:`~jaxbilevel.adjoints.FirstOrder` (``correction=None``,
    ``"bernoulli"`` or ``"telescope"``): the first-order (FO-MAML) estimate,
    optionally with UFO-BLO's unbiased randomized correction
    (:func:`jaxbilevel.fo_blo`, :func:`jaxbilevel.ufo_blo`; a correction
    needs ``key``).

  Switching the estimate is one changed value, with everything else (the
  problem, the optimizers, the drivers) unchanged. The adjoint also fixes the
  state (the class of its preset: :class:`~jaxbilevel.AIDState`,
  :class:`~jaxbilevel.ITDState`, :class:`~jaxbilevel.FOBLOState` or
  :class:`~jaxbilevel.UFOBLOState`), the diagnostics (those of its preset,
  e.g. ``linear_residual`` and ``tol`` for ``Implicit``) and where the inner
  solve may start:

  * ``Implicit``: ``"previous"`` (warm start: the previous ``y`` and
    optimizer state) or a callable ``(x, y) -> y0`` with a fresh optimizer
    state, not differentiated (the implicit hypergradient ignores how the
    start depends on ``x``);
  * ``Unrolled``: ``"previous"``, ``"initial"`` (the first ``params.y`` with
    a fresh state, every time) or a callable, differentiated through
    (``lambda x, y: x`` with ``y`` the adapted parameters is exact MAML);
  * ``FirstOrder``: ``"x"`` (MAML's :math:`\varphi_0=x`; ``x`` and ``y``
    of the same structure), ``"previous"`` or a callable; every inner solve
    starts a fresh optimizer state.

  Cost per outer iteration: T g-gradients (y-block) and one f-gradient (both
  blocks), plus the adjoint's: ``Implicit``, ``linear_steps`` (+1 for CG)
  Hessian-vector products and one cross product (``"direct"``: :math:`d_y`
  products and a dense solve); ``Unrolled``, T (or ``truncate``) pairs of
  (Hessian-vector product, cross product) backward; ``FirstOrder``, none
  (a correction: in expectation ``correction_probability``
  :math:`\cdot` T pairs for ``"bernoulli"``, about 2T for ``"telescope"``).

  Args:
    f: upper objective ``f(x, y, batch) -> scalar``.
    g: lower objective ``g(x, y, batch) -> scalar``.
    adjoint: how the lower solve is differentiated:
      :class:`jaxbilevel.adjoints.Implicit`,
      :class:`jaxbilevel.adjoints.Unrolled` or
      :class:`jaxbilevel.adjoints.FirstOrder`, with its hyperparameters as
      fields.
    upper_optimizer: optax optimizer for ``x``.
    lower_optimizer: optax optimizer of the inner steps (unrolled for
      ``Unrolled`` and ``FirstOrder``: use ``eps_root > 0`` for Adam,
      :func:`jaxbilevel.hypergradient.unrollable_adam`).
    inner_steps: T, inner steps per outer iteration (static int).
    inner_start: where the inner steps start: ``"previous"`` (default),
      ``"initial"`` (``Unrolled``), ``"x"`` (``FirstOrder``) or a callable
      ``(x, y) -> y0`` (see above).
    key: a ``jax.random`` key, for a ``FirstOrder`` adjoint with a
      correction (stored in the state and split at every step); refused
      otherwise.
    proj_x: optional projection for ``x``.
    proj_y: optional projection for ``y`` (after each inner step).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` over :class:`BilevelParams`.

  Raises:
    BilevelValidationError: if ``adjoint`` is not one of the three adjoints,
      one of its fields is invalid (the message names it, e.g.
      ``adjoint.solver``), ``inner_start`` is not one the adjoint allows, or
      ``key`` is missing for (or given without) a correction.

  Examples:
    Problem A8 of :doc:`/problems`, :math:`x^*=(-2.4113, -1.1458)`: the
    implicit hypergradient (by CG or by a direct solve) reaches it; the
    unrolled one differentiates the 10 inner steps, not :math:`y^*(x)`, and
    stops close by:

    >>> import jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> prob = jbl.problems.quadratic_a8(jnp.float32)
    >>> for adjoint in (jbl.adjoints.Implicit(solver="cg"),
    ...                 jbl.adjoints.Implicit(solver="direct"),
    ...                 jbl.adjoints.Unrolled()):
    ...   tx = jbl.hypergradient_descent(
    ...       prob.f, prob.g, adjoint=adjoint, upper_optimizer=optax.sgd(0.8),
    ...       lower_optimizer=optax.sgd(0.45), inner_steps=10)
    ...   params, state, history = jbl.run(tx, prob.params0, num_steps=200)
    ...   print([round(float(v), 4) for v in params.x])
    [-2.4113, -1.1458]
    [-2.4113, -1.1458]
    [-2.4108, -1.1464]

  References:
    R. Grazzi, L. Franceschi, M. Pontil, S. Salzo. *On the Iteration
    Complexity of Hypergradient Computation*, ICML 2020, arXiv:2006.16218;
    V. Likhosherstov, X. Song, K. Choromanski, J. Davis, A. Weller.
    *UFO-BLO: Unbiased First-Order Bilevel Optimization*, arXiv:2006.03631.
  """
  return build(f, g, adjoint=adjoint, upper_optimizer=upper_optimizer,
               lower_optimizer=lower_optimizer, inner_steps=inner_steps,
               inner_start=inner_start, key=key, proj_x=proj_x,
               proj_y=proj_y, method="hypergradient_descent",
               prefix="adjoint.")
