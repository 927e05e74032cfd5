"""Data sets (jaxbilevel.datasets): the LIBSVM loader, diabetes expansion and
splits of the SVM benchmark, and untrusted files and downloads (refused with
file and line; checksums; nothing bad is cached)."""

import contextlib
import functools
import hashlib
import http.server
import os
import pathlib
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from jaxbilevel import datasets
from jaxbilevel._src import datasets as datasets_src

from _helpers import full_data

# The full LIBSVM files, in the folder $JAXBILEVEL_DATA; without them the
# tests marked needs_data are skipped (the shipped samples cover the rest).
DATA_DIR, needs_data = full_data("diabetes_libsvm_scaled.txt",
                                "fourclass_libsvm.txt")
REAL_DIABETES = os.path.join(DATA_DIR or "", "diabetes_libsvm_scaled.txt")
REAL_FOURCLASS = os.path.join(DATA_DIR or "", "fourclass_libsvm.txt")
HAS_DATA = bool(DATA_DIR) and os.path.isfile(REAL_DIABETES) and os.path.isfile(
    REAL_FOURCLASS)


def _missing_feature_one_lines(path):
  with open(path, encoding="utf-8") as fh:
    return [line for line in fh if line.strip() and " 1:" not in line]


def test_fourclass_sample_is_parsed_by_index():
  path = datasets.sample_path("fourclass")
  z, labels = datasets.load_fourclass(path)
  assert z.shape == (32, 2) and labels.shape == (32,)
  assert set(labels.tolist()) == {-1.0, 1.0}
  missing = _missing_feature_one_lines(path)
  assert len(missing) == 7
  # e.g. '+1 2:0.54386': feature 1 is a sparse zero.
  row = [i for i, line in enumerate(open(path, encoding="utf-8"))
         if line.startswith("+1 2:0.54386")][0]
  np.testing.assert_array_equal(z[row], [0.0, 0.54386])
  assert np.sum(z[:, 0] == 0.0) == 7
  quirk, quirk_labels = datasets.load_fourclass(path, positional_quirk=True)
  np.testing.assert_array_equal(quirk[row], [0.54386, 0.0])
  np.testing.assert_array_equal(quirk_labels, labels)
  moved = np.any(quirk != z, axis=1)
  assert moved.sum() == 7
  np.testing.assert_array_equal(quirk[~moved], z[~moved])


def test_diabetes_sample_and_expansion():
  z8, labels = datasets.load_libsvm(datasets.sample_path("diabetes"))
  assert z8.shape == (30, 8)
  np.testing.assert_allclose(z8[0, :2], [-0.294118, 0.487437])
  assert labels[0] == -1.0
  z, labels2 = datasets.load_diabetes(datasets.sample_path("diabetes"))
  np.testing.assert_array_equal(labels, labels2)
  assert z.shape == (30, 45)
  np.testing.assert_allclose(z[0, :3], [1.0, -0.294118, 0.487437])
  np.testing.assert_allclose(z[0, 17], -0.143364, atol=5e-7)  # x1 * x2
  np.testing.assert_allclose(z[:, 9:17], z8 ** 2)
  # Cross products in lexicographic order (1,2), (1,3), ..., (7,8).
  pairs = [(i, j) for i in range(8) for j in range(i + 1, 8)]
  for k, (i, j) in enumerate(pairs):
    np.testing.assert_allclose(z[:, 17 + k], z8[:, i] * z8[:, j])
  with pytest.raises(datasets.DatasetError, match=r"\(n, 8\)"):
    datasets.diabetes_features(np.ones((3, 7)))


def test_parse_errors_are_clear():
  with pytest.raises(datasets.DatasetError, match="line 2"):
    datasets.parse_libsvm(["+1 1:0.5", "-1 1:abc"])
  with pytest.raises(datasets.DatasetError, match="1-based"):
    datasets.parse_libsvm(["+1 0:0.5"])
  with pytest.raises(datasets.DatasetError, match="num_features"):
    datasets.parse_libsvm(["+1 3:0.5"], num_features=2)
  with pytest.raises(datasets.DatasetError, match="no data"):
    datasets.parse_libsvm(["", "# comment"])
  z, y = datasets.parse_libsvm(["+1 2:1.5 # note", "", "-1 1:2"])
  np.testing.assert_array_equal(z, [[0.0, 1.5], [2.0, 0.0]])
  np.testing.assert_array_equal(y, [1.0, -1.0])


def test_splits_follow_numpy_legacy_rng():
  z, labels = datasets.load_fourclass(datasets.sample_path("fourclass"))
  before_z, before_y = z.copy(), labels.copy()
  np.random.seed(123)
  state = np.random.get_state()[1].copy()
  split = datasets.train_val_test_split(z, labels, seed=3, n_train=20,
                                        n_val=7)
  np.testing.assert_array_equal(np.random.get_state()[1], state)
  np.testing.assert_array_equal(z, before_z)  # inputs untouched
  np.testing.assert_array_equal(labels, before_y)
  assert [len(v) for v in split] == [20, 20, 7, 7, 5, 5]
  # Exactly np.random.seed(seed); np.random.shuffle(rows).
  rows = np.hstack([z, labels[:, None]])
  np.random.seed(3)
  np.random.shuffle(rows)
  np.testing.assert_array_equal(split.x_train, rows[:20, :-1])
  np.testing.assert_array_equal(split.y_val, rows[20:27, -1])
  np.testing.assert_array_equal(split.x_test, rows[27:, :-1])
  # The authors' in-place shuffles compose across seeds.
  fresh = datasets.random_splits(z, labels, [0, 1], 20, 7)
  chained = datasets.random_splits(z, labels, [0, 1], 20, 7, chained=True)
  np.testing.assert_array_equal(fresh[0].x_train, chained[0].x_train)
  assert not np.array_equal(fresh[1].x_train, chained[1].x_train)
  rows = np.hstack([z, labels[:, None]])
  for seed in (0, 1):
    np.random.seed(seed)
    np.random.shuffle(rows)
  np.testing.assert_array_equal(chained[1].y_train, rows[:20, -1])
  with pytest.raises(datasets.DatasetError, match="test set"):
    datasets.train_val_test_split(z, labels, 0, n_train=30, n_val=2)


def test_directory_name_lookup_download_and_offline_error(tmp_path,
                                                          monkeypatch):
  sample_dir = os.path.dirname(datasets.sample_path("fourclass"))
  z, _ = datasets.load_fourclass(sample_dir)  # a directory: found by name
  assert z.shape == (32, 2)
  z, _ = datasets.load_diabetes(sample_dir)
  assert z.shape == (30, 45)
  # "Download" from a file:// URL into a cache directory, then reuse it.
  url = "file://" + datasets.sample_path("diabetes")
  path = datasets.download("diabetes_sample.txt", tmp_path / "cache", url=url)
  assert os.path.basename(path) == "diabetes_sample.txt"
  z, _ = datasets.load_diabetes(path)
  assert z.shape == (30, 45)
  # The sample is not the published "diabetes" file: refused, not cached.
  with pytest.raises(datasets.DatasetError, match="not the 'diabetes' data"):
    datasets.download("diabetes", tmp_path / "cache2", url=url)
  assert os.listdir(tmp_path / "cache2") == []
  if HAS_DATA:  # the real file passes its size and SHA-256 check
    url = "file://" + os.path.join(DATA_DIR, "diabetes_libsvm_scaled.txt")
    path = datasets.download("diabetes", tmp_path / "cache", url=url)
    assert os.path.basename(path) == "diabetes_libsvm_scaled.txt"
    z, _ = datasets.load_diabetes("diabetes", cache_dir=tmp_path / "cache",
                                  download_if_missing=False)
    assert z.shape == (768, 45)
  # Offline: a clear error, and nothing half-written is left behind.

  def offline(*args, **kwargs):
    raise urllib.error.URLError("Temporary failure in name resolution")

  monkeypatch.setattr(urllib.request, "urlopen", offline)
  empty = tmp_path / "empty"
  with pytest.raises(datasets.DatasetError, match="offline"):
    datasets.load_fourclass("fourclass", cache_dir=empty)
  assert os.listdir(empty) == []
  with pytest.raises(datasets.DatasetError, match="downloading is disabled"):
    datasets.load_fourclass("fourclass", cache_dir=empty,
                            download_if_missing=False)
  with pytest.raises(datasets.DatasetError, match="neither"):
    datasets.load_libsvm("no-such-thing")
  with pytest.raises(datasets.DatasetError, match="none of the data files"):
    datasets.load_libsvm(tmp_path / "empty")


@needs_data
def test_real_diabetes_golden_values():
  z, labels = datasets.load_diabetes(DATA_DIR)
  assert z.shape == (768, 45)
  np.testing.assert_allclose(z.sum(), 3542.218985, atol=1e-6)
  np.testing.assert_allclose(z[0, 17], -0.143364, atol=5e-7)
  np.testing.assert_allclose(z[0, :3], [1.0, -0.294118, 0.487437])
  assert (labels == 1).sum() == 500 and (labels == -1).sum() == 268
  split = datasets.train_val_test_split(z, labels, seed=0)
  np.testing.assert_array_equal(split.y_train[:5], [-1, 1, 1, -1, 1])
  np.testing.assert_allclose(np.mean(split.y_train == 1), 0.6460, atol=5e-5)
  assert [len(v) for v in split[::2]] == [500, 150, 118]


@needs_data
def test_real_fourclass_counts_and_quirk():
  path = os.path.join(DATA_DIR, "fourclass_libsvm.txt")
  z, labels = datasets.load_fourclass(path)
  assert z.shape == (862, 2)
  assert (labels == 1).sum() == 307 and (labels == -1).sum() == 555
  assert len(_missing_feature_one_lines(path)) == 7
  assert np.sum(z[:, 0] == 0.0) == 7
  quirk, _ = datasets.load_fourclass(path, positional_quirk=True)
  assert np.sum(np.any(quirk != z, axis=1)) == 7
  assert len(datasets.train_val_test_split(z, labels, 0).y_test) == 212


# ---------------------------------------------------------------------------
# Untrusted downloads.
# ---------------------------------------------------------------------------


HTML_ERROR_PAGE = (b"<!DOCTYPE html><html><head><title>503 Service "
                   b"Unavailable</title></head><body>Try later</body></html>\n")


@contextlib.contextmanager
def _http_server(directory):
  """Serves ``directory`` over plain http on 127.0.0.1 (in a thread)."""
  handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                              directory=str(directory))
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}/"
  finally:
    server.shutdown()
    server.server_close()
    thread.join()


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data.rstrip()).hexdigest()


@pytest.mark.parametrize("name", ["../escaped.txt", "sub/dir.txt", "..", ".",
                                  "/tmp/abs.txt", ""])
def test_download_refuses_names_that_leave_the_cache(tmp_path, name):
  url = pathlib.Path(datasets.sample_path("fourclass")).as_uri()
  cache = tmp_path / "cache"
  with pytest.raises(datasets.DatasetError, match="not a plain file name"):
    datasets.download(name, cache, url=url)
  assert not (tmp_path / "escaped.txt").exists()
  assert not cache.exists() or os.listdir(cache) == []


@needs_data
def test_known_digests_are_those_of_the_libsvm_files():
  for name, path in (("diabetes", REAL_DIABETES),
                     ("fourclass", REAL_FOURCLASS)):
    data = open(path, "rb").read().rstrip()
    assert datasets_src.KNOWN_DIGESTS[name] == (len(data), _sha256(data))
    # The files the known URLs point to (same file names on the site).
    assert datasets.KNOWN_DATASETS[name][0] == f"{name}_scale"


def test_tampered_file_over_http_is_refused_and_not_cached(tmp_path):
  served = tmp_path / "site"
  served.mkdir()
  if os.path.isfile(REAL_DIABETES):  # one digit changed, same size
    data = open(REAL_DIABETES, "rb").read()
    data = data.replace(b"1:-0.294118", b"1:-0.294119", 1)
  else:
    data = open(datasets.sample_path("diabetes"), "rb").read()
  (served / "diabetes_scale").write_bytes(data)
  datasets.parse_libsvm(data.decode().splitlines())  # it parses fine
  cache = tmp_path / "cache"
  with _http_server(served) as site:
    with pytest.raises(datasets.DatasetError,
                       match="not the 'diabetes' data set.*not cached"):
      datasets.load_diabetes("diabetes", cache_dir=cache, url=site +
                             "diabetes_scale")
  assert os.listdir(cache) == []
  with pytest.raises(datasets.DatasetError, match="downloading is disabled"):
    datasets.load_diabetes("diabetes", cache_dir=cache,
                           download_if_missing=False)


@needs_data
def test_genuine_file_over_http_passes_its_checksum(tmp_path):
  served = tmp_path / "site"
  served.mkdir()
  (served / "fourclass_scale").write_bytes(open(REAL_FOURCLASS, "rb").read())
  with _http_server(served) as site:
    z, labels = datasets.load_fourclass(
        "fourclass", cache_dir=tmp_path / "cache", url=site +
        "fourclass_scale")
  assert z.shape == (862, 2) and (labels == 1).sum() == 307
  assert os.listdir(tmp_path / "cache") == ["fourclass_libsvm.txt"]


def test_error_page_is_never_cached(tmp_path):
  served = tmp_path / "site"
  served.mkdir()
  (served / "fourclass_scale").write_bytes(HTML_ERROR_PAGE)
  (served / "mine.txt").write_bytes(HTML_ERROR_PAGE)
  cache = tmp_path / "cache"
  with _http_server(served) as site:
    # A known name: the checksum catches it.
    with pytest.raises(datasets.DatasetError, match="not the 'fourclass'"):
      datasets.load_fourclass("fourclass", cache_dir=cache,
                              url=site + "fourclass_scale")
    # An unknown file over plain http needs a checksum.
    with pytest.raises(datasets.DatasetError, match="plain http.*sha256="):
      datasets.download("mine.txt", cache, url=site + "mine.txt")
    # With the right checksum of the page it downloads, but must parse.
    with pytest.raises(datasets.DatasetError,
                       match=r"not a LIBSVM data set, so it was not cached.*"
                       r"line 1.*'<!DOCTYPE"):
      datasets.download("mine.txt", cache, url=site + "mine.txt",
                        sha256=_sha256(HTML_ERROR_PAGE))
  with pytest.raises(datasets.DatasetError, match="not a LIBSVM data set"):
    datasets.download("mine.txt", cache, url=(served / "mine.txt").as_uri())
  assert os.listdir(cache) == []
  # A later good download of the same name works: nothing was poisoned.
  good = pathlib.Path(datasets.sample_path("fourclass"))
  path = datasets.download("mine.txt", cache, url=good.as_uri(),
                           sha256=_sha256(good.read_bytes()))
  assert datasets.load_libsvm(path)[0].shape == (32, 2)
  with pytest.raises(datasets.DatasetError, match="sha256 must be 64 hex"):
    datasets.download("x.txt", cache, url=good.as_uri(), sha256="abc")
  with pytest.raises(datasets.DatasetError, match="SHA-256"):
    datasets.download("y.txt", cache, url=good.as_uri(), sha256="0" * 64)
  assert sorted(os.listdir(cache)) == ["mine.txt"]


def test_tampered_cached_file_is_refused(tmp_path):
  cache = tmp_path / "cache"
  cache.mkdir()
  (cache / "diabetes_libsvm_scaled.txt").write_bytes(
      open(datasets.sample_path("diabetes"), "rb").read())
  with pytest.raises(datasets.DatasetError,
                     match="cached file .* is not the 'diabetes' data set.*"
                     "Delete it"):
    datasets.load_diabetes("diabetes", cache_dir=cache)
  # Given by path, the same file is the caller's to use.
  assert datasets.load_diabetes(cache / "diabetes_libsvm_scaled.txt")[0].shape \
      == (30, 45)


# ---------------------------------------------------------------------------
# Untrusted LIBSVM files.
# ---------------------------------------------------------------------------


BAD_LIBSVM = [
    ("huge index", "+1 1:0.5\n-1 1000000000:1\n",
     r"line 2: feature index 1000000000 would make a dense 2 x 1000000000 "
     r"matrix \(14\.9 GiB\).*Pass num_features="),
    ("nan value", "+1 1:0.5\n-1 1:nan\n", "line 2: .*'1:nan'.*refused"),
    ("inf value", "+1 1:inf\n", "line 1: .*'1:inf'"),
    ("overflowing value", "+1 1:0.5\n\n-1 2:1e400\n",
     "line 3: the value inf is not finite"),
    ("nan label", "+1 1:0.5\nnan 1:1\n", "line 2: .*label 'nan'"),
    ("overflowing label", "+1 1:0.5\n-1e999 1:1\n",
     "line 2: the label -inf is not finite"),
    ("duplicate index", "+1 1:0.5 2:1 2:3\n",
     "line 1: the line repeats feature index 2"),
    ("decreasing index", "+1 2:0.5 1:1\n",
     "line 1: the line has feature index 1 after 2; indices must increase"),
    ("underscore index", "+1 1_0:0.5\n",
     "line 1: .*'1_0:0.5' is not idx:value"),
    ("non-ASCII digit", "+1 \u0661:0.5\n", "line 1: non-ASCII character"),
    ("qid token", "+1 qid:3 1:0.5\n", "line 1: .*'qid:3' is not idx:value"),
]


@pytest.mark.parametrize("name,text,message", BAD_LIBSVM,
                         ids=[b[0] for b in BAD_LIBSVM])
def test_bad_libsvm_file_names_file_and_line(tmp_path, name, text, message):
  del name
  path = tmp_path / "data.txt"
  path.write_text(text, encoding="utf-8")
  with pytest.raises(datasets.DatasetError, match=f"data.txt, {message}"):
    datasets.load_libsvm(path)


def test_libsvm_encoding_and_width_rules(tmp_path):
  path = tmp_path / "latin1.txt"
  path.write_bytes(b"+1 1:0.5\n-1 1:0.25 # caf\xe9\n")
  with pytest.raises(datasets.DatasetError,
                     match=r"latin1.txt, line 2: not UTF-8 text \(byte 0xe9"):
    datasets.load_libsvm(path)
  # A byte-order mark and CRLF line ends are harmless.
  path = tmp_path / "bom.txt"
  path.write_bytes(b"\xef\xbb\xbf+1 1:0.5 3:2\r\n-1 2:-1\r\n")
  z, y = datasets.load_libsvm(path)
  np.testing.assert_array_equal(z, [[0.5, 0.0, 2.0], [0.0, -1.0, 0.0]])
  np.testing.assert_array_equal(y, [1.0, -1.0])
  # Width rule: up to max(MIN_INFERRED_WIDTH, stored values) inferred; any
  # width with num_features.
  assert datasets_src.MIN_INFERRED_WIDTH == 10_000
  assert datasets.parse_libsvm(["1 10000:2"])[0].shape == (1, 10_000)
  with pytest.raises(datasets.DatasetError, match="at most max.*= 10000"):
    datasets.parse_libsvm(["1 10001:2"])
  z, _ = datasets.parse_libsvm(["1 20000:2"], num_features=20_000)
  assert z.shape == (1, 20_000) and z[0, -1] == 2.0 and z.sum() == 2.0
  with pytest.raises(datasets.DatasetError, match="line 1: feature index 3 > "
                     "num_features=2"):
    datasets.parse_libsvm(["1 3:2"], num_features=2)
  # The quirk still moves the k-th pair to column k.
  z, _ = datasets.parse_libsvm(["1 2:5 4:7"], positional_quirk=True,
                               num_features=4)
  np.testing.assert_array_equal(z, [[5.0, 7.0, 0.0, 0.0]])
