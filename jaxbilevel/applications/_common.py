"""The shape shared by every application: objectives, variables, data, evaluation."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbilevel._src import base


class Application(NamedTuple):
  """A bilevel application, ready for any method of jaxbilevel.

  Attributes:
    name: short name (``"hyper_cleaning"``, ...).
    f: upper objective ``f(x, y, batch) -> scalar``.
    g: lower objective ``g(x, y, batch) -> scalar``.
    params: initial :class:`jaxbilevel.BilevelParams`.
    batch: the batch of a deterministic (full-batch) problem, passed as
      ``batch=`` to :func:`jaxbilevel.run`; ``None`` for stochastic ones.
    sample: for stochastic problems, a pure ``key -> batch`` that draws one
      step's batch (use :func:`batch_stream` to turn it into the ``batches=``
      callable of :func:`jaxbilevel.run`); ``None`` for full-batch problems.
    evaluate: a pure, jittable ``params -> dict`` of scalar metrics on
      held-out data; it always has ``"upper_loss"``, the quantity the
      benchmark plots and compares against a target.
    info: everything else (data sizes, seeds, hyperparameter hints, the
      reason a method does not apply, ...).
  """

  name: str
  f: base.Objective
  g: base.Objective
  params: base.BilevelParams
  batch: Any
  sample: Optional[Callable[[jax.Array], Any]]
  evaluate: Callable[[base.BilevelParams], dict]
  info: dict


def batch_stream(app: Application, key: jax.Array) -> Callable[[Any], Any]:
  """A ``step -> batch`` callable for ``jaxbilevel.run(batches=...)``.

  Step ``t`` gets ``app.sample(fold_in(key, t))``; for a full-batch
  application every step gets ``app.batch``.
  """
  if app.sample is None:
    return lambda step: app.batch
  return lambda step: app.sample(jax.random.fold_in(key, step))


def one_batch(app: Application, key: jax.Array) -> Any:
  """A single batch: ``app.batch`` or one draw of ``app.sample``."""
  return app.batch if app.sample is None else app.sample(key)


def as_float32(tree):
  """Every floating leaf as a float32 ``jax.Array`` (whatever ``jax_enable_x64`` is)."""
  def cast(v):
    v = np.asarray(v)
    if np.issubdtype(v.dtype, np.floating):
      return jnp.asarray(v, jnp.float32)
    return jnp.asarray(v)
  return jax.tree.map(cast, tree)


def split_indices(n: int, sizes, seed: int):
  """A seeded permutation of ``range(n)`` cut into consecutive pieces of ``sizes``.

  The last piece takes whatever is left when its size is ``None``.
  """
  order = np.random.RandomState(seed).permutation(n)
  pieces, start = [], 0
  for size in sizes:
    stop = n if size is None else start + size
    if stop > n:
      raise base.BilevelValidationError(
          f"cannot cut {n} rows into pieces of sizes {list(sizes)}.")
    pieces.append(order[start:stop])
    start = stop
  return pieces


def standardize(train: np.ndarray, *others: np.ndarray):
  """Scales columns to zero mean and unit variance with the training statistics.

  Constant columns (zero variance) are centred only.
  """
  mean = train.mean(axis=0)
  std = train.std(axis=0)
  std = np.where(std > 0, std, 1.0)
  return tuple((a - mean) / std for a in (train,) + others)


def train_val_batch(arrays: dict) -> dict:
  """The full batch of a train/validation problem: features and labels of both."""
  return {k: arrays[k] for k in ("train_x", "train_labels", "val_x",
                                 "val_labels")}


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy for integer labels (optax's)."""
  return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
