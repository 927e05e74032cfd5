"""The README's Python examples run as written."""

import contextlib
import io
import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert len(blocks) >= 2
  namespace = {}
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    exec(compile(blocks[0], str(README), "exec"), namespace)  # pylint: disable=exec-used
  # The quickstart's problem: y* = x, and F(x) = |x - 1|^2 + 0.1 |x|^2 is
  # minimised at x* = 1/1.1 with F(x*) = 3 * 0.1 / 1.1.
  numbers = [float(v) for v in re.findall(r"-?\d+\.\d+", printed.getvalue())]
  assert len(numbers) == 4, printed.getvalue()
  np.testing.assert_allclose(numbers[:3], 1 / 1.1, atol=1e-3)
  np.testing.assert_allclose(numbers[3], 0.3 / 1.1, atol=1e-4)
  # The numbers the README says it prints are the ones it prints.
  assert "# prints: " + printed.getvalue().strip() in blocks[0]
  x = np.asarray(namespace["params"].x)
  np.testing.assert_allclose(x, 1 / 1.1, atol=2e-4)   # ALT-PBGD, O(1/gamma)
  for block in blocks[1:]:
    exec(compile(block, str(README), "exec"), namespace)  # pylint: disable=exec-used
  swept = namespace["sweep"](np.logspace(0, 3, 4), np.full(4, 0.1))
  # ALT-PBGD approaches the bilevel solution 1 / 1.1 as gamma grows.
  err = np.abs(np.asarray(swept.x) - 1 / 1.1).max(axis=1)
  assert err[-1] < 2e-3 and err[0] > err[-1]


def _rows(results, app):
  return {row["method"]: row for row in
          results["applications"][app]["rows"]}


def test_readme_benchmark_numbers_come_from_the_results_files():
  """Every benchmark number the README quotes is the one the scripts wrote."""
  import json  # pylint: disable=import-outside-toplevel
  results_dir = README.parent / "benchmarks" / "results"
  text = " ".join(README.read_text().split())
  apps = json.loads((results_dir / "applications.json").read_text())
  assert apps["quick"] is False  # the committed results are a full run
  nlsy = _rows(apps, "nlsy")["PBGD-Free"]
  dpo = _rows(apps, "dpo_sft")
  start = apps["applications"]["dpo_sft"]["start"]
  quoted = [
      f"{nlsy['floor_ratio']:.2f}x (NLSY MLP)",
      f"{dpo['PBGD-Free']['floor_ratio']:.2f}x (transformer)",
      f"DPO loss {dpo['PBGD-Free']['final']['upper_loss']:.3f}",
      f"preference accuracy "
      f"{dpo['PBGD-Free']['final']['preference_accuracy']:.2f}",
      f"SFT loss rose from {start['lower_loss']:.2f} to "
      f"{dpo['PBGD-Free']['final']['lower_loss']:.2f}",
      f"BOME kept SFT at {dpo['BOME']['final']['lower_loss']:.2f}",
  ]
  svm = json.loads((results_dir / "svm.json").read_text())
  cc = svm["results"]["diabetes"]["pbgd_free_cc"]
  quoted.append(f"{cc['test_accuracy_mean']:.4f} ± "
                f"{cc['test_accuracy_std']:.4f}")
  scan_rows = json.loads((results_dir / "overhead_scan_run.json").read_text(
      ))["problems"]["quadratic d=1e4"]["rows"]
  ratios = [row["scan_run_ratio"] for row in scan_rows]
  quoted.append(f"takes {min(ratios):.2f}–{max(ratios):.2f}× on the d = 10⁴ "
                "quadratic")
  six = json.loads((results_dir / "llm_cpu" / "llm.json").read_text())
  assert six["quick"] is False and len(six["methods"]) == 6
  s2 = [row["stage2"] for row in six["methods"].values()]
  z = [r["margin"] / r["margin_se"] for r in s2]
  paired = [abs(row["paired_vs_pbgd_free"]["stage2_dpo"]["mean"])
            / row["paired_vs_pbgd_free"]["stage2_dpo"]["se"]
            for name, row in six["methods"].items() if name != "pbgd_free"]
  assert max(six["methods"], key=lambda n: six["methods"][n]["stage2"][
      "sft"]) == "pbgd_free"
  free = six["methods"]["pbgd_free"]["timing"]
  quoted += [
      f"held-out DPO loss {min(r['dpo'] for r in s2):.3f}–"
      f"{max(r['dpo'] for r in s2):.3f} against log 2",
      f"reward margins {min(z):.1f}–{max(z):.1f}",
      f"PBGD-Free of at most {max(paired):.1f} standard errors",
      f"{six['protocol']['budget_seconds']:.0f} s of training per method",
      f"Its step runs at {free['fraction_of_matmul']:.2f} of the rate",
      f"and at {free['floor_ratio']['median']:.2f}× the floor"]
  torch_side = json.loads((results_dir / "llm_torch.json").read_text())
  assert torch_side["quick"] is False
  timing = torch_side["timing"]
  quoted.append(f"jaxbilevel {timing['jax']['median']:.2f} s per step, "
                f"PyTorch {timing['torch']['median']:.2f} s, per-round ratio "
                f"{timing['ratio']['median']:.3f} (quartiles "
                f"{timing['ratio']['q1']:.3f}–{timing['ratio']['q3']:.3f})")
  flops = torch_side["flops"]
  quoted.append(f"the jaxbilevel step runs at "
                f"{flops['jax_fraction_of_matmul']:.2f} of the rate")
  quoted.append(f"({flops['jax_flops_per_second'] / 1e9:.0f} of "
                f"{flops['matmul_flops_per_second'] / 1e9:.0f} GFLOP/s), "
                f"PyTorch's at {flops['torch_fraction_of_matmul']:.2f}")
  agreement = torch_side["agreement"]
  assert max(agreement["dpo_start"]["abs_diff"],
             agreement["sft_start"]["abs_diff"]) < 2e-5
  for phrase in quoted:
    assert phrase in text, phrase
  # The README's comparisons: lowest DPO loss on DPO/SFT, highest group-0 MSE
  # on NLSY, among the bilevel methods (the floor excluded).
  def finals(app):
    return {name: row["final"]["upper_loss"] for name, row in
            _rows(apps, app).items()
            if row.get("role") == "method" and "final" in row}
  assert min(finals("dpo_sft"), key=finals("dpo_sft").get) == "PBGD-Free"
  assert max(finals("nlsy"), key=finals("nlsy").get) == "PBGD-Free"
