"""ITD: iterative (unrolled, reverse-mode) differentiation through the inner solve.

A preset of :func:`jaxbilevel.hypergradient_descent` with the
:class:`jaxbilevel.adjoints.Unrolled` adjoint.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import optax

from jaxbilevel._src import adjoints
from jaxbilevel._src import base
from jaxbilevel._src import hypergradient_descent as hd_lib
from jaxbilevel._src import programs

DIAGNOSTICS = hd_lib.UNROLLED_DIAGNOSTICS
ITDState = hd_lib.ITDState


@programs.bilevel_method
@base.renamed_arguments("itd", {
    "warm_start": ("inner_start",
                   lambda v: "previous" if v else "initial"),
    "init": "inner_start"})
def itd(f: base.Objective,
        g: base.Objective,
        *,
        upper_optimizer: optax.GradientTransformation,
        lower_optimizer: optax.GradientTransformation,
        inner_steps: int = 10,
        inner_start: Union[str, Callable] = "previous",
        truncate: Optional[int] = None,
        checkpoint: Union[bool, int] = False,
        proj_x: Optional[base.Projection] = None,
        proj_y: Optional[base.Projection] = None,
        ) -> optax.GradientTransformationExtraArgs:
  r"""ITD: reverse-mode differentiation through T unrolled inner steps.

  :func:`jaxbilevel.hypergradient_descent` with
  ``adjoint=jbl.adjoints.Unrolled(truncate, checkpoint)`` (the same iterates,
  state and diagnostics).

  One ``update`` is one outer iteration (see :doc:`/methods`):

  .. math::

    y_{t+1} &= \Phi(y_t, x) = \mathrm{Proj}_\mathcal{Y}\big(y_t +
        \mathrm{opt}(\nabla_y g(x, y_t))\big), \quad t = 0..T-1 \\
    x &\leftarrow \mathrm{Proj}_\mathcal{X}\Big(x - \eta\,
        \frac{d}{dx} f\big(x, y_T(x)\big)\Big)

  computed as ``jax.value_and_grad`` of ``x -> f(x, y_T(x))`` with
  :math:`y_T` from :func:`jaxbilevel.hypergradient.unrolled_solve` (a
  ``lax.scan`` of ``lower_optimizer`` steps). ``params.y`` becomes
  :math:`y_T`.

  The start of each unroll:

  * ``inner_start="previous"`` (default): the previous :math:`y_T`
    and inner optimizer state (standard; the hypergradient ignores the
    dependence of the start on earlier ``x``);
  * ``inner_start="initial"``: the initial ``params.y`` with a fresh optimizer
    state, every time;
  * ``inner_start=lambda x, y: ...``: :math:`y_0 = y_0(x, y)` with a
    fresh optimizer state, and the hypergradient *includes* the derivative
    through it (``inner_start=lambda x, y: x`` with ``y`` the adapted
    parameters is exact MAML).

  * ``truncate=K`` back-propagates through the last K steps only (T-RHG).
  * ``checkpoint=True`` rematerialises the unroll in :math:`\sqrt T` chunks so
    memory does not grow linearly in T (an int sets the chunk length).
  * Unrolling Adam/RMSProp needs ``eps_root > 0``: use
    :func:`jaxbilevel.hypergradient.unrollable_adam`; ``optax.adam``'s default ``eps_root=0`` gives NaN
    meta-gradients for coordinates with zero gradient history.

  Cost per outer iteration: T g-gradients forward, T (or K) pairs of
  (Hessian-vector product, cross product) backward, one f-gradient (both
  blocks), plus one g-gradient at :math:`y_T` only when the diagnostics are
  recorded. Memory:
  :math:`O(T d_y)` for the trajectory, :math:`O(K d_y)` truncated,
  :math:`O(\sqrt T d_y)` checkpointed.

  Args:
    f: upper objective ``f(x, y, batch) -> scalar``.
    g: lower objective ``g(x, y, batch) -> scalar``.
    upper_optimizer: optax optimizer for ``x``.
    lower_optimizer: the unrolled inner optax optimizer.
    inner_steps: T (static int).
    inner_start: where each unroll starts: ``"previous"`` (default),
      ``"initial"`` or a callable ``(x, y) -> y0``, differentiated through
      (see above; formerly ``warm_start=True``, ``warm_start=False`` and
      ``init``).
    truncate: K, number of final inner steps differentiated (static int or
      None for all).
    checkpoint: ``False``, ``True`` or a chunk length.
    proj_x: optional projection for ``x``.
    proj_y: optional projection for ``y`` (inside the unroll).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` over :class:`BilevelParams`.

  Examples:
    Ridge regression (problem A10 of :doc:`/problems`), ``x`` = log of the
    penalty:

    >>> import jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> ridge = jbl.problems.ridge(jnp.float32)
    >>> tx = jbl.itd(ridge.f, ridge.g, upper_optimizer=optax.sgd(1.0),
    ...              lower_optimizer=optax.sgd(0.5), inner_steps=200)
    >>> updates, state = tx.update(None, tx.init(ridge.params0), ridge.params0)
    >>> round(-float(updates.x), 4)     # dF/dlog(lambda) at lambda = 0.1
    0.045

  References:
    L. Franceschi, M. Donini, P. Frasconi, M. Pontil. *Forward and Reverse
    Gradient-Based Hyperparameter Optimization*, ICML 2017; R. Grazzi et al.,
    *On the Iteration Complexity of Hypergradient Computation*, ICML 2020.
  """
  return hd_lib.build(
      f, g, adjoint=adjoints.Unrolled(truncate, checkpoint),
      upper_optimizer=upper_optimizer, lower_optimizer=lower_optimizer,
      inner_steps=inner_steps, inner_start=inner_start, key=None,
      proj_x=proj_x, proj_y=proj_y, method="itd", prefix="")
