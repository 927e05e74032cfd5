"""AID: approximate implicit differentiation (CG, Neumann or a direct solve).

A preset of :func:`jaxbilevel.hypergradient_descent` with the
:class:`jaxbilevel.adjoints.Implicit` adjoint.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import optax

from jaxbilevel._src import adjoints
from jaxbilevel._src import base
from jaxbilevel._src import hypergradient_descent as hd_lib
from jaxbilevel._src import programs

DIAGNOSTICS = hd_lib.IMPLICIT_DIAGNOSTICS
AIDState = hd_lib.AIDState
default_tol = adjoints.default_tol


@programs.bilevel_method
@base.renamed_arguments("aid", {"init": "inner_start"})
def aid(f: base.Objective,
        g: base.Objective,
        *,
        upper_optimizer: optax.GradientTransformation,
        lower_optimizer: optax.GradientTransformation,
        inner_steps: int = 10,
        solver: str = "cg",
        linear_steps: int = 10,
        tol: Optional[base.ScalarOrSchedule] = None,
        neumann_step: Optional[base.ScalarOrSchedule] = None,
        inner_start: Union[str, Callable] = "previous",
        proj_x: Optional[base.Projection] = None,
        proj_y: Optional[base.Projection] = None,
        ) -> optax.GradientTransformationExtraArgs:
  r"""AID: K inner steps on ``g``, then an implicit hypergradient step on ``x``.

  :func:`jaxbilevel.hypergradient_descent` with
  ``adjoint=jbl.adjoints.Implicit(solver, linear_steps, tol, neumann_step)``
  (the same iterates, state and diagnostics).

  One ``update`` is one outer iteration (see :doc:`/methods`):

  .. math::

    y &\leftarrow \mathrm{Proj}_\mathcal{Y}(y - \eta_y\nabla_y g(x_t, y))
        \quad (T \text{ steps from } y \text{ or from } y_0(x_t, y)) \\
    H v &= \nabla_y f(x_t, y), \quad H = \nabla^2_{yy} g(x_t, y)
        \quad (K \text{ CG steps from } v_0 = 0, K
        \text{ Neumann terms, or a dense solve}) \\
    x_{t+1} &\leftarrow \mathrm{Proj}_\mathcal{X}\big(x_t - \eta\,
        [\nabla_x f(x_t, y) - \nabla^2_{xy} g(x_t, y)\, v]\big)

  The inner loop is :func:`jaxbilevel.inner_solve` with
  ``lower_optimizer``. By default it is warm-started: it starts from the
  previous ``y`` with the previous optimizer state (``inner_start="previous"``).
  ``inner_start=lambda x, y: ...`` restarts every inner solve from
  ``inner_start(x_t, y)`` with a fresh optimizer
  state instead. Use this when consecutive outer steps see different lower
  problems, e.g. the tasks of meta-learning (iMAML: ``inner_start=lambda x, y:
  zeros``, the offsets from the meta-parameters). The hypergradient is the
  implicit one at the inner solution, so it ignores how the start depends on
  ``x``. The hypergradient is :func:`jaxbilevel.hypergradient.implicit_hypergradient`
  at the new ``y`` (a constant: the inner loop is not differentiated).
  Hessian-vector products are forward-over-reverse; CG (a
  ``lax.while_loop``: no product is spent after convergence) stops once the
  residual norm is below ``tol``;
  ``solver="direct"`` forms the lower Hessian densely (``jax.jacfwd``) and
  solves exactly (``jnp.linalg.solve``), for small lower levels. The sign convention is
  :math:`v\approx+H^{-1}\nabla_y f` with :math:`-J_{xy}v` (AmIGO, stocBiO).
  Requires a lower Hessian that is positive definite at the iterates
  (strongly convex lower level); Neumann needs
  ``neumann_step`` :math:`\le 1/L_g`.

  Cost per outer iteration: ``inner_steps`` g-gradients (y-block), one
  f-gradient (both blocks), ``linear_steps`` Hessian-vector products (CG: at
  most one more, for the residual of its zero start, and one more for
  ``linear_residual`` when it is recorded; direct: :math:`d_y` of them and a
  dense :math:`O(d_y^3)` solve) and one
  cross product :math:`J_{xy}v`, plus one forward pass of ``g`` when the
  diagnostics are recorded. Memory: about four lower-level vectors (CG), two
  (Neumann) or a :math:`d_y\times d_y` matrix (direct)
  besides ``x``, ``y`` and the optimizer states.

  Args:
    f: upper objective ``f(x, y, batch) -> scalar``.
    g: lower objective ``g(x, y, batch) -> scalar``.
    upper_optimizer: optax optimizer for ``x``.
    lower_optimizer: optax optimizer of the inner solve.
    inner_steps: T, inner steps per outer iteration (static int).
    solver: ``"cg"`` (default), ``"neumann"`` or ``"direct"``.
    linear_steps: K, CG iterations or Neumann terms (static int; ignored by
      ``"direct"``).
    tol: CG early-exit tolerance on the residual norm (float, array or
      schedule). Default ``None``: 1e-10, or, for parameters whose dtype
      cannot hold 1e-10 (float16), the smallest normal number of that dtype
      (6.1e-5 for float16); either way CG stops early only at convergence to
      rounding level.
    neumann_step: :math:`\eta_N` (required for ``solver="neumann"``).
    inner_start: ``"previous"`` (default: warm-start from the previous ``y``
      and optimizer state) or a callable ``(x, y) -> y0``, the start of every
      inner solve (with a fresh ``lower_optimizer`` state); formerly
      ``init``.
    proj_x: optional projection for ``x``.
    proj_y: optional projection for ``y`` (applied after each inner step).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` over :class:`BilevelParams`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> prob = jbl.problems.quadratic_a8(jnp.float32)
    >>> tx = jbl.aid(prob.f, prob.g, upper_optimizer=optax.sgd(0.8),
    ...              lower_optimizer=optax.sgd(0.45), inner_steps=10)
    >>> params, state, history = jbl.run(tx, prob.params0, num_steps=200)
    >>> [round(float(v), 4) for v in params.x]    # x* = (-2.4113, -1.1458)
    [-2.4113, -1.1458]

  References:
    R. Grazzi, L. Franceschi, M. Pontil, S. Salzo. *On the Iteration
    Complexity of Hypergradient Computation*, ICML 2020, arXiv:2006.16218.
  """
  return hd_lib.build(
      f, g, adjoint=adjoints.Implicit(solver, linear_steps, tol, neumann_step),
      upper_optimizer=upper_optimizer, lower_optimizer=lower_optimizer,
      inner_steps=inner_steps, inner_start=inner_start, key=None,
      proj_x=proj_x, proj_y=proj_y, method="aid", prefix="")
