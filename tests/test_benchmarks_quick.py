"""The application benchmark's quick mode, end to end (as CI runs it)."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPS = ("hyper_cleaning", "regularization", "nlsy", "dpo_sft", "sinusoid")


def _finite(value):
  return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  env = dict(os.environ)
  env.pop("JAX_ENABLE_X64", None)
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "run.py"), "--quick",
       "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out / "applications.json") as fh:
    return out, json.load(fh)


def test_every_application_ran_with_finite_numbers(quick_run):
  _, results = quick_run
  assert results["quick"] is True
  assert set(results["applications"]) == set(APPS)
  for name, app in results["applications"].items():
    assert "error" not in app, (name, app.get("error"))
    rows = app["rows"]
    statuses = {row["method"]: row["status"] for row in rows}
    assert not [m for m, s in statuses.items() if s == "failed"], statuses
    timed = [row for row in rows if "final" in row]
    # The floor and every applicable method ran; every other row says why
    # it does not apply.
    assert sum(row["role"] == "method" for row in timed) >= 4, name
    assert timed[0]["role"] == "floor" and timed[0]["floor_ratio"] == 1.0
    for row in timed:
      assert _finite(row["final"]["upper_loss"]), (name, row["method"])
      assert _finite(row["ms_per_step"]) and row["ms_per_step"] > 0
      assert row["compile_seconds"] >= 0
      curve = row["curve"]
      assert len(curve["steps"]) == len(curve["upper_loss"]) >= 2
      assert all(_finite(v) for v in curve["upper_loss"])
      if row["role"] == "method":
        assert _finite(row["floor_ratio"]) and row["floor_ratio"] > 0
        assert row["memory"]["peak"] > 0 and row["memory"]["state"] > 0
    for row in rows:
      if "final" not in row:
        assert row["status"] == "not run" and row["reason"], row
        assert "quick mode" not in row["reason"], row
    assert _finite(app["target"]["target"])


def test_not_applicable_methods_are_listed_with_reasons(quick_run):
  _, results = quick_run
  hyper = {row["method"]: row for row in
           results["applications"]["hyper_cleaning"]["rows"]}
  assert "does not depend on x" in hyper["PBGD-Free"]["reason"]
  sinus = {row["method"]: row for row in
           results["applications"]["sinusoid"]["rows"]}
  assert "query labels" in sinus["PBGD-Free"]["reason"]


def test_markdown_plots_and_sweep(quick_run):
  out, results = quick_run
  table = (out / "README.md").read_text()
  for name in APPS:
    assert f"## {name}" in table
  assert "PBGD-Free" in table and "floor ratio" in table
  sweep = results["sweep"]
  assert sweep["points"] >= 256
  assert _finite(sweep["speedup"]) and sweep["speedup"] > 0
  assert sweep["max_abs_difference_upper_loss"] < 1e-3
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    pytest.skip("matplotlib (optional) is not installed: no plots")
  for name in APPS:
    png = out / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"({name}.png)" in table


def test_nlsy_parity_gap_and_sinusoid_implicit_check(quick_run):
  _, results = quick_run
  nlsy_rows = [row for row in results["applications"]["nlsy"]["rows"]
               if "final" in row]
  for row in nlsy_rows:
    assert 0.0 <= row["final"]["parity_gap"] <= 1.0
  check = results["sinusoid_implicit"]
  assert [row["proximal"] for row in check] == [1.0, 20.0]
  for row in check:
    assert row["relative_residual"] >= 0
    assert -1.0 <= row["cos_aid_itd"] <= 1.0
    assert -1.0 <= row["cos_fo_itd"] <= 1.0
  # lambda = 1/(r alpha) makes the lower Hessian positive definite here: CG
  # converges and AID points where exact MAML does.
  assert check[1]["relative_residual"] < 1e-3
  assert check[1]["cos_aid_itd"] > 0.9

