r"""Data hyper-cleaning on scikit-learn's digits.

Half of the training labels are replaced by a *different* class; the upper
level learns one weight per training sample so that the classifier fitted on
the weighted training loss does well on a clean validation set:

.. math::

  g(x, W) &= \frac1n\sum_{i\le n}\sigma(x_i)\,\mathrm{CE}(W; a_i,\tilde y_i)
            + \rho\|W\|^2, \\
  f(W) &= \frac1m\sum_{j\in val}\mathrm{CE}(W; a_j, y_j).

``x`` holds the weight logits (one per training sample, start 0, i.e. weight
1/2), ``y = {"w", "b"}`` a linear softmax classifier on the 64 standardised
pixels (start 0). ``f`` does not depend on ``x``: every method whose upper
direction is :math:`\nabla_x f` alone (PBGD-Free, FO-BLO) cannot move ``x``
here; the value-function, implicit and unrolled methods can.

Reproduced variant (the papers use several MNIST variants): digits instead
of MNIST so that nothing is downloaded (sklearn ships it); the split is 800
train / 400 validation / the remaining 597 test rows, drawn with a seeded
permutation; features standardised with the training statistics;
:math:`\omega=\sigma` and :math:`\rho=10^{-3}` (BOME's regulariser, which keeps
the lower level strongly convex for the implicit methods); the corrupted
labels are ``(label + U{1..9}) mod 10`` so that every corrupted label is
wrong (unlike ``randint(0, 10)``, which leaves about 10% unchanged).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxbilevel._src import base
from jaxbilevel.applications import _common

NUM_CLASSES = 10


def load_digits(*, seed: int = 0, num_train: int = 800, num_val: int = 400,
                corruption: float = 0.5) -> dict:
  """The digits split with corrupted training labels, as NumPy arrays.

  Args:
    seed: seed of the split and of the corruption.
    num_train: training rows (whose labels are corrupted).
    num_val: clean validation rows; the rest is the test set.
    corruption: fraction of training labels replaced by a different class.

  Returns:
    A dict with ``train_x``, ``train_labels`` (corrupted), ``clean_labels``,
    ``clean_mask`` (True where the label was kept), ``val_x``, ``val_labels``,
    ``test_x`` and ``test_labels``.
  """
  from sklearn import datasets  # pylint: disable=import-outside-toplevel
  if not 0.0 <= corruption < 1.0:
    raise base.BilevelValidationError(
        f"load_digits: corruption must be in [0, 1), got {corruption}.")
  digits = datasets.load_digits()
  features = digits.data.astype(np.float64)
  labels = digits.target.astype(np.int32)
  train, val, test = _common.split_indices(len(labels),
                                           (num_train, num_val, None), seed)
  train_x, val_x, test_x = _common.standardize(features[train], features[val],
                                               features[test])
  rng = np.random.RandomState(seed + 1)
  clean = labels[train]
  corrupted = rng.permutation(num_train)[:int(round(corruption * num_train))]
  noisy = clean.copy()
  noisy[corrupted] = (clean[corrupted] + rng.randint(
      1, NUM_CLASSES, size=len(corrupted))) % NUM_CLASSES
  return dict(train_x=train_x, train_labels=noisy, clean_labels=clean,
              clean_mask=noisy == clean, val_x=val_x, val_labels=labels[val],
              test_x=test_x, test_labels=labels[test])


def _logits(y, features):
  return features @ y["w"] + y["b"]


def lower_objective(x, y, batch, *, regularization: float = 1e-3):
  """:math:`g`: the sample-weighted training cross-entropy plus :math:`\\rho\\|W\\|^2`."""
  losses = _common.cross_entropy(_logits(y, batch["train_x"]),
                                 batch["train_labels"])
  weights = jax.nn.sigmoid(x)
  reg = jnp.asarray(regularization, losses.dtype)
  return jnp.mean(weights * losses) + reg * jnp.sum(y["w"] ** 2)


def upper_objective(x, y, batch):
  """:math:`f`: the validation cross-entropy (independent of ``x``)."""
  del x
  return jnp.mean(_common.cross_entropy(_logits(y, batch["val_x"]),
                                        batch["val_labels"]))


def f1_score(x, clean_mask) -> jax.Array:
  """F1 of the kept set :math:`\\{i: \\sigma(x_i) > 1/2\\}` against the clean samples."""
  kept = x > 0
  true_pos = jnp.sum(kept & clean_mask)
  precision = true_pos / jnp.maximum(jnp.sum(kept), 1)
  recall = true_pos / jnp.maximum(jnp.sum(clean_mask), 1)
  return 2 * precision * recall / jnp.maximum(precision + recall, 1e-12)


def problem(*, seed: int = 0, num_train: int = 800, num_val: int = 400,
            corruption: float = 0.5,
            regularization: float = 1e-3) -> _common.Application:
  """The hyper-cleaning application (full batch, float32).

  Args:
    seed: seed of the split and of the corruption.
    num_train: training rows.
    num_val: validation rows (the rest is the test set).
    corruption: fraction of corrupted training labels.
    regularization: :math:`\\rho` of the lower objective.

  Returns:
    An :class:`~jaxbilevel.applications.Application`. ``evaluate`` returns
    ``upper_loss`` (validation cross-entropy), ``test_loss``,
    ``test_accuracy`` and ``f1`` (of the kept samples against the clean
    ones).

  Examples:
    >>> import optax, jaxbilevel as jbl
    >>> from jaxbilevel.applications import hyper_cleaning
    >>> app = hyper_cleaning.problem(num_train=200, num_val=100)
    >>> tx = jbl.alt_pbgd(app.f, app.g, gamma=10.0,
    ...                   upper_optimizer=optax.adam(0.1),
    ...                   lower_optimizer=optax.sgd(1.0), inner_steps=5)
    >>> params, state, _ = jbl.run(tx, app.params, num_steps=200,
    ...                            batch=app.batch)
    >>> metrics = app.evaluate(params)
    >>> bool(metrics["f1"] > 0.8 and metrics["test_accuracy"] > 0.8)
    True
  """
  data = load_digits(seed=seed, num_train=num_train, num_val=num_val,
                     corruption=corruption)
  arrays = _common.as_float32(data)
  batch = _common.train_val_batch(arrays)
  dim = data["train_x"].shape[1]
  params = base.BilevelParams(
      x=jnp.zeros(num_train, jnp.float32),
      y={"w": jnp.zeros((dim, NUM_CLASSES), jnp.float32),
         "b": jnp.zeros(NUM_CLASSES, jnp.float32)})

  def g(x, y, batch):
    return lower_objective(x, y, batch, regularization=regularization)

  def evaluate(params):
    test_logits = _logits(params.y, arrays["test_x"])
    return dict(
        upper_loss=upper_objective(params.x, params.y, batch),
        test_loss=jnp.mean(_common.cross_entropy(test_logits,
                                                 arrays["test_labels"])),
        test_accuracy=jnp.mean(
            (jnp.argmax(test_logits, -1) == arrays["test_labels"]).astype(
                jnp.float32)),
        f1=f1_score(params.x, arrays["clean_mask"]))

  info = dict(seed=seed, num_train=num_train, num_val=num_val,
              num_test=len(data["test_labels"]), corruption=corruption,
              regularization=regularization,
              clean_fraction=float(data["clean_mask"].mean()),
              upper_depends_on_x=False)
  return _common.Application("hyper_cleaning", upper_objective, g, params,
                             batch, None, evaluate, info)
