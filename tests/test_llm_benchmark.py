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
  # Adapters off = the reference model: DPO is exactly log 2, margin 0.
  assert result["start"]["dpo"] == pytest.approx(math.log(2.0), abs=1e-6)
  assert result["start"]["margin"] == pytest.approx(0.0, abs=1e-6)
  n_eval = result["data"]["eval_pairs_used"]
  assert n_eval == 8
  tokens = result["data"]["tokens_per_step"]
  assert tokens == 32 * (2 * 2 + 2)  # max_len * (2 pairs x 2 + 2 SFT)
  for row in result["methods"].values():
    for stage in ("stage1", "stage2"):
      values = row[stage]
      assert set(METRICS) <= set(values)
      assert all(math.isfinite(values[k]) for k in METRICS)
      # Accuracy is a fraction of the eval pairs (a tie counts 1/2).
      assert 2 * values["accuracy"] * n_eval == pytest.approx(
          round(2 * values["accuracy"] * n_eval), abs=1e-9)
      assert values["margin"] == pytest.approx(
          values["chosen_reward"] - values["rejected_reward"], abs=1e-6)
      # The DPO loss is the mean of softplus(-margin) >= softplus(-mean).
      assert values["dpo"] >= math.log1p(math.exp(-values["margin"])) - 1e-6
    run1, run2 = row["stage1_run"], row["stage2_run"]
    budget = result["protocol"]["budget_seconds"]
    for run in (run1, run2):
      assert run["steps"] >= 1 and run["seconds"] >= budget
      assert run["steps"] == run["chunk"] * run["chunks"]
      assert run["compile_seconds"] >= 0.0
    # Curves: stage 1 starts at the base model, stage 2 at stage 1's end.
    assert run1["curve"][0]["dpo"] == result["start"]["dpo"]
    assert run2["curve"][0]["dpo"] == run1["curve"][-1]["dpo"]
    assert row["stage1"]["dpo"] == run1["curve"][-1]["dpo"]
    assert row["stage2"]["sft"] == run2["curve"][-1]["sft"]
    floor = row["floor"]
    assert floor["ratio"] == pytest.approx(
        floor["method_seconds_per_step"] / floor["floor_seconds_per_step"])
    assert len(floor["method_times"]) == len(floor["floor_times"]) == 3
    assert row["tokens_per_second"]["stage1_isolated_step"] == pytest.approx(
        tokens / floor["method_seconds_per_step"])
    assert row["memory"]["process_peak_rss_bytes"] > 0
  # PBGD-Free's adapter steps on DPO lower the held-out DPO loss.
  assert result["methods"]["pbgd_free"]["stage1"]["dpo"] < math.log(2.0)


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_markdown_table_and_png(quick_run):
  out, result, proc = quick_run
  text = (out / "llm.md").read_text()
  assert text.strip() == proc.stdout.strip()  # printed and written
  assert ("| method | S1 DPO | S1 SFT | S2 DPO | S2 SFT | S2 pref. acc. | "
          "S2 reward margin |") in text
  assert "floor ratio" in text and "tokens/s" in text and "peak RSS" in text
  assert "**1 s**" in text  # the budget is stated
  for row in result["methods"].values():
    a, b = row["stage1"], row["stage2"]
    line = next(l for l in text.splitlines()
                if l.startswith(f"| {row['label']} | {a['dpo']:.4f}"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:5] == [f"{a['dpo']:.4f}", f"{a['sft']:.4f}",
                          f"{b['dpo']:.4f}", f"{b['sft']:.4f}"]
    assert cells[5] == f"{b['accuracy']:.3f}"
    assert f"**{row['floor']['ratio']:.2f}**" in text
  png = (out / "llm_curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


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
