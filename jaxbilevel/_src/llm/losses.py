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

from typing import Any, Callable, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
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
    (fraction of pairs with a positive margin), ``margin`` (mean reward
    margin ``beta[(pi_c - ref_c) - (pi_r - ref_r)]``), ``chosen_reward`` and
    ``rejected_reward`` (means of ``beta (pi - ref)``).
  """
  dpo = _part(batch, key, _PREFERENCE_KEYS + _REF_KEYS, "dpo_metrics")
  pi_c, pi_r = _pair_logprobs(apply_fn, x, y, dpo)
  chosen = beta * (pi_c - dpo["ref_chosen_logp"])
  rejected = beta * (pi_r - dpo["ref_rejected_logp"])
  margin = chosen - rejected
  return {"loss": jnp.mean(-jax.nn.log_sigmoid(margin)),
          "accuracy": jnp.mean((margin > 0).astype(margin.dtype)),
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
