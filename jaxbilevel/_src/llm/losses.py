r"""DPO (upper) and SFT (lower) objectives for bilevel fine-tuning of LMs.

The objectives are pure functions ``(x, y, batch) -> scalar`` built around a
model ``apply_fn(x, y, input_ids, attention_mask) -> logits``, where ``x``
are e.g. LoRA adapters, ``y`` the output head, ``input_ids`` and
``attention_mask`` ``(B, T)`` int arrays and ``logits`` ``(B, T, V)``. The
logit at position ``t`` predicts token ``t + 1``.

Batch convention: one batch holds both levels' data in two sub-dicts,

* ``batch["dpo"]``: a preference batch (keys of
  :func:`jaxbilevel._src.llm.data.tokenize_preferences`) plus the reference
  log-probabilities ``ref_chosen_logp`` and ``ref_rejected_logp``
  (``(B,)``, from :func:`add_reference_logprobs`);
* ``batch["sft"]``: an SFT batch (``input_ids``, ``attention_mask``,
  ``loss_mask``).

Each objective reads only its own part, so ``f = make_dpo_loss(apply_fn)``
and ``g = make_sft_loss(apply_fn)`` can be handed to any ``jbl`` method with
the same batch. :func:`jaxbilevel._src.llm.data.stacked_batches` on the
mixture ``{"dpo": ..., "sft": ...}`` builds such batches.

DPO (Rafailov et al., 2023), with ``pi`` the summed response log-probability
under the policy and ``ref`` under the frozen reference model:

.. math::

  m = \beta\,[(\pi_c - \mathrm{ref}_c) - (\pi_r - \mathrm{ref}_r)], \qquad
  f(x, y) = \operatorname{mean}_{\text{pairs}}\, -\log\sigma(m).

SFT: the token cross-entropy averaged over all response tokens of the batch.

References:
  Rafailov et al., "Direct Preference Optimization: Your Language Model is
  Secretly a Reward Model", NeurIPS 2023, arXiv:2305.18290.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

ApplyFn = Callable[[Any, Any, jax.Array, jax.Array], jax.Array]
Batch = Mapping[str, Any]

_PREFERENCE_KEYS = ("chosen_ids", "chosen_attention_mask", "chosen_loss_mask",
                    "rejected_ids", "rejected_attention_mask",
                    "rejected_loss_mask")
_SFT_KEYS = ("input_ids", "attention_mask", "loss_mask")
_REF_KEYS = ("ref_chosen_logp", "ref_rejected_logp")


def _check_shapes(logits, input_ids, loss_mask):
  if logits.ndim != 3 or input_ids.ndim != 2:
    raise ValueError(
        f"logits must be (B, T, V) and input_ids (B, T); got logits "
        f"{logits.shape} and input_ids {input_ids.shape}.")
  if logits.shape[:2] != input_ids.shape or (
      loss_mask is not None and loss_mask.shape != input_ids.shape):
    raise ValueError(
        f"logits {logits.shape}, input_ids {input_ids.shape} and loss_mask "
        f"{None if loss_mask is None else loss_mask.shape} must agree on "
        "(B, T).")


def token_logprobs(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
  """Log-probabilities of the next tokens: ``out[b, t] = log p(ids[b, t+1])``.

  Args:
    logits: ``(B, T, V)``; ``logits[:, t]`` predicts ``input_ids[:, t + 1]``.
    input_ids: ``(B, T)`` int tokens.

  Returns:
    ``(B, T - 1)`` log-probabilities (float32 for float32 logits).
  """
  _check_shapes(logits, input_ids, None)
  # -cross-entropy with an integer label is the label's log-softmax.
  return -optax.losses.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1], input_ids[:, 1:])


def sequence_logprobs(logits: jax.Array, input_ids: jax.Array,
                      loss_mask: jax.Array) -> jax.Array:
  r"""Summed log-probability of the masked (response) tokens of each sequence.

  .. math:: \ell_b = \sum_{t=1}^{T-1} \mathrm{mask}_{b,t}\,
     \log \operatorname{softmax}(\mathrm{logits}_{b,t-1})[\mathrm{ids}_{b,t}].

  The first position has no prediction, so ``loss_mask[:, 0]`` is ignored
  (the data module never puts a response token there).

  Args:
    logits: ``(B, T, V)``.
    input_ids: ``(B, T)`` int tokens.
    loss_mask: ``(B, T)``, 1 on response tokens, 0 on prompt and padding.

  Returns:
    ``(B,)`` log-probabilities.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbilevel._src.llm import losses
    >>> logits = jnp.zeros((1, 3, 4))  # uniform over 4 tokens
    >>> ids, mask = jnp.array([[1, 2, 3]]), jnp.array([[0, 1, 1]])
    >>> float(losses.sequence_logprobs(logits, ids, mask)[0])  # 2 log(1/4)
    -2.7725...
  """
  _check_shapes(logits, input_ids, loss_mask)
  lp = token_logprobs(logits, input_ids)
  return jnp.sum(lp * loss_mask[:, 1:].astype(lp.dtype), axis=-1)


def _part(batch, key, keys, what):
  if key is not None:
    if not isinstance(batch, Mapping) or key not in batch:
      found = sorted(batch) if isinstance(batch, Mapping) else type(batch)
      raise KeyError(
          f"the batch has no {key!r} part (found {found}); {what} reads "
          f"batch[{key!r}] (see jaxbilevel.llm.stacked_batches on a mixture "
          f"{{{key!r}: ...}}).")
    batch = batch[key]
  missing = [k for k in keys if k not in batch]
  if missing:
    hint = (" Call add_reference_logprobs(reference_apply, batch) first."
            if set(missing) & set(_REF_KEYS) else "")
    raise KeyError(f"{what}: the {key or 'preference'} batch lacks "
                   f"{missing} (found {sorted(batch)}).{hint}")
  return batch


def _pair_logprobs(apply_fn, x, y, dpo):
  """Chosen and rejected response log-probs from one forward pass of 2B."""
  ids = jnp.concatenate([dpo["chosen_ids"], dpo["rejected_ids"]])
  attention = jnp.concatenate([dpo["chosen_attention_mask"],
                               dpo["rejected_attention_mask"]])
  mask = jnp.concatenate([dpo["chosen_loss_mask"], dpo["rejected_loss_mask"]])
  lp = sequence_logprobs(apply_fn(x, y, ids, attention), ids, mask)
  half = dpo["chosen_ids"].shape[0]
  return lp[:half], lp[half:]


def dpo_reward_margin(policy_chosen_logp, policy_rejected_logp,
                      ref_chosen_logp, ref_rejected_logp, *, beta: float):
  r"""Implicit reward margin ``beta [(pi_c - ref_c) - (pi_r - ref_r)]``."""
  return beta * ((policy_chosen_logp - ref_chosen_logp)
                 - (policy_rejected_logp - ref_rejected_logp))


def make_dpo_loss(apply_fn: ApplyFn, *, beta: float = 0.1,
                  key: str = "dpo") -> Callable[[Any, Any, Batch], jax.Array]:
  r"""The DPO loss as an upper objective ``f(x, y, batch)``.

  ``f = mean(-log sigmoid(m))`` with ``m`` the reward margin of
  :func:`dpo_reward_margin`, computed from ``batch[key]``; the reference
  log-probabilities are read from the batch (``ref_chosen_logp``,
  ``ref_rejected_logp``), so the reference model is not run in the loss.
  Chosen and rejected sequences go through ``apply_fn`` as one batch of
  ``2B`` sequences. When policy and reference agree, ``f = log 2``.

  Args:
    apply_fn: ``(x, y, input_ids, attention_mask) -> logits``.
    beta: the DPO temperature (0.1 in the paper's experiments).
    key: the batch part to read (``None``: the batch is the preference dict).

  Returns:
    ``f(x, y, batch) -> scalar``.

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> from jaxbilevel._src.llm import losses
    >>> apply_fn = lambda x, y, ids, m: jnp.zeros(ids.shape + (5,)) + x
    >>> ids, ones = np.array([[1, 2, 3]]), np.array([[1, 1, 1]])
    >>> dpo = dict(chosen_ids=ids, chosen_attention_mask=ones,
    ...            chosen_loss_mask=np.array([[0, 1, 1]]), rejected_ids=ids,
    ...            rejected_attention_mask=ones,
    ...            rejected_loss_mask=np.array([[0, 0, 1]]))
    >>> batch = losses.add_reference_logprobs(
    ...     lambda ids, m: apply_fn(0.0, None, ids, m), {"dpo": dpo})
    >>> f = losses.make_dpo_loss(apply_fn, beta=0.1)
    >>> float(f(0.0, None, batch))  # log 2
    0.6931...

  References:
    Rafailov et al., "Direct Preference Optimization: Your Language Model is
    Secretly a Reward Model", NeurIPS 2023, eq. (7).
  """
  beta = float(beta)
  if beta <= 0:
    raise ValueError(f"beta must be > 0, got {beta}.")

  def dpo_loss(x, y, batch):
    dpo = _part(batch, key, _PREFERENCE_KEYS + _REF_KEYS, "make_dpo_loss")
    pi_c, pi_r = _pair_logprobs(apply_fn, x, y, dpo)
    margin = dpo_reward_margin(pi_c, pi_r, dpo["ref_chosen_logp"],
                               dpo["ref_rejected_logp"], beta=beta)
    return jnp.mean(-jax.nn.log_sigmoid(margin))

  return dpo_loss


def dpo_metrics(apply_fn: ApplyFn, x: Any, y: Any, batch: Batch, *,
                beta: float = 0.1, key: str = "dpo") -> Dict[str, jax.Array]:
  """DPO loss, preference accuracy and reward margins on a batch.

  Args:
    apply_fn: ``(x, y, input_ids, attention_mask) -> logits``.
    x: the upper variable (adapters).
    y: the lower variable (head).
    batch: as for :func:`make_dpo_loss`.
    beta: the DPO temperature.
    key: the batch part to read (``None``: the batch is the preference dict).

  Returns:
    A dict of scalars: ``loss`` (as :func:`make_dpo_loss`), ``accuracy``
    (fraction of pairs with a positive margin, a tie counting 1/2: see
    :func:`preference_accuracy`), ``margin`` (mean reward
    margin ``beta[(pi_c - ref_c) - (pi_r - ref_r)]``), ``chosen_reward`` and
    ``rejected_reward`` (means of ``beta (pi - ref)``).
  """
  dpo = _part(batch, key, _PREFERENCE_KEYS + _REF_KEYS, "dpo_metrics")
  pi_c, pi_r = _pair_logprobs(apply_fn, x, y, dpo)
  chosen = beta * (pi_c - dpo["ref_chosen_logp"])
  rejected = beta * (pi_r - dpo["ref_rejected_logp"])
  margin = chosen - rejected
  return {"loss": jnp.mean(-jax.nn.log_sigmoid(margin)),
          "accuracy": jnp.mean(preference_accuracy(margin)),
          "margin": jnp.mean(margin),
          "chosen_reward": jnp.mean(chosen),
          "rejected_reward": jnp.mean(rejected)}


def make_sft_loss(apply_fn: ApplyFn, *, key: str = "sft"
                  ) -> Callable[[Any, Any, Batch], jax.Array]:
  r"""The SFT loss as a lower objective ``g(x, y, batch)``.

  .. math:: g = \frac{\sum_{b,t} \mathrm{mask}_{b,t}\,
     \mathrm{CE}(\mathrm{logits}_{b,t-1}, \mathrm{ids}_{b,t})}
     {\sum_{b,t} \mathrm{mask}_{b,t}}

  i.e. the token cross-entropy averaged over all response tokens of
  ``batch[key]`` (every response token weighs the same, so long responses
  weigh more than short ones). A batch without response tokens gives 0.

  Args:
    apply_fn: ``(x, y, input_ids, attention_mask) -> logits``.
    key: the batch part to read (``None``: the batch is the SFT dict).

  Returns:
    ``g(x, y, batch) -> scalar``.

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> from jaxbilevel._src.llm import losses
    >>> apply_fn = lambda x, y, ids, m: jnp.zeros(ids.shape + (4,))
    >>> sft = dict(input_ids=np.array([[1, 2, 3, 0]]),
    ...            attention_mask=np.array([[1, 1, 1, 0]]),
    ...            loss_mask=np.array([[0, 1, 1, 0]]))
    >>> float(losses.make_sft_loss(apply_fn)(None, None, {"sft": sft}))
    1.3862...
  """

  def sft_loss(x, y, batch):
    sft = _part(batch, key, _SFT_KEYS, "make_sft_loss")
    ids = sft["input_ids"]
    logits = apply_fn(x, y, ids, sft["attention_mask"])
    _check_shapes(logits, ids, sft["loss_mask"])
    ce = optax.losses.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1], ids[:, 1:])
    mask = sft["loss_mask"][:, 1:].astype(ce.dtype)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)

  return sft_loss


def add_reference_logprobs(reference_apply: Callable[[jax.Array, jax.Array],
                                                     jax.Array],
                           batch: Batch, *, key: str = "dpo",
                           stacked: bool = False) -> Dict[str, Any]:
  """Adds the reference model's response log-probabilities to a batch.

  Run it once per batch (before training, or inside the data pipeline): the
  reference model is frozen, so its log-probabilities are constants of the
  DPO loss (``jax.lax.stop_gradient`` is applied).

  Args:
    reference_apply: ``(input_ids, attention_mask) -> logits`` of the frozen
      reference model, e.g. ``lambda ids, m: apply_fn(x0, y0, ids, m)`` with
      adapters off (zero LoRA) and the initial head.
    batch: a batch with a ``key`` part (or, if ``key not in batch``, the
      preference dict itself).
    key: the part holding the preference data.
    stacked: the arrays carry a leading step axis (as from
      ``stacked_batches``); the reference then runs one step at a time
      (``jax.lax.map``), so memory stays that of one batch.

  Returns:
    A new batch (the input is not modified) whose preference part also holds
    ``ref_chosen_logp`` and ``ref_rejected_logp``, shape ``(B,)`` (or
    ``(num_steps, B)`` when ``stacked``).
  """
  nested = isinstance(batch, Mapping) and key in batch
  dpo = _part(batch, key if nested else None, _PREFERENCE_KEYS,
              "add_reference_logprobs")

  def one(part):
    ref_c, ref_r = _pair_logprobs(lambda _x, _y, ids, m: reference_apply(ids, m),
                                  None, None, part)
    return jax.lax.stop_gradient(ref_c), jax.lax.stop_gradient(ref_r)

  inputs = {k: dpo[k] for k in _PREFERENCE_KEYS}
  ref_c, ref_r = jax.lax.map(one, inputs) if stacked else one(inputs)
  new = dict(dpo, ref_chosen_logp=ref_c, ref_rejected_logp=ref_r)
  return dict(batch, **{key: new}) if nested else new


def dpo_logprobs(apply_fn: ApplyFn, x: Any, y: Any, batch: Batch, *,
                 key: str = "dpo") -> Tuple[jax.Array, jax.Array]:
  """Policy log-probabilities ``(pi_chosen, pi_rejected)``, each ``(B,)``."""
  return _pair_logprobs(apply_fn, x, y,
                        _part(batch, key, _PREFERENCE_KEYS, "dpo_logprobs"))


def preference_accuracy(margin: jax.Array) -> jax.Array:
  """Per-pair preference score: 1 if ``margin > 0``, 1/2 if 0, else 0.

  Decision: a tie counts as half right, so a model that does not separate
  the two responses at all (e.g. the reference model itself, whose margins
  are all exactly 0) scores 0.5, the accuracy of a coin flip, not 0.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbilevel import llm
    >>> llm.preference_accuracy(jnp.array([0.3, 0.0, -1.0])).tolist()
    [1.0, 0.5, 0.0]
  """
  margin = jnp.asarray(margin)
  kind = jnp.promote_types(margin.dtype, jnp.float32)
  return ((margin > 0).astype(kind) + 0.5 * (margin == 0).astype(kind))


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames="beta")
def _eval_margins(apply_fn, has_ref, x, y, reference, chunks, *, beta):
  def one(chunk):
    pi_c, pi_r = _pair_logprobs(apply_fn, x, y, chunk)
    if has_ref:
      ref_c, ref_r = chunk["ref_chosen_logp"], chunk["ref_rejected_logp"]
    else:
      ref_c, ref_r = _pair_logprobs(apply_fn, reference[0], reference[1],
                                    chunk)
    return dpo_reward_margin(pi_c, pi_r, ref_c, ref_r, beta=beta)

  return jax.lax.map(one, chunks)


def preference_eval(apply_fn: ApplyFn, x: Any, y: Any, pairs: Batch, *,
                    reference: Any = None, beta: float = 0.1,
                    batch_size: int = 8) -> Dict[str, float]:
  r"""Preference accuracy and reward margin on held-out pairs, with errors.

  For each pair the implicit DPO reward margin
  :math:`m = \beta[(\pi_c - \mathrm{ref}_c) - (\pi_r - \mathrm{ref}_r)]`
  is computed (:func:`dpo_reward_margin`), in chunks of ``batch_size`` pairs
  under one compiled program. The accuracy scores each pair with
  :func:`preference_accuracy` (a tie counts 1/2, so the reference model
  scores 0.5). Standard errors are those of a mean over independent pairs,
  ``std(ddof=1) / sqrt(n)``.

  Args:
    apply_fn: ``(x, y, input_ids, attention_mask) -> logits`` (e.g.
      ``problem.apply_fn`` of :func:`jaxbilevel.llm.dpo_sft_problem`, or
      :func:`jaxbilevel.llm.bilevel_split`'s).
    x: the upper variable (adapters) to evaluate.
    y: the lower variable (head) to evaluate.
    pairs: preference arrays of
      :func:`jaxbilevel.llm.tokenize_preferences` (``[N, T]`` each); if
      they hold ``ref_chosen_logp`` / ``ref_rejected_logp`` (as
      ``problem.batches["dpo"]`` does) those are the reference.
    reference: otherwise, the reference model's ``(x, y)`` for ``apply_fn``,
      e.g. ``problem.params0`` (adapters with ``B = 0``: the base model).
    beta: the DPO temperature of the margin.
    batch_size: pairs per forward pass.

  Returns:
    A dict of floats: ``accuracy``, ``accuracy_se``, ``margin`` (mean reward
    margin), ``margin_se``, ``loss`` (mean DPO loss), ``loss_se`` and ``n``
    (pairs).

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> from jaxbilevel import llm
    >>> apply_fn = lambda x, y, ids, m: jnp.zeros(ids.shape + (5,)) + x
    >>> ids = np.array([[1, 2, 3]] * 4)
    >>> pairs = dict(chosen_ids=ids, chosen_attention_mask=ids * 0 + 1,
    ...              chosen_loss_mask=np.array([[0, 1, 1]] * 4),
    ...              rejected_ids=ids, rejected_attention_mask=ids * 0 + 1,
    ...              rejected_loss_mask=np.array([[0, 0, 1]] * 4))
    >>> out = llm.preference_eval(apply_fn, 0.0, None, pairs,
    ...                           reference=(0.0, None), batch_size=3)
    >>> out["accuracy"], out["margin"], out["n"]   # all ties
    (0.5, 0.0, 4)
  """
  missing = [k for k in _PREFERENCE_KEYS if k not in pairs]
  if missing:
    raise KeyError(f"preference_eval: pairs lacks {missing} (use the arrays "
                   "of jaxbilevel.llm.tokenize_preferences).")
  beta = float(beta)
  if not beta > 0:
    raise ValueError(f"preference_eval: beta must be > 0, got {beta}.")
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or (
      batch_size < 1):
    raise ValueError(f"preference_eval: batch_size must be an int >= 1, got "
                     f"{batch_size!r}.")
  has_ref = all(k in pairs for k in _REF_KEYS)
  if not has_ref and reference is None:
    raise ValueError(
        "preference_eval: pairs has no ref_chosen_logp / ref_rejected_logp; "
        "pass reference=(x_ref, y_ref), e.g. problem.params0 (the base "
        "model).")
  keys = _PREFERENCE_KEYS + (_REF_KEYS if has_ref else ())
  arrays = {k: np.asarray(pairs[k]) for k in keys}
  n = int(arrays["chosen_ids"].shape[0])
  if n == 0:
    raise ValueError("preference_eval: pairs is empty.")
  size = min(batch_size, n)
  count = -(-n // size)
  index = np.concatenate([np.arange(n), np.zeros(count * size - n, np.int64)])
  chunks = {k: v[index].reshape((count, size) + v.shape[1:])
            for k, v in arrays.items()}
  ref = None if has_ref else tuple(reference)
  margin = np.asarray(_eval_margins(apply_fn, has_ref, x, y, ref, chunks,
                                    beta=beta)).reshape(-1)[:n]
  margin = margin.astype(np.float64)
  score = np.asarray(preference_accuracy(margin)).astype(np.float64)
  loss = np.logaddexp(0.0, -margin)  # -log sigmoid(m)

  def se(values):
    return float(np.std(values, ddof=1) / np.sqrt(n)) if n > 1 else 0.0

  return {"accuracy": float(np.mean(score)), "accuracy_se": se(score),
          "margin": float(np.mean(margin)), "margin_se": se(margin),
          "loss": float(np.mean(loss)), "loss_se": se(loss), "n": n}
