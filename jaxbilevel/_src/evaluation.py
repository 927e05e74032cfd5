r"""Honest evaluation: the upper objective at the lower-level solution.

Penalty methods return a ``params.y`` that minimises a penalised objective
(:math:`y_\gamma\approx\arg\min_y f/\gamma+g` for PBGD-Free, a joint iterate
for V-PBGD and BOME), and their ``history["f"]`` is :math:`f(x, y_\gamma)`.
The bilevel objective is :math:`F(x)=f(x, y^*(x))` with
:math:`y^*(x)\in\arg\min_y g(x, y)`; :math:`f(x, y_\gamma)` is lower than
:math:`F(x)` by about :math:`O(1/\gamma)` because :math:`y_\gamma` trades some
:math:`g` for :math:`f`. Choosing a penalty (or any hyperparameter) by the
recorded ``f`` therefore favours small penalties. :func:`lower_level_evaluation`
re-fits ``y`` on ``g`` alone at the same ``x`` and scores that.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import optax

from jaxbilevel._src import base
from jaxbilevel._src import inner
from jaxbilevel._src import tree as tree_lib

EVALUATION_KEYS = ("f_at_lower_solution", "f_at_iterate", "lower_value",
                   "lower_gap", "lower_grad_norm")

_UNSET = object()


def lower_level_evaluation(
    f: base.Objective,
    g: base.Objective,
    *,
    lower_optimizer: Optional[optax.GradientTransformation] = None,
    num_steps: Optional[int] = None,
    batch: Any = None,
    y_star: Optional[Callable[[base.PyTree, Any], base.PyTree]] = None,
    proj_y: Optional[base.Projection] = None,
    return_solution: bool = False,
) -> Callable:
  r"""Builds ``evaluate(params) -> dict``: :math:`f(x, y^*(x))` and the lower optimality gap.

  For the current upper variable :math:`x` (``params.x``) the returned function
  computes a lower solution :math:`\bar y\approx y^*(x)`, either exactly from
  a closed form ``y_star(x, batch)`` or by ``num_steps`` steps of
  ``lower_optimizer`` on :math:`g(x,\cdot)` alone, warm-started from
  ``params.y`` (a fresh optimizer state each call; :func:`jaxbilevel.inner_solve`,
  a ``lax.scan`` of static length), and returns a dict of scalars:

  * ``f_at_lower_solution``: :math:`f(x,\bar y)`, the bilevel objective
    :math:`F(x)` (exact with ``y_star``; up to the refit's error otherwise).
    Compare runs and choose hyperparameters with this value, not with
    ``history["f"]``, which is :math:`f` at the method's own ``y``;
  * ``f_at_iterate``: :math:`f(x, y)` at ``params.y`` (what ``history["f"]``
    records);
  * ``lower_value``: :math:`g(x,\bar y)`;
  * ``lower_gap``: :math:`g(x,y)-g(x,\bar y)`, how far ``params.y`` is from
    lower optimality in value (:math:`\ge0` when :math:`\bar y` is exact;
    a negative value means the refit is worse than ``params.y``: give it more
    steps);
  * ``lower_grad_norm``: :math:`\|\nabla_y g(x,\bar y)\|`, the stationarity
    of the refit itself (0 for an exact solution of an unconstrained lower
    level): a large value says the refit has not converged and
    ``f_at_lower_solution`` is not yet :math:`F(x)`;
  * ``lower_solution``: :math:`\bar y` (only with ``return_solution=True``).

  The function is pure and traceable: ``jax.jit`` and ``jax.vmap`` it (e.g.
  over the leading grid axis of the params returned by
  :func:`jaxbilevel.sweep`). Its signature is ``evaluate(params, state=None,
  *, batch=None)``; ``state`` is ignored, so ``evaluate`` itself is a valid
  ``record=`` of :func:`jaxbilevel.run` and :func:`jaxbilevel.scan_run`
  (``history["record"]["f_at_lower_solution"]``). Recording costs the refit
  (``num_steps`` lower gradients plus one ``f`` and two ``g`` evaluations)
  after every recorded step.

  Args:
    f: upper objective ``f(x, y, batch) -> scalar``.
    g: lower objective ``g(x, y, batch) -> scalar``.
    lower_optimizer: optax optimizer of the refit (e.g. the method's own
      ``lower_optimizer``). Required unless ``y_star`` is given.
    num_steps: number of refit steps (static int >= 1). Required unless
      ``y_star`` is given.
    batch: the batch handed to ``f``, ``g`` and ``y_star`` (for example the
      full data set); a ``batch=`` passed to ``evaluate`` replaces it.
    y_star: optional closed form ``(x, batch) -> y*(x)`` with the structure of
      ``params.y``; when given, no refit is run.
    proj_y: optional projection applied after each refit step (as in the
      methods, for a constrained lower level).
    return_solution: also return :math:`\bar y` as ``lower_solution``.

  Returns:
    ``evaluate(params, state=None, *, batch=None) -> dict`` as above.

  Examples:
    A quadratic with :math:`y^*(x)=x` and :math:`F(x)=|x-1|^2+0.1|x|^2`:

    >>> import jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> f = lambda x, y, batch: jnp.sum((y - 1.0) ** 2) + 0.1 * jnp.sum(x ** 2)
    >>> g = lambda x, y, batch: jnp.sum((y - x) ** 2)
    >>> evaluate = jbl.lower_level_evaluation(
    ...     f, g, lower_optimizer=optax.sgd(0.25), num_steps=50)
    >>> params = jbl.BilevelParams(x=jnp.array([0.5]), y=jnp.array([0.8]))
    >>> out = evaluate(params)
    >>> round(float(out["f_at_iterate"]), 4)        # f at the given y
    0.065
    >>> round(float(out["f_at_lower_solution"]), 4)  # F(0.5) = 0.25 + 0.025
    0.275
    >>> round(float(out["lower_gap"]), 4)            # g(x, y) - g(x, y*)
    0.09

    As a ``record=`` of a run: the bilevel objective after every step.

    >>> tx = jbl.pbgd_free(f, g, gamma=10.0, upper_optimizer=optax.sgd(0.1),
    ...                    lower_optimizer=optax.sgd(0.2), inner_steps=1)
    >>> p0 = jbl.BilevelParams(x=jnp.ones(1), y=jnp.ones(1))
    >>> _, _, history = jbl.run(tx, p0, num_steps=3, record=evaluate)
    >>> history["record"]["f_at_lower_solution"].shape
    (3,)

  References:
    H. Shen, T. Chen. *On Penalty-based Bilevel Gradient Descent Method*,
    ICML 2023, arXiv:2302.05185 (the :math:`O(1/\gamma)` gap between the
    penalised and the lower-level solution). L. Jiang, Q. Xiao, L. Chen,
    T. Chen. *Beyond Value Functions: Single-Loop Bilevel Optimization under
    Flatness Conditions*, NeurIPS 2025, arXiv:2507.20400 (PBGD-Free).
  """
  f = base.scalar_objective(f, "f")
  g = base.scalar_objective(g, "g")
  if y_star is None:
    if lower_optimizer is None or num_steps is None:
      raise base.BilevelValidationError(
          "lower_level_evaluation: pass lower_optimizer= and num_steps= (the "
          "refit of y on g, e.g. lower_optimizer=optax.sgd(0.1), "
          "num_steps=200), or a closed form y_star=(x, batch) -> y*(x).")
    base.check_optimizers(lower_optimizer=lower_optimizer)
    num_steps = base.check_static_int(num_steps, "num_steps")
  elif not callable(y_star):
    raise base.BilevelValidationError(
        "lower_level_evaluation: y_star must be a callable (x, batch) -> "
        f"y*(x), got {type(y_star).__name__}.")
  proj = base.optional_projection(proj_y, "proj_y")
  default_batch = batch
  grad_g = jax.grad(g, argnums=1)

  def evaluate(params, state=None, *, batch=_UNSET):
    del state  # accepted so that `evaluate` is a `record=` of jbl.run.
    batch = default_batch if batch is _UNSET else batch
    params = base.check_params(params, "lower_level_evaluation")
    x, y = params
    if y_star is None:
      y_bar, _, _ = inner.inner_solve(
          lambda y_: g(x, y_, batch), y, lower_optimizer.init(y),
          optimizer=lower_optimizer, num_steps=num_steps, proj=proj,
          grad_norm=False)
    else:
      y_bar = y_star(x, batch)
      base.check_same_structure(y_bar, y, "y_star(x, batch)", "params.y",
                                "lower_level_evaluation")
      y_bar = tree_lib.tree_cast_like(y_bar, y)
    lower_value = g(x, y_bar, batch)
    out = {
        "f_at_lower_solution": f(x, y_bar, batch),
        "f_at_iterate": f(x, y, batch),
        "lower_value": lower_value,
        "lower_gap": g(x, y, batch) - lower_value,
        "lower_grad_norm": tree_lib.tree_norm(grad_g(x, y_bar, batch)),
    }
    if return_solution:
      out["lower_solution"] = y_bar
    return out

  return evaluate
