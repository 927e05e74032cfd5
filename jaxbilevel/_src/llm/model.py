r"""A compact flax.nnx decoder language model for the Llama / Qwen2 family.

The model is the pre-norm decoder of Llama (Touvron et al., 2023) and Qwen2
(Yang et al., 2024): token embedding; ``L`` blocks of

.. math::

  h &\leftarrow h + W_o\,\mathrm{attn}\big(\mathrm{RoPE}(W_q \bar h),
      \mathrm{RoPE}(W_k \bar h), W_v \bar h\big),
      \quad \bar h = \mathrm{RMSNorm}(h),\\
  h &\leftarrow h + W_{down}\big(\mathrm{silu}(W_{gate}\bar h)\odot
      W_{up}\bar h\big), \quad \bar h = \mathrm{RMSNorm}(h);

a final RMSNorm and a linear head. Attention is causal, grouped-query
(``num_key_value_heads`` key/value heads shared by groups of query heads,
Ainslie et al., 2023) with rotary position embeddings (Su et al., 2021) and,
for Qwen2, biases on the q/k/v projections.

Decision: jaxbilevel writes its own model instead of depending on a model
zoo. The whole family fits in a few hundred lines; it adds no dependency; and
every projection is a plain ``nnx.Linear`` whose path mirrors the Hugging
Face parameter name (``layers/3/self_attn/q_proj``), so LoRA adapters are
placed by a regular expression on that path
(:func:`jaxbilevel.llm.add_lora`) and the bilevel split selects variables by
type and path, with no model-specific glue.

Decision: the head ``lm_head`` is always its own ``nnx.Linear`` holding its
own kernel, also for checkpoints with tied embeddings
(``tie_word_embeddings``): the embedding is *copied* into the head when the
model is built or loaded. In the bilevel fine-tuning of the PBGD-Free paper
the head is the lower-level variable ``y`` while the embedding is frozen, so
the two must be able to differ; the copy makes the loaded model compute
exactly the tied logits at the start.

Numerics follow the Hugging Face PyTorch reference: RMSNorm statistics and
the attention softmax are computed in (at least) float32 whatever the
compute dtype; logits are returned in float32 (float64 for a float64 model,
which the finite-difference tests use).

References:
  Touvron et al., "LLaMA: Open and Efficient Foundation Language Models",
  2023 (arXiv:2302.13971).
  Yang et al., "Qwen2 Technical Report", 2024 (arXiv:2407.10671).
  Su et al., "RoFormer: Enhanced Transformer with Rotary Position
  Embedding", 2021 (arXiv:2104.09864).
  Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models
  from Multi-Head Checkpoints", EMNLP 2023 (arXiv:2305.13245).
  Zhang and Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Tuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jaxbilevel._src import base

# Hugging Face ``architectures`` / ``model_type`` -> family.
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "llama": "llama",
    "qwen2": "qwen2",
}
_HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_ROPE_TYPES = ("default", "linear", "llama3")


class UnknownArchitectureError(ValueError):
  """Raised for a checkpoint whose architecture the model does not cover."""


def _freeze(value):
  """Dicts -> sorted tuples of items, lists -> tuples (hashable config)."""
  if isinstance(value, Mapping):
    return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """The hyperparameters of a Llama / Qwen2 decoder.

  Field names are those of the Hugging Face ``config.json``. The config is
  hashable (``rope_scaling`` is stored as a sorted tuple of items), so it can
  be a static attribute of the nnx model.

  Attributes:
    vocab_size: number of rows of the embedding (and columns of the head).
    hidden_size: model width d.
    intermediate_size: width of the SwiGLU MLP.
    num_hidden_layers: number of decoder blocks.
    num_attention_heads: number of query heads.
    num_key_value_heads: number of key/value heads (divides the former).
    head_dim: width of one head (default ``hidden_size //
      num_attention_heads``).
    architecture: ``"llama"`` or ``"qwen2"``.
    rms_norm_eps: epsilon of RMSNorm.
    rope_theta: RoPE base.
    rope_scaling: ``None`` or the HF ``rope_scaling`` dict as sorted items;
      ``rope_type`` ``"default"``, ``"linear"`` and ``"llama3"`` are covered.
    qkv_bias: biases on the q/k/v projections (Qwen2; Llama's
      ``attention_bias``).
    o_bias: bias on the output projection (Llama's ``attention_bias``).
    mlp_bias: biases on the MLP projections (Llama's ``mlp_bias``).
    tie_word_embeddings: whether the checkpoint ties head and embedding (the
      model then starts with a *copy* of the embedding in ``lm_head``).
    max_position_embeddings: context length of the checkpoint.
    bos_token_id: beginning-of-sequence token, if any.
    eos_token_id: end-of-sequence token(s), if any.

  Examples:
    >>> from jaxbilevel import llm
    >>> config = llm.LMConfig.from_hf({
    ...     "architectures": ["Qwen2ForCausalLM"], "vocab_size": 64,
    ...     "hidden_size": 32, "intermediate_size": 64,
    ...     "num_hidden_layers": 2, "num_attention_heads": 4,
    ...     "num_key_value_heads": 2})
    >>> config.architecture, config.head_dim, config.qkv_bias
    ('qwen2', 8, True)
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int = 0
  architecture: str = "llama"
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Optional[Tuple[Tuple[str, Any], ...]] = None
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 2048
  bos_token_id: Optional[int] = None
  eos_token_id: Any = None

  def __post_init__(self):
    if not self.head_dim:
      object.__setattr__(self, "head_dim",
                         self.hidden_size // max(self.num_attention_heads, 1))
    object.__setattr__(self, "rope_scaling", _freeze(self.rope_scaling))
    object.__setattr__(self, "eos_token_id", _freeze(self.eos_token_id))
    for name in ("vocab_size", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise base.BilevelValidationError(
            f"LMConfig: {name} must be a positive int, got {value!r}.")
    if self.architecture not in _HF_CLASS:
      raise UnknownArchitectureError(
          f"LMConfig: unknown architecture {self.architecture!r}; covered: "
          f"{sorted(_HF_CLASS)}.")
    if self.num_attention_heads % self.num_key_value_heads:
      raise base.BilevelValidationError(
          f"LMConfig: num_attention_heads={self.num_attention_heads} is not "
          f"a multiple of num_key_value_heads={self.num_key_value_heads}.")
    if self.head_dim % 2:
      raise base.BilevelValidationError(
          f"LMConfig: head_dim={self.head_dim} must be even for RoPE.")
    rope_type = self.rope_scaling_dict.get("rope_type", "default")
    if rope_type not in _ROPE_TYPES:
      raise base.BilevelValidationError(
          f"LMConfig: rope_scaling type {rope_type!r} is not covered; "
          f"covered: {_ROPE_TYPES}.")

  @property
  def rope_scaling_dict(self) -> dict:
    """``rope_scaling`` as a dict (``{}`` when absent)."""
    items = dict(self.rope_scaling or ())
    if "type" in items and "rope_type" not in items:
      items["rope_type"] = items["type"]
    return items

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], *, where: str = "config") -> LMConfig:
    """Builds the config from a Hugging Face ``config.json`` dict.

    Args:
      hf: the parsed ``config.json``.
      where: a name for the source (e.g. the file path) used in errors.

    Returns:
      The :class:`LMConfig`.

    Raises:
      UnknownArchitectureError: for anything but Llama / Qwen2 (e.g.
        Mistral's sliding window), or an activation other than SiLU.
    """
    if not isinstance(hf, Mapping):
      raise base.BilevelValidationError(
          f"LMConfig.from_hf: {where} must be a dict (the parsed config.json), "
          f"got {type(hf).__name__}.")
    names = list(hf.get("architectures") or []) + [hf.get("model_type")]
    family = next((_ARCHITECTURES[n] for n in names if n in _ARCHITECTURES),
                  None)
    if family is None:
      raise UnknownArchitectureError(
          f"{where}: unknown architecture (architectures="
          f"{hf.get('architectures')}, model_type={hf.get('model_type')!r}); "
          "jaxbilevel.llm covers LlamaForCausalLM and Qwen2ForCausalLM.")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise UnknownArchitectureError(
          f"{where}: hidden_act={act!r}; the model implements SwiGLU (silu).")
    if hf.get("use_sliding_window", False):
      raise UnknownArchitectureError(
          f"{where}: use_sliding_window=true is not implemented; set it to "
          "false (full attention) or use another loader.")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                           "num_hidden_layers", "num_attention_heads")
               if k not in hf]
    if missing:
      raise base.BilevelValidationError(
          f"{where}: missing keys {missing} in the model config.")
    heads = hf["num_attention_heads"]
    attention_bias = bool(hf.get("attention_bias", False))
    return cls(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        architecture=family,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rope_scaling=hf.get("rope_scaling"),
        qkv_bias=True if family == "qwen2" else attention_bias,
        o_bias=False if family == "qwen2" else attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
    )

  @classmethod
  def tiny(cls, **overrides) -> LMConfig:
    """A two-layer Llama config of width 32, for examples, tests and checks.

    ``vocab_size=64, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2``;
    other fields keep their defaults. A :class:`CausalLM` of it has 22,688
    parameters.

    Args:
      **overrides: fields to set otherwise (e.g. ``architecture="qwen2",
        qkv_bias=True``); they are validated as in the constructor.

    Returns:
      The :class:`LMConfig`.

    Examples:
      >>> from flax import nnx
      >>> from jaxbilevel import llm
      >>> config = llm.LMConfig.tiny()
      >>> config.hidden_size, config.head_dim, config.num_hidden_layers
      (32, 8, 2)
      >>> llm.count_params(llm.CausalLM(config, rngs=nnx.Rngs(0)))
      22688
      >>> llm.LMConfig.tiny(vocab_size=128, architecture="qwen2").vocab_size
      128
    """
    fields = dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self) -> dict:
    """The Hugging Face ``config.json`` dict of this config."""
    out = {
        "architectures": [_HF_CLASS[self.architecture]],
        "model_type": self.architecture,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_scaling": self.rope_scaling_dict or None,
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": (list(self.eos_token_id)
                         if isinstance(self.eos_token_id, tuple)
                         else self.eos_token_id),
        "torch_dtype": "float32",
    }
    if self.architecture == "llama":
      if self.qkv_bias != self.o_bias:
        raise base.BilevelValidationError(
            "LMConfig.to_hf: Llama has one attention_bias for q/k/v/o; got "
            f"qkv_bias={self.qkv_bias}, o_bias={self.o_bias}.")
      out["attention_bias"] = self.qkv_bias
      out["mlp_bias"] = self.mlp_bias
    else:
      if not self.qkv_bias or self.o_bias or self.mlp_bias:
        raise base.BilevelValidationError(
            "LMConfig.to_hf: Qwen2 has q/k/v biases and no o/MLP biases.")
      out["use_sliding_window"] = False
    return out


def rope_inverse_frequencies(config: LMConfig) -> np.ndarray:
  r"""The RoPE inverse frequencies :math:`\theta^{-2i/d}`, shape ``[d/2]``.

  Computed in float32 like the reference implementation. ``rope_scaling``
  of type ``"linear"`` divides them by ``factor``; ``"llama3"`` (Llama 3.1)
  divides the low frequencies by ``factor``, keeps the high ones and
  interpolates in between.

  Args:
    config: the model config.

  Returns:
    A float32 numpy array of length ``head_dim // 2``.
  """
  dim = config.head_dim
  inv = (1.0 / (np.float32(config.rope_theta)
                ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
                )).astype(np.float32)
  scaling = config.rope_scaling_dict
  kind = scaling.get("rope_type", "default")
  if kind == "linear":
    inv = inv / np.float32(scaling["factor"])
  elif kind == "llama3":
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    old = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    inv = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv


def _at_least_f32(dtype):
  """float32 for half types, the dtype itself for float32 / float64."""
  return jnp.promote_types(dtype, jnp.float32)


def _rotate_half(x):
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, cos, sin):
  """Rotates ``x`` of shape ``[B, T, heads, head_dim]`` (half-split layout)."""
  return x * cos[:, :, None, :] + _rotate_half(x) * sin[:, :, None, :]


class RMSNorm(nnx.Module):
  r"""Root-mean-square normalization :math:`w\odot h/\sqrt{\overline{h^2}+\epsilon}`.

  Decision: written here rather than ``nnx.RMSNorm`` to keep the reference
  numerics: statistics in float32, the normalized vector cast to the compute
  dtype before the scale multiplies it, and the HF parameter name
  ``weight``.
  """

  def __init__(self, dim: int, eps: float, *, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, h):
    h32 = h.astype(_at_least_f32(h.dtype))
    variance = jnp.mean(h32 * h32, axis=-1, keepdims=True)
    normed = (h32 * jax.lax.rsqrt(variance + self.eps)).astype(self.dtype)
    return self.weight[...].astype(self.dtype) * normed


def _linear(d_in, d_out, bias, dtype, param_dtype, rngs):
  return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype,
                    param_dtype=param_dtype,
                    kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


class Attention(nnx.Module):
  """Causal grouped-query self-attention with RoPE."""

  def __init__(self, config: LMConfig, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    d, hd = config.hidden_size, config.head_dim
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    self.num_heads, self.num_kv_heads, self.head_dim = heads, kv, hd
    self.dtype = dtype
    self.q_proj = _linear(d, heads * hd, config.qkv_bias, dtype, param_dtype,
                          rngs)
    self.k_proj = _linear(d, kv * hd, config.qkv_bias, dtype, param_dtype,
                          rngs)
    self.v_proj = _linear(d, kv * hd, config.qkv_bias, dtype, param_dtype,
                          rngs)
    self.o_proj = _linear(heads * hd, d, config.o_bias, dtype, param_dtype,
                          rngs)

  def __call__(self, h, cos, sin, mask):
    batch, length, _ = h.shape
    kv, hd = self.num_kv_heads, self.head_dim
    group = self.num_heads // kv
    q = apply_rope(self.q_proj(h).reshape(batch, length, self.num_heads, hd),
                   cos, sin)
    k = apply_rope(self.k_proj(h).reshape(batch, length, kv, hd), cos, sin)
    v = self.v_proj(h).reshape(batch, length, kv, hd)
    # Query head j uses key/value head j // group (HF's repeat_kv layout).
    q = q.reshape(batch, length, kv, group, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k) * (hd ** -0.5)
    kind = _at_least_f32(scores.dtype)
    scores = jnp.where(mask, scores.astype(kind), jnp.finfo(kind).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, v)
    return self.o_proj(out.reshape(batch, length, self.num_heads * hd))


class MLP(nnx.Module):
  """The SwiGLU MLP ``down(silu(gate(h)) * up(h))``."""

  def __init__(self, config: LMConfig, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    d, f, b = config.hidden_size, config.intermediate_size, config.mlp_bias
    self.gate_proj = _linear(d, f, b, dtype, param_dtype, rngs)
    self.up_proj = _linear(d, f, b, dtype, param_dtype, rngs)
    self.down_proj = _linear(f, d, b, dtype, param_dtype, rngs)

  def __call__(self, h):
    return self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h))


class DecoderLayer(nnx.Module):
  """One pre-norm block: attention and MLP, each with a residual."""

  def __init__(self, config: LMConfig, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps,
                                   **kw)
    self.self_attn = Attention(config, rngs=rngs, **kw)
    self.post_attention_layernorm = RMSNorm(config.hidden_size,
                                            config.rms_norm_eps, **kw)
    self.mlp = MLP(config, rngs=rngs, **kw)

  def __call__(self, h, cos, sin, mask):
    h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask)
    return h + self.mlp(self.post_attention_layernorm(h))


def _block(layer, h, cos, sin, mask):
  return layer(h, cos, sin, mask)


class CausalLM(nnx.Module):
  r"""A Llama / Qwen2 causal language model.

  Attributes ``embed_tokens`` (``nnx.Embed``), ``layers`` (an ``nnx.List`` of
  blocks with ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``),
  ``norm`` and ``lm_head`` (``nnx.Linear`` with kernel ``[d, V]``).

  Args:
    config: the :class:`LMConfig`.
    dtype: compute dtype (e.g. ``jnp.bfloat16`` with float32 parameters);
      logits are float32 (float64 for a float64 model).
    param_dtype: dtype of the parameters.
    remat: rematerialize each block in the backward pass (``nnx.remat``):
      activation memory O(L) blocks' inputs instead of all intermediates, for
      one extra forward.
    rngs: ``nnx.Rngs`` for the random initialization (normal, std 0.02).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbilevel import llm
    >>> config = llm.LMConfig(vocab_size=64, hidden_size=32,
    ...                       intermediate_size=64, num_hidden_layers=2,
    ...                       num_attention_heads=4, num_key_value_heads=2)
    >>> model = llm.CausalLM(config, rngs=nnx.Rngs(0))
    >>> ids = jnp.array([[1, 2, 3, 0]])
    >>> logits = model(ids, jnp.array([[1, 1, 1, 0]]))
    >>> logits.shape, logits.dtype
    ((1, 4, 64), dtype('float32'))
  """

  def __init__(self, config: LMConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, remat: bool = False,
               rngs: nnx.Rngs):
    if not isinstance(config, LMConfig):
      raise base.BilevelValidationError(
          f"CausalLM: config must be an LMConfig (use LMConfig.from_hf for a "
          f"config.json dict), got {type(config).__name__}.")
    self.config = config
    self.dtype = dtype
    self.remat = bool(remat)
    self.embed_tokens = nnx.Embed(
        config.vocab_size, config.hidden_size, dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.layers = nnx.List([
        DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype,
                        param_dtype=param_dtype)
    self.lm_head = _linear(config.hidden_size, config.vocab_size, False,
                           dtype, param_dtype, rngs)
    if config.tie_word_embeddings:
      # A copy, not a shared variable: the head may be trained on its own.
      self.lm_head.kernel[...] = self.embed_tokens.embedding[...].T

  def __call__(self, input_ids, attention_mask=None, *, positions=None):
    """Logits ``[B, T, V]`` (float32).

    Args:
      input_ids: int array ``[B, T]``.
      attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding (default
        all ones). Token t attends to tokens s <= t with mask 1; the logits
        at padded positions are finite but meaningless.
      positions: int array ``[B, T]`` of RoPE positions (default: the index
        of each token among the real ones, ``cumsum(mask) - 1``, which is
        ``0..T-1`` without left padding).

    Returns:
      Logits ``[B, T, vocab_size]``, float32 (float64 if ``dtype`` is).
    """
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise base.BilevelValidationError(
          f"CausalLM: input_ids must be an int array [batch, length], got "
          f"shape {input_ids.shape} dtype {input_ids.dtype}.")
    check_token_ids(input_ids, self.config.vocab_size, "CausalLM")
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape != input_ids.shape:
      raise base.BilevelValidationError(
          f"CausalLM: attention_mask has shape {attention_mask.shape}, "
          f"input_ids {input_ids.shape}; they must match.")
    real = attention_mask.astype(bool)
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(real, axis=-1) - 1, 0)
    elif jnp.shape(positions) != input_ids.shape:
      raise base.BilevelValidationError(
          f"CausalLM: positions has shape {jnp.shape(positions)}, input_ids "
          f"{input_ids.shape}; they must match.")
    length = input_ids.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    # [B, kv, group, T, S]: query t sees key s when s <= t and s is real.
    mask = (causal[None] & real[:, None, :])[:, None, None]
    angles = (jnp.asarray(positions, jnp.float32)[..., None]
              * jnp.asarray(rope_inverse_frequencies(self.config)))
    angles = jnp.concatenate([angles, angles], axis=-1)
    cos = jnp.cos(angles).astype(self.dtype)
    sin = jnp.sin(angles).astype(self.dtype)
    h = self.embed_tokens(input_ids)
    block = nnx.remat(_block) if self.remat else _block
    for layer in self.layers:
      h = block(layer, h, cos, sin, mask)
    return self.lm_head(self.norm(h)).astype(_at_least_f32(self.dtype))


def check_token_ids(ids, vocab_size: int, where: str) -> None:
  """Refuses concrete token ids outside ``[0, vocab_size)``, naming them.

  ``jnp.take`` (the embedding lookup) returns NaN rows for ids past the
  table and wraps negative ones around, so such ids would give NaN or wrong
  logits without a word. Traced ids (inside ``jax.jit``) cannot be read and
  are not checked.

  Examples:
    >>> import numpy as np
    >>> from jaxbilevel._src.llm import model
    >>> model.check_token_ids(np.array([[1, 2, 3]]), 4, "demo")
    >>> try:
    ...   model.check_token_ids(np.array([[1, 7, 3]]), 4, "demo")
    ... except ValueError as err:
    ...   print(str(err)[:58])
    demo: token ids must be in [0, vocab_size) = [0, 4), got 7
  """
  if isinstance(ids, jax.core.Tracer):
    return
  ids = np.asarray(ids)
  bad = (ids < 0) | (ids >= vocab_size)
  if not bad.any():
    return
  values = np.unique(ids[bad])
  first = tuple(int(i) for i in np.argwhere(bad)[0])
  shown = ", ".join(str(v) for v in values[:8]) + (
      f", ... ({values.size} distinct)" if values.size > 8 else "")
  raise base.BilevelValidationError(
      f"{where}: token ids must be in [0, vocab_size) = [0, {vocab_size}), "
      f"got {shown} (first at index {list(first)}). The embedding would give "
      "NaN (or, for negative ids, another token's) rows: tokenize with the "
      "model's own tokenizer (jaxbilevel.llm.load_pretrained returns it), or "
      "use a model whose config has a larger vocab_size.")


def count_params(model: nnx.Module, filter_=nnx.Param) -> int:
  """The number of scalars in the variables of ``model`` matching ``filter_``.

  Examples:
    >>> from flax import nnx
    >>> from jaxbilevel import llm
    >>> llm.count_params(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    8
  """
  state = nnx.state(model, filter_)
  return int(sum(np.prod(np.shape(v)) for v in jax.tree.leaves(state)))
