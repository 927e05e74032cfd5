"""FO-BLO (first-order MAML) and UFO-BLO (its unbiased randomized correction)."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from jaxbilevel._src import base
from jaxbilevel._src import programs
from jaxbilevel._src import hypergradient
from jaxbilevel._src import inner

DIAGNOSTICS = base.COMMON_DIAGNOSTICS
UFO_DIAGNOSTICS = base.COMMON_DIAGNOSTICS + ("correction_norm",
                                             "correction_draw")
_ESTIMATORS = ("bernoulli", "telescope")


class FOBLOState(NamedTuple):
  """State of :func:`fo_blo`.

  Attributes:
    count: number of outer steps taken.
    upper_state: state of the optimizer of ``x``.
    diagnostics: dict of scalars: ``f`` and ``g`` at :math:`(x_t, y_r)`,
      ``upper_grad_norm`` (norm of the meta-gradient estimate),
      and ``lower_grad_norm`` (:math:`\\|\\nabla_y g(x_t, y_r)\\|`).
  """

  count: jax.Array
  upper_state: optax.OptState
  diagnostics: dict


class UFOBLOState(NamedTuple):
  """State of :func:`ufo_blo`.

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


def _start(init, params, method):
  """The start of the inner problem ``y0``: ``x`` (MAML), ``y`` or ``init(x, y)``."""
  if callable(init):
    return lambda x, y: base.inner_start(init, x, y, method)
  if init == "previous":
    return lambda x, y: y
  base.check_same_structure(
      params.x, params.y, "params.x", "params.y",
      f"{method} (default inner_start='x': the inner problem starts at "
      "y0 = x, as in MAML; pass inner_start='previous' to warm-start from "
      "the previous y, or inner_start=lambda x, y: ...)")
  return lambda x, y: jax.tree.map(lambda a, b: a.astype(b.dtype), x, y)


def _meta_gradient_fn(f, g, lower_optimizer, inner_steps, proj_y):
  """``(x, y, batch, truncate, jacobian) -> ((f, y_r), d/dx f(x, y_r(x)))``."""
  def objective(x, y, batch, init, truncate, truncated_jacobian):
    y_r, _ = hypergradient.unrolled_solve(
        g, x, init(x, y), batch, optimizer=lower_optimizer,
        num_steps=inner_steps, proj=proj_y, truncate=truncate,
        truncated_jacobian=truncated_jacobian)
    return f(x, y_r, batch), y_r

  return jax.value_and_grad(objective, has_aux=True)


def _blo(f, g, *, upper_optimizer, lower_optimizer, inner_steps, init,
         proj_x, proj_y, method, correction: Optional[Callable],
         key=None):
  """The shared FO-BLO / UFO-BLO transformation (``correction`` adds UFO's term)."""
  f = base.scalar_objective(f, "f")
  g = base.scalar_objective(g, "g")
  inner_steps = base.check_static_int(inner_steps, "inner_steps")
  init = base.check_start(init, method, "inner_start", ("x", "previous"))
  _, proj_x, proj_y = base.level_arguments(
      upper_optimizer, lower_optimizer, None, proj_x, proj_y)
  meta_gradient = _meta_gradient_fn(f, g, lower_optimizer, inner_steps,
                                    proj_y)
  keys = DIAGNOSTICS if correction is None else UFO_DIAGNOSTICS

  def init_fn(params):
    fields = base.init_state_fields(params, method, keys, upper_optimizer)
    if correction is None:
      return FOBLOState(**fields)
    return UFOBLOState(key=key, **fields)

  def step_fn(params, state, *, batch=None, diagnostics=False,
              **extra_args):
    del extra_args
    params, dtype = base.begin_step(params, method)
    record = base.recorded_names(diagnostics, keys, method)
    x, y = params
    start = _start(init, params, method)

    # FO-BLO: r inner steps recorded by nothing, d y_r / d y0 := I.
    (f_t, y_r), direction = meta_gradient(x, y, batch, start, 0, "identity")
    extra = {}
    if correction is not None:
      key, draw_key = jax.random.split(state.key)
      delta, draw = correction(
          lambda trunc: meta_gradient(x, y, batch, start, trunc,
                                      "identity")[1],
          direction, draw_key, state.count, dtype)
      direction = jax.tree.map(jnp.add, direction, delta)
      extra = dict(correction_norm=lambda: base.diagnostic_norm(delta),
                   correction_draw=draw)
    x_new, upper_state = inner.projected_step(
        upper_optimizer, direction, state.upper_state, x, proj_x)

    g_t, g_grad_norm = base.recorded_lower_value(g, x, y_r, batch)
    diag = base.diagnostics(
        dtype, record, f=f_t, g=g_t,
        upper_grad_norm=lambda: base.diagnostic_norm(direction),
        lower_grad_norm=g_grad_norm, **extra)
    fields = dict(count=optax.safe_increment(state.count),
                  upper_state=upper_state, diagnostics=diag)
    new_state = (FOBLOState(**fields) if correction is None
                 else UFOBLOState(key=key, **fields))
    return base.BilevelParams(x_new, y_r), new_state

  return base.bilevel_transformation(init_fn, step_fn, method)


@programs.bilevel_method
@base.renamed_arguments("fo_blo", {"init": "inner_start"})
def fo_blo(f: base.Objective,
           g: base.Objective,
           *,
           upper_optimizer: optax.GradientTransformation,
           lower_optimizer: optax.GradientTransformation,
           inner_steps: int = 5,
           inner_start: Union[str, Callable] = "x",
           proj_x: Optional[base.Projection] = None,
           proj_y: Optional[base.Projection] = None,
           ) -> optax.GradientTransformationExtraArgs:
  r"""FO-BLO: first-order (FO-MAML) meta-gradient through r inner steps.

  The lower level is an r-step optimizer started at
  :math:`\varphi_0=\mathrm{init}(x)` (see :doc:`/methods`):

  .. math::

    \varphi_j &= \varphi_{j-1} + \mathrm{opt}(\nabla_y g(x,\varphi_{j-1})),
        \quad j = 1..r \\
    g_{FO} &= \nabla_x f(x,\varphi_r) + \Big(\frac{\partial\,\mathrm{init}}
        {\partial x}\Big)^{\!\top}\nabla_y f(x,\varphi_r), \qquad
    x \leftarrow \mathrm{Proj}_\mathcal{X}(x - \eta\, g_{FO})

  i.e. the Jacobian :math:`\partial\varphi_r/\partial\varphi_0` is replaced
  by the identity and the dependence of the steps on ``x`` through ``g`` is
  dropped (for MAML, :math:`\varphi_0=x` and :math:`g_{FO}=\nabla
  L^{out}(\varphi_r)`). Computed by
  :func:`jaxbilevel.hypergradient.unrolled_solve` with ``truncate=0`` and
  ``truncated_jacobian="identity"``: the inner loop records nothing.
  ``params.y`` becomes :math:`\varphi_r`; every call starts a fresh inner
  optimizer state (one adaptation per task/batch).

  FO-BLO is biased: with stochastic tasks it can converge to a point that is
  not stationary for :math:`F(x)=\mathbb E\, f(x,\varphi_r(x))`
  (problem A9 of :doc:`/problems`); :func:`ufo_blo` removes the bias. If ``x`` enters
  only through ``g`` (regularisation strengths, sample weights) the
  estimate reduces to :math:`\nabla_x f`, which is then meaningless.

  Cost per outer iteration: r g-gradients (y-block), one f-gradient (both
  blocks), plus one g-gradient at :math:`\varphi_r` only when the diagnostics
  are recorded; no
  Hessian-vector products. Memory: :math:`O(d)`, constant in r.

  Args:
    f: outer loss ``f(x, y, batch) -> scalar`` (e.g. the query loss).
    g: inner loss ``g(x, y, batch) -> scalar`` (e.g. the support loss).
    upper_optimizer: optax meta-optimizer for ``x``.
    lower_optimizer: the inner (adaptation) optax optimizer.
    inner_steps: r (static int). Default 5, the training setting of MAML
      on miniImageNet (Finn et al., 2017).
    inner_start: the start of the inner problem: ``"x"`` (default: ``x``
      itself, MAML; ``x`` and ``y`` must have the same structure),
      ``"previous"`` (warm start from the previous ``y``) or a callable
      ``(x, y) -> y0``; formerly ``init``.
    proj_x: optional projection for ``x``.
    proj_y: optional projection for the inner iterates.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` over :class:`BilevelParams`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> prob = jbl.problems.maml_counterexample(jnp.float32)
    >>> tx = jbl.fo_blo(prob.f, prob.g, upper_optimizer=optax.sgd(2.0),
    ...                 lower_optimizer=optax.sgd(prob.info["alpha"]),
    ...                 inner_steps=5, inner_start=prob.info["init"])
    >>> params, state, history = jbl.run(tx, prob.params0, num_steps=300)
    >>> round(float(params.x), 3)       # x_FO, not x* = 3.042816
    -6.096

  References:
    V. Likhosherstov, X. Song, K. Choromanski, J. Davis, A. Weller.
    *UFO-BLO: Unbiased First-Order Bilevel Optimization*, arXiv:2006.03631;
    C. Finn, P. Abbeel, S. Levine. *Model-Agnostic Meta-Learning*, ICML 2017.
  """
  return _blo(f, g, upper_optimizer=upper_optimizer,
              lower_optimizer=lower_optimizer, inner_steps=inner_steps,
              init=inner_start, proj_x=proj_x, proj_y=proj_y, method="fo_blo",
              correction=None)


@programs.bilevel_method
@base.renamed_arguments("ufo_blo", {"init": "inner_start",
                                    "probability": "correction_probability"})
def ufo_blo(f: base.Objective,
            g: base.Objective,
            *,
            upper_optimizer: optax.GradientTransformation,
            lower_optimizer: optax.GradientTransformation,
            inner_steps: int = 5,
            key: jax.Array,
            correction_probability: Optional[base.ScalarOrSchedule] = None,
            estimator: str = "bernoulli",
            inner_start: Union[str, Callable] = "x",
            proj_x: Optional[base.Projection] = None,
            proj_y: Optional[base.Projection] = None,
            ) -> optax.GradientTransformationExtraArgs:
  r"""UFO-BLO: FO-BLO plus a randomized correction that makes it unbiased.

  With :math:`g_{FO}` the FO-BLO estimate and :math:`g_{BLO}` the exact
  meta-gradient :math:`\frac{d}{dx}f(x,\varphi_r(x))` (reverse mode through
  the r inner steps), both on the same batch:

  * ``estimator="bernoulli"`` (default): draw :math:`\xi\sim
    \mathrm{Bernoulli}(q)` and use

    .. math:: \hat g = g_{FO} + \frac{\xi}{q}\,(g_{BLO} - g_{FO}).

    :math:`g_{BLO}` is computed only when :math:`\xi=1` (``lax.cond``), so the
    expected cost is FO-BLO's plus :math:`q\cdot r` (Hessian-vector product,
    cross product) pairs; the default :math:`q=1/r` keeps the expected time
    :math:`O(r)`. The extra variance is :math:`\tfrac{1-q}{q}\|g_{BLO}-
    g_{FO}\|^2`.
  * ``estimator="telescope"``: with :math:`g_k` the estimate that
    back-propagates through the last k inner steps and takes the identity for
    :math:`\partial\varphi_{r-k}/\partial\varphi_0` (so :math:`g_0=g_{FO}`,
    :math:`g_r=g_{BLO}`), draw :math:`K` uniformly in :math:`\{1..r\}` and use
    :math:`\hat g=g_0+r\,(g_K-g_{K-1})`.

  Both satisfy :math:`\mathbb E\hat g=g_{BLO}` exactly, for any batch.

  **Decision on the "(unverified)" estimator.** Only the paper's abstract was
  available (an unbiased estimator built on FO-BLO with FO-BLO's memory and
  expected time), so the exact form it uses could not be checked. Both
  candidate estimators (Bernoulli and telescoping, :doc:`/methods`) are implemented; "bernoulli" is the
  default because it matches the abstract's claims (memory and expected time
  of FO-BLO up to the :math:`\xi=1` branch). Unbiasedness is verified
  numerically (mean over keys equals the exact meta-gradient within its
  standard error, problem A9 of :doc:`/problems`), not taken from the paper.

  Randomness: the PRNG ``key`` is stored in the state and split at every
  step, so a run is deterministic for a given key.

  Cost per outer iteration: FO-BLO's (r g-gradients, one f-gradient) plus,
  in expectation, :math:`q\cdot r` (HVP, cross product) pairs and r extra
  g-gradients (Bernoulli), or about :math:`2r` of each (telescope, which
  unrolls twice). Memory: :math:`O(d)`, and :math:`O(r d)` on the branch
  that back-propagates.

  Args:
    f: outer loss ``f(x, y, batch) -> scalar``.
    g: inner loss ``g(x, y, batch) -> scalar``.
    upper_optimizer: optax meta-optimizer for ``x``.
    lower_optimizer: the inner optax optimizer (use ``eps_root > 0`` for
      Adam: :func:`jaxbilevel.hypergradient.unrollable_adam`).
    inner_steps: r (static int; default 5, as in :func:`fo_blo`).
    key: a ``jax.random`` key.
    correction_probability: q in (0, 1], the probability of computing the
      correction, for ``"bernoulli"`` (float, array or schedule; default 1/r,
      which keeps the expected time :math:`O(r)`); ignored by
      ``"telescope"``. Formerly ``probability``.
    estimator: ``"bernoulli"`` or ``"telescope"``.
    inner_start: ``"x"`` (default), ``"previous"`` or ``(x, y) -> y0``, as in
      :func:`fo_blo`; formerly ``init``.
    proj_x: optional projection for ``x``.
    proj_y: optional projection for the inner iterates.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` over :class:`BilevelParams`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> prob = jbl.problems.maml_counterexample(jnp.float32)
    >>> tx = jbl.ufo_blo(prob.f, prob.g, upper_optimizer=optax.sgd(1.0),
    ...                  lower_optimizer=optax.sgd(prob.info["alpha"]),
    ...                  inner_steps=5, key=jax.random.PRNGKey(0),
    ...                  correction_probability=1.0,
    ...                  inner_start=prob.info["init"])
    >>> params, state, history = jbl.run(tx, prob.params0, num_steps=300)
    >>> round(float(params.x), 3)       # q = 1: the exact gradient, x*
    3.043

  References:
    V. Likhosherstov, X. Song, K. Choromanski, J. Davis, A. Weller.
    *UFO-BLO: Unbiased First-Order Bilevel Optimization*, arXiv:2006.03631.
  """
  inner_steps = base.check_static_int(inner_steps, "inner_steps")
  if estimator not in _ESTIMATORS:
    raise base.BilevelValidationError(
        f"ufo_blo: estimator must be one of {_ESTIMATORS}, got "
        f"{estimator!r}.")
  if key is None:
    raise base.BilevelValidationError(
        "ufo_blo: key must be a jax.random key (e.g. jax.random.PRNGKey(0)).")
  q = (1.0 / inner_steps if correction_probability is None
       else correction_probability)
  q = base.check_hyperparameter(q, "correction_probability")
  if not callable(q) and base._is_concrete(q) and float(q) > 1.0:  # pylint: disable=protected-access
    raise base.BilevelValidationError(
        f"ufo_blo: correction_probability must be in (0, 1], got "
        f"{float(q)}.")

  def bernoulli(grad_at, g_fo, draw_key, count, dtype):
    q_t = base.resolve_hyperparameter(q, count, dtype,
                                      name="correction_probability")
    q_t = jnp.where(q_t <= 1, q_t, jnp.nan)
    xi = jax.random.bernoulli(draw_key, q_t)
    exact = jax.lax.cond(xi, lambda: grad_at(inner_steps), lambda: g_fo)
    delta = jax.tree.map(lambda e, a: (e - a) / q_t.astype(a.dtype), exact,
                         g_fo)
    return delta, xi

  def telescope(grad_at, g_fo, draw_key, count, dtype):
    del g_fo, count
    k = jax.random.randint(draw_key, (), 1, inner_steps + 1)
    g_k, g_km1 = grad_at(k), grad_at(k - 1)
    delta = jax.tree.map(lambda a, b: inner_steps * (a - b), g_k, g_km1)
    return delta, k.astype(dtype)

  return _blo(f, g, upper_optimizer=upper_optimizer,
              lower_optimizer=lower_optimizer, inner_steps=inner_steps,
              init=inner_start, proj_x=proj_x, proj_y=proj_y, method="ufo_blo",
              correction=bernoulli if estimator == "bernoulli" else telescope,
              key=key)
