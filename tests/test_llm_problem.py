"""Tests of the bilevel DPO / SFT fine-tuning problem (jaxbilevel.llm.dpo_sft_problem).

A tiny random Llama (1 layer, width 16) with a byte-level BPE trained on the
shipped HH-RLHF sample (64 real pairs, MIT licence); parameters are float32
(float64 is on in conftest, so nothing may silently promote them).
"""

import math
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _helpers import byte_level_bpe as _byte_level_bpe
import jaxbilevel as jbl

llm = pytest.importorskip("jaxbilevel.llm")
tokenizers = pytest.importorskip("tokenizers")

SAMPLE = os.path.join(os.path.dirname(__file__), "data",
                      "hh_rlhf_sample.jsonl.gz")
LOG2 = math.log(2.0)


@pytest.fixture(scope="module")
def pairs():
  return llm.load_preference_jsonl(SAMPLE)


@pytest.fixture(scope="module")
def tok(pairs):
  return _byte_level_bpe([p.prompt + p.chosen for p in pairs], 300)


@pytest.fixture(scope="module")
def config(tok):
  return llm.LMConfig(vocab_size=tok.get_vocab_size(), hidden_size=16,
                      intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)


def _problem(config, tok, pairs, **kw):
  kw = dict(dict(num_steps=10, max_len=32, dpo_batch_size=4,
                 sft_batch_size=4, eval_size=8, lora_rank=4, seed=0), **kw)
  model = llm.CausalLM(config, rngs=nnx.Rngs(0))
  return llm.dpo_sft_problem(model, tok, pairs, **kw)


def _step(batches, t):
  return jax.tree.map(lambda a: a[t], batches)


def _maxdiff(a, b):
  return max(float(np.max(np.abs(np.asarray(u, np.float64)
                                 - np.asarray(v, np.float64))))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def problem(config, tok, pairs):
  return _problem(config, tok, pairs)


def test_structure_and_start(problem):
  x, y = problem.params0
  assert sorted(y) == ["lm_head"]
  # 1 layer x (q, v) x (A, B); every B is zero, so the model is the base.
  assert len(jax.tree.leaves(x)) == 4
  assert _maxdiff(llm.zero_adapters(x), x) == 0.0
  assert {leaf.dtype for leaf in jax.tree.leaves(problem.params0)} == {
      jnp.dtype(jnp.float32)}
  # Without sft_data: 64 pairs -> 32 DPO + 32 SFT, 8 of each for eval.
  assert problem.batches["dpo"]["chosen_ids"].shape == (10, 4, 32)
  assert problem.batches["dpo"]["ref_chosen_logp"].shape == (10, 4)
  assert problem.batches["sft"]["token_weight"].shape == (10, 4, 32)
  batch = _step(problem.batches, 0)
  # Policy = reference at the start: DPO loss log 2, zero margin.
  assert abs(float(jax.jit(problem.f)(*problem.params0, batch)) - LOG2) < 1e-6
  metrics = problem.evaluate(problem.params0)
  assert abs(metrics["dpo_loss"] - LOG2) < 1e-6
  # Every margin is a tie, which counts 1/2.
  assert metrics["accuracy"] == 0.5 and metrics["reward_margin"] == 0.0
  # A random model predicts roughly uniformly over the 300 tokens.
  assert abs(metrics["sft_loss"] - math.log(300)) < 0.3


def test_sft_objective_is_the_token_average(problem):
  batch = _step(problem.batches, 3)
  plain = llm.make_sft_loss(problem.apply_fn)
  want = float(jax.jit(plain)(*problem.params0, batch))
  g = jax.jit(problem.g)
  assert abs(float(g(*problem.params0, batch)) - want) < 1e-6
  # Without the precomputed weights (a batch built elsewhere): the same.
  sft = {k: v for k, v in batch["sft"].items() if k != "token_weight"}
  got = float(g(*problem.params0, dict(batch, sft=sft)))
  assert abs(got - want) < 1e-6


@pytest.mark.slow
def test_evaluate_matches_direct_computation(config, tok, pairs, problem):
  # eval_batch_size 3 pads the 8 eval examples to 9: padding must not count.
  prob3 = _problem(config, tok, pairs, eval_batch_size=3)
  tx = jbl.pbgd_free(problem.f, problem.g, gamma=10.0,
                     upper_optimizer=optax.adam(3e-2),
                     lower_optimizer=optax.adam(1e-2))
  params, _, _ = jbl.run(tx, problem.params0, num_steps=3,
                         batches=problem.batches)
  got, got3 = problem.evaluate(params), prob3.evaluate(params)
  for k in got:
    assert abs(got[k] - got3[k]) < 1e-5, k
  # The same numbers from the losses module on the eval parts, split as the
  # docstring says: halves for DPO / SFT, then 8 eval examples of each.
  pref = llm.tokenize_preferences(pairs, tok, max_len=32)
  dpo_part, sft_part = llm.train_eval_split(pref, eval_size=0.5, seed=0)
  _, pref_eval = llm.train_eval_split(dpo_part, eval_size=8, seed=0)
  sft = {"input_ids": sft_part["chosen_ids"],
         "attention_mask": sft_part["chosen_attention_mask"],
         "loss_mask": sft_part["chosen_loss_mask"]}
  _, sft_eval = llm.train_eval_split(sft, eval_size=8, seed=1)
  x0, y0 = problem.params0
  apply_fn = jax.jit(problem.apply_fn)
  ref = lambda ids, m: apply_fn(llm.zero_adapters(x0), y0, ids, m)
  dpo = llm.add_reference_logprobs(ref, {"dpo": pref_eval})
  want = llm.dpo_metrics(apply_fn, *params, dpo, beta=0.1)
  assert abs(got["dpo_loss"] - float(want["loss"])) < 1e-5
  assert abs(got["accuracy"] - float(want["accuracy"])) < 1e-9
  assert abs(got["reward_margin"] - float(want["margin"])) < 1e-5
  want_sft = llm.make_sft_loss(apply_fn)(*params, {"sft": sft_eval})
  assert abs(got["sft_loss"] - float(want_sft)) < 1e-5
  assert abs(got["dpo_loss"] - LOG2) > 1e-4
  # preference_eval on the eval pairs, reference = the starting point.
  held_out = llm.preference_eval(problem.apply_fn, *params, pref_eval,
                                 reference=problem.params0, beta=0.1,
                                 batch_size=3)
  assert held_out["n"] == 8
  assert abs(held_out["accuracy"] - got["accuracy"]) < 1e-9
  assert abs(held_out["margin"] - got["reward_margin"]) < 1e-5
  assert abs(held_out["loss"] - got["dpo_loss"]) < 1e-5
  assert held_out["margin_se"] > 0


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_accumulated_microbatches_equal_the_full_batch(config, tok, pairs,
                                                       problem):
  acc = _problem(config, tok, pairs, microbatches=2)
  batch = _step(problem.batches, 1)
  values = [jax.jit(lambda p, b, q=q: (q.f(*p, b), q.g(*p, b)))(q.params0,
                                                                 batch)
            for q in (problem, acc)]
  assert _maxdiff(*values) < 1e-6
  # One PBGD-Free step (2 lower steps on f / gamma + g, one upper step on
  # grad_x f: gradients of both objectives in both variables) agrees.
  outs = []
  for p in (problem, acc):
    tx = jbl.pbgd_free(p.f, p.g, gamma=10.0, inner_steps=2,
                       upper_optimizer=optax.adam(1e-2),
                       lower_optimizer=optax.sgd(0.1))
    step = jax.jit(lambda s, b, tx=tx, p=p: tx.update(None, s, p.params0,
                                                      batch=b)[0])
    outs.append(step(tx.init(p.params0), batch))
  assert _maxdiff(*outs) < 1e-6
  assert _maxdiff(outs[0], jax.tree.map(jnp.zeros_like, outs[0])) > 1e-4


def test_microbatches_must_divide_the_batch(config, tok, pairs):
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"microbatches=3 does not divide dpo_batch_size=4"):
    _problem(config, tok, pairs, microbatches=3)
  with pytest.raises(jbl.BilevelValidationError, match="tokenizer is None"):
    _problem(config, None, pairs)


@pytest.mark.slow
def test_remat_gives_the_same_gradients(config, tok, pairs, problem):
  rem = _problem(config, tok, pairs, remat=True)
  batch = _step(problem.batches, 2)
  for name in ("f", "g"):
    g1 = jax.jit(jax.grad(getattr(problem, name), (0, 1)))(*problem.params0,
                                                           batch)
    g2 = jax.jit(jax.grad(getattr(rem, name), (0, 1)))(*rem.params0, batch)
    assert _maxdiff(g1, g2) < 1e-6, name


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_bf16_compute_keeps_float32_state_and_stays_finite(config, tok, pairs,
                                                           problem):
  bf = _problem(config, tok, pairs, dtype=jnp.bfloat16)
  assert {l.dtype for l in jax.tree.leaves(bf.params0)} == {
      jnp.dtype(jnp.float32)}
  batch = _step(bf.batches, 0)
  ids = batch["sft"]["input_ids"]
  logits32 = jax.jit(problem.apply_fn)(*problem.params0, ids)
  logits16 = jax.jit(bf.apply_fn)(*bf.params0, ids)
  assert logits16.dtype == jnp.float32  # logits are returned in float32
  err = float(jnp.max(jnp.abs(logits16 - logits32)))
  assert 1e-5 < err < 0.1  # bfloat16 rounding: visible, small
  # Policy = reference up to bf16 rounding differences between programs.
  assert abs(float(jax.jit(bf.f)(*bf.params0, batch)) - LOG2) < 1e-3
  tx = jbl.pbgd_free(bf.f, bf.g, gamma=10.0, upper_optimizer=optax.adam(3e-2),
                     lower_optimizer=optax.adam(1e-2))
  state = tx.init(bf.params0)
  floats = [l for l in jax.tree.leaves(state)
            if jnp.issubdtype(l.dtype, jnp.floating)]
  assert floats and {l.dtype for l in floats} == {jnp.dtype(jnp.float32)}
  params, state, history = jbl.run(tx, bf.params0, num_steps=5,
                                   batches=bf.batches, diagnostics=True)
  assert history["finite"].all() and len(history["f"]) == 5
  assert {l.dtype for l in jax.tree.leaves((params, state))
          if jnp.issubdtype(l.dtype, jnp.floating)} == {
              jnp.dtype(jnp.float32)}


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_pbgd_free_lowers_the_dpo_loss_and_refit_lowers_sft(problem):
  batch = _step(problem.batches, 0)
  tx = jbl.pbgd_free(problem.f, problem.g, gamma=10.0,
                     upper_optimizer=optax.adam(3e-2),
                     lower_optimizer=optax.adam(1e-2))
  params, _, history = jbl.run(tx, problem.params0, num_steps=10, batch=batch,
                                   diagnostics=True)
  f_end = float(jax.jit(problem.f)(*params, batch))
  assert history["f"][0] == pytest.approx(LOG2, abs=1e-6)
  assert f_end < LOG2 - 0.1, history["f"]
  # Stage 2: re-fit the head on g with the adapters frozen.
  refit, sft_losses = problem.refit_head(params, 20, optax.adam(1e-2))
  assert sft_losses.shape == (20,)
  assert _maxdiff(refit.x, params.x) == 0.0
  assert sft_losses[-1] < sft_losses[0] - 0.05
  assert sft_losses[0] == pytest.approx(
      float(jax.jit(problem.g)(*params, _step(problem.batches, 0))), abs=1e-5)


_METHODS = {
    "pbgd_free": lambda f, g: jbl.pbgd_free(
        f, g, gamma=10.0, upper_optimizer=optax.adam(1e-2),
        lower_optimizer=optax.adam(1e-2)),
    "alt_pbgd": lambda f, g: jbl.alt_pbgd(
        f, g, gamma=10.0, upper_optimizer=optax.adam(1e-2),
        lower_optimizer=optax.adam(1e-2)),
    "v_pbgd": lambda f, g: jbl.v_pbgd(
        f, g, gamma=10.0, upper_optimizer=optax.adam(1e-2),
        lower_optimizer=optax.adam(1e-2)),
    "bome": lambda f, g: jbl.bome(
        f, g, eta=0.5, upper_optimizer=optax.adam(1e-2),
        lower_optimizer=optax.adam(1e-2), value_steps=2),
    "f2sa": lambda f, g: jbl.f2sa(
        f, g, gamma=10.0, upper_optimizer=optax.adam(1e-2),
        lower_optimizer=optax.adam(1e-2), inner_steps=2),
    "alright": lambda f, g: jbl.alright(
        f, g, probability=0.5, upper_optimizer=optax.adam(1e-2),
        lower_optimizer=optax.adam(1e-2), key=jax.random.key(0)),
}


@pytest.mark.slow  # ~10 s per method (compilation), 1 min in all.
@pytest.mark.parametrize("method", sorted(_METHODS))
def test_every_method_runs_on_the_problem_unchanged(method, problem):
  tx = _METHODS[method](problem.f, problem.g)
  params, _, history = jbl.run(tx, problem.params0, num_steps=3,
                               batches=problem.batches, diagnostics=True)
  assert history["finite"].all(), method
  assert np.isfinite(history["f"]).all() and np.isfinite(history["g"]).all()
  # Every method moved the head (all take lower steps on y).
  assert _maxdiff(params.y, problem.params0.y) > 1e-5, method
  assert history["f"][0] == pytest.approx(LOG2, abs=1e-6), method


def _array_pairs(length, high, n=8):
  rng = np.random.default_rng(0)
  ids = rng.integers(1, high, (n, length))
  mask = np.ones((n, length), np.int32)
  loss = np.zeros((n, length), np.int32)
  loss[:, length // 2:] = 1
  return dict(chosen_ids=ids, chosen_attention_mask=mask,
              chosen_loss_mask=loss, rejected_ids=rng.integers(1, high, (
                  n, length)), rejected_attention_mask=mask,
              rejected_loss_mask=loss)


_SMALL = dict(num_steps=2, dpo_batch_size=2, sft_batch_size=2, eval_size=2,
              lora_rank=2)


def _tiny_config(**kw):
  return llm.LMConfig(vocab_size=16, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, **kw)


def test_ids_outside_the_vocabulary_are_refused_at_build_time():
  pairs = _array_pairs(6, 16)
  pairs["rejected_ids"][3, 2] = 16  # vocab_size is 16
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"dpo_sft_problem: .*\['rejected_ids'\]: token "
                           r"ids must be in \[0, vocab_size\) = \[0, 16\), "
                           r"got 16"):
    llm.dpo_sft_problem(llm.CausalLM(_tiny_config(), rngs=nnx.Rngs(0)),
                        None, pairs, **_SMALL)


def test_sequences_longer_than_the_context_are_refused():
  config = _tiny_config(max_position_embeddings=16)
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"dpo_sft_problem: preference_data\['chosen_ids'\] "
                           r"holds sequences of 24 tokens, more than the "
                           r"model's max_position_embeddings=16 .* not "
                           r"truncated. Pass max_len <= 16"):
    llm.dpo_sft_problem(llm.CausalLM(config, rngs=nnx.Rngs(0)), None,
                        _array_pairs(24, 16), **_SMALL)
  # At the context length it builds, with finite reference log-probs.
  problem = llm.dpo_sft_problem(llm.CausalLM(config, rngs=nnx.Rngs(0)),
                                None, _array_pairs(16, 16), **_SMALL)
  assert np.isfinite(problem.batches["dpo"]["ref_chosen_logp"]).all()


def test_text_cut_to_a_max_len_beyond_the_context_is_refused(tok, pairs):
  config = llm.LMConfig(vocab_size=tok.get_vocab_size(), hidden_size=16,
                        intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1,
                        max_position_embeddings=16)
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"holds sequences of 32 tokens, more than the "
                           r"model's max_position_embeddings=16"):
    _problem(config, tok, pairs, max_len=32)
