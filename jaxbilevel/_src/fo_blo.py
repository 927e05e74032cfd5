"""FO-BLO (first-order MAML) and UFO-BLO (its unbiased randomized correction).

Presets of :func:`jaxbilevel.hypergradient_descent` with the
:class:`jaxbilevel.adjoints.FirstOrder` adjoint, without and with a
correction.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import jax
import optax

from jaxbilevel._src import adjoints
from jaxbilevel._src import base
from jaxbilevel._src import hypergradient_descent as hd_lib
from jaxbilevel._src import programs

DIAGNOSTICS = hd_lib.FIRST_ORDER_DIAGNOSTICS
UFO_DIAGNOSTICS = hd_lib.CORRECTED_DIAGNOSTICS
FOBLOState = hd_lib.FOBLOState
UFOBLOState = hd_lib.UFOBLOState


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

  :func:`jaxbilevel.hypergradient_descent` with
  ``adjoint=jbl.adjoints.FirstOrder()`` (the same iterates, state and
  diagnostics).

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
  return hd_lib.build(
      f, g, adjoint=adjoints.FirstOrder(), upper_optimizer=upper_optimizer,
      lower_optimizer=lower_optimizer, inner_steps=inner_steps,
      inner_start=inner_start, key=None, proj_x=proj_x, proj_y=proj_y,
      method="fo_blo", prefix="")


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

  :func:`jaxbilevel.hypergradient_descent` with ``adjoint=jbl.adjoints.
  FirstOrder(correction=estimator, correction_probability=...)`` and ``key``
  (the same iterates, state and diagnostics).

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
  if estimator not in adjoints.CORRECTIONS:
    raise base.BilevelValidationError(
        f"ufo_blo: estimator must be one of {adjoints.CORRECTIONS}, got "
        f"{estimator!r}.")
  return hd_lib.build(
      f, g, adjoint=adjoints.FirstOrder(estimator, correction_probability),
      upper_optimizer=upper_optimizer, lower_optimizer=lower_optimizer,
      inner_steps=inner_steps, inner_start=inner_start, key=key,
      proj_x=proj_x, proj_y=proj_y, method="ufo_blo", prefix="")
