"""Untrusted data files and downloads: refused with file and line."""

import contextlib
import functools
import hashlib
import http.server
import os
import pathlib
import threading

import numpy as np
import pytest

import jaxbilevel as jbl
from jaxbilevel import datasets
from jaxbilevel._src import datasets as datasets_src
from jaxbilevel.applications import nlsy

DATA_DIR = os.environ.get("JAXBILEVEL_DATA", "/work/shared/data")
REAL_DIABETES = os.path.join(DATA_DIR, "diabetes_libsvm_scaled.txt")
REAL_FOURCLASS = os.path.join(DATA_DIR, "fourclass_libsvm.txt")
needs_data = pytest.mark.skipif(
    not (os.path.isfile(REAL_DIABETES) and os.path.isfile(REAL_FOURCLASS)),
    reason=f"real LIBSVM files not found in {DATA_DIR} (set JAXBILEVEL_DATA)")

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


# ---------------------------------------------------------------------------
# Downloads (finding 3).
# ---------------------------------------------------------------------------


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
# LIBSVM files (finding 5).
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


# ---------------------------------------------------------------------------
# NLSY CSV files (finding 5).
# ---------------------------------------------------------------------------


def _nlsy_lines():
  with open(nlsy.sample_path(), encoding="utf-8") as fh:
    return fh.read().splitlines()


def _edit(lines, line, column, value):
  """Sets a cell (1-based line number, column name)."""
  header = lines[0].split(",")
  cells = lines[line - 1].split(",")
  cells[header.index(column)] = value
  out = list(lines)
  out[line - 1] = ",".join(cells)
  return out


def _bad_nlsy():
  lines = _nlsy_lines()
  header = lines[0]
  short = list(lines)
  short[4] = short[4].rsplit(",", 2)[0]
  return [
      ("gender 0.7", _edit(lines, 5, "gender", "0.7"),
       "line 5: column 'gender' holds '0.7'; it must be 0 or 1"),
      ("gender 2", _edit(lines, 3, "gender", "2"),
       "line 3: column 'gender' holds '2'"),
      ("income nan", _edit(lines, 7, "income", "nan"),
       "line 7: column 'income' holds 'nan', not a finite"),
      ("income inf", _edit(lines, 7, "income", "-inf"),
       "line 7: column 'income' holds '-inf'"),
      ("income 1e400", _edit(lines, 8, "income", "1e400"),
       "line 8: column 'income' holds '1e400'"),
      ("word in a cell", _edit(lines, 9, "afqt89", "n/a"),
       "line 9: column 'afqt89' holds 'n/a'"),
      ("underscore", _edit(lines, 9, "age", "1_4"),
       "line 9: column 'age' holds '1_4'"),
      ("short row", short, "line 5: the row has 21 cells, the header 23"),
      ("duplicated column", [header + ",income"] + [
          line + ",1" for line in lines[1:]],
       r"line 1: the header names the columns \['income'\] more than once"),
      ("header only", [header], "the file has a header but no data rows"),
      ("empty", [], "the file is empty"),
  ]


@pytest.mark.parametrize("name,lines,message", _bad_nlsy(),
                         ids=[b[0] for b in _bad_nlsy()])
def test_bad_nlsy_csv_names_file_line_and_column(tmp_path, name, lines,
                                                 message):
  del name
  path = tmp_path / "nlsy.csv"
  path.write_text("\n".join(lines) + ("\n" if lines else ""),
                  encoding="utf-8")
  with pytest.raises(jbl.BilevelValidationError,
                     match=f"nlsy.load_csv: '.*nlsy.csv'.*{message}"):
    nlsy.load_csv(path)


def test_nlsy_csv_encodings(tmp_path):
  expected = nlsy.load_csv(nlsy.sample_path())
  text = "\n".join(_nlsy_lines()) + "\n"
  # Excel's "CSV UTF-8" starts with a byte-order mark and ends lines in CRLF.
  path = tmp_path / "excel.csv"
  path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
  got = nlsy.load_csv(path)
  for key, value in expected.items():
    np.testing.assert_array_equal(got[key], value)
    assert got[key].dtype == value.dtype
  path = tmp_path / "latin1.csv"
  path.write_bytes(text.encode() + b"1,2.0,caf\xe9\n")
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"latin1.csv', line 202: not UTF-8 text"):
    nlsy.load_csv(path)
