"""The one-command LLM benchmark (benchmarks/llm.py) runs end to end.

``--quick`` fine-tunes a tiny random Llama on the shipped HH-RLHF sample
(64 real pairs) with two methods under a one-second budget per stage; the
test checks the numbers and columns of the JSON / Markdown / PNG outputs.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "llm.py"
METRICS = ("dpo", "sft", "accuracy", "margin", "chosen_reward",
           "rejected_reward")


def _run(args, tmp_path, timeout=300):
  env = dict(os.environ, MPLBACKEND="Agg")
  env.pop("JAX_ENABLE_X64", None)
  env.pop("JAXBILEVEL_DATA", None)  # the data come from the arguments only
  return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path,
                        env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  pytest.importorskip("tokenizers")
  pytest.importorskip("matplotlib")
  out = tmp_path_factory.mktemp("llm")
  proc = _run(["--quick", "--method", "pbgd_free,alright", "--out",
               str(out)], out)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads((out / "llm.json").read_text())
  return out, result, proc


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_json_numbers(quick_run):
  _, result, _ = quick_run
  assert list(result["methods"]) == ["pbgd_free", "alright"]
  # Adapters off = the reference model: DPO is exactly log 2, margin 0, and
  # every pair a tie (accuracy 1/2).
  start = result["start"]
  assert start["dpo"] == pytest.approx(math.log(2.0), abs=1e-6)
  assert start["margin"] == pytest.approx(0.0, abs=1e-6)
  assert start["accuracy"] == pytest.approx(0.5)
  n_eval = result["data"]["eval_pairs_used"]
  assert n_eval == 8 == start["pairs"] == start["sft_sequences"]
  tokens = result["data"]["tokens_per_step"]
  assert tokens == 32 * (2 * 2 + 2)  # max_len * (2 pairs x 2 + 2 SFT)
  beta = result["protocol"]["beta"]
  budget = result["protocol"]["budget_seconds"]
  rounds = result["protocol"]["rounds"]
  floor = result["timing"]["floor"]["seconds"]
  mm_rate = result["timing"]["matmul_flops_per_second"]
  assert len(floor) == rounds == 3
  refit_steps = {row["stage2_run"]["steps"] for row in
                 result["methods"].values()}
  assert refit_steps == {result["protocol"]["refit_steps"]}  # equal for all
  for name, row in result["methods"].items():
    for stage in ("stage1", "stage2"):
      values, items = row[stage], row[stage + "_items"]
      assert set(METRICS) <= set(values)
      assert all(math.isfinite(values[k]) for k in METRICS)
      # Accuracy is a fraction of the eval pairs (a tie counts 1/2).
      assert 2 * values["accuracy"] * n_eval == pytest.approx(
          round(2 * values["accuracy"] * n_eval), abs=1e-9)
      assert values["margin"] == pytest.approx(
          values["chosen_reward"] - values["rejected_reward"], abs=1e-6)
      # The DPO loss is the mean of softplus(-margin) >= softplus(-mean).
      assert values["dpo"] >= math.log1p(math.exp(-values["margin"])) - 1e-6
      # The errors are those of a mean over the held-out pairs.
      margin = beta * (np.array(items["chosen"]) - np.array(items["rejected"]))
      dpo = np.logaddexp(0.0, -margin)
      assert values["dpo"] == pytest.approx(dpo.mean(), rel=1e-9)
      assert values["dpo_se"] == pytest.approx(
          dpo.std(ddof=1) / math.sqrt(n_eval), rel=1e-9)
      sft = np.sum(items["sft_sum"]) / np.sum(items["sft_count"])
      assert values["sft"] == pytest.approx(sft, rel=1e-9)
      assert values["sft_se"] > 0
    run = row["stage1_run"]
    timing = row["timing"]
    per_step = timing["step"]["median"]
    assert per_step == pytest.approx(float(np.median(timing["seconds"])))
    # Equal budgets: steps x median step time is the budget, to a chunk.
    assert run["steps"] % run["chunk"] == 0 and run["stopped"] is None
    assert run["budget_seconds"] == pytest.approx(run["steps"] * per_step)
    assert abs(run["budget_seconds"] - budget) <= run["chunk"] * per_step
    assert len(run["chunk_wall_seconds"]) == run["steps"] // run["chunk"]
    # Curves: one point per chunk, starting at the base model.
    curve = run["curve"]
    assert [c["step"] for c in curve] == list(
        range(0, run["steps"] + 1, run["chunk"]))
    assert curve[0]["dpo"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert curve[-1]["dpo"] == pytest.approx(row["stage1"]["dpo"], rel=1e-6)
    ratios = [a / b for a, b in zip(timing["seconds"], floor)]
    assert timing["floor_ratio"]["median"] == pytest.approx(
        float(np.median(ratios)))
    assert timing["flops"] > 0 and timing["compile_seconds"] > 0
    assert timing["fraction_of_matmul"] == pytest.approx(
        timing["flops"] / per_step / mm_rate)
    paired = row["paired_vs_pbgd_free"]["stage2_dpo"]
    if name == "pbgd_free":
      assert paired["mean"] == 0.0
    else:
      s2 = [row["stage2"]["dpo"], result["methods"]["pbgd_free"]["stage2"][
          "dpo"]]
      assert paired["mean"] == pytest.approx(s2[0] - s2[1], abs=1e-9)
  assert result["process_peak_rss_bytes"] > 0
  # PBGD-Free's adapter steps on DPO lower the held-out DPO loss.
  assert result["methods"]["pbgd_free"]["stage1"]["dpo"] < math.log(2.0)


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_markdown_table_and_png(quick_run):
  out, result, proc = quick_run
  text = (out / "llm.md").read_text()
  assert text.strip() == proc.stdout.strip()  # printed and written
  assert ("| method | steps | S1 DPO | S1 SFT | S2 DPO | S2 SFT | S2 pref. "
          "acc. | S2 reward margin | S2 DPO paired vs PBGD-Free |") in text
  assert "floor ratio" in text and "of matmul rate" in text
  assert "**1 s**" in text  # the budget is stated
  for row in result["methods"].values():
    a, b = row["stage1"], row["stage2"]
    line = next(l for l in text.splitlines()
                if l.startswith(f"| {row['label']} | "
                                f"{row['stage1_run']['steps']} |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2:6] == [f"{a['dpo']:.4f} ± {a['dpo_se']:.4f}",
                          f"{a['sft']:.4f} ± {a['sft_se']:.4f}",
                          f"{b['dpo']:.4f} ± {b['dpo_se']:.4f}",
                          f"{b['sft']:.4f} ± {b['sft_se']:.4f}"]
    assert cells[6] == f"{b['accuracy']:.3f} ± {b['accuracy_se']:.3f}"
  png = (out / "llm_curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_timing_only_writes_the_speed_table(tmp_path):
  pytest.importorskip("tokenizers")
  proc = _run(["--quick", "--timing-only", "--method", "pbgd_free",
               "--dtype", "bfloat16", "--rounds", "2", "--out",
               str(tmp_path)], tmp_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads((tmp_path / "llm.json").read_text())
  row = result["methods"]["pbgd_free"]
  assert set(row) == {"label", "hyperparameters", "timing"}
  assert result["model"]["dtype"] == "bfloat16"
  assert len(row["timing"]["seconds"]) == 2 and row["timing"]["flops"] > 0
  text = (tmp_path / "llm.md").read_text()
  assert "Timing only" in text and "Table 2" not in text
  assert "| PBGD-Free | gamma=10, K=1 |" in text
  assert not (tmp_path / "llm_curves.png").exists()


@pytest.mark.parametrize("args,message", [
    (["--quick", "--method", "sgd"], "--method: unknown ['sgd']"),
    (["--dpo-data", "missing.jsonl"], "--dpo-data: file 'missing.jsonl' not "
     "found"),
    (["--model", "smollm2"], "--dpo-data is required"),
])
def test_bad_arguments_name_the_flag(args, message, tmp_path):
  proc = _run(args, tmp_path, timeout=120)
  assert proc.returncode == 2
  assert message in proc.stderr


def test_committed_cpu_run_meets_the_targets():
  """benchmarks/results/llm_cpu: six methods that learn, a step at the limit."""
  result = json.loads((ROOT / "benchmarks" / "results" / "llm_cpu" /
                       "llm.json").read_text())
  assert result["quick"] is False
  assert list(result["methods"]) == ["pbgd_free", "alt_pbgd", "v_pbgd",
                                     "bome", "f2sa", "alright"]
  assert result["data"]["eval_pairs_used"] >= 256
  budget = result["protocol"]["budget_seconds"]
  for row in result["methods"].values():
    s2 = row["stage2"]
    assert s2["pairs"] >= 256
    # Every method moved the held-out DPO loss below log 2, with a reward
    # margin more than three standard errors above zero.
    assert s2["dpo"] < math.log(2.0) and s2["margin"] > 3 * s2["margin_se"]
    run, timing = row["stage1_run"], row["timing"]
    assert abs(run["budget_seconds"] - budget) <= run["chunk"] * timing[
        "step"]["median"]
    assert timing["compile_seconds"] <= 30.0
  free = result["methods"]["pbgd_free"]["timing"]
  assert free["fraction_of_matmul"] >= 0.5
  assert free["floor_ratio"]["median"] <= 1.2
  for dtype in ("float32", "bfloat16"):
    timed = json.loads((ROOT / "benchmarks" / "results" / "llm_dtype" / dtype
                        / "llm.json").read_text())
    assert timed["model"]["dtype"] == dtype
    assert set(timed["methods"]) == {"pbgd_free"}
