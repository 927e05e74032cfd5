r"""Adjoints: how :func:`jaxbilevel.hypergradient_descent` differentiates ``y*(x)``.

The hypergradient :math:`\frac{d}{dx}f(x, y^*(x))` needs the derivative of
the lower solution :math:`y^*(x)`. An *adjoint* says how it is obtained,
in the way ``optimistix``'s ``adjoint=`` argument does for a root find:

* :class:`Implicit`: by the implicit function theorem at the last iterate,
  :math:`\nabla_x f - \nabla^2_{xy}g\,[\nabla^2_{yy}g]^{-1}\nabla_y f`, with
  the linear system solved by conjugate gradient, the Neumann series or a
  dense direct solve (AID, :func:`jaxbilevel.aid`);
* :class:`Unrolled`: by reverse-mode differentiation through the inner
  steps, optionally truncated to the last ones and checkpointed (ITD,
  :func:`jaxbilevel.itd`);
* :class:`FirstOrder`: by taking the Jacobian of the inner steps with
  respect to their start to be the identity (FO-MAML,
  :func:`jaxbilevel.fo_blo`), optionally with UFO-BLO's randomized correction that makes the estimate
  unbiased (:func:`jaxbilevel.ufo_blo`).

An adjoint is a small immutable value (a ``NamedTuple``) whose fields are
its hyperparameters. Being a pytree, its floating-point fields (``tol``,
``neumann_step``, ``correction_probability``) are traced arguments of the
drivers' compiled programs, like a method's other hyperparameters, so a sweep
over them compiles once.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import jax.numpy as jnp

from jaxbilevel._src import base

SOLVERS = ("cg", "neumann", "direct")
CORRECTIONS = ("bernoulli", "telescope")


def default_tol(dtype) -> float:
  """The CG tolerance of :class:`Implicit` and :func:`jaxbilevel.aid` for ``tol=None``.

  1e-10 (float32, float64, bfloat16), or the smallest normal number of
  ``dtype`` where 1e-10 would underflow to 0 (float16: 6.1e-5).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbilevel._src import aid
    >>> aid.default_tol(jnp.float32), round(aid.default_tol(jnp.float16), 9)
    (1e-10, 6.1035e-05)
  """
  return max(1e-10, float(jnp.finfo(dtype).tiny))


class Implicit(NamedTuple):
  r"""The implicit hypergradient at the last inner iterate (AID).

  .. math::

    H v = \nabla_y f(x, y), \quad H = \nabla^2_{yy} g(x, y), \qquad
    \nabla\phi(x) \approx \nabla_x f(x, y) - \nabla^2_{xy} g(x, y)\, v

  The inner loop is not differentiated: its result ``y`` is taken as
  :math:`y^*(x)`. Requires a lower Hessian that is positive definite at the
  iterates (a strongly convex lower level). The adjoint of
  :func:`jaxbilevel.aid`.

  Attributes:
    solver: how :math:`Hv=\nabla_y f` is solved: ``"cg"`` (default:
      conjugate gradient with Hessian-vector products, stopping at
      ``tol``), ``"neumann"``
      (the truncated Neumann series, step ``neumann_step``) or ``"direct"``
      (the dense Hessian, formed by ``jax.jacfwd`` with :math:`d_y`
      Hessian-vector products, and ``jnp.linalg.solve``: exact, for small
      lower levels only; ``linear_steps`` and ``tol`` are ignored).
    linear_steps: K, the most CG iterations, or the number of Neumann terms
      (static int >= 1).
    tol: CG's early-exit tolerance on the residual norm (float, array or
      schedule). ``None``: :func:`default_tol` of the parameters' dtype
      (1e-10, or 6.1e-5 for float16), so that CG stops early only at
      convergence to rounding level.
    neumann_step: :math:`\eta_N\le 1/L_g`, the step of the Neumann series
      (float, array or schedule; required for ``solver="neumann"``).

  Examples:
    >>> import jaxbilevel as jbl
    >>> jbl.adjoints.Implicit(solver="neumann", linear_steps=20,
    ...                       neumann_step=0.5)
    Implicit(solver='neumann', linear_steps=20, tol=None, neumann_step=0.5)

  References:
    R. Grazzi, L. Franceschi, M. Pontil, S. Salzo. *On the Iteration
    Complexity of Hypergradient Computation*, ICML 2020, arXiv:2006.16218.
  """

  solver: str = "cg"
  linear_steps: int = 10
  tol: Optional[base.ScalarOrSchedule] = None
  neumann_step: Optional[base.ScalarOrSchedule] = None


class Unrolled(NamedTuple):
  r"""Reverse-mode differentiation through the unrolled inner steps (ITD).

  .. math::

    y_{t+1} = \mathrm{Proj}\big(y_t + \mathrm{opt}(\nabla_y g(x, y_t))\big),
    \quad t = 0..T-1, \qquad \nabla\phi(x) \approx \frac{d}{dx} f(x, y_T(x))

  computed by :func:`jaxbilevel.hypergradient.unrolled_solve` inside
  ``jax.value_and_grad``; a callable ``inner_start`` is differentiated
  through (MAML). The adjoint of :func:`jaxbilevel.itd`.

  Attributes:
    truncate: K, the number of final inner steps differentiated (T-RHG;
      static int in [0, inner_steps], or ``None`` for all).
    checkpoint: ``False`` (default), ``True`` (rematerialise the unroll in
      chunks of :math:`\lceil\sqrt T\rceil` steps, memory
      :math:`O(\sqrt T d_y)`) or a chunk length.

  Examples:
    >>> import jaxbilevel as jbl
    >>> jbl.adjoints.Unrolled(truncate=5, checkpoint=True)
    Unrolled(truncate=5, checkpoint=True)

  References:
    L. Franceschi, M. Donini, P. Frasconi, M. Pontil. *Forward and Reverse
    Gradient-Based Hyperparameter Optimization*, ICML 2017; A. Shaban, C.-A.
    Cheng, N. Hatch, B. Boots. *Truncated Back-propagation for Bilevel
    Optimization*, AISTATS 2019.
  """

  truncate: Optional[int] = None
  checkpoint: Union[bool, int] = False


class FirstOrder(NamedTuple):
  r"""The first-order (FO-MAML) meta-gradient, optionally corrected (UFO-BLO).

  .. math::

    g_{FO} = \nabla_x f(x,\varphi_r) + \Big(\frac{\partial\varphi_0}
        {\partial x}\Big)^{\!\top}\nabla_y f(x,\varphi_r)

  i.e. :math:`\partial\varphi_r/\partial\varphi_0 := I` and the dependence
  of the inner steps on ``x`` through ``g`` is dropped; the inner loop
  records nothing and every inner solve starts a fresh optimizer state (one
  adaptation per task/batch). The adjoint of :func:`jaxbilevel.fo_blo`.

  With a ``correction``, UFO-BLO's randomized term is added so that the
  expected estimate is the exact meta-gradient :math:`g_{BLO}` through the r
  inner steps (the adjoint of :func:`jaxbilevel.ufo_blo`; the method then
  needs a ``key``):

  * ``"bernoulli"``: :math:`\hat g = g_{FO} + \frac{\xi}{q}(g_{BLO}-g_{FO})`,
    :math:`\xi\sim\mathrm{Bernoulli}(q)`, with :math:`g_{BLO}` computed only
    when :math:`\xi=1`;
  * ``"telescope"``: :math:`\hat g = g_0 + r(g_K - g_{K-1})`, K uniform in
    :math:`\{1..r\}`, :math:`g_k` back-propagating through the last k steps.

  Attributes:
    correction: ``None`` (default: FO-BLO, biased), ``"bernoulli"`` or
      ``"telescope"``.
    correction_probability: q in (0, 1] for ``"bernoulli"`` (float, array or
      schedule); ``None``: :math:`1/r`, which keeps the expected time
      :math:`O(r)`. Ignored otherwise.

  Examples:
    >>> import jaxbilevel as jbl
    >>> jbl.adjoints.FirstOrder(correction="bernoulli")
    FirstOrder(correction='bernoulli', correction_probability=None)

  References:
    V. Likhosherstov, X. Song, K. Choromanski, J. Davis, A. Weller.
    *UFO-BLO: Unbiased First-Order Bilevel Optimization*, arXiv:2006.03631;
    C. Finn, P. Abbeel, S. Levine. *Model-Agnostic Meta-Learning*, ICML 2017.
  """

  correction: Optional[str] = None
  correction_probability: Optional[base.ScalarOrSchedule] = None


ADJOINTS = (Implicit, Unrolled, FirstOrder)


def check_adjoint(adjoint, method: str, inner_steps: int, *,
                  prefix: str = "adjoint."):
  """Validates ``adjoint`` at build time; returns it with checked fields.

  ``prefix`` is how a field is named in the messages: ``"adjoint."`` for
  :func:`jaxbilevel.hypergradient_descent`, ``""`` for a preset whose
  arguments are the fields themselves (:func:`jaxbilevel.aid`, ...).
  """
  if not isinstance(adjoint, ADJOINTS):
    raise base.BilevelValidationError(
        f"{method}: adjoint must be jaxbilevel.adjoints.Implicit(...), "
        f"Unrolled(...) or FirstOrder(...), got {adjoint!r}.")
  if isinstance(adjoint, Implicit):
    if adjoint.solver not in SOLVERS:
      raise base.BilevelValidationError(
          f"{method}: {prefix}solver must be one of {SOLVERS}, got "
          f"{adjoint.solver!r}.")
    linear_steps = base.check_static_int(adjoint.linear_steps,
                                         f"{prefix}linear_steps")
    tol = adjoint.tol
    if tol is not None:
      tol = base.check_hyperparameter(tol, f"{prefix}tol", allow_zero=True)
    step = adjoint.neumann_step
    if adjoint.solver == "neumann":
      if step is None:
        raise base.BilevelValidationError(
            f"{method}: {prefix}solver='neumann' needs {prefix}neumann_step "
            "(eta_N <= 1/L_g, the inverse of the largest eigenvalue of the "
            "lower Hessian).")
      step = base.check_hyperparameter(step, f"{prefix}neumann_step")
    return Implicit(adjoint.solver, linear_steps, tol, step)
  if isinstance(adjoint, Unrolled):
    truncate = adjoint.truncate
    if truncate is not None:
      truncate = base.check_static_int(truncate, f"{prefix}truncate",
                                       minimum=0)
      if truncate > inner_steps:
        raise base.BilevelValidationError(
            f"{method}: {prefix}truncate={truncate} exceeds "
            f"inner_steps={inner_steps}.")
    checkpoint = adjoint.checkpoint
    if not isinstance(checkpoint, bool):
      checkpoint = base.check_static_int(checkpoint, f"{prefix}checkpoint",
                                         minimum=0)
    return Unrolled(truncate, checkpoint)
  if adjoint.correction is not None and adjoint.correction not in CORRECTIONS:
    raise base.BilevelValidationError(
        f"{method}: {prefix}correction must be None or one of "
        f"{CORRECTIONS}, got {adjoint.correction!r}.")
  q = adjoint.correction_probability
  if adjoint.correction is not None:
    q = base.check_hyperparameter(1.0 / inner_steps if q is None else q,
                                  f"{prefix}correction_probability")
    if not callable(q) and base._is_concrete(q) and float(q) > 1.0:  # pylint: disable=protected-access
      raise base.BilevelValidationError(
          f"{method}: {prefix}correction_probability must be in (0, 1], "
          f"got {float(q)}.")
  return FirstOrder(adjoint.correction, q)
