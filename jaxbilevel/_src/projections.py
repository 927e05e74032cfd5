"""Euclidean projections onto simple sets, for ``proj_x`` and ``proj_y``.

Each function returns a projection ``tree -> tree`` that can be passed as the
``proj_x`` or ``proj_y`` argument of every method. Bounds may be Python
numbers, arrays broadcastable to the leaves, or pytrees matching the
variables. The projections themselves are optax's (``optax.projections``);
these wrappers add the broadcasting of scalar bounds and keep each leaf's
dtype. Any optax projection can be passed directly too, e.g.
``proj_y=lambda y: optax.projections.projection_l2_ball(y, 1.0)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbilevel._src.base import BilevelValidationError


def identity():
  """The identity projection (no constraint)."""
  return lambda tree: tree


def _bound_tree(bound, tree, fill):
  """Broadcasts a scalar bound to ``tree``'s structure (pytrees pass through)."""
  if bound is None:
    return jax.tree.map(lambda t: jnp.full((), fill, jnp.result_type(t)), tree)
  if isinstance(bound, (dict, list, tuple)) or hasattr(bound, "_fields"):
    return bound
  return jax.tree.map(lambda _: bound, tree)


def box(lower=None, upper=None):
  """Projection onto the box ``lower <= v <= upper`` (leafwise clipping).

  Args:
    lower: lower bound (number, array, pytree matching the variables, or None).
    upper: upper bound (same forms), or None.

  Returns:
    A projection ``tree -> tree``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbilevel import projections
    >>> proj = projections.box(-8.0, 1.5)
    >>> proj({"a": jnp.array([-10.0, 0.0, 3.0])})["a"].tolist()
    [-8.0, 0.0, 1.5]
  """
  if lower is None and upper is None:
    raise BilevelValidationError("box() needs at least one of lower, upper.")
  for name, bound, none in (("lower", lower, "-inf"), ("upper", upper, "inf")):
    for leaf in jax.tree.leaves(bound):
      if isinstance(leaf, jax.core.Tracer):
        continue  # a traced bound cannot be checked here
      if np.isnan(np.asarray(leaf, dtype=np.float64)).any():
        raise BilevelValidationError(
            f"box(): {name} contains NaN ({name}={str(bound)[:80]}); a NaN "
            f"bound would make every projected value NaN. Use {name}=None "
            f"(or {none}) for no bound.")
  if (lower is not None and upper is not None
      and not isinstance(lower, (dict, list, tuple))
      and not isinstance(upper, (dict, list, tuple))):
    try:
      if bool(jnp.any(jnp.asarray(lower) > jnp.asarray(upper))):
        raise BilevelValidationError(
            f"box(): lower bound {lower} exceeds upper bound {upper}.")
    except jax.errors.ConcretizationTypeError:
      pass

  def project(tree):
    lo = _bound_tree(lower, tree, -jnp.inf)
    hi = _bound_tree(upper, tree, jnp.inf)
    projected = optax.projections.projection_box(tree, lo, hi)
    return jax.tree.map(lambda p, t: p.astype(jnp.result_type(t)), projected,
                        tree)

  return project


def nonnegative(floor=0.0):
  """Projection onto ``{v >= floor}`` (e.g. multipliers, SVM margins)."""
  if isinstance(floor, (int, float)) and floor == 0:
    return optax.projections.projection_non_negative
  return box(lower=floor, upper=None)
