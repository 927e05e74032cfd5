"""The per-method LLM memory benchmark (benchmarks/llm_memory.py).

``--quick`` runs PBGD-Free and ALT-PBGD on a tiny random Llama, each in its
own process; the test checks the JSON and the state sizes: the value tracker
of ALT-PBGD (a copy ``y_g`` of the head plus the Adam state that moves it) is
exactly three copies of ``y``, which PBGD-Free does not hold. The committed
results (benchmarks/results/llm_memory.json) are checked for the same
relation for every value-function method, and their table regenerates from
the JSON.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "llm_memory.py"
RESULTS = ROOT / "benchmarks" / "results" / "llm_memory.json"
METHODS = ("pbgd_free", "alt_pbgd", "v_pbgd", "bome", "f2sa", "alright")
VALUE_FUNCTION = ("alt_pbgd", "v_pbgd", "bome", "f2sa")
ROW_KEYS = ("state_bytes", "y_bytes", "y_g_bytes",
            "value_optimizer_state_bytes", "value_tracker_bytes",
            "argument_bytes", "output_bytes", "temp_bytes", "alias_bytes",
            "ru_maxrss_bytes", "rss_after_build_bytes", "peak_rss_delta_bytes",
            "peak_steps_delta_bytes", "compile_seconds")


def _check_value_tracker(rows):
  by = {r["method"]: r for r in rows}
  free = by["pbgd_free"]
  y = free["y_bytes"]
  assert y > 0 and free["y_g_bytes"] == 0 and free["value_tracker_bytes"] == 0
  for name in VALUE_FUNCTION:
    if name not in by:
      continue
    row = by[name]
    assert row["y_bytes"] == y
    # y_g is one copy of y; its Adam state (the lower optimizer) two more.
    assert row["y_g_bytes"] == y
    assert row["value_optimizer_state_bytes"] >= 2 * y
    assert row["state_bytes"] - free["state_bytes"] >= y, name
    assert row["state_bytes"] - free["state_bytes"] >= row[
        "value_tracker_bytes"], name
    # The state is an input and an output of the step: the arguments grow
    # by the value tracker too (same model, batch and frozen weights).
    assert row["argument_bytes"] - free["argument_bytes"] >= row[
        "value_tracker_bytes"], name


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_quick_run(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), "--quick", "--growth-methods", "none",
       "--out", str(tmp_path)], env=env, capture_output=True, text=True,
      timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  data = json.loads((tmp_path / "llm_memory.json").read_text())
  assert data["benchmark"] == "llm_memory"
  assert data["machine"]["cpu_count"] >= 1
  (result,) = data["results"]
  assert result["config"] == "quick" and result["quick"] is True
  problem = result["problem"]
  assert problem["vocab_size"] == 256 and problem["hidden_size"] == 32
  assert problem["seq_len"] == 16
  # The head y is vocab x width float32.
  assert problem["y_params"] == 256 * 32
  assert problem["y_bytes"] == 4 * 256 * 32
  rows = result["rows"]
  assert [r["method"] for r in rows] == ["pbgd_free", "alt_pbgd"]
  for row in rows:
    for key in ROW_KEYS:
      assert isinstance(row[key], (int, float)), (row["method"], key)
    assert row["argument_bytes"] > problem["frozen_bytes"]
    assert row["temp_bytes"] > 0 and row["output_bytes"] > 0
    # The process's peak includes the resident memory after the build.
    assert row["ru_maxrss_bytes"] >= row["rss_after_build_bytes"]
    assert len(row["step_seconds"]) == 2
  _check_value_tracker(rows)
  by = {r["method"]: r for r in rows}
  # Three copies of y (y_g and Adam's two moments) and Adam's int32 count.
  assert by["alt_pbgd"]["value_tracker_bytes"] == 3 * problem["y_bytes"] + 4
  text = (tmp_path / "llm_memory.md").read_text()
  assert "| PBGD-Free |" in text and "| ALT-PBGD |" in text


def test_committed_results():
  data = json.loads(RESULTS.read_text())
  configs = {r["config"]: r for r in data["results"]}
  assert "default" in configs
  for result in data["results"]:
    assert result["quick"] is False
    rows = result["rows"]
    assert sorted(r["method"] for r in rows) == sorted(METHODS)
    for row in rows:
      for key in ROW_KEYS:
        assert isinstance(row[key], (int, float)), (row["method"], key)
    _check_value_tracker(rows)
    growth = result.get("growth")
    if result["config"] == "default":
      assert growth is not None
    if growth is None:
      continue
    assert len(growth["vocab_sizes"]) == 3 and len(growth["seq_lens"]) == 3
    for name in {r["method"] for r in growth["rows"]}:
      mine = [r for r in growth["rows"] if r["method"] == name]
      heads = sorted({(r["head_params"], r["state_bytes"]) for r in mine
                      if r["seq_len"] == growth["base_seq_len"]})
      # The state grows with the head; not with the sequence length.
      assert len(heads) == 3
      assert all(a[1] < b[1] for a, b in zip(heads, heads[1:]))
      by_len = sorted((r["seq_len"], r["state_bytes"], r["temp_bytes"])
                      for r in mine
                      if r["vocab_size"] == growth["base_vocab_size"])
      assert len(by_len) == 3 and len({s for _, s, _ in by_len}) == 1
      assert all(a[2] < b[2] for a, b in zip(by_len, by_len[1:]))
    for point in {(r["vocab_size"], r["seq_len"]) for r in growth["rows"]}:
      _check_value_tracker([r for r in growth["rows"]
                            if (r["vocab_size"], r["seq_len"]) == point])


def test_committed_table_regenerates(tmp_path):
  copy = tmp_path / "llm_memory.json"
  shutil.copy(RESULTS, copy)
  subprocess.run([sys.executable, str(SCRIPT), "--markdown", str(copy)],
                 check=True, capture_output=True)
  assert (tmp_path / "llm_memory.md").read_text() == (
      RESULTS.with_suffix(".md").read_text())
