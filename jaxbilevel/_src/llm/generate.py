r"""Text generation from a :class:`CausalLM` (with or without LoRA adapters).

:func:`generate` decodes greedily (``temperature=0``) or samples with a
temperature and nucleus (top-p) filtering (Holtzman et al., 2020). It runs as
one compiled program: a *prefill* of the (left-padded) prompts fills a
key/value cache, then a ``lax.while_loop`` appends one token per step, feeding
only that token through the model and attending to the cached keys and values.
The loop has a static bound ``max_new_tokens`` and stops early once every
sequence has produced an end-of-sequence token.

The cache (:class:`KVCache`) is a pytree of arrays of static shape ``[B, S,
kv_heads, head_dim]`` per layer, with ``S`` the prompt length plus
``max_new_tokens``; :func:`init_cache` and :func:`forward_cached` expose it
for custom decoding loops. :func:`forward_cached` computes the same function
as ``CausalLM.__call__``: rotary positions continue from the tokens
already cached (the index of each token among the real ones, as in the full
forward pass with a left-padded prompt), and a query attends to the real
cached tokens at or before its own slot. The logits of a cached decode equal
those of recomputing the full forward pass at every step up to float
rounding (``use_cache=False`` does the latter, for checks and timing).

Decision: the cached forward pass lives here and reuses the model's own
sub-modules (projections, norms, MLP; LoRA wrappers included) rather than
adding a cache argument to :class:`CausalLM`, whose training forward stays
unchanged.

References:
  Holtzman, Buys, Du, Forbes and Choi, "The Curious Case of Neural Text
  Degeneration", ICLR 2020 (arXiv:1904.09751).
  Pope et al., "Efficiently Scaling Transformer Inference", MLSys 2023
  (arXiv:2211.05102).
"""

from __future__ import annotations

import functools
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple, Union

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jaxbilevel._src import base
from jaxbilevel._src.llm import model as model_lib

_FROM_CONFIG = "config"


class KVCache(NamedTuple):
  """Keys and values of the tokens seen so far, one array pair per layer.

  Attributes:
    keys: tuple (one per layer) of ``[B, S, kv_heads, head_dim]`` arrays
      (rotary embedding applied), in the model's compute dtype.
    values: tuple of arrays of the same shapes.
    valid: ``[B, S]`` bool, True at the slots holding a real token.
    length: int32 scalar, the number of slots filled (the next write slot).
    next_position: ``[B]`` int32, the rotary position of each sequence's next
      real token (its number of real tokens so far).
  """

  keys: Tuple[jax.Array, ...]
  values: Tuple[jax.Array, ...]
  valid: jax.Array
  length: jax.Array
  next_position: jax.Array


class Generation(NamedTuple):
  """The output of :func:`generate`.

  Attributes:
    tokens: ``[B, max_new_tokens]`` int32 generated ids; after a sequence's
      end-of-sequence token the row holds ``pad_id``.
    lengths: ``[B]`` int32, the generated tokens of each row (the
      end-of-sequence token included).
    texts: the decoded texts (special tokens skipped) when a tokenizer was
      given, else ``None``.
    logits: ``[B, max_new_tokens, V]`` float32 logits each token was chosen
      from (before temperature / top-p), when ``return_logits=True``; rows past
      their end hold the logits of the padding steps.
  """

  tokens: np.ndarray
  lengths: np.ndarray
  texts: Optional[List[str]]
  logits: Optional[np.ndarray]


def _err(message):
  return base.BilevelValidationError(message)


def init_cache(model: model_lib.CausalLM, batch_size: int,
               max_length: int) -> KVCache:
  """An empty :class:`KVCache` for ``batch_size`` sequences of ``max_length``.

  Args:
    model: the :class:`CausalLM` (its config and compute dtype set the
      shapes and dtype).
    batch_size: B.
    max_length: S, the total number of tokens (prompt and generated) the
      cache holds.

  Returns:
    A cache with no slot filled.
  """
  batch_size = base.check_static_int(batch_size, "batch_size")
  max_length = base.check_static_int(max_length, "max_length")
  config = model.config
  shape = (batch_size, max_length, config.num_key_value_heads,
           config.head_dim)
  zeros = tuple(jnp.zeros(shape, model.dtype)
                for _ in range(config.num_hidden_layers))
  return KVCache(keys=zeros, values=zeros,
                 valid=jnp.zeros((batch_size, max_length), bool),
                 length=jnp.zeros((), jnp.int32),
                 next_position=jnp.zeros((batch_size,), jnp.int32))


def _attend(attn, h, cos, sin, k_cache, v_cache, mask, start):
  """Attention of ``h`` (written at slot ``start``) over the cache."""
  batch, length, _ = h.shape
  kv, hd = attn.num_kv_heads, attn.head_dim
  group = attn.num_heads // kv
  q = model_lib.apply_rope(
      attn.q_proj(h).reshape(batch, length, attn.num_heads, hd), cos, sin)
  k = model_lib.apply_rope(attn.k_proj(h).reshape(batch, length, kv, hd),
                           cos, sin)
  v = attn.v_proj(h).reshape(batch, length, kv, hd)
  zero = jnp.zeros_like(start)
  k_cache = jax.lax.dynamic_update_slice(
      k_cache, k.astype(k_cache.dtype), (zero, start, zero, zero))
  v_cache = jax.lax.dynamic_update_slice(
      v_cache, v.astype(v_cache.dtype), (zero, start, zero, zero))
  q = q.reshape(batch, length, kv, group, hd)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k_cache) * (hd ** -0.5)
  kind = model_lib._at_least_f32(scores.dtype)  # pylint: disable=protected-access
  scores = jnp.where(mask, scores.astype(kind), jnp.finfo(kind).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", weights, v_cache)
  out = attn.o_proj(out.reshape(batch, length, attn.num_heads * hd))
  return out, k_cache, v_cache


def forward_cached(model: model_lib.CausalLM, input_ids, cache: KVCache,
                   attention_mask=None) -> Tuple[jax.Array, KVCache]:
  """Runs ``input_ids`` through the model after the tokens already cached.

  The ``T`` new tokens are written at slots ``cache.length ... cache.length
  + T - 1``; token ``t`` attends to the real tokens of slots up to its own.
  Its rotary position is ``cache.next_position`` plus its index among the
  new real tokens, so a prefill of a left-padded prompt followed by one
  token per call gives the logits of ``CausalLM.__call__`` on the whole
  sequence. The caller keeps ``cache.length + T <= S``.

  Args:
    model: a :class:`CausalLM` (adapters allowed).
    input_ids: int ``[B, T]``.
    cache: the :class:`KVCache` (from :func:`init_cache` or a previous call).
    attention_mask: ``[B, T]``, 1 for real tokens and 0 for padding (default
      all ones).

  Returns:
    ``(logits [B, T, V], new cache)``; logits are float32 (float64 for a
    float64 model).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbilevel import llm
    >>> model = llm.CausalLM(llm.LMConfig.tiny(), rngs=nnx.Rngs(0))
    >>> ids = jnp.array([[5, 6, 7, 8]])
    >>> cache = llm.init_cache(model, 1, 8)
    >>> _, cache = llm.forward_cached(model, ids[:, :3], cache)
    >>> last, cache = llm.forward_cached(model, ids[:, 3:], cache)
    >>> bool(jnp.allclose(last[:, 0], model(ids)[:, 3], atol=1e-5))
    True
  """
  input_ids = jnp.asarray(input_ids)
  if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise _err(f"forward_cached: input_ids must be an int array [batch, "
               f"length], got shape {input_ids.shape} dtype "
               f"{input_ids.dtype}.")
  if not isinstance(cache, KVCache):
    raise _err(f"forward_cached: cache must be a KVCache (from "
               f"llm.init_cache), got {type(cache).__name__}.")
  batch, length = input_ids.shape
  if cache.valid.shape[0] != batch or length > cache.valid.shape[1]:
    raise _err(f"forward_cached: input_ids {input_ids.shape} does not fit a "
               f"cache of batch {cache.valid.shape[0]} and "
               f"{cache.valid.shape[1]} slots.")
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids.shape, jnp.int32)
  real = jnp.asarray(attention_mask).astype(bool)
  if real.shape != input_ids.shape:
    raise _err(f"forward_cached: attention_mask has shape {real.shape}, "
               f"input_ids {input_ids.shape}; they must match.")
  start = jnp.asarray(cache.length, jnp.int32)
  positions = (cache.next_position[:, None]
               + jnp.maximum(jnp.cumsum(real, axis=-1) - 1, 0))
  valid = jax.lax.dynamic_update_slice(cache.valid, real,
                                       (jnp.zeros_like(start), start))
  slots = jnp.arange(cache.valid.shape[1])
  # [B, kv, group, T, S]: query t (slot start + t) sees real slots <= its own.
  causal = slots[None, :] <= (start + jnp.arange(length))[:, None]
  mask = (causal[None] & valid[:, None, :])[:, None, None]
  angles = (positions.astype(jnp.float32)[..., None]
            * jnp.asarray(model_lib.rope_inverse_frequencies(model.config)))
  angles = jnp.concatenate([angles, angles], axis=-1)
  cos = jnp.cos(angles).astype(model.dtype)
  sin = jnp.sin(angles).astype(model.dtype)
  h = model.embed_tokens(input_ids)
  keys, values = [], []
  for layer, k_cache, v_cache in zip(model.layers, cache.keys, cache.values):
    out, k_cache, v_cache = _attend(
        layer.self_attn, layer.input_layernorm(h), cos, sin, k_cache,
        v_cache, mask, start)
    h = h + out
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    keys.append(k_cache)
    values.append(v_cache)
  logits = model.lm_head(model.norm(h)).astype(
      model_lib._at_least_f32(model.dtype))  # pylint: disable=protected-access
  new = KVCache(keys=tuple(keys), values=tuple(values), valid=valid,
                length=start + length,
                next_position=cache.next_position
                + jnp.sum(real, axis=-1).astype(jnp.int32))
  return logits, new


def top_p_filter(logits: jax.Array, top_p) -> jax.Array:
  """Sets to ``-inf`` the logits outside the nucleus of probability ``top_p``.

  The nucleus is the smallest set of most likely tokens whose probabilities
  sum to at least ``top_p`` (the most likely token is always kept; tokens
  tied with the least likely kept one are kept too).

  Args:
    logits: ``[..., V]``.
    top_p: in ``(0, 1]``; 1 keeps every token.

  Returns:
    The filtered logits.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbilevel import llm
    >>> logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
    >>> jnp.isfinite(llm.top_p_filter(logits, 0.7)).tolist()
    [True, True, False, False]
  """
  ordered = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  keep = before < top_p
  cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= cutoff, logits, -jnp.inf)


def _choose(logits, key, temperature, top_p, greedy):
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = top_p_filter(logits / temperature, top_p)
  return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "max_new_tokens", "greedy", "use_cache", "return_logits"))
def _decode(graphdef, state, ids, mask, key, temperature, top_p, eos_ids,
            pad_id, *, max_new_tokens, greedy, use_cache, return_logits):
  model = nnx.merge(graphdef, state)
  batch, prompt_len = ids.shape
  total = prompt_len + max_new_tokens
  vocab = model.config.vocab_size
  kind = model_lib._at_least_f32(model.dtype)  # pylint: disable=protected-access
  if use_cache:
    logits, cache = forward_cached(
        model, ids, init_cache(model, batch, total), mask)
    carry_model = cache
  else:  # Full recompute over a static buffer; unfilled slots masked out.
    buf_ids = jnp.zeros((batch, total), ids.dtype).at[:, :prompt_len].set(ids)
    buf_mask = jnp.zeros((batch, total), mask.dtype).at[
        :, :prompt_len].set(mask)
    logits = model(buf_ids, buf_mask)[:, :prompt_len]
    carry_model = (buf_ids, buf_mask)
  last = logits[:, -1]
  tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  out_logits = (jnp.zeros((batch, max_new_tokens, vocab), kind)
                if return_logits else jnp.zeros((), kind))
  done = jnp.zeros((batch,), bool)
  lengths = jnp.zeros((batch,), jnp.int32)

  def cond(carry):
    step, _, _, _, _, done, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, carry_model, last, key, tokens, done, lengths, out_logits = carry
    key, sub = jax.random.split(key)
    token = _choose(last, sub, temperature, top_p, greedy)
    token = jnp.where(done, pad_id, token)
    tokens = tokens.at[:, step].set(token)
    lengths = lengths + (~done).astype(jnp.int32)
    if return_logits:
      out_logits = out_logits.at[:, step].set(last)
    done = done | jnp.any(token[:, None] == eos_ids[None, :], axis=-1)
    if use_cache:
      step_logits, carry_model = forward_cached(model, token[:, None],
                                                carry_model)
      last = step_logits[:, 0]
    else:
      buf_ids, buf_mask = carry_model
      slot = prompt_len + step
      zero = jnp.zeros_like(slot)
      buf_ids = jax.lax.dynamic_update_slice(buf_ids, token[:, None].astype(
          buf_ids.dtype), (zero, slot))
      buf_mask = jax.lax.dynamic_update_slice(
          buf_mask, jnp.ones((batch, 1), buf_mask.dtype), (zero, slot))
      full = model(buf_ids, buf_mask)
      last = jax.lax.dynamic_index_in_dim(full, slot, axis=1, keepdims=False)
      carry_model = (buf_ids, buf_mask)
    return (step + 1, carry_model, last, key, tokens, done, lengths,
            out_logits)

  carry = (jnp.zeros((), jnp.int32), carry_model, last, key, tokens, done,
           lengths, out_logits)
  carry = jax.lax.while_loop(cond, body, carry)
  _, _, _, _, tokens, _, lengths, out_logits = carry
  return tokens, lengths, out_logits


def _special(value, config, name):
  if isinstance(value, str) and value == _FROM_CONFIG:
    value = getattr(config, name, None)
  if value is None:
    return ()
  if isinstance(value, (tuple, list)):
    return tuple(int(v) for v in value)
  return (int(value),)


def _prompt_ids(tokenizer, prompt, bos):
  """Left-padded ``(ids, mask)`` int32 arrays from text or token ids."""
  if isinstance(prompt, str) or (
      isinstance(prompt, (list, tuple)) and prompt
      and all(isinstance(p, str) for p in prompt)):
    if tokenizer is None:
      raise _err("generate: prompt is text but tokenizer is None; pass the "
                 "model's tokenizer (llm.load_pretrained returns it) or token "
                 "ids.")
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    rows = [list(bos) + list(e.ids) for e in tokenizer.encode_batch(
        texts, add_special_tokens=False)]
  else:
    nested = (isinstance(prompt, (list, tuple)) and prompt
              and all(np.ndim(p) == 1 for p in prompt))
    arrays = ([np.asarray(p) for p in prompt] if nested
              else [np.asarray(prompt)])
    if any(a.size and (a.dtype == object
                       or not np.issubdtype(a.dtype, np.integer))
           for a in arrays):
      raise _err(f"generate: prompt must be a string, a list of strings or "
                 f"int token ids ([T], [B, T] or a list of [T_i]), got "
                 f"{type(prompt).__name__}.")
    if not nested:
      arr = arrays[0]
      if arr.ndim == 1:
        arr = arr[None]
      if arr.ndim != 2:
        raise _err(f"generate: token-id prompts must be [T] or [B, T], got "
                   f"shape {arr.shape}.")
      arrays = list(arr)
    rows = [list(bos) + r.tolist() for r in arrays]
  if not rows or min(len(r) for r in rows) == 0:
    raise _err("generate: a prompt is empty; give at least one token (or set "
               "bos_id).")
  width = max(len(r) for r in rows)
  ids = np.zeros((len(rows), width), np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    ids[i, width - len(row):] = row
    mask[i, width - len(row):] = 1
  return ids, mask


def generate(model: model_lib.CausalLM,
             tokenizer: Any,
             prompt: Union[str, Sequence[str], Any], *,
             max_new_tokens: int = 64,
             temperature: float = 0.0,
             top_p: float = 1.0,
             key: Optional[jax.Array] = None,
             params: Optional[base.BilevelParams] = None,
             eos_id: Any = _FROM_CONFIG,
             bos_id: Any = _FROM_CONFIG,
             pad_id: Optional[int] = None,
             use_cache: bool = True,
             return_logits: bool = False) -> Generation:
  r"""Generates text from ``model`` (with its LoRA adapters, if any).

  The prompts are tokenized without special tokens, ``bos_id`` is prepended
  (as :func:`jaxbilevel.llm.dpo_sft_problem` does for training prompts) and
  a batch of prompts is left-padded. Each new token is the argmax of the
  logits (``temperature=0``) or is sampled from
  :math:`\mathrm{softmax}(\text{logits}/T)` restricted to the top-p nucleus
  (:func:`top_p_filter`). A row stops at its first ``eos_id`` token; the
  call stops when every row has stopped or after ``max_new_tokens``.

  For an instruction-tuned model, format the prompt with its chat template
  first (:func:`jaxbilevel.llm.format_chat`).

  One compiled program per (model structure, prompt shape,
  ``max_new_tokens``, greedy or not, ``use_cache``, ``return_logits``);
  ``temperature``, ``top_p`` and ``key`` are traced.

  Args:
    model: a :class:`CausalLM`, possibly with adapters
      (:func:`jaxbilevel.llm.add_lora`).
    tokenizer: a ``tokenizers.Tokenizer``; ``None`` when ``prompt`` holds
      token ids (then ``texts`` is ``None``).
    prompt: a string, a list of strings (a batch), or int token ids ``[T]``
      or ``[B, T]`` (without padding).
    max_new_tokens: the static bound on the generated tokens.
    temperature: 0 for greedy decoding; > 0 to sample.
    top_p: nucleus probability in ``(0, 1]`` (sampling only).
    key: a ``jax.random`` key; required when ``temperature > 0``.
    params: trained ``BilevelParams(x=adapters, y=head)`` of
      :func:`jaxbilevel.llm.bilevel_split` (e.g. from ``jbl.run`` on a
      :class:`DPOSFTProblem`) to use instead of the values in ``model``;
      ``model`` itself is not modified.
    eos_id: end-of-sequence id(s) (default: the config's
      ``eos_token_id``; ``None``: never stop early).
    bos_id: id prepended to every prompt (default: the config's
      ``bos_token_id``; ``None``: none).
    pad_id: id written after a row's end (default: its first ``eos_id``, or
      0).
    use_cache: decode with the key/value cache (default). ``False``
      recomputes the full forward pass over the whole sequence at every step
      (same tokens; for checks and timing).
    return_logits: also return the ``[B, max_new_tokens, V]`` logits.

  Returns:
    A :class:`Generation`.

  Examples:
    >>> import jax
    >>> from flax import nnx
    >>> from jaxbilevel import llm
    >>> model = llm.CausalLM(llm.LMConfig.tiny(), rngs=nnx.Rngs(0))
    >>> out = llm.generate(model, None, [3, 4, 5], max_new_tokens=6)
    >>> out.tokens.shape, out.lengths.tolist()
    ((1, 6), [6])
    >>> sampled = llm.generate(model, None, [[3, 4, 5], [6, 7, 8]],
    ...                        max_new_tokens=4, temperature=0.7, top_p=0.9,
    ...                        key=jax.random.key(0))
    >>> sampled.tokens.shape
    (2, 4)
  """
  if not isinstance(model, model_lib.CausalLM):
    raise _err(f"generate: model must be a jaxbilevel.llm.CausalLM, got "
               f"{type(model).__name__}.")
  max_new_tokens = base.check_static_int(max_new_tokens, "max_new_tokens")
  if isinstance(temperature, bool) or not isinstance(
      temperature, (int, float, np.floating)) or not temperature >= 0:
    raise _err(f"generate: temperature must be a number >= 0 (0: greedy), "
               f"got {temperature!r}.")
  if isinstance(top_p, bool) or not isinstance(
      top_p, (int, float, np.floating)) or not 0 < top_p <= 1:
    raise _err(f"generate: top_p must be in (0, 1], got {top_p!r}.")
  greedy = float(temperature) == 0.0
  if not greedy and key is None:
    raise _err("generate: temperature > 0 samples and needs key= (e.g. "
               "jax.random.key(0)).")
  if key is None:
    key = jax.random.key(0)
  elif not (isinstance(key, jax.Array) and (
      jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
      or (key.dtype == jnp.uint32 and key.shape == (2,)))):
    raise _err(f"generate: key must be a jax.random key, got {key!r}.")
  config = model.config
  eos = _special(eos_id, config, "eos_token_id")
  bos = _special(bos_id, config, "bos_token_id")
  if len(bos) > 1:
    raise _err(f"generate: bos_id must be one id, got {bos}.")
  pad = int(pad_id) if pad_id is not None else (eos[0] if eos else 0)
  ids, mask = _prompt_ids(tokenizer, prompt, bos)
  bad = [int(t) for t in np.unique(ids[mask.astype(bool)])
         if not 0 <= t < config.vocab_size]
  if bad:
    raise _err(f"generate: token ids {bad[:5]} are outside the vocabulary "
               f"[0, {config.vocab_size}); use the model's tokenizer.")
  if params is not None:
    if not isinstance(params, base.BilevelParams):
      raise _err(f"generate: params must be BilevelParams(x, y) from "
                 f"llm.bilevel_split, got {type(params).__name__}.")
    model = nnx.clone(model)
    nnx.update(model, params.x, params.y)
  graphdef, state = nnx.split(model)
  eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)
  tokens, lengths, logits = _decode(
      graphdef, state, jnp.asarray(ids), jnp.asarray(mask), key,
      jnp.asarray(temperature if not greedy else 1.0, jnp.float32),
      jnp.asarray(top_p, jnp.float32), eos_arr, jnp.int32(pad),
      max_new_tokens=max_new_tokens, greedy=greedy,
      use_cache=bool(use_cache), return_logits=bool(return_logits))
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  texts = None
  if tokenizer is not None:
    texts = [tokenizer.decode(row[:n].tolist(), skip_special_tokens=True)
             for row, n in zip(tokens, lengths)]
  return Generation(tokens=tokens, lengths=lengths, texts=texts,
                    logits=np.asarray(logits) if return_logits else None)
