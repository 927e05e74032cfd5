r"""LIBSVM data for the SVM hyperparameter benchmark (``PROBLEMS.md`` §B3).

* :func:`load_libsvm` parses the sparse text format
  ``label idx:value idx:value ...`` (1-based indices) **by feature index**,
  from a path, a cache directory or the public LIBSVM site;
* :func:`diabetes_features` is the authors' 45-feature expansion;
* :func:`train_val_test_split` reproduces the authors' splits (NumPy legacy
  RNG).

Data stay NumPy (float64) on the host; cast when building a problem.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np

LIBSVM_URL = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/"

# name -> (file name on the LIBSVM site, number of features). The scaled
# versions (values in [-1, 1]) are the ones the benchmark uses.
KNOWN_DATASETS = {
    "diabetes": ("diabetes_scale", 8),
    "fourclass": ("fourclass_scale", 2),
}

# File names under which the benchmark's shared folder stores them.
_ALIASES = {
    "diabetes": ("diabetes_libsvm_scaled.txt", "diabetes_scale",
                 "diabetes_scale.txt", "diabetes_sample.txt"),
    "fourclass": ("fourclass_libsvm.txt", "fourclass_scale",
                  "fourclass_scale.txt", "fourclass_sample.txt"),
}

PathLike = Union[str, os.PathLike]


class DatasetError(OSError):
  """Raised when a data set cannot be found, downloaded or parsed."""


class Split(NamedTuple):
  """One train / validation / test split (NumPy arrays, labels in {-1, +1})."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def parse_libsvm(lines: Sequence[str], *, num_features: Optional[int] = None,
                 positional_quirk: bool = False, source: str = "<lines>"):
  """Parses LIBSVM text lines into a dense matrix and a label vector.

  Features are placed **by index**: a line that omits feature ``j`` (a
  sparse zero) gets 0 in column ``j``. With ``positional_quirk=True`` the
  ``k``-th ``idx:value`` pair of a line goes to column ``k`` whatever its
  index, and missing trailing slots are 0 — the authors' loader, which
  shifts the 7 fourclass lines that omit feature 1 (``PROBLEMS.md`` §B3).
  Use it only to reproduce their numbers bit for bit.

  Args:
    lines: the text lines (blank lines and ``#`` comments are skipped).
    num_features: number of columns (default: the largest index seen).
    positional_quirk: parse by position instead of by index.
    source: a name for error messages.

  Returns:
    ``(features, labels)``: float64 arrays of shapes ``(n, d)`` and ``(n,)``.
  """
  rows, labels = [], []
  for lineno, raw in enumerate(lines, start=1):
    text = raw.split("#", 1)[0].strip()
    if not text:
      continue
    tokens = text.split()
    try:
      labels.append(float(tokens[0]))
      pairs = [tok.split(":", 1) for tok in tokens[1:]]
      entries = [(int(idx), float(val)) for idx, val in pairs]
    except ValueError as err:
      raise DatasetError(
          f"{source}, line {lineno}: not in LIBSVM format 'label idx:value "
          f"...' ({err}): {raw.strip()!r}") from err
    for idx, _ in entries:
      if idx < 1:
        raise DatasetError(
            f"{source}, line {lineno}: feature indices are 1-based, got "
            f"{idx}.")
    if positional_quirk:
      entries = [(k + 1, val) for k, (_, val) in enumerate(entries)]
    rows.append(entries)
  if not rows:
    raise DatasetError(f"{source}: no data lines.")
  width = max((idx for row in rows for idx, _ in row), default=0)
  if num_features is None:
    num_features = width
  elif width > num_features:
    raise DatasetError(
        f"{source}: a line has feature index {width} > num_features="
        f"{num_features}.")
  features = np.zeros((len(rows), num_features))
  for i, row in enumerate(rows):
    for idx, val in row:
      features[i, idx - 1] = val
  return features, np.asarray(labels)


def _find_in(directory: PathLike, name: str) -> Optional[str]:
  for candidate in _ALIASES.get(name, ()) + (name,):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  return None


def download(name: str, cache_dir: PathLike, *, url: Optional[str] = None,
             timeout: float = 30.0) -> str:
  """Downloads a LIBSVM data set into ``cache_dir`` and returns its path.

  Args:
    name: a key of ``KNOWN_DATASETS`` (``"diabetes"``, ``"fourclass"``) or,
      with ``url``, any file name.
    cache_dir: directory to store the file in (created if needed).
    url: where to download from (default: the public LIBSVM site).
    timeout: seconds before giving up.

  Returns:
    The path of the downloaded file.
  """
  if url is None:
    if name not in KNOWN_DATASETS:
      raise DatasetError(
          f"unknown data set {name!r}: known ones are "
          f"{sorted(KNOWN_DATASETS)}; pass url= for others.")
    url = LIBSVM_URL + KNOWN_DATASETS[name][0]
  os.makedirs(cache_dir, exist_ok=True)
  target = os.path.join(cache_dir, _ALIASES.get(name, (name,))[0])
  tmp = tempfile.NamedTemporaryFile(dir=cache_dir, delete=False)
  try:
    with tmp, urllib.request.urlopen(url, timeout=timeout) as response:
      shutil.copyfileobj(response, tmp)
  except (urllib.error.URLError, OSError, ValueError) as err:
    os.remove(tmp.name)
    raise DatasetError(
        f"could not download {name!r} from {url} ({err}). If this machine "
        "is offline, download the file elsewhere and pass its path (or a "
        "directory holding it) instead.") from err
  os.replace(tmp.name, target)
  return target


def load_libsvm(source: PathLike, *, name: Optional[str] = None,
                cache_dir: Optional[PathLike] = None,
                num_features: Optional[int] = None,
                positional_quirk: bool = False,
                download_if_missing: bool = True,
                url: Optional[str] = None):
  """Loads a LIBSVM-format data set.

  ``source`` is either the path of a file, or a directory holding it
  (give ``name`` to pick one of several), or a known name (``"diabetes"``,
  ``"fourclass"``). A name is looked up in
  ``cache_dir`` (under the shared folder's or the LIBSVM site's file name)
  and downloaded there from the LIBSVM site when missing; when that fails
  (offline) a :class:`DatasetError` says so plainly.

  Args:
    source: file path, directory, or data-set name.
    name: which known data set to look for in a directory.
    cache_dir: where to look for / store named data sets (default
      ``~/.cache/jaxbilevel``).
    num_features: number of columns (default: the known count for a named
      data set, else the largest index seen).
    positional_quirk: see :func:`parse_libsvm`.
    download_if_missing: allow downloading a named data set.
    url: download address (default: the public LIBSVM site).

  Returns:
    ``(features, labels)`` as float64 NumPy arrays.

  Examples:
    >>> from jaxbilevel import datasets
    >>> z, y = datasets.load_libsvm(datasets.sample_path("fourclass"))
    >>> z.shape[1], sorted(set(y.tolist()))
    (2, [-1.0, 1.0])
  """
  source = os.fspath(source)
  if name is not None and name not in KNOWN_DATASETS:
    raise DatasetError(f"unknown data set name {name!r}; known: "
                       f"{sorted(KNOWN_DATASETS)}.")
  if os.path.isfile(source):
    path = source
    base_name = os.path.basename(source)
    name = name or next((k for k, v in _ALIASES.items() if base_name in v),
                        None)
  elif os.path.isdir(source):
    wanted = [name] if name else list(KNOWN_DATASETS)
    name = next((k for k in wanted if _find_in(source, k)), None)
    if name is None:
      raise DatasetError(
          f"{source} holds none of the data files "
          f"{sorted(a for k in wanted for a in _ALIASES[k])}.")
    path = _find_in(source, name)
  elif source in KNOWN_DATASETS:
    name = source
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache",
                                          "jaxbilevel")
    path = _find_in(cache_dir, source)
    if path is None:
      if not download_if_missing:
        raise DatasetError(
            f"{source!r} is not in {cache_dir} and downloading is disabled.")
      path = download(source, cache_dir, url=url)
  else:
    raise DatasetError(
        f"{source!r} is neither a file, a directory, nor a known data set "
        f"name ({sorted(KNOWN_DATASETS)}).")
  if num_features is None and name in KNOWN_DATASETS:
    num_features = KNOWN_DATASETS[name][1]
  with open(path, encoding="utf-8") as handle:
    return parse_libsvm(handle.readlines(), num_features=num_features,
                        positional_quirk=positional_quirk, source=path)


def diabetes_features(x: np.ndarray) -> np.ndarray:
  r"""The authors' 45-feature expansion of the 8 diabetes features.

  :math:`z=[1,\ x_1..x_8,\ x_1^2..x_8^2,\ x_ix_j\ (i<j)]`, the cross
  products in lexicographic order (1,2), (1,3), …, (7,8): 1 + 8 + 8 + 28 =
  45 columns (the SVM bias is kept separately).

  Examples:
    >>> import numpy as np
    >>> from jaxbilevel import datasets
    >>> datasets.diabetes_features(np.arange(1.0, 9.0)[None]).shape
    (1, 45)
  """
  x = np.asarray(x, dtype=float)
  if x.ndim != 2 or x.shape[1] != 8:
    raise DatasetError(
        f"diabetes_features expects an (n, 8) matrix, got shape {x.shape}.")
  i, j = np.triu_indices(8, k=1)
  return np.hstack([np.ones((x.shape[0], 1)), x, x ** 2, x[:, i] * x[:, j]])


def load_diabetes(source: PathLike = "diabetes", **kwargs):
  """The diabetes data with the 45-feature expansion: ``(z (n, 45), labels)``."""
  x, y = load_libsvm(source, name="diabetes", num_features=8, **kwargs)
  return diabetes_features(x), y


def load_fourclass(source: PathLike = "fourclass", **kwargs):
  """The fourclass data (2 features, parsed by index): ``(z (n, 2), labels)``."""
  return load_libsvm(source, name="fourclass", num_features=2, **kwargs)


def train_val_test_split(features: np.ndarray, labels: np.ndarray, seed: int,
                         n_train: int = 500, n_val: int = 150) -> Split:
  """The authors' split: shuffle the rows with NumPy's legacy RNG, then cut.

  Stacks ``[features | labels]``, shuffles the rows as
  ``np.random.seed(seed); np.random.shuffle(rows)`` would (a private
  ``RandomState(seed)``, so the global RNG is untouched), and takes the
  first ``n_train`` rows for training, the next ``n_val`` for validation and
  the rest for testing. The inputs are not modified.

  Note: the authors' notebook shuffles one array *in place* for every seed,
  so its split ``k`` is the composition of the shuffles ``0..k``; pass
  ``chained=True`` to :func:`random_splits` to reproduce that.
  """
  features = np.asarray(features, dtype=float)
  labels = np.asarray(labels, dtype=float)
  if features.ndim != 2 or labels.shape != (features.shape[0],):
    raise DatasetError(
        f"features must be (n, d) and labels (n,); got {features.shape} and "
        f"{labels.shape}.")
  n = features.shape[0]
  if n_train < 1 or n_val < 0 or n_train + n_val >= n:
    raise DatasetError(
        f"cannot split {n} rows into {n_train} train, {n_val} validation and "
        "a non-empty test set.")
  rows = np.hstack([features, labels[:, None]])
  np.random.RandomState(seed).shuffle(rows)
  return _cut(rows, n_train, n_val)


def _cut(rows, n_train, n_val):
  a, b = n_train, n_train + n_val
  return Split(rows[:a, :-1], rows[:a, -1], rows[a:b, :-1], rows[a:b, -1],
               rows[b:, :-1], rows[b:, -1])


def random_splits(features: np.ndarray, labels: np.ndarray,
                  seeds: Sequence[int], n_train: int = 500, n_val: int = 150,
                  *, chained: bool = False) -> list:
  """Splits for several seeds (see :func:`train_val_test_split`).

  With ``chained=True`` the shuffles compose, as in the authors' notebook
  (one array shuffled in place seed after seed).
  """
  if not chained:
    return [train_val_test_split(features, labels, s, n_train, n_val)
            for s in seeds]
  rows = np.hstack([np.asarray(features, float),
                    np.asarray(labels, float)[:, None]])
  out = []
  for s in seeds:
    np.random.RandomState(s).shuffle(rows)
    out.append(_cut(rows.copy(), n_train, n_val))
  return out


def sample_path(name: str) -> str:
  """Path of the small sample of a data set shipped with jaxbilevel.

  The samples (``jaxbilevel/data/{diabetes,fourclass}_sample.txt``) hold a
  few dozen lines of each file, including fourclass lines that omit
  feature 1; they are meant for tests and examples, not for benchmarks.
  """
  if name not in KNOWN_DATASETS:
    raise DatasetError(f"no shipped sample for {name!r}; known: "
                       f"{sorted(KNOWN_DATASETS)}.")
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data",
                      f"{name}_sample.txt")
  if not os.path.isfile(path):
    raise DatasetError(f"the shipped sample {path} is missing.")
  return path
