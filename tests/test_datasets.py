"""LIBSVM loader, diabetes expansion and splits of the SVM benchmark."""

import os
import urllib.error
import urllib.request

import numpy as np
import pytest

from jaxbilevel import datasets

# The real files: $JAXBILEVEL_DATA, else the shared folder, else skipped.
DATA_DIR = os.environ.get("JAXBILEVEL_DATA", "/work/shared/data")
HAS_DATA = os.path.isfile(
    os.path.join(DATA_DIR, "diabetes_libsvm_scaled.txt")) and os.path.isfile(
        os.path.join(DATA_DIR, "fourclass_libsvm.txt"))
needs_data = pytest.mark.skipif(
    not HAS_DATA, reason=f"real LIBSVM files not found in {DATA_DIR} "
    "(set JAXBILEVEL_DATA)")


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
