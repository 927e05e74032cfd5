"""LoRA adapters in PEFT's layout (export, import) and merged into the weights."""

import json

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbilevel as jbl
from jaxbilevel import llm

safetensors = pytest.importorskip("safetensors")

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
       "down_proj")


def _config(arch="llama", **overrides):
  kwargs = dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, architecture=arch,
                qkv_bias=arch == "qwen2", bos_token_id=1, eos_token_id=2)
  kwargs.update(overrides)
  return llm.LMConfig(**kwargs)


def _base(config, seed=0):
  """A random base model (every parameter matters)."""
  model = llm.CausalLM(config, rngs=nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  nnx.update(model, jax.tree_util.tree_unflatten(treedef, [
      1.0 + 0.1 * jax.random.normal(k, l.shape, l.dtype)
      if any("norm" in str(p) for p in path)
      else 0.2 * jax.random.normal(k, l.shape, l.dtype)
      for (path, l), k in zip(leaves, keys)]))
  if config.tie_word_embeddings:
    model.lm_head.kernel[...] = model.embed_tokens.embedding[...].T
  return model


def _adapted(model, targets=("q_proj", "v_proj"), rank=4, alpha=8.0,
             seed=1, head=True):
  """Adds adapters with random (non-zero) B and perturbs the head."""
  llm.add_lora(model, targets=targets, rank=rank, alpha=alpha,
               rngs=nnx.Rngs(seed))
  x = nnx.state(model, nnx.LoRAParam)
  leaves, treedef = jax.tree_util.tree_flatten(x)
  keys = jax.random.split(jax.random.PRNGKey(seed + 10), len(leaves))
  nnx.update(model, jax.tree_util.tree_unflatten(treedef, [
      0.3 * jax.random.normal(k, l.shape, l.dtype)
      for k, l in zip(keys, leaves)]))
  if head:
    kernel = model.lm_head.kernel[...]
    model.lm_head.kernel[...] = kernel + 0.1 * jax.random.normal(
        jax.random.PRNGKey(seed + 20), kernel.shape, kernel.dtype)
  return model


def _ids(batch=2, length=9, seed=3):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 64,
                                                          (batch, length)))


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_merge_gives_the_adapter_logits_and_can_be_saved(tmp_path):
  model = _adapted(_base(_config()), targets=ALL)
  ids = _ids()
  with pytest.raises(llm.CheckpointError, match=r"llm\.merge_lora\(model\)"):
    llm.save_safetensors(model, tmp_path / "refused")
  merged = llm.merge_lora(model)
  assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
  assert jax.tree.leaves(nnx.state(model, nnx.LoRAParam))   # untouched
  want = np.asarray(model(ids))
  np.testing.assert_allclose(merged(ids), want, rtol=0, atol=1e-5)
  assert np.abs(want - np.asarray(
      llm.merge_lora(_adapted(_base(_config()), targets=ALL, seed=5))(ids))
                ).max() > 1e-2   # the adapters matter
  # W + (alpha / r) A B in the [in, out] layout, layer 1's down_proj.
  wrapper = model.layers[1].mlp.down_proj
  np.testing.assert_allclose(
      merged.layers[1].mlp.down_proj.kernel[...],
      wrapper.base.kernel[...] + 2.0 * wrapper.lora.lora_a[...]
      @ wrapper.lora.lora_b[...], rtol=1e-6, atol=1e-6)
  llm.save_safetensors(merged, tmp_path / "merged")
  np.testing.assert_allclose(llm.load_safetensors(tmp_path / "merged")(ids),
                             want, rtol=0, atol=1e-5)


def test_merge_with_trained_params():
  model = _adapted(_base(_config()), head=False)
  apply_fn, params, _ = llm.bilevel_split(model)
  trained = jbl.BilevelParams(x=jax.tree.map(lambda a: 2 * a, params.x),
                              y=jax.tree.map(lambda a: a + 0.05, params.y))
  ids = _ids()
  np.testing.assert_allclose(llm.merge_lora(model, params=trained)(ids),
                             apply_fn(trained.x, trained.y, ids), rtol=0,
                             atol=1e-5)
  with pytest.raises(jbl.BilevelValidationError, match="no LoRA adapters"):
    llm.merge_lora(_base(_config()))


def test_export_layout_and_round_trip(tmp_path):
  config = _config()
  model = _adapted(_base(config), targets=("q_proj", "v_proj", "down_proj"),
                   rank=4, alpha=12.0)
  llm.save_adapter(model, tmp_path, base_model_name_or_path="tiny/base")
  cfg = json.loads((tmp_path / "adapter_config.json").read_text())
  assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
  assert cfg["r"] == 4 and cfg["lora_alpha"] == 12.0
  assert cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
  assert cfg["modules_to_save"] == ["lm_head"]
  assert cfg["base_model_name_or_path"] == "tiny/base"
  _, tensors = llm.read_adapter(tmp_path)
  pre = "base_model.model.model.layers.1."
  wrapper = model.layers[1].self_attn.v_proj
  a, b = tensors[pre + "self_attn.v_proj.lora_A.weight"], tensors[
      pre + "self_attn.v_proj.lora_B.weight"]
  assert a.shape == (4, 32) and b.shape == (16, 4)          # [r, in], [out, r]
  np.testing.assert_array_equal(a, wrapper.lora.lora_a[...].T)
  np.testing.assert_array_equal(b, wrapper.lora.lora_b[...].T)
  assert tensors[pre + "mlp.down_proj.lora_A.weight"].shape == (4, 64)
  np.testing.assert_array_equal(tensors["base_model.model.lm_head.weight"],
                                model.lm_head.kernel[...].T)
  assert len(tensors) == 2 * 3 * 2 + 1
  # Import into a fresh base model: the same logits, bit for bit.
  loaded = llm.load_adapter(_base(config), tmp_path)
  ids = _ids()
  np.testing.assert_array_equal(loaded(ids), model(ids))
  assert loaded.layers[0].self_attn.q_proj.scale == 3.0     # alpha / r
  # Into a model that already carries adapters of that rank: overwritten.
  again = llm.load_adapter(_adapted(_base(config), seed=9, head=False),
                           tmp_path)
  np.testing.assert_array_equal(again(ids), model(ids))
  # Without the head.
  llm.save_adapter(model, tmp_path / "no_head", save_head=False)
  cfg = json.loads((tmp_path / "no_head" / "adapter_config.json").read_text())
  assert cfg["modules_to_save"] is None
  base = _base(config)
  head = np.asarray(base.lm_head.kernel[...])
  llm.load_adapter(base, tmp_path / "no_head")
  np.testing.assert_array_equal(base.lm_head.kernel[...], head)


def test_export_of_some_layers_names_them_exactly(tmp_path):
  model = _adapted(_base(_config()), targets=r"layers/1/self_attn/q_proj")
  llm.save_adapter(model, tmp_path)
  cfg = json.loads((tmp_path / "adapter_config.json").read_text())
  assert cfg["target_modules"] == r"model\.layers\.1\.self_attn\.q_proj"
  loaded = llm.load_adapter(_base(_config()), tmp_path)
  assert isinstance(loaded.layers[0].self_attn.q_proj, nnx.Linear)
  np.testing.assert_array_equal(loaded(_ids()), model(_ids()))


def test_export_with_trained_params(tmp_path):
  model = _adapted(_base(_config()), head=False)
  apply_fn, params, _ = llm.bilevel_split(model)
  trained = jbl.BilevelParams(x=jax.tree.map(lambda a: -a, params.x),
                              y=jax.tree.map(lambda a: 1.1 * a, params.y))
  llm.save_adapter(model, tmp_path, params=trained)
  loaded = llm.load_adapter(_base(_config()), tmp_path)
  np.testing.assert_allclose(loaded(_ids()),
                             apply_fn(trained.x, trained.y, _ids()), rtol=0,
                             atol=1e-6)


def _mixed(config):
  """Adapters of two ranks and scales: q 2 (alpha 3) in layer 0, v 4."""
  model = _adapted(_base(config), targets="v_proj", rank=4, alpha=8.0)
  return _adapted(model, targets=r"0/self_attn/q_proj", rank=2, alpha=3.0,
                  seed=4, head=False)


def test_mixed_ranks_use_rank_and_alpha_patterns(tmp_path):
  model = _mixed(_config())
  llm.save_adapter(model, tmp_path)
  cfg = json.loads((tmp_path / "adapter_config.json").read_text())
  assert (cfg["r"], cfg["lora_alpha"]) == (4, 8.0)   # the most common
  assert cfg["rank_pattern"] == {r"model\.layers\.0\.self_attn\.q_proj": 2}
  assert cfg["alpha_pattern"] == {r"model\.layers\.0\.self_attn\.q_proj": 3.0}
  assert cfg["target_modules"] == (r"model\.layers\.0\.self_attn\.q_proj|"
                                   r"model\.layers\.0\.self_attn\.v_proj|"
                                   r"model\.layers\.1\.self_attn\.v_proj")
  loaded = llm.load_adapter(_base(_config()), tmp_path)
  assert loaded.layers[0].self_attn.q_proj.scale == 1.5
  assert loaded.layers[1].self_attn.v_proj.scale == 2.0
  np.testing.assert_array_equal(loaded(_ids()), model(_ids()))


def test_adapter_errors(tmp_path):
  error = jbl.BilevelValidationError
  with pytest.raises(error, match="no LoRA adapters"):
    llm.save_adapter(_base(_config()), tmp_path / "none")
  good = tmp_path / "good"
  llm.save_adapter(_adapted(_base(_config())), good)
  with pytest.raises(FileNotFoundError, match="not a directory"):
    llm.load_adapter(_base(_config()), tmp_path / "missing")
  cfg = json.loads((good / "adapter_config.json").read_text())
  for change, match in (({"peft_type": "IA3"}, "only LORA"),
                        ({"use_dora": True}, "use_dora=true"),
                        ({"bias": "all"}, "trained biases"),
                        ({"r": 8}, r"needs \(8, 32\)")):
    (good / "adapter_config.json").write_text(json.dumps(dict(cfg, **change)))
    with pytest.raises(llm.CheckpointError, match=match):
      llm.load_adapter(_base(_config()), good)
  (good / "adapter_config.json").write_text(json.dumps(cfg))
  with pytest.raises(llm.CheckpointError, match="does not have"):
    llm.load_adapter(_base(_config(num_hidden_layers=1)), good)
  with pytest.raises(llm.CheckpointError, match="lm_head.weight has shape"):
    llm.load_adapter(_base(_config(vocab_size=32)), good)


# ---------------------------------------------------------------------------
# Cross-check against PEFT on the PyTorch reference model.
# ---------------------------------------------------------------------------


# Expected third-party warnings of the PEFT cross-checks: PEFT warns that
# modules_to_save=["lm_head"] unties a tied head (jaxbilevel's head is a copy
# that trains on its own, so untying is the intended behaviour), and PEFT
# 0.21 calls a transformers 5 method that transformers deprecates.
_PEFT_WARNINGS = [
    pytest.mark.filterwarnings(
        "ignore:Model has `tie_word_embeddings=True`:UserWarning"),
    pytest.mark.filterwarnings(
        "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]


@_PEFT_WARNINGS[0]
@_PEFT_WARNINGS[1]
@pytest.mark.parametrize("arch, overrides, targets", [
    ("llama", {"tie_word_embeddings": True}, ALL),
    ("qwen2", {"num_key_value_heads": 1}, ("q_proj", "v_proj")),
    ("llama", {}, "mixed"),
])
def test_peft_loads_the_exported_adapter_to_the_same_logits(
    tmp_path, arch, overrides, targets):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  config = _config(arch, **overrides)
  base = _base(config)
  llm.save_safetensors(base, tmp_path / "base")
  if targets == "mixed":
    model = _mixed(config)
  else:
    model = _adapted(base, targets=targets, rank=4, alpha=6.0)
  llm.save_adapter(model, tmp_path / "adapter")
  cls = {"llama": transformers.LlamaForCausalLM,
         "qwen2": transformers.Qwen2ForCausalLM}[arch]
  reference = cls.from_pretrained(str(tmp_path / "base"),
                                  dtype=torch.float32)
  reference = peft.PeftModel.from_pretrained(
      reference, str(tmp_path / "adapter")).eval()
  ids = np.asarray(_ids(2, 9))
  with torch.no_grad():
    expected = reference(torch.tensor(ids)).logits.numpy()
    plain = reference.get_base_model()
    with reference.disable_adapter():
      base_logits = plain(torch.tensor(ids)).logits.numpy()
  got = np.asarray(model(jnp.asarray(ids)))
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
  assert np.abs(expected - base_logits).max() > 0.05   # the adapter matters


@_PEFT_WARNINGS[1]
def test_an_adapter_written_by_peft_loads_to_the_same_logits(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  config = _config()
  base = _base(config)
  llm.save_safetensors(base, tmp_path / "base")
  torch.manual_seed(0)
  reference = transformers.LlamaForCausalLM.from_pretrained(
      str(tmp_path / "base"), dtype=torch.float32)
  reference = peft.get_peft_model(reference, peft.LoraConfig(
      r=2, lora_alpha=5, target_modules=["k_proj", "o_proj", "up_proj"],
      use_rslora=True, modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
  with torch.no_grad():
    for name, param in reference.named_parameters():
      if "lora_B" in name or "modules_to_save" in name:
        param.add_(0.2 * torch.randn_like(param))
  reference.save_pretrained(str(tmp_path / "adapter"))
  ids = np.asarray(_ids(2, 9))
  with torch.no_grad():
    expected = reference.eval()(torch.tensor(ids)).logits.numpy()
  model = llm.load_adapter(_base(config), tmp_path / "adapter")
  assert model.layers[0].self_attn.k_proj.scale == pytest.approx(
      5 / np.sqrt(2))   # rsLoRA: alpha / sqrt(r)
  np.testing.assert_allclose(model(jnp.asarray(ids)), expected, rtol=0,
                             atol=1e-4)
