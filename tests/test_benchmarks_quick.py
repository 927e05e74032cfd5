"""The application benchmark's quick mode, end to end (as CI runs it)."""

import math
import os
import sys

import pytest

from _helpers import run_benchmark_quick as _run_benchmark_quick

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPS = ("hyper_cleaning", "regularization", "nlsy", "dpo_sft", "sinusoid")
# Tables that do not read the application (the others need its data).
APP_FREE_TABLES = ("nlsy", "dpo_sft")


def _methods_module():
  """``benchmarks/apps/methods.py`` (the benchmark is not an installed package)."""
  path = os.path.join(REPO, "benchmarks")
  if path not in sys.path:
    sys.path.insert(0, path)
  from apps import methods  # pylint: disable=import-outside-toplevel
  return methods


def _finite(value):
  return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  return _run_benchmark_quick("run.py", tmp_path_factory,
                              "applications.json")


@pytest.mark.slow  # run by .ci/run (step 1b)
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


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_not_applicable_methods_are_listed_with_reasons(quick_run):
  _, results = quick_run
  hyper = {row["method"]: row for row in
           results["applications"]["hyper_cleaning"]["rows"]}
  assert "does not depend on x" in hyper["PBGD-Free"]["reason"]
  sinus = {row["method"]: row for row in
           results["applications"]["sinusoid"]["rows"]}
  assert "query labels" in sinus["PBGD-Free"]["reason"]


@pytest.mark.slow  # run by .ci/run (step 1b)
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


@pytest.mark.slow  # run by .ci/run (step 1b)
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


def _as_tuple(value, methods):
  """A table argument as the nested tuples the recorders below produce."""
  if isinstance(value, methods.Call):
    return (value.fn.__name__, tuple(_as_tuple(a, methods) for a in value.args),
            {k: _as_tuple(v, methods) for k, v in (value.kwargs or {}).items()})
  return value


def _recorder(name):
  return lambda *args, **kwargs: (name, args, kwargs)


@pytest.mark.parametrize("app", APP_FREE_TABLES)
def test_settings_text_reads_back_as_the_arguments(app):
  # The settings text is generated from the table's arguments: evaluated as
  # Python (with each factory recording its call) it gives them back.
  methods = _methods_module()
  rows = [row for row in methods.METHOD_TABLES[app](None) if row.constructor]
  assert len(rows) >= 6
  for row in rows:
    text = row.settings.split("; ")[0]
    factories = {}
    for value in row.kwargs.values():
      stack = [value]
      while stack:
        v = stack.pop()
        if isinstance(v, methods.Call):
          factories[v.fn.__name__] = _recorder(v.fn.__name__)
          stack += list(v.args) + list((v.kwargs or {}).values())
    # pylint: disable-next=eval-used
    parsed = eval(f"dict({text})", {"__builtins__": {"dict": dict}},
                  factories)
    assert parsed == {k: _as_tuple(v, methods) for k, v in row.kwargs.items()}
    assert row.note == "" or "=" not in row.note, row.note


def test_settings_text_format_and_unknown_argument():
  methods = _methods_module()
  import optax  # pylint: disable=import-outside-toplevel
  import jaxbilevel as jbl  # pylint: disable=import-outside-toplevel
  row = methods.method(
      "ALT-PBGD", jbl.alt_pbgd, gamma=10.0, inner_steps=5,
      upper_optimizer=methods.call(optax.adam, 1e-3),
      lower_optimizer=methods.call(
          optax.chain, methods.call(optax.clip_by_global_norm, 1.0),
          methods.call(optax.sgd, 0.5, momentum=0.9)))
  assert row.settings == (
      "gamma=10, inner_steps=5, upper_optimizer=adam(0.001), "
      "lower_optimizer=chain(clip_by_global_norm(1), sgd(0.5, momentum=0.9))")
  assert methods.format_value(1e-8) == "1e-08"
  assert methods.format_value(0.123456789) == "0.123456789"
  with pytest.raises(TypeError, match="has no parameter .'gama'."):
    methods.method("ALT-PBGD", jbl.alt_pbgd, gama=10.0)
  with pytest.raises(TypeError, match="record it as call"):
    methods.format_value(object())


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_report_settings_are_the_tables(quick_run):
  _, results = quick_run
  methods = _methods_module()
  for app in APP_FREE_TABLES:
    table = {row.name: row.settings for row in methods.METHOD_TABLES[app](None)
             if row.constructor}
    rows = {row["method"]: row["settings"]
            for row in results["applications"][app]["rows"]
            if row["role"] in ("floor", "method") and "final" in row}
    assert rows == table


def test_nlsy_data_come_from_the_data_folder_or_the_shipped_sample(tmp_path):
  """``--data-dir`` / ``$JAXBILEVEL_DATA`` (resolved by run.py), else the sample.

  The notes written into the results name the file, never a folder of the
  machine.
  """
  import argparse  # pylint: disable=import-outside-toplevel
  _methods_module()  # puts benchmarks/ on sys.path
  from apps import config  # pylint: disable=import-outside-toplevel
  from jaxbilevel.applications import nlsy  # pylint: disable=import-outside-toplevel

  def build(data_dir, quick=False):
    args = argparse.Namespace(seed=0, quick=quick, data_dir=data_dir,
                              data_dir_given=data_dir is not None)
    app, notes = config.build_app("nlsy", config.QUICK, args)
    assert str(tmp_path) not in notes["data"]
    return app.info["rows"], notes["data"]

  assert build(None) == (200, "no data folder (--data-dir or JAXBILEVEL_DATA)"
                         ": ran on the 200-row sample shipped with jaxbilevel")
  rows, note = build(str(tmp_path))
  assert rows == 200 and note.startswith("nlsy79_processed.csv not in the")
  # A full file (here: the sample's first 150 rows under the full file's name).
  lines = open(nlsy.sample_path(), encoding="utf-8").read().splitlines()
  (tmp_path / "nlsy79_processed.csv").write_text("\n".join(lines[:151]) + "\n")
  assert build(str(tmp_path)) == (
      150, "nlsy79_processed.csv (the full NLSY79 file, from the data folder)")
  # Quick mode keeps the sample unless --data-dir is given.
  args = argparse.Namespace(seed=0, quick=True, data_dir=str(tmp_path),
                            data_dir_given=False)
  assert config.build_app("nlsy", config.QUICK, args)[0].info["rows"] == 200
