"""Tests of the DPO / SFT objectives (jaxbilevel._src.llm.losses).

Float64 is on (conftest), so closed forms hold to 1e-12.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbilevel as jbl
from jaxbilevel._src.llm import data
from jaxbilevel._src.llm import losses

V, D = 7, 4


def _logits_apply(x, y, ids, mask):
  """A "model" whose logits are its lower variable y (B, T, V), times x."""
  del ids, mask
  return x * y


def _tiny_lm():
  """A tiny random linear LM: logits[b, t] = E[ids[b, t]] (I + x) y."""
  emb = jnp.asarray(np.random.default_rng(0).normal(size=(V, D)))

  def apply_fn(x, y, ids, mask):
    h = emb[ids] @ (jnp.eye(D) + x)
    # Causal context: add the mean of the attended previous embeddings.
    m = mask.astype(h.dtype)[..., None]
    ctx = jnp.cumsum(h * m, axis=1) / jnp.maximum(jnp.cumsum(m, axis=1), 1)
    return (h + ctx) @ y

  return apply_fn


def _log_softmax_np(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _manual_logprob(logits, ids, mask):
  """A plain loop: sum over t >= 1 with mask[t] of log p(ids[t] | logits[t-1])."""
  out = np.zeros(ids.shape[0])
  for b in range(ids.shape[0]):
    for t in range(1, ids.shape[1]):
      if mask[b, t]:
        out[b] += _log_softmax_np(np.asarray(logits[b, t - 1]))[ids[b, t]]
  return out


# A hand-made pair batch (B = 2, T = 6): prompt tokens, response tokens and
# padding at known positions.
#   chosen 0:   [p p r r 0 0]   rejected 0: [p p r 0 0 0]
#   chosen 1:   [p r r r 0 0]   rejected 1: [p r r r r r]
DPO = {
    "chosen_ids": np.array([[1, 2, 3, 4, 0, 0], [5, 6, 1, 2, 0, 0]]),
    "chosen_attention_mask": np.array([[1, 1, 1, 1, 0, 0],
                                       [1, 1, 1, 1, 0, 0]]),
    "chosen_loss_mask": np.array([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0]]),
    "rejected_ids": np.array([[1, 2, 6, 0, 0, 0], [5, 3, 3, 3, 3, 3]]),
    "rejected_attention_mask": np.array([[1, 1, 1, 0, 0, 0],
                                         [1, 1, 1, 1, 1, 1]]),
    "rejected_loss_mask": np.array([[0, 0, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1]]),
}
SFT = {"input_ids": DPO["chosen_ids"],
       "attention_mask": DPO["chosen_attention_mask"],
       "loss_mask": DPO["chosen_loss_mask"]}


def _random_logits(seed, shape=(4, 6, V)):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def test_sequence_logprobs_equals_manual_loop():
  logits = _random_logits(1, (2, 6, V))
  ids, mask = DPO["rejected_ids"], DPO["rejected_loss_mask"]
  got = losses.sequence_logprobs(logits, ids, mask)
  np.testing.assert_allclose(got, _manual_logprob(logits, ids, mask),
                             rtol=1e-12)
  # Uniform logits: each of the n response tokens has log-prob -log V.
  uniform = losses.sequence_logprobs(jnp.zeros((2, 6, V)), ids, mask)
  np.testing.assert_allclose(uniform, [-math.log(V), -5 * math.log(V)],
                             rtol=1e-12)
  # float32 logits give float32 log-probs.
  assert losses.sequence_logprobs(logits.astype(jnp.float32), ids,
                                  mask).dtype == jnp.float32


def test_masks_exclude_prompt_and_padding():
  """Logits at positions that predict prompt or padding tokens do not count."""
  ids, mask = DPO["chosen_ids"], DPO["chosen_loss_mask"]
  logits = _random_logits(2, (2, 6, V))
  base = losses.sequence_logprobs(logits, ids, mask)
  # Position t predicts token t + 1. Response tokens of row 0 are at 2, 3
  # (predicted from 1, 2); of row 1 at 1, 2, 3 (predicted from 0, 1, 2).
  counted = {0: {1, 2}, 1: {0, 1, 2}}
  for b in range(2):
    for t in range(6):
      bumped = logits.at[b, t].add(3.0 * jnp.arange(V))
      changed = losses.sequence_logprobs(bumped, ids, mask)
      assert (abs(float(changed[b] - base[b])) > 1e-3) == (t in counted[b])
      assert float(changed[1 - b]) == float(base[1 - b])
  # With the logits fixed, the ids of the first prompt token and of padding
  # tokens are never scored, so changing them changes nothing.
  ids2 = ids.copy()
  ids2[0, 0] = 6
  ids2[0, 4:] = 5
  np.testing.assert_array_equal(losses.sequence_logprobs(logits, ids2, mask),
                                base)


def test_dpo_loss_is_log2_when_policy_equals_reference():
  apply_fn = _tiny_lm()
  rng = np.random.default_rng(3)
  x = jnp.asarray(0.3 * rng.normal(size=(D, D)))
  y = jnp.asarray(rng.normal(size=(D, V)))
  batch = losses.add_reference_logprobs(
      lambda ids, m: apply_fn(x, y, ids, m), {"dpo": DPO, "sft": SFT})
  for beta in (0.1, 2.0):
    f = losses.make_dpo_loss(apply_fn, beta=beta)
    assert float(f(x, y, batch)) == pytest.approx(math.log(2), abs=1e-12)
  metrics = losses.dpo_metrics(apply_fn, x, y, batch)
  assert float(metrics["margin"]) == pytest.approx(0.0, abs=1e-12)
  assert float(metrics["accuracy"]) == 0.5  # every margin is a tie: 1/2


def test_dpo_loss_closed_form_and_numpy_cross_check():
  # Uniform logits: pi = -n log V with n the number of response tokens:
  # chosen (2, 3), rejected (1, 5).
  beta = 0.5
  ref_c, ref_r = np.array([-1.0, -7.0]), np.array([-1.0, -9.0])
  batch = {"dpo": dict(DPO, ref_chosen_logp=ref_c, ref_rejected_logp=ref_r)}
  f = losses.make_dpo_loss(_logits_apply, beta=beta)
  lv = math.log(V)
  m0 = beta * ((-2 * lv + 1.0) - (-1 * lv + 1.0))   # = -beta log V
  m1 = beta * ((-3 * lv + 7.0) - (-5 * lv + 9.0))   # = beta (2 log V - 2)
  expected = 0.5 * (math.log1p(math.exp(-m0)) + math.log1p(math.exp(-m1)))
  assert float(f(1.0, jnp.zeros((4, 6, V)), batch)) == pytest.approx(
      expected, rel=1e-12)
  metrics = losses.dpo_metrics(_logits_apply, 1.0, jnp.zeros((4, 6, V)),
                               batch, beta=beta)
  assert float(metrics["margin"]) == pytest.approx((m0 + m1) / 2, rel=1e-12)
  assert float(metrics["accuracy"]) == 0.5  # m0 < 0 < m1
  assert m0 < 0 < m1
  assert float(metrics["chosen_reward"]) == pytest.approx(
      beta * ((-2 * lv + 1) + (-3 * lv + 7)) / 2, rel=1e-12)
  assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-12)

  # Random logits against a NumPy loop.
  logits = _random_logits(4)
  pi = _manual_logprob(
      logits, np.concatenate([DPO["chosen_ids"], DPO["rejected_ids"]]),
      np.concatenate([DPO["chosen_loss_mask"], DPO["rejected_loss_mask"]]))
  margin = beta * ((pi[:2] - ref_c) - (pi[2:] - ref_r))
  expected = np.mean(np.log1p(np.exp(-margin)))
  assert float(f(1.0, logits, batch)) == pytest.approx(expected, rel=1e-12)


def test_dpo_gradient_wrt_logits_matches_finite_differences():
  beta = 0.7
  batch = {"dpo": dict(DPO, ref_chosen_logp=np.array([-4.0, -6.0]),
                       ref_rejected_logp=np.array([-2.0, -8.0]))}
  f = jax.jit(losses.make_dpo_loss(_logits_apply, beta=beta))
  logits = _random_logits(5)
  grad = np.asarray(jax.grad(f, argnums=1)(1.0, logits, batch))
  eps = 1e-6
  fd = np.zeros_like(grad)
  for idx in np.ndindex(*grad.shape):
    e = jnp.zeros_like(logits).at[idx].set(eps)
    fd[idx] = (f(1.0, logits + e, batch) - f(1.0, logits - e, batch)) / (
        2 * eps)
  np.testing.assert_allclose(grad, fd, atol=1e-8)
  # Rows of the concatenated batch: chosen 0, 1 then rejected 0, 1. Logits
  # at the last position and at positions predicting prompt or padding get
  # exactly zero gradient.
  masks = np.concatenate([DPO["chosen_loss_mask"], DPO["rejected_loss_mask"]])
  predicts_response = np.zeros(masks.shape, bool)
  predicts_response[:, :-1] = masks[:, 1:] == 1
  assert np.all(grad[~predicts_response] == 0.0)
  assert np.all(np.abs(grad[predicts_response]).sum(-1) > 0)


def test_sft_loss_equals_optax_mean_over_response_tokens():
  logits = _random_logits(6, (2, 6, V))
  g = losses.make_sft_loss(_logits_apply)
  ids, mask = SFT["input_ids"], SFT["loss_mask"]
  ces = []
  for b in range(2):
    for t in range(1, 6):
      if mask[b, t]:
        ces.append(float(optax.losses.softmax_cross_entropy_with_integer_labels(
            logits[b, t - 1], ids[b, t])))
  assert len(ces) == 5
  assert float(g(1.0, logits, {"sft": SFT, "dpo": DPO})) == pytest.approx(
      np.mean(ces), rel=1e-12)
  # It equals minus the summed response log-prob over the token count.
  assert float(g(1.0, logits, {"sft": SFT})) == pytest.approx(
      -float(losses.sequence_logprobs(logits, ids, mask).sum()) / 5, rel=1e-12)
  # key=None reads a plain SFT dict; no response tokens gives 0.
  g_plain = losses.make_sft_loss(_logits_apply, key=None)
  empty = dict(SFT, loss_mask=np.zeros_like(mask))
  assert float(g_plain(1.0, logits, empty)) == 0.0


def test_add_reference_logprobs_plain_nested_and_stacked():
  apply_fn = _tiny_lm()
  rng = np.random.default_rng(7)
  y0 = jnp.asarray(rng.normal(size=(D, V)))
  x0 = jnp.zeros((D, D))
  ref = lambda ids, m: apply_fn(x0, y0, ids, m)
  nested = losses.add_reference_logprobs(ref, {"dpo": DPO, "sft": SFT})
  assert "ref_chosen_logp" not in DPO  # the input is not modified
  assert nested["sft"] is SFT
  want_c = losses.sequence_logprobs(
      ref(DPO["chosen_ids"], DPO["chosen_attention_mask"]),
      DPO["chosen_ids"], DPO["chosen_loss_mask"])
  np.testing.assert_allclose(nested["dpo"]["ref_chosen_logp"], want_c,
                             rtol=1e-12)
  plain = losses.add_reference_logprobs(ref, DPO)
  np.testing.assert_allclose(plain["ref_rejected_logp"],
                             nested["dpo"]["ref_rejected_logp"], rtol=1e-12)
  # Stacked (leading step axis): step by step equals the unstacked result.
  stacked = {k: np.stack([v, v[::-1]]) for k, v in DPO.items()}
  out = losses.add_reference_logprobs(ref, {"dpo": stacked}, stacked=True)
  assert out["dpo"]["ref_chosen_logp"].shape == (2, 2)
  np.testing.assert_allclose(out["dpo"]["ref_chosen_logp"][0], want_c,
                             rtol=1e-12)
  np.testing.assert_allclose(out["dpo"]["ref_chosen_logp"][1], want_c[::-1],
                             rtol=1e-12)


def test_losses_under_jit_and_jbl_run_on_tokenized_mixture():
  """End to end: tokenized DPO + SFT mixture, stacked batches, PBGD-Free."""
  tokenizers = pytest.importorskip("tokenizers")
  words = ["[PAD]", "Human", "Assistant", ":", "hi", "hello", "go"]  # V
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(words)}, unk_token="[PAD]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  pairs = [data.PreferenceExample("Human : hi Assistant :", " hello",
                                  " go go")] * 4
  sft = data.preference_to_sft(pairs)
  mixture = {"dpo": data.tokenize_preferences(pairs, tok, max_len=8),
             "sft": data.tokenize_sft(sft, tok, max_len=8)}
  apply_fn = _tiny_lm()
  rng = np.random.default_rng(8)
  params = jbl.BilevelParams(jnp.zeros((D, D)),
                             jnp.asarray(rng.normal(size=(D, V))))
  batches = data.stacked_batches(mixture, 2, num_steps=20, seed=0)
  batches = losses.add_reference_logprobs(
      lambda ids, m: apply_fn(params.x, params.y, ids, m), batches,
      stacked=True)
  f = losses.make_dpo_loss(apply_fn, beta=0.5)
  g = losses.make_sft_loss(apply_fn)
  one = jax.tree.map(lambda a: a[0], batches)
  assert float(jax.jit(f)(params.x, params.y, one)) == pytest.approx(
      math.log(2), abs=1e-12)
  tx = jbl.pbgd_free(f, g, gamma=1.0, upper_optimizer=optax.sgd(0.1),
                     lower_optimizer=optax.sgd(0.1))
  final, _, _ = jbl.run(tx, params, num_steps=20, batches=batches,
                        progress=False)
  # DPO moved x so that the chosen response gained on the rejected one.
  metrics = losses.dpo_metrics(apply_fn, final.x, final.y, one, beta=0.5)
  assert float(metrics["loss"]) < math.log(2) - 1e-3
  assert float(metrics["accuracy"]) == 1.0


def test_errors_name_the_missing_part_and_fix():
  f = losses.make_dpo_loss(_logits_apply)
  g = losses.make_sft_loss(_logits_apply)
  logits = _random_logits(0)
  with pytest.raises(KeyError, match=r"the batch has no 'sft' part"):
    g(1.0, logits, {"dpo": DPO})
  with pytest.raises(KeyError, match=r"lacks \['ref_chosen_logp', "
                     r"'ref_rejected_logp'\].*add_reference_logprobs"):
    f(1.0, logits, {"dpo": DPO})
  with pytest.raises(ValueError, match="beta must be > 0"):
    losses.make_dpo_loss(_logits_apply, beta=0.0)
  with pytest.raises(ValueError, match=r"must agree on \(B, T\)"):
    losses.sequence_logprobs(logits, DPO["chosen_ids"],
                             DPO["chosen_loss_mask"])


def test_preference_eval_accuracy_margin_and_standard_errors():
  apply_fn = _tiny_lm()
  rng = np.random.default_rng(5)
  x0, y0 = jnp.zeros((D, D)), jnp.asarray(rng.normal(size=(D, V)))
  x = jnp.asarray(0.5 * rng.normal(size=(D, D)))
  # 5 pairs (the 2 hand-made ones, repeated): chunks of 2 with padding.
  pairs = {k: np.concatenate([v, v, v[:1]]) for k, v in DPO.items()}
  beta = 0.3
  out = losses.preference_eval(apply_fn, x, y0, pairs, reference=(x0, y0),
                               beta=beta, batch_size=2)
  logits = np.asarray(apply_fn(x, y0, jnp.asarray(pairs["chosen_ids"]),
                               jnp.asarray(pairs["chosen_attention_mask"])))
  ref = np.asarray(apply_fn(x0, y0, jnp.asarray(pairs["chosen_ids"]),
                            jnp.asarray(pairs["chosen_attention_mask"])))
  logits_r = np.asarray(apply_fn(x, y0, jnp.asarray(pairs["rejected_ids"]),
                                 jnp.asarray(pairs["rejected_attention_mask"])))
  ref_r = np.asarray(apply_fn(x0, y0, jnp.asarray(pairs["rejected_ids"]),
                              jnp.asarray(pairs["rejected_attention_mask"])))
  margin = beta * (
      (_manual_logprob(logits, pairs["chosen_ids"], pairs["chosen_loss_mask"])
       - _manual_logprob(ref, pairs["chosen_ids"], pairs["chosen_loss_mask"]))
      - (_manual_logprob(logits_r, pairs["rejected_ids"],
                         pairs["rejected_loss_mask"])
         - _manual_logprob(ref_r, pairs["rejected_ids"],
                           pairs["rejected_loss_mask"])))
  score = (margin > 0) + 0.5 * (margin == 0)
  assert out["n"] == 5
  assert out["margin"] == pytest.approx(margin.mean(), abs=1e-9)
  assert out["margin_se"] == pytest.approx(margin.std(ddof=1) / math.sqrt(5),
                                           abs=1e-9)
  assert out["accuracy"] == pytest.approx(score.mean(), abs=1e-12)
  assert out["accuracy_se"] == pytest.approx(
      score.std(ddof=1) / math.sqrt(5), abs=1e-12)
  assert out["loss"] == pytest.approx(np.logaddexp(0, -margin).mean(),
                                      abs=1e-9)
  assert out["loss_se"] == pytest.approx(
      np.logaddexp(0, -margin).std(ddof=1) / math.sqrt(5), abs=1e-9)
  assert 0 < out["accuracy"] < 1 and out["margin_se"] > 0
  # The same with the reference log-probabilities carried by the pairs.
  with_ref = losses.add_reference_logprobs(
      lambda ids, m: apply_fn(x0, y0, ids, m), pairs, key="dpo")
  again = losses.preference_eval(apply_fn, x, y0, with_ref, beta=beta,
                                 batch_size=3)
  for k in out:
    assert again[k] == pytest.approx(out[k], abs=1e-9)
  # The reference model against itself: every pair a tie, accuracy 1/2.
  tie = losses.preference_eval(apply_fn, x0, y0, pairs, reference=(x0, y0))
  assert tie["accuracy"] == 0.5 and tie["accuracy_se"] == 0.0
  assert tie["margin"] == 0.0 and tie["loss"] == pytest.approx(math.log(2))
  with pytest.raises(ValueError, match="pass reference="):
    losses.preference_eval(apply_fn, x, y0, pairs)
  with pytest.raises(KeyError, match="lacks"):
    losses.preference_eval(apply_fn, x, y0, {"chosen_ids": pairs["chosen_ids"]},
                           reference=(x0, y0))
