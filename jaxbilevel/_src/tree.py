"""Small pytree utilities used across jaxbilevel (on top of optax.tree_utils)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def tree_norm(tree) -> jax.Array:
  """Euclidean norm of all leaves of ``tree`` together."""
  return optax.tree_utils.tree_norm(tree)


def tree_sub(a, b):
  """Leafwise ``a - b``."""
  return optax.tree_utils.tree_sub(a, b)


def tree_all_finite(tree) -> jax.Array:
  """A boolean scalar: True when every leaf of ``tree`` is finite."""
  leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  if not leaves:
    return jnp.asarray(True)
  return jnp.all(jnp.stack(leaves))


def tree_select(pred, on_true, on_false):
  """``on_true`` if the scalar ``pred`` holds, else ``on_false`` (whole trees).

  One ``lax.cond`` over the whole tree rather than a ``jnp.where`` per leaf:
  XLA's compile time grows about quadratically with the number of per-leaf
  selects inside a loop (113 s for 150 + 150 leaves), while one conditional
  compiles like the plain step. Under ``vmap`` (a batched ``pred``) JAX turns
  the conditional back into a select, as ``where`` would be.
  """
  return jax.lax.cond(pred, lambda: on_true, lambda: on_false)


def tree_cast_like(tree, like):
  """Casts every leaf of ``tree`` to the dtype of the matching leaf of ``like``."""
  return jax.tree.map(lambda t, l: jnp.asarray(t, jnp.result_type(l)), tree,
                      like)


def tree_dtype(tree):
  """The common result dtype of the leaves of ``tree``."""
  return jnp.result_type(*jax.tree.leaves(tree))
