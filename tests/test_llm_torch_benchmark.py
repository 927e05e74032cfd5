"""jaxbilevel vs PyTorch (benchmarks/llm_torch.py) agree on the first step.

``--quick`` builds the tiny random Llama of ``benchmarks/llm.py --quick``
in jaxbilevel and, from its exported weights and adapter, in transformers +
peft, takes one PBGD-Free step in each and times a few more. The test checks
that the two start from the same losses and land on the same parameters
(float32 rounding only), and the columns of the JSON / Markdown outputs.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "llm_torch.py"


def _run(args, cwd, timeout=300):
  env = dict(os.environ)
  env.pop("JAX_ENABLE_X64", None)
  return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd,
                        env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  for name in ("torch", "transformers", "peft", "tokenizers", "safetensors"):
    pytest.importorskip(name)
  out = tmp_path_factory.mktemp("llm_torch")
  proc = _run(["--quick", "--seq-len", "16", "--rounds", "3", "--out",
               str(out)], out)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return out, json.loads((out / "llm_torch.json").read_text()), proc


def test_first_step_agrees_and_outputs_are_complete(quick_run):
  out, result, proc = quick_run
  a = result["agreement"]
  # Adapters off (B = 0) = the reference model: DPO is log 2 in both.
  assert a["dpo_start"]["jax"] == pytest.approx(math.log(2.0), abs=1e-6)
  assert a["dpo_start"]["torch"] == pytest.approx(math.log(2.0), abs=1e-6)
  # A 320-token vocabulary: the random model's SFT loss is near log 320.
  assert a["sft_start"]["jax"] == pytest.approx(math.log(320), abs=0.1)
  assert a["sft_start"]["abs_diff"] < 1e-5
  assert a["reference_logp_max_abs_diff"] < 1e-4
  # One step moves x by lr_x and y by lr_y (Adam's first step is lr *
  # sign); the two frameworks land on the same values up to float32
  # rounding, far below the step.
  assert a["x_step_max_abs"] == pytest.approx(5e-4, rel=1e-3)
  assert a["y_step_max_abs"] == pytest.approx(1e-5, rel=1e-3)
  assert a["x_after_step_max_abs_diff"] < 1e-7
  assert a["y_after_step_max_abs_diff"] < 1e-7
  assert a["dpo_after_step"]["abs_diff"] < 1e-5
  assert a["sft_after_step"]["abs_diff"] < 1e-5
  assert a["dpo_after_step"]["jax"] < a["dpo_start"]["jax"]   # DPO step

  assert set(result) >= {"benchmark", "command", "machine", "versions",
                         "model", "problem", "agreement", "timing",
                         "total_seconds"}
  assert result["machine"]["torch_threads"] == os.cpu_count()
  assert result["model"]["lora_rank"] == 16
  assert result["model"]["x_size"] == 2 * (16 * (32 + 32) + 16 * (32 + 16))
  assert result["problem"]["tokens_per_step"] == 16 * (2 * 2 + 2)
  t = result["timing"]
  assert len(t["jax_seconds"]) == len(t["torch_seconds"]) == 3
  assert all(v > 0 for v in t["jax_seconds"] + t["torch_seconds"])
  for key in ("jax", "torch", "ratio"):
    assert t[key]["q1"] <= t[key]["median"] <= t[key]["q3"]
  assert t["ratio_of_medians"] == pytest.approx(
      t["jax"]["median"] / t["torch"]["median"])
  assert t["jax_compile_seconds"] > 0
  fl = result["flops"]
  # The matmul's FLOPs are 2 m k n of its recorded shape, and the rates are
  # the FLOP counts over the median times.
  m, k, n = fl["matmul_shape"]
  assert m == 16 * (2 * 2 + 2) and fl["matmul_flops"] == 2.0 * m * k * n
  assert fl["matmul_flops_per_second"] == pytest.approx(
      fl["matmul_flops"] / fl["matmul"]["median"])
  assert fl["jax_fraction_of_matmul"] == pytest.approx(
      fl["step_flops"] / t["jax"]["median"] / fl["matmul_flops_per_second"])
  # A step does more than its head product: forward and backward passes.
  assert fl["step_flops"] > fl["matmul_flops"]
  md = (out / "llm_torch.md").read_text()
  assert "| DPO loss at the start | 0.693147 | 0.693147 |" in md
  assert f"**{t['ratio']['median']:.3f}**" in md
  assert md in proc.stdout
