r"""Bilevel LLM fine-tuning as one problem: DPO over LoRA adapters, SFT over the head.

:func:`dpo_sft_problem` composes the pieces of :mod:`jaxbilevel.llm` into the
problem of the PBGD-Free fine-tuning experiments (Jiang et al., 2025):

.. math::

  \min_x\ f(x, y^*(x)) = \mathcal L_{DPO}(x, y^*(x)) \quad\text{s.t.}\quad
  y^*(x) \in \arg\min_y\ g(x, y) = \mathcal L_{SFT}(x, y),

with ``x`` the LoRA adapters (:func:`add_lora`), ``y`` the output head and
every other weight frozen (:func:`bilevel_split`). The DPO reference model is
the base model (adapters off, initial head); its log-probabilities are
computed once per batch when the problem is built
(:func:`add_reference_logprobs`), so the objectives never run it.

Any ``jbl`` method takes ``(problem.f, problem.g)`` unchanged; ``batch`` is
one step of ``problem.batches``.

Scale
-----
* **Mixed precision**: ``dtype=jnp.bfloat16`` makes the model *compute* in
  bfloat16 while every parameter, and hence every optax state, stays float32
  (logits, softmax and RMSNorm statistics are float32 in the model).
* **Gradient accumulation**: ``microbatches=k`` wraps both objectives with
  :func:`jaxbilevel.objectives.accumulate`, so every gradient a method takes
  inside one bilevel step runs over ``k`` micro-batches, one at a time. The
  SFT loss is a token average over the whole batch; it is written as a mean
  over examples of per-example sums weighted by ``B / (response tokens of
  the batch)`` (the ``token_weight`` of ``batch["sft"]``), so ``k``
  micro-batches give exactly the full-batch value and gradients.
* **Rematerialization**: ``remat=True`` recomputes each decoder block in the
  backward pass.
* **Sharding**: with ``mesh=``, the examples of every batch are split along
  ``data_axis`` (:func:`jaxbilevel.shard_batch`) and, with ``fsdp_axis=``,
  the large parameters and frozen weights along that axis
  (:func:`jaxbilevel.fsdp_shardings`).

Frozen weights: ``f`` and ``g`` close over ``problem.frozen``, and ``jit``
embeds closed-over arrays in the compiled program as constants (replicated,
and compiled into the program). For a large model, or to keep the frozen
weights FSDP-sharded, pass them as an argument instead: a batch may carry
them under ``"frozen"``, which ``f`` and ``g`` then use::

  @jax.jit
  def train(params, frozen, batches):
    def batch_at(t):
      return dict(jax.tree.map(lambda b: b[t], batches), frozen=frozen)
    return jbl.scan_run(tx, params, num_steps=n, batches=batch_at)

  params, state, history = train(problem.params0, problem.frozen,
                                 problem.batches)

References:
  Jiang, Xiao, Chen and Chen, "Beyond Value Functions: Single-Loop Bilevel
  Optimization under Flatness Conditions", NeurIPS 2025, arXiv:2507.20400.

  Rafailov et al., "Direct Preference Optimization: Your Language Model is
  Secretly a Reward Model", NeurIPS 2023, arXiv:2305.18290.

  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbilevel._src import base
from jaxbilevel._src import objectives
from jaxbilevel._src import sharding
from jaxbilevel._src.llm import adapters
from jaxbilevel._src.llm import data as data_lib
from jaxbilevel._src.llm import losses
from jaxbilevel._src.llm import model as model_lib

_FROM_CONFIG = "config"


class DPOSFTProblem(NamedTuple):
  """The bilevel DPO / SFT fine-tuning problem built by :func:`dpo_sft_problem`.

  Attributes:
    f: the upper objective ``f(x, y, batch)``, the DPO loss of
      ``batch["dpo"]``.
    g: the lower objective ``g(x, y, batch)``, the SFT loss (token average)
      of ``batch["sft"]``.
    params0: the starting point, ``BilevelParams(x=adapters, y=head)``
      (float32 for a float32 model; ``B = 0``, so the model starts as the
      base model).
    batches: ``num_steps`` training batches stacked along a leading axis
      (``jbl.run(..., batches=problem.batches)``), with the reference
      log-probabilities and SFT token weights added.
    evaluate: ``evaluate(params) -> dict`` of floats on the eval split:
      ``dpo_loss``, ``accuracy`` (fraction of pairs with a positive reward
      margin, a tie counting 1/2, so the base model scores 0.5),
      ``reward_margin`` (mean), ``sft_loss`` (token average). For standard
      errors use :func:`jaxbilevel.llm.preference_eval`.
    refit_head: ``refit_head(params, num_steps, optimizer) -> (params,
      sft_losses)``: the authors' stage 2, ``num_steps`` optax steps on ``g``
      over ``y`` with ``x`` frozen (cycling through the training batches);
      ``sft_losses`` holds ``g`` before each step.
    apply_fn: ``apply_fn(x, y, input_ids, attention_mask=None, *,
      positions=None, frozen=None) -> logits`` of :func:`bilevel_split`.
    frozen: the frozen weights (placed on the mesh when one is given).
  """

  f: Callable
  g: Callable
  params0: base.BilevelParams
  batches: Any
  evaluate: Callable
  refit_head: Callable
  apply_fn: Callable
  frozen: Any


def _err(message: str):
  return base.BilevelValidationError(f"dpo_sft_problem: {message}")


def _split_frozen(batch, default):
  """``(frozen, rest)``: weights carried by the batch, or the default."""
  if isinstance(batch, Mapping) and "frozen" in batch:
    return batch["frozen"], {k: v for k, v in batch.items() if k != "frozen"}
  return default, batch


def _is_arrays(value, keys) -> bool:
  return isinstance(value, Mapping) and all(k in value for k in keys)


def _set_compute(model: nnx.Module, dtype, remat) -> None:
  """Sets the compute dtype of every module (and ``remat``) in place."""
  if dtype is not None:
    for _, module in nnx.iter_modules(model):
      if "dtype" in vars(module):
        module.dtype = dtype
  if remat is not None:
    if not hasattr(model, "remat"):
      raise _err(f"remat=True needs a model with a `remat` attribute (e.g. "
                 f"jaxbilevel.llm.CausalLM), got {type(model).__name__}.")
    model.remat = bool(remat)


def _special(value, config, name):
  if value != _FROM_CONFIG:
    return value
  token = getattr(config, name, None)
  if isinstance(token, (tuple, list)):
    token = token[0] if token else None
  return token


def _tokenized(examples, keys, tokenize, what):
  if _is_arrays(examples, keys):
    return {k: np.asarray(examples[k]) for k in keys}
  if isinstance(examples, Mapping):
    missing = [k for k in keys if k not in examples]
    raise _err(f"{what} is a dict without the keys {missing}; pass text "
               f"examples or the arrays of tokenize_* (keys {list(keys)}).")
  return tokenize(list(examples))


def _check_fits_model(arrays, config, what: str) -> None:
  """Refuses token ids or sequence lengths that ``config``'s model cannot take.

  Ids outside the vocabulary give NaN reference log-probabilities (see
  :func:`jaxbilevel.llm.model.check_token_ids`) and sequences longer than
  ``max_position_embeddings`` run the model at positions it was never
  trained on; both are refused here, when the problem is built.
  """
  vocab_size = getattr(config, "vocab_size", None)
  positions = getattr(config, "max_position_embeddings", None)
  for key in sorted(arrays):
    if not key.endswith("ids"):
      continue
    value = arrays[key]
    if isinstance(vocab_size, int):
      model_lib.check_token_ids(value, vocab_size,
                                f"dpo_sft_problem: {what}[{key!r}]")
    length = np.shape(value)[-1]
    if isinstance(positions, int) and length > positions:
      raise _err(
          f"{what}[{key!r}] holds sequences of {length} tokens, more than "
          f"the model's max_position_embeddings={positions} (the context "
          f"length of the checkpoint); sequences are not truncated. Pass "
          f"max_len <= {positions} (text data are cut to max_len tokens) or "
          f"cut the arrays to at most {positions} tokens.")


def _sft_token_weights(loss_mask: np.ndarray) -> np.ndarray:
  """``mask * B / tokens`` per batch (last two axes: examples, positions).

  With these weights the mean over examples of the per-example weighted
  cross-entropy sums is the token average of the batch, and stays so under
  an equal split of the examples into micro-batches.
  """
  mask = np.asarray(loss_mask, np.float32).copy()
  mask[..., 0] = 0.0  # Position 0 predicts nothing.
  tokens = mask.sum(axis=(-2, -1), keepdims=True)
  return mask * mask.shape[-2] / np.maximum(tokens, 1.0)


def _sft_loss(apply_fn):
  """The SFT token average as a mean over examples (see _sft_token_weights)."""

  def sft_loss(x, y, batch):
    sft = batch["sft"]
    ids = sft["input_ids"]
    weight = sft.get("token_weight")
    if weight is None:  # A batch built elsewhere: the same weights, traced.
      weight = _traced_weights(sft["loss_mask"])
    logp = losses.token_logprobs(apply_fn(x, y, ids, sft["attention_mask"]),
                                 ids)
    return -jnp.sum(logp * weight[:, 1:].astype(logp.dtype)) / ids.shape[0]

  return sft_loss


def _traced_weights(loss_mask):
  mask = jnp.asarray(loss_mask, jnp.float32).at[:, 0].set(0.0)
  return mask * mask.shape[0] / jnp.maximum(jnp.sum(mask), 1.0)


def _chunks(arrays, size):
  """Pads ``(N, ...)`` arrays to whole chunks: ``(C, size, ...)`` and a mask."""
  n = data_lib.num_examples(arrays)
  count = -(-n // size)
  pad = count * size - n
  idx = np.concatenate([np.arange(n), np.zeros(pad, np.int64)])
  valid = (np.arange(count * size) < n).astype(np.float32)
  out = {k: np.asarray(v)[idx].reshape((count, size) + np.shape(v)[1:])
         for k, v in arrays.items()}
  return out, valid.reshape(count, size)


def dpo_sft_problem(model: nnx.Module,
                    tokenizer: Any,
                    preference_data: Union[Sequence[data_lib.PreferenceExample],
                                           Mapping[str, np.ndarray]],
                    sft_data: Union[None, Sequence[data_lib.SFTExample],
                                    Mapping[str, np.ndarray]] = None,
                    *,
                    num_steps: int,
                    max_len: int = 256,
                    max_prompt_len: Optional[int] = None,
                    dpo_batch_size: int = 8,
                    sft_batch_size: int = 8,
                    eval_size: Union[int, float] = 0.1,
                    eval_batch_size: Optional[int] = None,
                    lora_rank: int = 16,
                    lora_alpha: float = 32.0,
                    targets: Optional[Sequence[str]] = ("q_proj", "v_proj"),
                    beta: float = 0.1,
                    dtype: Any = None,
                    microbatches: int = 1,
                    remat: Optional[bool] = None,
                    mesh: Optional[jax.sharding.Mesh] = None,
                    data_axis: str = "data",
                    fsdp_axis: Optional[str] = None,
                    fsdp_min_size: int = 2 ** 14,
                    bos_id: Any = _FROM_CONFIG,
                    eos_id: Any = _FROM_CONFIG,
                    seed: int = 0) -> DPOSFTProblem:
  r"""Builds the bilevel DPO (upper, LoRA ``x``) / SFT (lower, head ``y``) problem.

  Steps, each an existing public function: adapters are added to ``model``
  (:func:`add_lora`, in place) and it is split (:func:`bilevel_split`); the
  examples are tokenized (:func:`tokenize_preferences`,
  :func:`tokenize_sft`) and split into train and eval parts
  (:func:`train_eval_split`); ``num_steps`` batches are stacked
  (:func:`stacked_batches`) and the base model's log-probabilities added
  (:func:`add_reference_logprobs`, once per batch); ``f`` and ``g`` are
  :func:`make_dpo_loss` and the SFT token average, wrapped in
  :func:`jaxbilevel.objectives.accumulate` when ``microbatches > 1``.

  Without ``sft_data`` the preference examples are split in two halves (by
  ``seed``): one is the DPO set, the chosen dialogues of the other the SFT
  set (so the two are disjoint).

  Cost: building runs the reference model once over every training and
  eval pair (no gradients). Each ``f``/``g`` evaluation is one forward pass
  over ``2 * dpo_batch_size`` / ``sft_batch_size`` sequences of ``max_len``
  tokens.

  Args:
    model: a :class:`CausalLM` (or any nnx LM with an ``lm_head``), modified
      in place: adapters are added, and ``dtype``/``remat`` set if given.
    tokenizer: a ``tokenizers.Tokenizer`` (``None`` if the data are arrays).
    preference_data: :class:`PreferenceExample` items, or the arrays of
      :func:`tokenize_preferences`.
    sft_data: :class:`SFTExample` items, the arrays of :func:`tokenize_sft`,
      or ``None`` (see above).
    num_steps: the number of stacked training batches.
    max_len: tokens per sequence (prompt + response + padding); text is
      cut to it. Sequences (text cut to ``max_len``, or given arrays) longer
      than the model's ``max_position_embeddings`` are refused, not
      truncated.
    max_prompt_len: prompt tokens kept when a sequence is cut (default
      ``max_len // 2``).
    dpo_batch_size: preference pairs per batch.
    sft_batch_size: SFT examples per batch.
    eval_size: eval examples of each set (an int, or a fraction).
    eval_batch_size: examples per evaluation chunk (default
      ``dpo_batch_size``).
    lora_rank: LoRA rank r (16 in the paper).
    lora_alpha: LoRA :math:`\alpha` (update scaled by :math:`\alpha/r`).
    targets: regular expressions of the adapted projections (q and v in the
      paper); ``None`` if ``model`` already carries adapters.
    beta: the DPO temperature (0.1 in the paper).
    dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters keep theirs.
      ``None``: the model's.
    microbatches: micro-batches per batch (gradient accumulation); divides
      both batch sizes.
    remat: rematerialize the decoder blocks (``None``: the model's setting).
    mesh: a :class:`jax.sharding.Mesh` to place batches and parameters on.
      A mesh with ``Explicit`` axes (the default of ``jax.make_mesh`` in
      recent JAX) is used with the same devices and axis names but ``Auto``
      axes: the model's embedding gather has no explicit output sharding, so
      with explicit axes JAX refuses it (``ShardingTypeError``).
    data_axis: the mesh axis the examples of a batch are split over.
    fsdp_axis: the mesh axis that large parameters and frozen weights are
      split over (``None``: replicated).
    fsdp_min_size: leaves with fewer elements stay replicated.
    bos_id: id prepended to prompts (default: the model config's
      ``bos_token_id``; ``None``: none).
    eos_id: id appended to responses (default: the config's first
      ``eos_token_id``; ``None``: none).
    seed: seed of the adapters, the data splits and the batch order.

  Returns:
    A :class:`DPOSFTProblem`.

  Examples:
    >>> import jax, optax
    >>> from flax import nnx
    >>> import jaxbilevel as jbl
    >>> from jaxbilevel import llm
    >>> config = llm.LMConfig(vocab_size=16, hidden_size=16,
    ...                       intermediate_size=32, num_hidden_layers=1,
    ...                       num_attention_heads=2, num_key_value_heads=1)
    >>> rng = jax.random.split(jax.random.key(0), 3)
    >>> ids = jax.random.randint(rng[0], (8, 6), 1, 16)
    >>> mask = jax.numpy.array([[0, 0, 0, 1, 1, 1]] * 8)
    >>> pairs = dict(chosen_ids=ids, chosen_attention_mask=mask * 0 + 1,
    ...              chosen_loss_mask=mask,
    ...              rejected_ids=jax.random.randint(rng[1], (8, 6), 1, 16),
    ...              rejected_attention_mask=mask * 0 + 1,
    ...              rejected_loss_mask=mask)
    >>> problem = llm.dpo_sft_problem(
    ...     llm.CausalLM(config, rngs=nnx.Rngs(0)), None, pairs,
    ...     num_steps=3, dpo_batch_size=2, sft_batch_size=2, eval_size=2,
    ...     lora_rank=2)
    >>> round(problem.evaluate(problem.params0)["dpo_loss"], 4)  # log 2
    0.6931
    >>> tx = jbl.pbgd_free(problem.f, problem.g, gamma=10.0,
    ...                    upper_optimizer=optax.adam(1e-2),
    ...                    lower_optimizer=optax.adam(1e-2))
    >>> params, _, history = jbl.run(tx, problem.params0, num_steps=3,
    ...                              batches=problem.batches, diagnostics=True)
    >>> history["f"].shape
    (3,)

  References:
    Jiang, Xiao, Chen and Chen, "Beyond Value Functions: Single-Loop Bilevel
    Optimization under Flatness Conditions", NeurIPS 2025, arXiv:2507.20400.
  """
  num_steps = base.check_static_int(num_steps, "num_steps")
  microbatches = base.check_static_int(microbatches, "microbatches")
  for name, size in (("dpo_batch_size", dpo_batch_size),
                     ("sft_batch_size", sft_batch_size)):
    base.check_static_int(size, name)
    if size % microbatches:
      raise _err(f"microbatches={microbatches} does not divide {name}={size};"
                 " pick a divisor of both batch sizes.")
  config = getattr(model, "config", None)

  # The model: adapters, compute dtype, remat, split.
  if targets is not None:
    adapters.add_lora(model, targets=targets, rank=lora_rank,
                      alpha=lora_alpha, rngs=nnx.Rngs(seed))
  _set_compute(model, dtype, remat)
  apply_fn, params0, frozen = adapters.bilevel_split(model)

  # The data: tokenize, split into DPO / SFT and train / eval.
  tok_kw = dict(max_len=max_len, max_prompt_len=max_prompt_len,
                bos_id=_special(bos_id, config, "bos_token_id"),
                eos_id=_special(eos_id, config, "eos_token_id"))
  needs_tokenizer = not _is_arrays(preference_data, data_lib.PREFERENCE_KEYS)
  if tokenizer is None and (needs_tokenizer or not (
      sft_data is None or _is_arrays(sft_data, data_lib.SFT_KEYS))):
    raise _err("tokenizer is None but the data are text; pass the model's "
               "tokenizer (jaxbilevel.llm.load_pretrained returns it).")
  pref = _tokenized(preference_data, data_lib.PREFERENCE_KEYS,
                    lambda ex: data_lib.tokenize_preferences(
                        ex, tokenizer, **tok_kw), "preference_data")
  _check_fits_model(pref, config, "preference_data")
  if sft_data is None:
    pref, other = data_lib.train_eval_split(pref, eval_size=0.5, seed=seed)
    sft = {"input_ids": other["chosen_ids"],
           "attention_mask": other["chosen_attention_mask"],
           "loss_mask": other["chosen_loss_mask"]}
  else:
    sft = _tokenized(sft_data, data_lib.SFT_KEYS,
                     lambda ex: data_lib.tokenize_sft(ex, tokenizer, **tok_kw),
                     "sft_data")
  if sft_data is not None:
    _check_fits_model(sft, config, "sft_data")
  pref_train, pref_eval = data_lib.train_eval_split(
      pref, eval_size=eval_size, seed=seed)
  sft_train, sft_eval = data_lib.train_eval_split(
      sft, eval_size=eval_size, seed=seed + 1)

  batches = data_lib.stacked_batches(
      {"dpo": pref_train, "sft": sft_train},
      {"dpo": dpo_batch_size, "sft": sft_batch_size}, num_steps, seed=seed)
  batches["sft"]["token_weight"] = _sft_token_weights(
      batches["sft"]["loss_mask"])
  eval_batch_size = base.check_static_int(
      eval_batch_size or dpo_batch_size, "eval_batch_size")
  eval_dpo, eval_dpo_valid = _chunks(pref_eval, eval_batch_size)
  eval_sft, eval_sft_valid = _chunks(sft_eval, eval_batch_size)
  # Padding rows of the SFT chunks carry no response tokens.
  eval_sft["loss_mask"] = eval_sft["loss_mask"] * eval_sft_valid[
      ..., None].astype(eval_sft["loss_mask"].dtype)

  # Placement on the mesh.
  if mesh is not None:
    mesh = _auto_axes(mesh)
    def place(tree):
      if fsdp_axis is None:
        return sharding.replicate(tree, mesh)
      return sharding.shard_fsdp(tree, mesh, fsdp_axis,
                                 min_size=fsdp_min_size)

    params0, frozen = place(params0), place(frozen)
    batches = sharding.shard_batch(batches, mesh, data_axis, batch_axis=1)

  # Reference log-probabilities: the base model (adapters off, head y0).
  @jax.jit
  def with_reference(x0, y0, frozen, parts):
    def reference(ids, mask):
      return apply_fn(adapters.zero_adapters(x0), y0, ids, mask,
                      frozen=frozen)
    return losses.add_reference_logprobs(reference, parts, stacked=True)

  batches = with_reference(params0.x, params0.y, frozen, batches)
  eval_dpo = with_reference(params0.x, params0.y, frozen, {"dpo": eval_dpo})[
      "dpo"]

  def f_core(x, y, batch, frozen_):
    dpo = losses.make_dpo_loss(functools.partial(apply_fn, frozen=frozen_),
                               beta=beta)
    return _maybe_accumulate(dpo, microbatches)(x, y, {"dpo": batch["dpo"]})

  def g_core(x, y, batch, frozen_):
    sft = _sft_loss(functools.partial(apply_fn, frozen=frozen_))
    return _maybe_accumulate(sft, microbatches)(x, y, {"sft": batch["sft"]})

  def f(x, y, batch):
    frozen_, batch = _split_frozen(batch, frozen)
    return f_core(x, y, batch, frozen_)

  def g(x, y, batch):
    frozen_, batch = _split_frozen(batch, frozen)
    return g_core(x, y, batch, frozen_)

  f.__name__, g.__name__ = "dpo_loss", "sft_loss"

  @jax.jit
  def eval_sums(x, y, frozen_, dpo_chunks, dpo_valid, sft_chunks):
    apply = functools.partial(apply_fn, frozen=frozen_)

    def dpo_chunk(args):
      chunk, valid = args
      pi_c, pi_r = losses.dpo_logprobs(apply, x, y, chunk, key=None)
      margin = losses.dpo_reward_margin(
          pi_c, pi_r, chunk["ref_chosen_logp"], chunk["ref_rejected_logp"],
          beta=beta)
      return (jnp.sum(valid * -jax.nn.log_sigmoid(margin)),
              jnp.sum(valid * losses.preference_accuracy(margin)),
              jnp.sum(valid * margin))

    def sft_chunk(chunk):
      ids = chunk["input_ids"]
      logits = apply(x, y, ids, chunk["attention_mask"])
      return (-jnp.sum(losses.sequence_logprobs(logits, ids,
                                                chunk["loss_mask"])),
              jnp.sum(chunk["loss_mask"][:, 1:]))

    dpo = jax.lax.map(dpo_chunk, (dpo_chunks, dpo_valid))
    sft = jax.lax.map(sft_chunk, sft_chunks)
    return jax.tree.map(jnp.sum, (dpo, sft))

  n_dpo = float(np.sum(eval_dpo_valid))

  def evaluate(params):
    (loss, correct, margin), (nll, tokens) = eval_sums(
        params.x, params.y, frozen, eval_dpo, eval_dpo_valid, eval_sft)
    return {"dpo_loss": float(loss) / n_dpo,
            "accuracy": float(correct) / n_dpo,
            "reward_margin": float(margin) / n_dpo,
            "sft_loss": float(nll) / max(float(tokens), 1.0)}

  def refit_head(params, num_steps, optimizer):
    num_steps = base.check_static_int(num_steps, "num_steps")
    if not isinstance(optimizer, optax.GradientTransformation):
      raise base.BilevelValidationError(
          "refit_head: optimizer must be an optax.GradientTransformation "
          f"(e.g. optax.adam(1e-3)), got {type(optimizer).__name__}.")
    count = jax.tree.leaves(batches)[0].shape[0]

    @jax.jit
    def loop(x, y, frozen_, parts):
      def step(carry, t):
        y, state = carry
        batch = jax.tree.map(
            lambda b: jax.lax.dynamic_index_in_dim(b, t % count, 0, False),
            parts)
        loss, grad = jax.value_and_grad(g_core, argnums=1)(x, y, batch,
                                                            frozen_)
        updates, state = optimizer.update(grad, state, y)
        return (optax.apply_updates(y, updates), state), loss

      (y, _), history = jax.lax.scan(step, (y, optimizer.init(y)),
                                     jnp.arange(num_steps))
      return y, history

    y, history = loop(params.x, params.y, frozen, {"sft": batches["sft"]})
    return base.BilevelParams(x=params.x, y=y), np.asarray(history)

  return DPOSFTProblem(f=f, g=g, params0=params0, batches=batches,
                       evaluate=evaluate, refit_head=refit_head,
                       apply_fn=apply_fn, frozen=frozen)


def _auto_axes(mesh):
  """``mesh`` with every axis ``Auto`` (XLA's sharding propagation).

  ``jax.make_mesh`` gives ``Explicit`` axes in recent JAX; under them every
  gather needs an explicit ``out_sharding``, which the embedding lookup of
  the model does not give. The same devices with ``Auto`` axes work.
  """
  if not isinstance(mesh, jax.sharding.Mesh):
    raise _err(f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((2, 4),"
               f" ('data', 'fsdp'))), got {type(mesh).__name__}.")
  axis_type = getattr(jax.sharding, "AxisType", None)
  types = getattr(mesh, "axis_types", None)
  if axis_type is None or types is None or all(
      t == axis_type.Auto for t in types):
    return mesh
  return jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                           axis_types=(axis_type.Auto,) * len(mesh.axis_names))


def _maybe_accumulate(fn, microbatches):
  return fn if microbatches == 1 else objectives.accumulate(fn, microbatches)
