"""benchmarks/gamma_auto.py: its quick mode, and the committed results' targets."""

import json
import math
import os

import pytest

from _helpers import ROOT
from _helpers import run_benchmark_quick as _run_benchmark_quick

# The default cap of gamma="auto": 100 x its start; 10 x for V-PBGD.
CAP = {"alt_pbgd": 100.0, "v_pbgd": 10.0}


def _load(name="gamma_auto.json"):
  with open(os.path.join(ROOT, "benchmarks", "results", name)) as fh:
    return json.load(fh)


def test_committed_results_meet_the_targets():
  result = _load()
  assert not result["quick"] and result["num_steps"] == 10000
  assert set(result["problems"]) == {
      "ridge_toy", "ridge_diabetes", "logistic_breast_cancer",
      "mlp_breast_cancer", "random_quadratic_0", "random_quadratic_1", "quadratic_a8"}
  for name, prob in result["problems"].items():
    for method in ("alt_pbgd", "v_pbgd"):
      row = prob[method]
      auto = row["auto"]
      # gamma grew from its start, by the default factor, up to its cap.
      assert auto["increases"] >= 1 and auto["gamma_last"] > auto[
          "gamma_first"]
      assert auto["gamma_last"] <= CAP[method] * auto["gamma_first"] * (
          1 + 1e-9)
      # At most 2x the time of one fixed-gamma run of the same length.
      assert 0 < row["cost"]["ratio"] <= 2.0, (name, method, row["cost"])
      # Within 2% of the best (grid or exact) value.
      assert -1e-6 <= auto["gap"] <= 0.02, (name, method, auto)


def test_committed_gamma_check_and_choices():
  result = _load()
  for name, rows in result["gamma_check"].items():
    assert not rows["auto"]["warned"], name
    assert rows["auto"]["disagreement"] < 0.02
    # gamma = 10 warns exactly where its disagreement is above 2%.
    assert rows["gamma=10"]["warned"] == (
        rows["gamma=10"]["disagreement"] > 0.02), name
  assert result["gamma_check"]["logistic_breast_cancer"]["gamma=10"][
      "warned"]
  picks = {name: row["method"] for name, row in
           result["choose_method"].items()}
  assert picks == {"dpo_sft_toy": "pbgd_free", "negative_example": "alt_pbgd",
                   "quadratic_a8": "alt_pbgd",
                   "random_quadratic_0": "alt_pbgd",
                   "random_quadratic_1": "alt_pbgd", "ridge": "alt_pbgd"}
  assert result["choose_method"]["ridge"]["probe_steps"] == 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  return _run_benchmark_quick("gamma_auto.py", tmp_path_factory,
                              "gamma_auto_quick.json")


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_quick_mode_runs_end_to_end(quick):
  out, result = quick
  assert result["quick"] is True and result["num_steps"] == 1000
  assert set(result["problems"]) == {"ridge_toy", "random_quadratic_0"}
  for prob in result["problems"].values():
    alt = prob["alt_pbgd"]["auto"]
    assert math.isfinite(alt["F"]) and alt["gap"] <= 0.02
    assert prob["alt_pbgd"]["cost"]["ratio"] > 0
  assert result["choose_method"]["dpo_sft_toy"]["method"] == "pbgd_free"
  assert "| problem | best F (from) |" in (
      out / "gamma_auto_quick.md").read_text()


def _guide():
  with open(os.path.join(ROOT, "docs", "choosing_gamma.md")) as fh:
    return fh.read()


def test_guide_numbers_come_from_the_results_file():
  result = _load()
  text = " ".join(_guide().split())
  logistic = result["problems"]["logistic_breast_cancer"]
  alt = logistic["alt_pbgd"]
  check = result["gamma_check"]["logistic_breast_cancer"]
  quoted = [
      f"F={logistic['F_best'] + logistic['F_best'] * alt['gamma=10']['gap']:.5f}",
      f"**{alt['gamma=10']['gap']:.2%} above** the grid's best "
      f"${logistic['F_best']:.5f}$",
      f"f at the method's y is {check['gamma=10']['f_at_iterate']:.6g}",
      f"re-fitted lower solution is "
      f"{check['gamma=10']['f_at_lower_solution']:.6g}",
      f"(relative disagreement {check['gamma=10']['disagreement']:.3g};",
      f"$\\gamma_0={alt['auto']['gamma_first']:.2f}$",
      f"cap ${alt['auto']['gamma_last']:.0f}$",
      f"disagreement {check['auto']['disagreement']:.2g}",
  ]
  for name, label in (("ridge_toy", "ridge (`jbl.problems.ridge`)"),
                      ("ridge_diabetes", "ridge, diabetes"),
                      ("logistic_breast_cancer", "logistic, breast cancer"),
                      ("mlp_breast_cancer", "MLP (flax.nnx), breast cancer"),
                      ("random_quadratic_0", "random quadratic, seed 0"),
                      ("random_quadratic_1", "random quadratic, seed 1"),
                      ("quadratic_a8", "`quadratic_a8`")):
    prob = result["problems"][name]
    quoted.append(
        f"| {label} | {prob['alt_pbgd']['auto']['gap']:.2%} | "
        f"{prob['v_pbgd']['auto']['gap']:.2%} | "
        f"{prob['alt_pbgd']['gamma=10']['gap']:.2%} / "
        f"{prob['v_pbgd']['gamma=10']['gap']:.2%} |")
  for method, label in (("alt_pbgd", "ALT-PBGD"), ("v_pbgd", "V-PBGD")):
    ratios = [prob[method]["cost"]["ratio"]
              for prob in result["problems"].values()]
    quoted.append(f"{min(ratios):.2f}–{max(ratios):.2f} for {label}")
  toy = result["problems"]["ridge_toy"]["v_pbgd"]
  quoted += [f"(on the ridge toy at 10,000 steps: {toy['auto']['gap']:.2%}",
             f"cap of $10\\gamma_0$, {toy['auto_cap100']['gap']:.2%} with",
             f"V-PBGD ends {toy['auto_cap100']['gap']:.2%} away there"]
  real = [result["problems"][name]["alt_pbgd"]["cost"]["ratio"]
          for name in ("ridge_diabetes", "logistic_breast_cancer",
                       "mlp_breast_cancer")]
  quoted.append(f"ALT-PBGD's ratio is {real[0]:.2f}, {real[1]:.2f} and "
                f"{real[2]:.2f}")
  mlp = result["problems"]["mlp_breast_cancer"]
  mlp_check = result["gamma_check"]["mlp_breast_cancer"]["gamma=10"]
  quoted += [
      f"there V-PBGD's is {mlp['v_pbgd']['cost']['ratio']:.2f})",
      f"V-PBGD's: {mlp['v_pbgd']['auto']['gap']:.2%} on the MLP",
      f"(106 values of $x$; every re-fit's gradient norm below "
      f"{mlp['refit_grad_norm']:.2g})",
      f"best $F={mlp['F_best']:.5f}$ at $x={mlp['x_best']:.2f}$, against "
      f"${mlp['F_start']:.5f}$ at the start",
      f"ends **{mlp['alt_pbgd']['auto']['gap']:.2%} from that best**, "
      f"against {mlp['alt_pbgd']['gamma=10']['gap']:.2%} at",
      f"V-PBGD with `\"auto\"` ends {mlp['v_pbgd']['auto']['gap']:.2%} from",
      f"f at the method's y is {mlp_check['f_at_iterate']:.6g} but f at",
      f"$\\gamma_0={mlp['alt_pbgd']['auto']['gamma_first']:.2f}$",
      f"cap ${mlp['alt_pbgd']['auto']['gamma_last']:.0f}$ and ends at "
      f"$x={mlp['alt_pbgd']['auto']['x']:.2f}$"]
  for name, row in result["choose_method"].items():
    if row["bias_ratio"] is not None:
      assert f"{row['bias_ratio']:.2g}" in text or (
          f"{row['bias_ratio']:.3g}" in text), (name, row["bias_ratio"])
  for phrase in quoted:
    assert phrase in text, phrase


@pytest.mark.slow
@pytest.mark.parametrize("example", [2, 3], ids=["logistic", "mlp"])
def test_guide_example_runs_and_prints_the_quoted_numbers(capsys, example):
  text = _guide()
  block = text.split("```python\n")[example].split("```")[0]
  with pytest.warns(Warning) as caught:
    exec(compile(block, "docs/choosing_gamma.md", "exec"), {})  # pylint: disable=exec-used
  import jaxbilevel as jbl  # pylint: disable=import-outside-toplevel
  penalty = [w for w in caught if issubclass(w.category,
                                             jbl.PenaltyGapWarning)]
  assert len(penalty) == 1  # gamma = 10 warns, "auto" does not
  out = capsys.readouterr().out
  for line in out.strip().splitlines()[-2:]:
    assert " ".join(line.split()[1:]) in text, line
