r"""NLSY79 fair representation learning (the experiment of Jiang et al., NeurIPS 2025).

A feature extractor is shared by two groups (the sensitive attribute
``gender``); the regression head is fitted on one group and the extractor is
chosen so that this head also predicts the other group's income well:

.. math::

  \min_x\ f(x, y^*(x)) = \mathrm{MSE}_0\big(\mathrm{Reg}_{y^*}\circ
  \mathrm{Fea}_x\big)
  \quad\text{s.t.}\quad y^*(x)\in\arg\min_y\ g(x,y)=
  \mathrm{MSE}_1\big(\mathrm{Reg}_y\circ\mathrm{Fea}_x\big),

with ``x`` = ``Fea`` (Linear(21→200)–ReLU–Linear(200→200)–ReLU) and ``y`` =
``Reg`` (Linear(200→1)). Each step draws ``batch_size`` examples per group
without replacement from the training split (the authors' protocol: 500).

Decisions (all fixed seeds, recorded in ``info``):

* The 80/20 train/test split is a permutation with ``seed`` (the authors'
  ``train_test_split`` had no fixed state).
* Features are not standardised by default, as in the authors' code
  (``standardize=True`` is available).
* The per-sample MSE is the correct one; the authors' broadcast
  ``(B, 1)`` vs ``(B,)`` quirk is not reproduced.
* Initialisation follows PyTorch's ``nn.Linear`` default (uniform in
  :math:`\pm1/\sqrt{\text{fan-in}}` for weights and biases).
* Which ``gender`` code is male and which female is (unverified) upstream;
  the module only speaks of group 0 (upper) and group 1 (lower).

The data file is ``nlsy79_processed.csv`` (7 244 rows, 23 columns, the
processed file of the PBGD-Free authors' code): pass its path. A 200-row
sample ships with the package for tests (:func:`sample_path`).
"""

from __future__ import annotations

import csv
import io
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxbilevel._src import base
from jaxbilevel.applications import _common

TARGET = "income"
SENSITIVE = "gender"
#: The 21 feature columns of the NLSY79 file, in the order of the model's
#: input.
FEATURES = ("genhealth", "illegalact", "age", "charged", "grade90",
            "jobsnum90", "afqt89", "jobtrain90", "job_agri", "job_mining",
            "job_construction", "job_manuf", "job_transp", "job_wholesale",
            "job_retail", "job_fin", "job_busi", "job_personal", "job_enter",
            "job_pro", "job_pub")


def sample_path() -> str:
  """Path of the 200-row NLSY79 sample shipped with jaxbilevel (for tests)."""
  return os.path.join(os.path.dirname(os.path.dirname(__file__)), "data",
                      "nlsy79_sample.csv")


def load_csv(path) -> dict:
  """Reads the processed NLSY79 CSV.

  The file is checked cell by cell, and every error names the file, the line
  and the column: it must be UTF-8 (a leading byte-order mark, as Excel
  writes, is allowed), have a header naming each column once, at least one
  data row, as many cells in each row as in the header, finite decimal
  numbers in the columns used (``nan``, ``inf`` and words are refused), and
  a ``gender`` of exactly 0 or 1. Other columns are not read.

  Args:
    path: path of ``nlsy79_processed.csv`` (or of the shipped sample).

  Returns:
    A dict with ``features`` (rows x 21, float64, in the order of
    :data:`FEATURES`), ``income`` (float64) and ``gender`` (int, 0/1).

  Examples:
    >>> from jaxbilevel.applications import nlsy
    >>> data = nlsy.load_csv(nlsy.sample_path())
    >>> data["features"].shape, sorted(set(data["gender"].tolist()))
    ((200, 21), [0, 1])
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"nlsy.load_csv: no file at {path!r}. Pass the path of "
        "nlsy79_processed.csv, or nlsy.sample_path() for "
        "the 200-row sample shipped with jaxbilevel.")

  def error(message, line=None):
    where = f"{path!r}" if line is None else f"{path!r}, line {line}"
    return base.BilevelValidationError(f"nlsy.load_csv: {where}: {message}")

  with open(path, "rb") as fh:
    raw = fh.read()
  try:
    text = raw.decode("utf-8-sig")  # the BOM of an Excel export is dropped
  except UnicodeDecodeError as err:
    line = raw[:err.start].count(b"\n") + 1
    raise error(f"not UTF-8 text (byte 0x{raw[err.start]:02x}); save the "
                "file as UTF-8 CSV.", line) from err
  reader = csv.reader(io.StringIO(text, newline=""))
  try:
    header = next(reader)
  except StopIteration:
    raise error("the file is empty; expected a header line naming the "
                "columns and one row per person.") from None
  except csv.Error as err:
    raise error(f"not a CSV file ({err}).", reader.line_num) from err
  header = [name.strip() for name in header]
  duplicated = sorted({c for c in header if header.count(c) > 1})
  if duplicated:
    raise error(f"the header names the columns {duplicated} more than once; "
                "each column must appear once.", 1)
  missing = [c for c in (TARGET, SENSITIVE) + FEATURES if c not in header]
  if missing:
    raise base.BilevelValidationError(
        f"nlsy.load_csv: {path!r} lacks the columns {missing}; expected the "
        "processed NLSY79 file (gender, income and 21 feature columns).")
  used = [(name, header.index(name)) for name in (TARGET, SENSITIVE)
          + FEATURES]
  values = []
  try:
    for row in reader:
      if not row:
        continue
      line = reader.line_num
      if len(row) != len(header):
        raise error(f"the row has {len(row)} cells, the header "
                    f"{len(header)} columns.", line)
      numbers = []
      for name, j in used:
        cell = row[j].strip()
        number = (float(cell) if _DECIMAL.fullmatch(cell) else None)
        if number is None or not np.isfinite(number):
          raise error(f"column {name!r} holds {row[j][:40]!r}, not a finite "
                      "decimal number.", line)
        numbers.append(number)
      if numbers[1] not in (0.0, 1.0):
        raise error(f"column {SENSITIVE!r} holds {row[used[1][1]]!r}; it must "
                    "be 0 or 1.", line)
      values.append(numbers)
  except csv.Error as err:
    raise error(f"not a CSV file ({err}).", reader.line_num) from err
  if not values:
    raise error("the file has a header but no data rows.")
  table = np.asarray(values, dtype=np.float64)
  return dict(features=table[:, 2:], income=table[:, 0],
              gender=table[:, 1].astype(np.int64))


# A decimal number in ASCII; float() would also take "nan", "inf" and "1_0".
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?",
                      re.ASCII)


def split(data: dict, *, seed: int = 0, test_fraction: float = 0.2,
          standardize: bool = False) -> dict:
  """The seeded 80/20 train/test split, then per group.

  Returns:
    A dict with ``train_a0``, ``train_t0``, ``train_a1``, ``train_t1``,
    ``test_a0``, ``test_t0``, ``test_a1``, ``test_t1`` (features ``a``,
    targets ``t``, group 0 or 1).
  """
  n = len(data["income"])
  num_test = int(round(test_fraction * n))
  train, test = _common.split_indices(n, (n - num_test, None), seed)
  features = data["features"]
  if standardize:
    train_a, test_a = _common.standardize(features[train], features[test])
  else:
    train_a, test_a = features[train], features[test]
  out = {}
  for part, rows, a in (("train", train, train_a), ("test", test, test_a)):
    for group in (0, 1):
      mask = data["gender"][rows] == group
      out[f"{part}_a{group}"] = a[mask]
      out[f"{part}_t{group}"] = data["income"][rows][mask]
  return out


def _linear_init(key, fan_in, fan_out):
  bound = 1.0 / np.sqrt(fan_in)
  kw, kb = jax.random.split(key)
  return {"kernel": jax.random.uniform(kw, (fan_in, fan_out), jnp.float32,
                                       -bound, bound),
          "bias": jax.random.uniform(kb, (fan_out,), jnp.float32, -bound,
                                     bound)}


def init_params(key, num_features: int = len(FEATURES),
                hidden: int = 200) -> base.BilevelParams:
  """``BilevelParams(x=Fea, y=Reg)`` with PyTorch's default ``nn.Linear`` init."""
  k1, k2, k3 = jax.random.split(key, 3)
  x = {"fc1": _linear_init(k1, num_features, hidden),
       "fc2": _linear_init(k2, hidden, hidden)}
  head = _linear_init(k3, hidden, 1)
  y = {"kernel": head["kernel"][:, 0], "bias": head["bias"][0]}
  return base.BilevelParams(x, y)


def features_of(x, a):
  """``Fea``: the two-layer ReLU feature extractor."""
  h = jax.nn.relu(a @ x["fc1"]["kernel"] + x["fc1"]["bias"])
  return jax.nn.relu(h @ x["fc2"]["kernel"] + x["fc2"]["bias"])


def predict(x, y, a):
  """``Reg(Fea(a))``: predicted income, shape ``(rows,)``."""
  return features_of(x, a) @ y["kernel"] + y["bias"]


def mse(x, y, a, t) -> jax.Array:
  """Per-sample mean squared error (no broadcasting quirk)."""
  return jnp.mean((predict(x, y, a) - t) ** 2)


def calibration_curve(pred, target, num_percentiles: int = 33) -> jax.Array:
  r"""Fraction of targets at or below each percentile of the predictions.

  At the ``num_percentiles`` levels :math:`p_k` evenly spaced in
  :math:`[0, 100]`, :math:`c_k = \frac1n\#\{i: t_i \le
  q_{p_k}(\hat y)\}` with :math:`q_p` the linearly interpolated percentile
  of the predictions (``numpy.percentile``'s default). A model whose
  predictions are calibrated in distribution has :math:`c_k \approx
  p_k/100`.
  """
  pred, target = jnp.asarray(pred), jnp.asarray(target)
  if pred.ndim != 1 or target.ndim != 1:
    raise base.BilevelValidationError(
        "calibration_curve: predictions and targets must be vectors, got "
        f"shapes {pred.shape} and {target.shape}.")
  levels = jnp.linspace(0.0, 100.0, num_percentiles,
                        dtype=jnp.promote_types(pred.dtype, jnp.float32))
  quantiles = jnp.percentile(pred, levels)
  below = target[None, :] <= quantiles[:, None]
  return jnp.mean(below.astype(quantiles.dtype), axis=1)


def predictive_parity_gap(pred0, t0, pred1, t1,
                          num_percentiles: int = 33) -> jax.Array:
  """The predictive-parity gap between the two groups.

  The mean absolute difference of the two groups' calibration curves
  (:func:`calibration_curve`) at ``num_percentiles`` percentiles (33, as in
  the authors' evaluation). 0 means that the predictions of both groups
  relate to their targets alike.
  """
  return jnp.mean(jnp.abs(calibration_curve(pred0, t0, num_percentiles)
                          - calibration_curve(pred1, t1, num_percentiles)))


def upper_objective(x, y, batch):
  """:math:`f`: MSE on the group-0 batch."""
  return mse(x, y, batch["a0"], batch["t0"])


def lower_objective(x, y, batch):
  """:math:`g`: MSE on the group-1 batch."""
  return mse(x, y, batch["a1"], batch["t1"])


def problem(path, *, seed: int = 0, batch_size: int = 500, hidden: int = 200,
            test_fraction: float = 0.2,
            standardize: bool = False) -> _common.Application:
  """The NLSY application (stochastic: ``sample(key)`` draws one step's batch).

  Args:
    path: path of the processed NLSY79 CSV.
    seed: seed of the split and of the initialisation.
    batch_size: rows per group per step (without replacement; capped at the
      size of the smaller training group).
    hidden: width of the feature extractor.
    test_fraction: fraction of rows held out for evaluation.
    standardize: standardise the features with the training statistics.

  Returns:
    An :class:`~jaxbilevel.applications.Application`; ``evaluate`` returns
    ``upper_loss`` (test MSE of group 0), ``lower_loss`` (test MSE of group
    1), ``test_mse`` (their mean) and ``parity_gap``
    (:func:`predictive_parity_gap`), the two metrics of the experiment.

  Examples:
    >>> import jax, optax, jaxbilevel as jbl
    >>> from jaxbilevel.applications import nlsy, batch_stream
    >>> app = nlsy.problem(nlsy.sample_path(), batch_size=50, hidden=16)
    >>> adam = lambda: optax.adam(1e-3, eps=1e-3)
    >>> tx = jbl.pbgd_free(app.f, app.g, gamma=10.0, upper_optimizer=adam(),
    ...                    lower_optimizer=adam())
    >>> params, _, history = jbl.run(
    ...     tx, app.params, num_steps=20,
    ...     batches=batch_stream(app, jax.random.PRNGKey(0)))
    >>> sorted(app.evaluate(params))
    ['lower_loss', 'parity_gap', 'test_mse', 'upper_loss']
  """
  data = load_csv(path)
  parts = split(data, seed=seed, test_fraction=test_fraction,
                standardize=standardize)
  arrays = _common.as_float32(parts)
  n0, n1 = len(parts["train_t0"]), len(parts["train_t1"])
  base.check_static_int(batch_size, "batch_size")
  size = min(batch_size, n0, n1)
  params = init_params(jax.random.PRNGKey(seed), data["features"].shape[1],
                       hidden)

  def sample(key):
    k0, k1 = jax.random.split(key)
    i0 = jax.random.permutation(k0, n0)[:size]
    i1 = jax.random.permutation(k1, n1)[:size]
    return {"a0": arrays["train_a0"][i0], "t0": arrays["train_t0"][i0],
            "a1": arrays["train_a1"][i1], "t1": arrays["train_t1"][i1]}

  def evaluate(params):
    x, y = params
    pred0 = predict(x, y, arrays["test_a0"])
    pred1 = predict(x, y, arrays["test_a1"])
    upper = jnp.mean((pred0 - arrays["test_t0"]) ** 2)
    lower = jnp.mean((pred1 - arrays["test_t1"]) ** 2)
    return dict(upper_loss=upper, lower_loss=lower,
                test_mse=0.5 * (upper + lower),
                parity_gap=predictive_parity_gap(
                    pred0, arrays["test_t0"], pred1, arrays["test_t1"]))

  info = dict(path=os.fspath(path), seed=seed, batch_size=size, hidden=hidden,
              standardize=standardize, rows=len(data["income"]),
              train_rows=(n0, n1),
              test_rows=(len(parts["test_t0"]), len(parts["test_t1"])),
              upper_depends_on_x=True)
  return _common.Application("nlsy", upper_objective, lower_objective, params,
                             None, sample, evaluate, info)
