r"""LIBSVM data for the SVM hyperparameter benchmark (Jiang et al., NeurIPS 2024).

* :func:`load_libsvm` parses the sparse text format
  ``label idx:value idx:value ...`` (1-based indices) **by feature index**,
  from a path, a cache directory or the public LIBSVM site;
* :func:`diabetes_features` is the authors' 45-feature expansion;
* :func:`train_val_test_split` reproduces the authors' splits (NumPy legacy
  RNG).

Data stay NumPy (float64) on the host; cast when building a problem.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np

from jaxbilevel._src import base

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


# Known files: (size in bytes, SHA-256) of the LIBSVM file with the white
# space at its very end removed. Copies of these files differ only there (a
# final newline, a trailing blank), so the digest ignores the end-of-file white
# space; every other byte counts. Measured on copies of the files that the
# LIBSVM site serves as ``diabetes_scale`` and ``fourclass_scale`` (768 and
# 862 lines); two independent copies of fourclass_scale agree.
KNOWN_DIGESTS = {
    "diabetes": (68715, "5101328a901e0b0a6cc40c9276b9f81e"
                        "ceb1b1ac8c03b841c38a9076a54f13d3"),
    "fourclass": (23154, "6d018dee7805fc15776bbc82d1262644"
                         "3ec39030514d471fd717bf7fb379c727"),
}

# Downloads of files without a known size stop at this many bytes.
MAX_DOWNLOAD_BYTES = 256 * 2 ** 20
# Without ``num_features`` the number of columns is inferred from the largest
# feature index, but only up to max(MIN_INFERRED_WIDTH, number of stored
# values): a wider matrix would have more all-zero columns than the file has
# values, which a stray index (say 10**9 in a two-line file, a 15 GiB dense
# matrix) produces, not real data.
MIN_INFERRED_WIDTH = 10_000

# A decimal number in ASCII (what LIBSVM's tools write). Python's float() and
# int() also take "nan", "inf", "1_0" and non-ASCII digits; these are refused.
_NUMBER = r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_LABEL_RE = re.compile(_NUMBER, re.ASCII)
_PAIR_RE = re.compile(r"([0-9]+):(" + _NUMBER + ")", re.ASCII)


def _read_lines(path: str) -> list:
  """The lines of a text file, refusing non-UTF-8 bytes with file and line."""
  with open(path, "rb") as handle:
    data = handle.read()
  lines = data.split(b"\n")
  out = []
  for lineno, raw in enumerate(lines, start=1):
    try:
      out.append(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
      raise DatasetError(
          f"{path}, line {lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x}"
          f" at column {err.start + 1}); LIBSVM files are plain ASCII text. Is "
          "this the right file?") from err
  return out


def parse_libsvm(lines: Sequence[str], *, num_features: Optional[int] = None,
                 positional_quirk: bool = False, source: str = "<lines>"):
  """Parses LIBSVM text lines into a dense matrix and a label vector.

  Features are placed **by index**: a line that omits feature ``j`` (a
  sparse zero) gets 0 in column ``j``. With ``positional_quirk=True`` the
  ``k``-th ``idx:value`` pair of a line goes to column ``k`` whatever its
  index, and missing trailing slots are 0 — the authors' loader, which
  shifts the 7 fourclass lines that omit feature 1.
  Use it only to reproduce their numbers bit for bit.

  The format is checked strictly, with file and line in every error: labels
  and values are finite decimal numbers in ASCII (``nan``, ``inf``,
  ``1e400``, ``1_0`` and non-ASCII digits are refused), indices are 1-based
  decimal integers that increase along a line (so a repeated index is an
  error, as in LIBSVM's own reader). Without ``num_features`` the width is
  the largest index, which may be at most ``max(MIN_INFERRED_WIDTH, number
  of idx:value pairs in the data)``; pass ``num_features`` for wider data.

  Args:
    lines: the text lines (blank lines and ``#`` comments are skipped).
    num_features: number of columns (default: the largest index seen).
    positional_quirk: parse by position instead of by index.
    source: a name for error messages.

  Returns:
    ``(features, labels)``: float64 arrays of shapes ``(n, d)`` and ``(n,)``.

  Examples:
    >>> from jaxbilevel import datasets
    >>> z, y = datasets.parse_libsvm(["+1 2:0.5", "-1 1:-1 2:2"])
    >>> z.tolist(), y.tolist()
    ([[0.0, 0.5], [-1.0, 2.0]], [1.0, -1.0])
  """
  if num_features is not None:
    num_features = base.check_static_int(num_features, "num_features",
                                         minimum=0)
  # scikit-learn's parser (below) does the parsing, but its errors name no
  # line, and it takes "nan", "inf", "1_0" and duplicate indices silently. So
  # every line is first checked here against the format (cheap: one regular
  # expression per token), and the values are checked after parsing, with
  # the row mapped back to its line.
  texts, linenos = [], []
  max_index, max_line, num_values = 0, 0, 0
  for lineno, raw in enumerate(lines, start=1):
    if isinstance(raw, bytes):
      try:
        raw = raw.decode("utf-8")
      except UnicodeDecodeError as err:
        raise DatasetError(f"{source}, line {lineno}: not UTF-8 text "
                           f"({err}).") from err
    text = raw.lstrip("\ufeff") if lineno == 1 else raw
    text = text.split("#", 1)[0].strip(" \t\r\n\v\f")
    if not text:
      continue
    where = f"{source}, line {lineno}"
    if not text.isascii():
      char = next(c for c in text if not c.isascii())
      raise DatasetError(
          f"{where}: non-ASCII character {char!r}; LIBSVM lines hold ASCII "
          f"'label idx:value ...' only: {raw.strip()[:80]!r}")
    tokens = text.split()
    if not _LABEL_RE.fullmatch(tokens[0]):
      raise DatasetError(
          f"{where}: not in LIBSVM format 'label idx:value ...': the label "
          f"{tokens[0]!r} is not a decimal number (nan and inf are "
          f"refused): {raw.strip()[:80]!r}")
    previous = 0
    for token in tokens[1:]:
      match = _PAIR_RE.fullmatch(token)
      if match is None:
        raise DatasetError(
            f"{where}: not in LIBSVM format 'label idx:value ...': {token!r} "
            "is not idx:value with a decimal integer index and a decimal "
            f"value (nan and inf are refused): {raw.strip()[:80]!r}")
      index = int(match.group(1))
      if index < 1:
        raise DatasetError(
            f"{where}: feature indices are 1-based, got {index}.")
      if index <= previous:
        what = ("repeats feature index" if index == previous else
                f"has feature index {index} after")
        raise DatasetError(
            f"{where}: the line {what} {previous}; indices must increase "
            "along a line (LIBSVM format).")
      previous = index
    if num_features is not None and previous > num_features:
      raise DatasetError(
          f"{where}: feature index {previous} > num_features="
          f"{num_features}.")
    if previous > max_index:
      max_index, max_line = previous, lineno
    num_values += len(tokens) - 1
    texts.append(text)
    linenos.append(lineno)
  if not texts:
    raise DatasetError(f"{source}: no data lines.")
  if num_features is None:
    limit = max(MIN_INFERRED_WIDTH, num_values)
    if max_index > limit:
      gib = len(texts) * max_index * 8 / 2 ** 30
      raise DatasetError(
          f"{source}, line {max_line}: feature index {max_index} would make "
          f"a dense {len(texts)} x {max_index} matrix ({gib:.1f} GiB) from "
          f"{num_values} stored values; without num_features at most "
          f"max({MIN_INFERRED_WIDTH}, number of stored values) = {limit} "
          "columns are inferred. Pass num_features= if the data really have "
          "that many features.")
    num_features = max_index
  # Imported here: slow to import, and only the parser needs it.
  try:
    from sklearn import datasets as sklearn_datasets  # pylint: disable=g-import-not-at-top
  except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "jaxbilevel.datasets parses LIBSVM files with scikit-learn: pip "
        "install scikit-learn (or, in a jaxbilevel checkout, pip install -e "
        "'.[data]').") from err
  features, labels = sklearn_datasets.load_svmlight_file(
      io.BytesIO("\n".join(texts).encode("ascii")),
      n_features=max(num_features, 1), dtype=np.float64, zero_based=False)
  _check_finite(labels, "label", np.arange(len(labels)), source, linenos)
  rows = np.repeat(np.arange(features.shape[0]), np.diff(features.indptr))
  _check_finite(features.data, "value", rows, source, linenos)
  if positional_quirk:
    features.indices = (np.arange(features.nnz) - np.repeat(
        features.indptr[:-1], np.diff(features.indptr))).astype(
            features.indices.dtype)
  return features.toarray()[:, :num_features], np.asarray(labels)


def _check_finite(values, what, rows, source, linenos):
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    raise DatasetError(
        f"{source}, line {linenos[rows[bad[0]]]}: the {what} "
        f"{values[bad[0]]} is not finite (it overflows float64); labels and "
        "values must be finite numbers.")


def _find_in(directory: PathLike, name: str) -> Optional[str]:
  for candidate in _ALIASES.get(name, ()) + (name,):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  return None


def _digest(path: str):
  """``(size, SHA-256)`` of a file without the white space at its end."""
  with open(path, "rb") as handle:
    data = handle.read().rstrip()
  return len(data), hashlib.sha256(data).hexdigest()


def _check_digest(path: str, name: str, expected, what: str, fix: str):
  size, digest = _digest(path)
  exp_size, exp_digest = expected
  if digest != exp_digest or (exp_size is not None and size != exp_size):
    raise DatasetError(
        f"{what} is not the {name!r} data set: {size} bytes with SHA-256 "
        f"{digest}, expected "
        f"{'' if exp_size is None else f'{exp_size} bytes with '}SHA-256 "
        f"{exp_digest} (end-of-file white space not counted). {fix}")


def _cache_target(cache_dir: str, file_name: str) -> str:
  """``cache_dir/file_name``, refusing names that would leave ``cache_dir``."""
  if (not isinstance(file_name, str) or file_name in ("", ".", "..")
      or os.path.basename(file_name) != file_name or "/" in file_name
      or (os.altsep and os.altsep in file_name) or "\0" in file_name):
    raise DatasetError(
        f"download: name {file_name!r} is not a plain file name; the file is "
        f"stored in cache_dir={cache_dir} under that name, so it must not "
        "hold directories, '..' or path separators.")
  return os.path.join(cache_dir, file_name)


def download(name: str, cache_dir: PathLike, *, url: Optional[str] = None,
             timeout: float = 30.0, sha256: Optional[str] = None) -> str:
  """Downloads a LIBSVM data set into ``cache_dir`` and returns its path.

  The file is written to a temporary file in ``cache_dir`` and moved into
  place only after it has been checked: a known data set must match its size
  and SHA-256 (recorded in the library for ``"diabetes"`` and
  ``"fourclass"``, whatever ``url`` serves it), a file
  with ``sha256`` given must match that, and every file must parse as
  LIBSVM. A failed download (offline, an error page, a tampered file) leaves
  nothing in the cache. Plain ``http://`` is accepted only for files with a
  checksum.

  Args:
    name: a key of ``KNOWN_DATASETS`` (``"diabetes"``, ``"fourclass"``) or,
      with ``url``, any plain file name (no directories).
    cache_dir: directory to store the file in (created if needed).
    url: where to download from (default: the public LIBSVM site);
      ``https://``, ``http://`` or ``file://``.
    timeout: seconds before giving up.
    sha256: expected SHA-256 (hex) of the file without its end-of-file white
      space; defaults to the known digest of a known data set.

  Returns:
    The path of the downloaded file.

  Examples:
    >>> import pathlib, tempfile
    >>> from jaxbilevel import datasets
    >>> url = pathlib.Path(datasets.sample_path("fourclass")).as_uri()
    >>> path = datasets.download("four.txt", tempfile.mkdtemp(), url=url)
    >>> datasets.load_libsvm(path)[0].shape
    (32, 2)
  """
  known = name in KNOWN_DATASETS
  if url is None:
    if not known:
      raise DatasetError(
          f"unknown data set {name!r}: known ones are "
          f"{sorted(KNOWN_DATASETS)}; pass url= for others.")
    url = LIBSVM_URL + KNOWN_DATASETS[name][0]
  cache_dir = os.fspath(cache_dir)
  target = _cache_target(cache_dir, _ALIASES[name][0] if known else name)
  if sha256 is not None:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", str(sha256)):
      raise DatasetError(
          f"download: sha256 must be 64 hexadecimal digits, got {sha256!r}.")
    expected = (None, str(sha256).lower())
  else:
    expected = KNOWN_DIGESTS.get(name)
  scheme = urllib.parse.urlsplit(url).scheme.lower()
  if scheme not in ("https", "http", "file"):
    raise DatasetError(
        f"download: url {url!r} must start with https://, http:// or "
        "file://.")
  if scheme == "http" and expected is None:
    raise DatasetError(
        f"download: {url} is plain http, which anyone on the way can alter, "
        f"and {name!r} has no known checksum; use https or pass sha256=.")
  limit = (MAX_DOWNLOAD_BYTES if expected is None or expected[0] is None
           else expected[0] + 4096)
  os.makedirs(cache_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".download-",
                             suffix=".part")
  try:
    try:
      with os.fdopen(fd, "wb") as out, urllib.request.urlopen(
          url, timeout=timeout) as response:
        size = 0
        while chunk := response.read(1 << 16):
          size += len(chunk)
          if size > limit:
            raise DatasetError(
                f"could not download {name!r} from {url}: it is larger than "
                f"{limit} bytes, more than the file can be; nothing was "
                "cached.")
          out.write(chunk)
    except DatasetError:
      raise
    except (urllib.error.URLError, OSError, ValueError) as err:
      raise DatasetError(
          f"could not download {name!r} from {url} ({err}). If this machine "
          "is offline, download the file elsewhere and pass its path (or a "
          "directory holding it) instead.") from err
    if expected is not None:
      _check_digest(tmp, name, expected, f"the file downloaded from {url}",
                    "It was not cached; the server may have sent an error "
                    "page or an altered file.")
    try:
      parse_libsvm(_read_lines(tmp), source=url, num_features=(
          KNOWN_DATASETS[name][1] if known else None))
    except DatasetError as err:
      raise DatasetError(
          f"the file downloaded from {url} is not a LIBSVM data set, so it "
          f"was not cached: {err}") from err
    os.replace(tmp, target)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
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
  and downloaded there from the LIBSVM site when missing (see
  :func:`download`); when that fails (offline) a :class:`DatasetError` says
  so plainly. A file found in ``cache_dir`` for a name must match the known
  size and SHA-256 of that data set; files given by path or directory are
  taken as they are.

  Args:
    source: file path, directory, or data-set name.
    name: which known data set to look for in a directory.
    cache_dir: where to look for / store named data sets (default
      ``~/.cache/jaxbilevel``).
    num_features: number of columns (default: the known count for a named
      data set, else the largest index seen; see :func:`parse_libsvm`).
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
    cache_dir = os.fspath(cache_dir or os.path.join(
        os.path.expanduser("~"), ".cache", "jaxbilevel"))
    path = _find_in(cache_dir, source)
    if path is None:
      if not download_if_missing:
        raise DatasetError(
            f"{source!r} is not in {cache_dir} and downloading is disabled.")
      path = download(source, cache_dir, url=url)
    else:
      _check_digest(path, name, KNOWN_DIGESTS[name], f"the cached file {path}",
                    "Delete it so that it is downloaded again, or pass its "
                    "path to load it as it is.")
  else:
    raise DatasetError(
        f"{source!r} is neither a file, a directory, nor a known data set "
        f"name ({sorted(KNOWN_DATASETS)}).")
  if num_features is None and name in KNOWN_DATASETS:
    num_features = KNOWN_DATASETS[name][1]
  return parse_libsvm(_read_lines(path), num_features=num_features,
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
