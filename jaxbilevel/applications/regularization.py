r"""Per-feature L2-regularisation selection for logistic regression.

On scikit-learn's breast-cancer data (569 rows, 30 features, labels
:math:`b\in\{-1,+1\}`):

.. math::

  g(x, z) &= \frac1n\sum_{i\in train}\log(1+e^{-b_i(a_i^\top w + c)})
            + \tfrac12\sum_j e^{x_j} w_j^2, \\
  f(z) &= \frac1m\sum_{j\in val}\log(1+e^{-b_j(a_j^\top w + c)}),

with ``x`` the log regularisation strengths (one per feature) and
``z = y = {"w", "c"}`` the classifier. This is benchopt's ``ijcnn1`` problem
shape on a dataset that sklearn ships. ``f`` does not depend on ``x``,
so PBGD-Free cannot move ``x``; the lower problem is strongly convex in
``w`` (through :math:`e^{x}`) and smooth, which makes implicit
differentiation (AID, jaxopt) the natural reference.

Split: 300 train / 135 validation / 134 test rows (seeded permutation),
features standardised with the training statistics. Start: ``x = log 1 = 0``
for every feature (decision: a deterministic start instead of benchopt's
:math:`\log U(0,1)`, so that all methods and peers start from one point),
``w = 0``.

Decision: ``info["proj_x"]`` keeps the log-strengths in
:data:`LOG_STRENGTH_BOUNDS` (:math:`e^{x}\in[3.4\cdot10^{-4}, 3.0\cdot
10^{3}]`); pass it as ``proj_x`` to any method. Without it the joint-step
methods (V-PBGD, BOME) can push :math:`x` until :math:`e^x` overflows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxbilevel._src import base
from jaxbilevel._src import projections
from jaxbilevel.applications import _common

#: Bounds of the log-strengths ``x`` that ``info["proj_x"]`` projects onto.
LOG_STRENGTH_BOUNDS = (-8.0, 8.0)


def load_breast_cancer(*, seed: int = 0, num_train: int = 300,
                       num_val: int = 135) -> dict:
  """The standardised breast-cancer split, labels in {-1, +1}, as NumPy arrays."""
  from sklearn import datasets  # pylint: disable=import-outside-toplevel
  data = datasets.load_breast_cancer()
  features = data.data.astype(np.float64)
  labels = np.where(data.target > 0, 1.0, -1.0)
  train, val, test = _common.split_indices(len(labels),
                                           (num_train, num_val, None), seed)
  train_x, val_x, test_x = _common.standardize(features[train], features[val],
                                               features[test])
  return dict(train_x=train_x, train_labels=labels[train], val_x=val_x,
              val_labels=labels[val], test_x=test_x, test_labels=labels[test])


def logistic_loss(y, features, labels) -> jax.Array:
  """Mean logistic loss :math:`\\log(1+e^{-b(a^\\top w+c)})`."""
  margins = labels * (features @ y["w"] + y["c"])
  return jnp.mean(jax.nn.softplus(-margins))


def lower_objective(x, y, batch):
  """:math:`g`: training logistic loss plus :math:`\\tfrac12\\sum_j e^{x_j}w_j^2`."""
  return (logistic_loss(y, batch["train_x"], batch["train_labels"])
          + 0.5 * jnp.sum(jnp.exp(x) * y["w"] ** 2))


def upper_objective(x, y, batch):
  """:math:`f`: validation logistic loss (independent of ``x``)."""
  del x
  return logistic_loss(y, batch["val_x"], batch["val_labels"])


def problem(*, seed: int = 0, num_train: int = 300,
            num_val: int = 135) -> _common.Application:
  """The regularisation-selection application (full batch, float32).

  Returns:
    An :class:`~jaxbilevel.applications.Application`; ``evaluate`` returns
    ``upper_loss`` (validation logistic loss), ``test_loss`` and
    ``test_accuracy``.

  Examples:
    >>> import optax, jaxbilevel as jbl
    >>> from jaxbilevel.applications import regularization
    >>> app = regularization.problem()
    >>> tx = jbl.alt_pbgd(app.f, app.g, gamma=10.0,
    ...                   upper_optimizer=optax.adam(0.05),
    ...                   lower_optimizer=optax.adam(0.05), inner_steps=5,
    ...                   proj_x=app.info["proj_x"])
    >>> start = float(app.evaluate(app.params)["upper_loss"])
    >>> params, _, _ = jbl.run(tx, app.params, num_steps=100, batch=app.batch)
    >>> bool(app.evaluate(params)["upper_loss"] < 0.2 < start)
    True
  """
  data = load_breast_cancer(seed=seed, num_train=num_train, num_val=num_val)
  arrays = _common.as_float32(data)
  batch = _common.train_val_batch(arrays)
  dim = data["train_x"].shape[1]
  params = base.BilevelParams(
      x=jnp.zeros(dim, jnp.float32),
      y={"w": jnp.zeros(dim, jnp.float32), "c": jnp.zeros((), jnp.float32)})

  def evaluate(params):
    y = params.y
    scores = arrays["test_x"] @ y["w"] + y["c"]
    return dict(
        upper_loss=upper_objective(params.x, y, batch),
        test_loss=logistic_loss(y, arrays["test_x"], arrays["test_labels"]),
        test_accuracy=jnp.mean((scores * arrays["test_labels"] > 0).astype(
            jnp.float32)))

  info = dict(seed=seed, num_train=num_train, num_val=num_val,
              num_test=len(data["test_labels"]), num_features=dim,
              upper_depends_on_x=False, numpy_data=data,
              proj_x=projections.box(*LOG_STRENGTH_BOUNDS))
  return _common.Application("regularization", upper_objective,
                             lower_objective, params, batch, None, evaluate,
                             info)
