"""The overhead benchmark's quick mode, end to end (as CI runs it)."""

import json
import math
import os

import jax
import numpy as np
import pytest

from _helpers import ROOT
from _helpers import overhead_benchmark
from _helpers import run_benchmark_quick as _run_benchmark_quick

METHODS = ("PBGD-Free", "ALT-PBGD", "V-PBGD", "BOME", "F2SA", "AID", "ITD")
ROW_KEYS = {"method", "ms_per_step", "hand_ms_per_step", "time_ratio",
            "mflops_per_step", "hand_mflops_per_step", "flops_ratio",
            "chunk_check_mflops", "mbytes_per_step", "bytes_ratio",
            "floor_ratio", "compile_s",
            "hand_compile_s", "hand_constants_ms_per_step",
            "time_ratio_constants", "user_update_ms_per_step",
            "user_update_ratio", "user_step_ratio", "scan_run_ratio",
            "diagnostics_ratio", "hand_record_ratio", "user_update_ratio_iqr",
            "user_step_ratio_iqr", "time_ratio_iqr"}


def _positive(value):
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  return _run_benchmark_quick("overhead.py", tmp_path_factory,
                              "overhead_quick.json")


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_rows_have_every_column(quick):
  _, result = quick
  assert result["quick"] is True and result["machine"]["cpu_count"] >= 1
  (bench,) = result["problems"].values()
  assert [row["method"] for row in bench["rows"]] == list(METHODS)
  for row in bench["rows"]:
    assert set(row) == ROW_KEYS, row
    spreads = {k for k in ROW_KEYS if k.endswith("_iqr")}
    for key in ROW_KEYS - {"method", "compile_s", "hand_compile_s"} - spreads:
      assert _positive(row[key]), (row["method"], key, row[key])
    for key in spreads:  # the quartiles of the per-round ratios
      q1, q3 = row[key]
      assert _positive(q1) and q1 <= q3, (row["method"], key, row[key])
    assert row["time_ratio"] == pytest.approx(
        row["ms_per_step"] / row["hand_ms_per_step"])
    assert row["flops_ratio"] == pytest.approx(
        row["mflops_per_step"] / row["hand_mflops_per_step"])
    # No work beyond the hand-written step: the driver takes a method's new
    # params directly (no difference added back), and values used only for
    # the record are not computed.
    assert row["flops_ratio"] <= 1.001, row
  assert _positive(bench["floor"]["ms_per_step"])


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_sweep_agrees_with_the_hand_written_vmap(quick):
  _, result = quick
  (sweep,) = result["sweep"]
  assert sweep["points"] == 16
  recorded = {"none": [], "f": ["f"],
              "all": ["f", "g", "gamma", "lower_grad_norm", "upper_grad_norm"]}
  for history, names in recorded.items():
    row = sweep[history]
    assert _positive(row["ratio"]) and row["recorded"] == names, row
    # The same iterates and the same recorded values as the hand version.
    assert row["max_abs_difference"] < 1e-5, (history, row)


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_no_compilation_in_a_loop_over_gamma(quick):
  out, result = quick
  count = result["compile_count"]
  assert len(count["programs_compiled"]) == 5
  assert count["programs_compiled"][0] >= 1     # the first call compiles
  assert count["compilations_after_first"] == 0
  assert count["backend_compiles"][1:] == [0, 0, 0, 0]
  table = (out / "overhead_quick.md").read_text()
  assert "| method | jbl.run ms/step |" in table and "**0**" in table


def test_hand_twin_with_traced_hyperparameters_computes_the_same_run():
  # The benchmark's hand-written twin takes gamma (eta, the tolerance) as an
  # argument, as jbl.run's program does; it must run the same algorithm as
  # the version with the constants compiled in.
  bench = overhead_benchmark()
  prob = bench.quadratic_problem(50)
  for method in bench.METHODS:
    twin, _ = bench.hand_twin(method, prob, 7)
    init, step = bench.hand_method(method, prob)
    constants = bench.hand_program(init, step, 7)(prob["params"],
                                                  prob["batch"])
    for a, b in zip(jax.tree.leaves(twin()), jax.tree.leaves(constants)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5,
                                 atol=1e-6, err_msg=method)


def test_committed_results_meet_the_targets():
  # benchmarks/results/overhead.json, as the README quotes it: every method's
  # jbl.run within 5% of its hand-written twin in time and FLOPs, sweeps
  # within 20% of a hand-written jit(vmap(scan)), no recompilation in a loop.
  with open(os.path.join(ROOT, "benchmarks", "results", "overhead.json")) as fh:
    result = json.load(fh)
  assert not result["quick"] and result["sweep"]
  for bench in result["problems"].values():
    for row in bench["rows"]:
      assert row["time_ratio"] <= 1.05, row
      assert row["flops_ratio"] <= 1.05, row
  for sweep in result["sweep"]:
    for history in ("none", "f", "all"):
      assert sweep[history]["ratio"] <= 1.2, (sweep["points"], history)
  assert result["compile_count"]["compilations_after_first"] == 0
