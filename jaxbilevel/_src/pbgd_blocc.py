r"""Penalty methods for coupled constraints: PBGD-BLOCC and PBGD-Free-CC.

Both solve :math:`\min_x f(x,y^*(x))` with
:math:`y^*(x)\in\arg\min_{y\in\mathcal Y}\{g(x,y):c(x,y)\le0\}`, the lower
constraint ``c(x, y, batch) -> (m,)`` coupling both levels. Both obtain the
penalized solution :math:`(y_F,\tilde\mu_F)` as a saddle point of the scaled
Lagrangian :math:`\gamma^{-1}f+g+\tilde\mu^\top c` with the warm-started
primal-dual solver :func:`jaxbilevel.constrained.primal_dual_solve`;
``params.y`` is :math:`y_F` and the multipliers live in the state. They
differ in the upper direction (see the methods guide, ``docs/methods.md``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxbilevel._src import base
from jaxbilevel._src import continuation
from jaxbilevel._src import programs
from jaxbilevel._src import constrained
from jaxbilevel._src import method_parts

FREE_CC_DIAGNOSTICS = base.COMMON_DIAGNOSTICS + ("gamma",
                                                "constraint_violation")
BLOCC_DIAGNOSTICS = FREE_CC_DIAGNOSTICS + ("g_gap",)


class PBGDBLOCCState(NamedTuple):
  """State of :func:`pbgd_blocc`.

  Attributes:
    count: number of outer steps taken.
    upper_state: state of the upper optimizer (for ``x``).
    lower_state: state of the primal optimizer of :math:`y_F` (``params.y``).
    value_state: state of the primal optimizer of :math:`y_g`.
    y_g: the value tracker, an estimate of :math:`y_g^*(x)`.
    mu_g: multipliers of :math:`g+\\mu^\\top c` at :math:`y_g`, shape ``(m,)``.
    mu_F: multipliers :math:`\\tilde\\mu_F` of the *scaled* problem
      :math:`\\gamma^{-1}f+g+\\tilde\\mu^\\top c`; those of
      :math:`f+\\gamma g+\\mu^\\top c` are :math:`\\gamma\\tilde\\mu_F`.
    diagnostics: dict of scalars: ``f``, ``g`` at the incoming iterate,
      ``lower_grad_norm`` (:math:`\\|\\nabla_y g\\|` there),
      ``upper_grad_norm`` (norm of the upper direction), ``gamma``,
      ``constraint_violation``
      (:math:`\\max_i\\max(c_i(x,y_F),0)` at the new :math:`y_F`) and
      ``g_gap`` :math:`=g(x,y_F)-g(x,y_g)`.
  """

  count: jax.Array
  upper_state: optax.OptState
  lower_state: optax.OptState
  value_state: optax.OptState
  y_g: base.PyTree
  mu_g: jax.Array
  mu_F: jax.Array
  diagnostics: dict


class PBGDFreeCCState(NamedTuple):
  """State of :func:`pbgd_free_cc`.

  Attributes:
    count: number of outer steps taken.
    upper_state: state of the upper optimizer (for ``x``).
    lower_state: state of the primal optimizer of :math:`y_F` (``params.y``).
    mu_F: multipliers :math:`\\tilde\\mu_F` of the scaled problem
      :math:`\\gamma^{-1}f+g+\\tilde\\mu^\\top c`, shape ``(m,)``.
    diagnostics: dict of scalars: ``f``, ``g`` at the incoming iterate,
      ``lower_grad_norm`` (:math:`\\|\\nabla_y g\\|` there),
      ``upper_grad_norm``, ``gamma`` and ``constraint_violation`` at the new :math:`y_F`.
  """

  count: jax.Array
  upper_state: optax.OptState
  lower_state: optax.OptState
  mu_F: jax.Array
  diagnostics: dict


def _check_constraint(arguments):
  """Checks the constraint ``c`` at construction under ``gamma="auto"``."""
  constrained.check_constraint(arguments["c"])


@programs.bilevel_method
@continuation.penalty_method("pbgd_blocc", check=_check_constraint)
def pbgd_blocc(f: base.Objective,
               g: base.Objective,
               c: constrained.Constraint,
               *,
               gamma: base.ScalarOrSchedule,
               upper_optimizer: optax.GradientTransformation,
               lower_optimizer: optax.GradientTransformation,
               dual_step_size: base.ScalarOrSchedule,
               dual_steps: int = 20,
               primal_steps: int = 20,
               value_optimizer: Optional[optax.GradientTransformation] = None,
               value_dual_step_size: Optional[base.ScalarOrSchedule] = None,
               value_dual_steps: Optional[int] = None,
               value_primal_steps: Optional[int] = None,
               multiplier_floor=0.0,
               num_constraints: Optional[int] = None,
               proj_x: Optional[base.Projection] = None,
               proj_y: Optional[base.Projection] = None,
               ) -> optax.GradientTransformationExtraArgs:
  r"""PBGD-BLOCC: two primal-dual solves, then a step on the multiplier-aware reduced-penalty gradient.

  One ``update`` is one outer iteration (direction G4 of :doc:`/methods`):

  .. math::

    (y_g,\mu_g) &\leftarrow \mathrm{MaxMin}\big(g+\mu^\top c\big)
        \quad\text{(warm start)} \\
    (y_F,\tilde\mu_F) &\leftarrow \mathrm{MaxMin}\big(\gamma^{-1}f+g
        +\tilde\mu^\top c\big) \quad\text{(warm start)} \\
    d_t &= \nabla_x f(x_t,y_F)+\gamma\big[\nabla_x g(x_t,y_F)
        +\langle\tilde\mu_F,\nabla_x c(x_t,y_F)\rangle\big]
        -\gamma\big[\nabla_x g(x_t,y_g)+\langle\mu_g,\nabla_x c(x_t,y_g)
        \rangle\big] \\
    x_{t+1} &\leftarrow \mathrm{Proj}_\mathcal{X}(x_t-\eta\,d_t)

  MaxMin is :func:`jaxbilevel.constrained.primal_dual_solve`: ``dual_steps``
  rounds of ``primal_steps`` projected optax steps on :math:`y` followed by
  one projected ascent step :math:`\mu\leftarrow\max(\mu+\eta_2c,\mu_{\min})`.
  :math:`d_t` is that gradient with :math:`\mu_F=\gamma\tilde\mu_F` (the F-subproblem
  is scaled as in the authors' newer code, so the primal step size stays
  :math:`O(1/L_g)`), obtained as :math:`\nabla_x` of
  :func:`jaxbilevel.constrained.coupled_value_gap_penalty` in one backward
  pass. Without the multiplier terms the partial derivatives
  :math:`\nabla_x g` give a wrong value-function gradient as soon as a
  coupled constraint is active. The iterates, multipliers and primal
  optimizer states are all carried across outer iterations.

  Cost per outer iteration: :math:`T_gT_{y,g}` gradients of ``g`` and
  :math:`TT_y` of :math:`(f, g)` in the two solves, :math:`T_g(T_{y,g}+1)+
  T(T_y+1)` constraint evaluations (VJPs), then one backward pass through
  :math:`f,g,c` at :math:`y_F` and :math:`g,c` at :math:`y_g`; no
  Hessian-vector products. Memory: two lower-level copies
  (:math:`y_F, y_g`), two multiplier vectors of size :math:`m` and the
  optimizer states.

  Args:
    f: upper objective ``f(x, y, batch) -> scalar``.
    g: lower objective ``g(x, y, batch) -> scalar``.
    c: coupled constraint ``c(x, y, batch) -> (m,)``, feasible where
      ``<= 0``.
    gamma: penalty constant :math:`\gamma>0` (float, traced array or
      schedule); ``"auto"`` or :class:`jaxbilevel.GammaContinuation` grows
      it by continuation (see :doc:`/choosing_gamma`).
    upper_optimizer: optax optimizer for ``x``.
    lower_optimizer: optax optimizer of the primal steps on :math:`y_F`
      (the authors: ``optax.sgd(eta1)``).
    dual_step_size: :math:`\eta_2>0` of the multiplier steps (float, traced
      array or schedule).
    dual_steps: :math:`T`, rounds per solve (static int).
    primal_steps: :math:`T_y`, primal steps per round (static int).
    value_optimizer: primal optimizer of :math:`y_g` (default:
      ``lower_optimizer``, with its own state).
    value_dual_step_size: :math:`\eta_2` of the g-solve (default:
      ``dual_step_size``).
    value_dual_steps: :math:`T` of the g-solve (default ``dual_steps``).
    value_primal_steps: :math:`T_y` of the g-solve (default
      ``primal_steps``).
    multiplier_floor: :math:`\mu_{\min}\ge0` (0 is the textbook projection;
      the authors' SVM code uses 1e-5).
    num_constraints: :math:`m`; inferred from ``c(x, y, None)`` at ``init``
      when omitted (pass it when ``c`` needs the batch).
    proj_x: optional projection for ``x``.
    proj_y: optional projection onto the simple set :math:`\mathcal Y`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` over :class:`BilevelParams`
    (``params.y`` is :math:`y_F`); ``update(None, state, params, *,
    batch=None)``, unknown keyword arguments are ignored.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> # Toy 1 of blocc_toy: g = (y - 2x)^2 s.t. y - x <= 0, x in [0, 3].
    >>> prob = jbl.problems.blocc_toy(1)
    >>> tx = jbl.pbgd_blocc(
    ...     prob.f, prob.g, prob.info["c"], gamma=5.0,
    ...     upper_optimizer=optax.sgd(0.01), lower_optimizer=optax.sgd(0.1),
    ...     dual_step_size=0.1, dual_steps=50, primal_steps=1,
    ...     proj_x=jbl.projections.box(0.0, 3.0))
    >>> params, state, _ = jbl.run(tx, prob.params0, num_steps=500)
    >>> round(float(params.x), 3), round(float(state.mu_g[0]), 3)
    (0.301, 0.601)

  References:
    L. Jiang, Q. Xiao, V. M. Tenorio, F. Real-Rojas, A. G. Marques,
    T. Chen. *A Primal-Dual-Assisted Penalty Approach to Bilevel
    Optimization with Coupled Constraints*, NeurIPS 2024, arXiv:2406.10148.
  """
  f = base.scalar_objective(f, "f")
  g = base.scalar_objective(g, "g")
  c = constrained.check_constraint(c)
  gamma = base.check_hyperparameter(gamma, "gamma")
  value_optimizer, proj_x, proj_y = base.level_arguments(
      upper_optimizer, lower_optimizer, value_optimizer, proj_x, proj_y)
  settings = constrained.SaddleSettings.create(
      lower_optimizer, dual_step_size, dual_steps, primal_steps,
      multiplier_floor)
  value_settings = constrained.SaddleSettings.create(
      value_optimizer,
      dual_step_size if value_dual_step_size is None else value_dual_step_size,
      dual_steps if value_dual_steps is None else value_dual_steps,
      primal_steps if value_primal_steps is None else value_primal_steps,
      multiplier_floor, prefix="value_")
  value_saddle = method_parts.ValueSaddle(g, c, value_settings, proj_y)
  penalized_saddle = method_parts.PenalizedSaddle(f, g, c, settings, proj_y)
  upper_step = method_parts.ProjectedStep(upper_optimizer, proj_x)
  penalty = constrained.coupled_value_gap_penalty(f, g, c, has_aux=True)

  def init_fn(params):
    fields = base.init_state_fields(params, "pbgd_blocc", BLOCC_DIAGNOSTICS,
                                    upper_optimizer, settings.optimizer)
    mu = constrained.init_multipliers(c, params, num_constraints,
                                      "pbgd_blocc")
    return PBGDBLOCCState(
        **fields, value_state=value_settings.optimizer.init(params.y),
        y_g=params.y, mu_g=mu, mu_F=mu)

  def step_fn(params, state, *, batch=None, diagnostics=False,
              **extra_args):
    del extra_args
    step = method_parts.begin(params, state, diagnostics, "pbgd_blocc",
                              BLOCC_DIAGNOSTICS)
    gamma_t = step.hyperparameter(gamma, "gamma")
    # (y_g, mu_g): saddle point of g + mu^T c.
    y_g = value_saddle.update(step, state, batch)
    # (y_F, mu_F): saddle point of f / gamma + g + mu^T c.
    y_f = penalized_saddle.update(step, state, gamma_t, batch)
    # d_t: grad_x of the coupled value-gap penalty (multiplier-aware).
    (_, aux), direction = jax.value_and_grad(penalty, has_aux=True)(
        step.x, y_f.iterate, y_f.fields["mu_F"], y_g.iterate,
        y_g.fields["mu_g"], gamma_t, batch)
    x_next = upper_step.update(step, state, direction)
    return step.finish(PBGDBLOCCState, x_next, y_f, y_g, gamma=gamma_t,
                       g_gap=aux["g_gap"])

  return base.bilevel_transformation(init_fn, step_fn, "pbgd_blocc")


@programs.bilevel_method
@continuation.penalty_method("pbgd_free_cc", check=_check_constraint)
def pbgd_free_cc(f: base.Objective,
                 g: base.Objective,
                 c: constrained.Constraint,
                 *,
                 gamma: base.ScalarOrSchedule,
                 upper_optimizer: optax.GradientTransformation,
                 lower_optimizer: optax.GradientTransformation,
                 dual_step_size: base.ScalarOrSchedule,
                 dual_steps: int = 10,
                 primal_steps: int = 5,
                 multiplier_term: bool = False,
                 multiplier_floor=0.0,
                 num_constraints: Optional[int] = None,
                 proj_x: Optional[base.Projection] = None,
                 proj_y: Optional[base.Projection] = None,
                 ) -> optax.GradientTransformationExtraArgs:
  r"""PBGD-Free-CC: one primal-dual solve of :math:`\gamma^{-1}f+g+\tilde\mu^\top c`, then a step on :math:`\nabla_x f`.

  One ``update`` is one outer iteration (see :doc:`/methods`):

  .. math::

    (y_F,\tilde\mu_F) &\leftarrow \mathrm{MaxMin}\big(\gamma^{-1}f+g
        +\tilde\mu^\top c\big) \quad\text{(warm start; no }(y_g,\mu_g)
        \text{ solve)} \\
    x_{t+1} &\leftarrow \mathrm{Proj}_\mathcal{X}\big(x_t-\eta
        \nabla_x f(x_t,y_F)\big)

  **Decision on the multiplier term** (``multiplier_term``, default
  ``False``, as in the authors' code). Writing the multiplier-aware
  reduced-penalty gradient (G4 of :doc:`/methods`) as
  :math:`\nabla F_\gamma=\nabla_x f(x,y_F)+\gamma[\nabla_x\mathcal L_g(x,y_F,
  \tilde\mu_F)-\nabla_x\mathcal L_g(x,y_g,\mu_g)]` with
  :math:`\mathcal L_g=g+\mu^\top c`, the bracket is the coupled
  value-function correction; PBGD-Free drops it *as a whole*. Its two halves
  converge to each other as :math:`(y_F,\tilde\mu_F)\to(y_g,\mu_g)`, so the
  dropped term is an :math:`O(1)` bias like PBGD-Free's, small under
  flatness.
  Keeping only :math:`\gamma\langle\tilde\mu_F,\nabla_xc(x,y_F)\rangle`
  drops its partner :math:`-\gamma\langle\mu_g,\nabla_xc(x,y_g)\rangle`
  (which needs the :math:`(y_g,\mu_g)` solve PBGD-Free avoids) and leaves an
  uncancelled error of order :math:`\gamma\|\mu_g\|\|\nabla_x c\|` that
  *grows* with :math:`\gamma` [D, checked numerically in
  ``tests/test_constrained.py``]. The paper's Theorem 5.2 surrogate could
  not be checked against its text here (unverified); ``multiplier_term=True``
  adds :math:`\gamma\langle\tilde\mu_F,\nabla_x c(x,y_F)\rangle` to the
  direction for that comparison.

  On the SVM benchmark ``f`` reads :math:`C` only through
  :math:`\tfrac12\|C\|^2`, so the default step is the shrinkage
  :math:`C\leftarrow\max((1-\eta)C,10^{-4})` and validation data act through
  the :math:`\gamma^{-1}f` term of the solve.

  Cost per outer iteration: :math:`TT_y` gradients of :math:`(f,g)`,
  :math:`T(T_y+1)` constraint evaluations and one :math:`\nabla_x f` (plus
  one constraint VJP with ``multiplier_term``); no Hessian-vector products.
  Memory: one lower-level copy :math:`y_F`, one multiplier vector of size
  :math:`m` and the optimizer states.

  Args:
    f: upper objective ``f(x, y, batch) -> scalar``.
    g: lower objective ``g(x, y, batch) -> scalar``.
    c: coupled constraint ``c(x, y, batch) -> (m,)``, feasible where
      ``<= 0``.
    gamma: penalty constant :math:`\gamma>0` (float, traced array or
      schedule); ``"auto"`` or :class:`jaxbilevel.GammaContinuation` grows
      it by continuation (see :doc:`/choosing_gamma`).
    upper_optimizer: optax optimizer for ``x``.
    lower_optimizer: optax optimizer of the primal steps on :math:`y_F`.
    dual_step_size: :math:`\eta_2>0` of the multiplier steps.
    dual_steps: :math:`T` (static int; authors: 10).
    primal_steps: :math:`T_y` (static int; authors: 5).
    multiplier_term: add :math:`\gamma\langle\tilde\mu_F,\nabla_xc(x,y_F)
      \rangle` to the upper direction (see above; default False).
    multiplier_floor: :math:`\mu_{\min}\ge0`.
    num_constraints: :math:`m` (inferred at ``init`` when omitted).
    proj_x: optional projection for ``x``.
    proj_y: optional projection onto :math:`\mathcal Y`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` over :class:`BilevelParams`
    (``params.y`` is :math:`y_F`).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> f = lambda x, y, batch: (x - 1.0) ** 2 + 0.0 * y
    >>> g = lambda x, y, batch: (y - 2.0) ** 2
    >>> c = lambda x, y, batch: jnp.atleast_1d(y - x)   # y <= x
    >>> tx = jbl.pbgd_free_cc(f, g, c, gamma=10.0,
    ...                       upper_optimizer=optax.sgd(0.1),
    ...                       lower_optimizer=optax.sgd(0.1),
    ...                       dual_step_size=0.1, dual_steps=20, primal_steps=2)
    >>> params = jbl.BilevelParams(x=jnp.array(0.0), y=jnp.array(0.0))
    >>> params, state, _ = jbl.run(tx, params, num_steps=200)
    >>> round(float(params.x), 4), round(float(params.y), 2)  # f is flat in y
    (1.0, 1.0)

  References:
    L. Jiang, Q. Xiao, L. Chen, T. Chen. *Efficient Penalty-Based Bilevel
    Methods: Improved Analysis, Novel Updates, and Flatness Condition*,
    arXiv:2511.16796 (Theorem 5.2; code: ``Liuyuan999/PBGD_Free``,
    ``SVM/algorithms/pbgd_free.py``).
  """
  f = base.scalar_objective(f, "f")
  g = base.scalar_objective(g, "g")
  c = constrained.check_constraint(c)
  gamma = base.check_hyperparameter(gamma, "gamma")
  if not isinstance(multiplier_term, bool):
    raise base.BilevelValidationError(
        f"pbgd_free_cc: multiplier_term must be a bool, got "
        f"{multiplier_term!r}.")
  settings = constrained.SaddleSettings.create(
      lower_optimizer, dual_step_size, dual_steps, primal_steps,
      multiplier_floor)
  _, proj_x, proj_y = base.level_arguments(
      upper_optimizer, lower_optimizer, None, proj_x, proj_y)
  penalized_saddle = method_parts.PenalizedSaddle(f, g, c, settings, proj_y)
  upper_step = method_parts.ProjectedStep(upper_optimizer, proj_x)

  def upper_objective(x, y_f, mu_f, gamma_t, batch):
    value = f(x, y_f, batch)
    if multiplier_term:
      mu_f = jax.lax.stop_gradient(mu_f).astype(jnp.result_type(value))
      value = value + gamma_t.astype(value.dtype) * jnp.vdot(
          mu_f, c(x, y_f, batch))
    return value

  def init_fn(params):
    return PBGDFreeCCState(
        **base.init_state_fields(params, "pbgd_free_cc", FREE_CC_DIAGNOSTICS,
                                 upper_optimizer, settings.optimizer),
        mu_F=constrained.init_multipliers(c, params, num_constraints,
                                          "pbgd_free_cc"))

  def step_fn(params, state, *, batch=None, diagnostics=False,
              **extra_args):
    del extra_args
    step = method_parts.begin(params, state, diagnostics, "pbgd_free_cc",
                              FREE_CC_DIAGNOSTICS)
    gamma_t = step.hyperparameter(gamma, "gamma")
    if not base.depends_on(lambda x_: upper_objective(
        x_, step.y, state.mu_F, gamma_t, batch), step.x):
      raise base.BilevelValidationError(
          "pbgd_free_cc: the upper direction does not depend on x (f ignores "
          "x), so x would never move. PBGD-Free-CC drops the value-function "
          "correction, which is then the whole hypergradient: use "
          "jaxbilevel.pbgd_blocc.")
    # (y_F, mu_F): saddle point of f / gamma + g + mu^T c (no (y_g, mu_g)).
    y_f = penalized_saddle.update(step, state, gamma_t, batch)
    # x <- Proj(x - eta grad_x f(x, y_F)).
    direction = jax.grad(upper_objective)(
        step.x, y_f.iterate, y_f.fields["mu_F"], gamma_t, batch)
    x_next = upper_step.update(step, state, direction)
    return step.finish(PBGDFreeCCState, x_next, y_f, gamma=gamma_t)

  return base.bilevel_transformation(init_fn, step_fn, "pbgd_free_cc")
