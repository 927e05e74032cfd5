r"""DPO (upper, over LoRA adapters) / SFT (lower, over the output head) of a small flax LM.

The structure of the LLM experiment of Jiang et al. (NeurIPS 2025,
arXiv:2507.20400) at a size that
trains on a CPU in a minute:

.. math::

  \min_x\ f_{DPO}(x, y^*(x))\quad\text{s.t.}\quad
  y^*(x)\in\arg\min_y f_{SFT}(x, y),

with ``x`` the LoRA adapters of the attention query/value kernels of a
causal transformer (:func:`jaxbilevel.lora.init`) and ``y`` its untied
output head. The backbone is pre-trained (:func:`pretrain`) on a synthetic
language that this module generates, then frozen; the pre-trained model is
also the DPO reference (as for Pythia in the paper), so at the start the
policy equals the reference and the DPO loss is :math:`\log 2`.

**The synthetic language** (vocabulary 64: ``PAD``, ``BOS``, ``SEP``,
``EOS`` and two "dialects" of 30 content tokens, ``A`` = 4..33 and ``B`` =
34..63, token :math:`t` of A pairing with :math:`t+30` of B). A sequence is
``BOS p1..p6 SEP r1..r6 EOS PAD``: a prompt of 6 dialect-A tokens and a
response that *reverses* or *copies* the prompt, rendered in dialect A or B.

* Pre-training corpus: all four behaviours, equally likely (the mode is not
  announced, so the base model hesitates between reverse and copy at the
  first response token, then follows it).
* SFT data (the OpenOrca role): prompt → reversed prompt in dialect A.
* DPO data (the hh-rlhf role): chosen = reversed prompt, rejected = copied
  prompt, both in the same random dialect.

The two objectives agree on "reverse" and differ in what they constrain: the
dialect is a property of the head (the lower level can fit it alone), while
"reverse rather than copy" needs the attention pattern, i.e. the adapters.

**Losses** (as in that experiment): DPO
:math:`-\log\sigma(\beta[(\log\pi(c)-\log\pi(r))-(\log\pi_{ref}(c)-
\log\pi_{ref}(r))])` with β = 0.1 and sequence log-probabilities summed over
the response tokens (prompt masked); SFT = token-mean cross-entropy over the
response tokens; preference accuracy = mean of
[chosen reward > rejected reward].
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbilevel._src import base
from jaxbilevel._src import flax_utils
from jaxbilevel._src import lora as lora_lib
from jaxbilevel.applications import _common

PAD, BOS, SEP, EOS = 0, 1, 2, 3
DIALECT_SIZE = 30
FIRST_CONTENT = 4
PROMPT_LEN = 6
SEQ_LEN = 2 * PROMPT_LEN + 4          # BOS p SEP r EOS PAD
VOCAB = FIRST_CONTENT + 2 * DIALECT_SIZE
# Positions of the targets (tokens[1:]) that belong to the response: r1..EOS.
RESPONSE_MASK = np.zeros(SEQ_LEN - 1, bool)
RESPONSE_MASK[PROMPT_LEN + 1:2 * PROMPT_LEN + 2] = True
LORA_TARGET = r"attn/(query|value)"


class LMConfig(NamedTuple):
  """Size of the causal language model.

  Attributes:
    vocab: vocabulary size (64 for the synthetic language).
    d_model: width.
    num_layers: transformer blocks.
    num_heads: attention heads.
    max_len: longest input (``SEQ_LEN - 1``).
    mlp_ratio: hidden width of the MLP over ``d_model``.
  """

  vocab: int = VOCAB
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  max_len: int = SEQ_LEN - 1
  mlp_ratio: int = 4


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention with 2-D ``query/key/value/out`` kernels."""

  num_heads: int

  @nn.compact
  def __call__(self, h):
    batch, length, width = h.shape
    head_dim = width // self.num_heads

    def heads(name):
      return nn.Dense(width, name=name)(h).reshape(batch, length,
                                                   self.num_heads, head_dim)

    q, k, v = heads("query"), heads("key"), heads("value")
    logits = jnp.einsum("blhd,bmhd->bhlm", q, k) / float(np.sqrt(head_dim))
    causal = jnp.tril(jnp.ones((length, length), bool))
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    out = jnp.einsum("bhlm,bmhd->blhd", jax.nn.softmax(logits, axis=-1), v)
    return nn.Dense(width, name="out")(out.reshape(batch, length, width))


class Block(nn.Module):
  """Pre-LayerNorm transformer block."""

  num_heads: int
  mlp_ratio: int

  @nn.compact
  def __call__(self, h):
    h = h + CausalSelfAttention(self.num_heads, name="attn")(
        nn.LayerNorm(name="ln1")(h))
    m = nn.LayerNorm(name="ln2")(h)
    m = nn.Dense(self.mlp_ratio * h.shape[-1], name="mlp_in")(m)
    m = nn.Dense(h.shape[-1], name="mlp_out")(jax.nn.gelu(m))
    return h + m


class CausalLM(nn.Module):
  """A small decoder-only transformer with learned positions and an untied head."""

  config: LMConfig

  def setup(self):
    """Token embedding, learned positions, blocks, final norm and head."""
    c = self.config
    self.embed = nn.Embed(c.vocab, c.d_model)
    self.pos = self.param("pos", nn.initializers.normal(0.02),
                          (c.max_len, c.d_model))
    self.blocks = [Block(c.num_heads, c.mlp_ratio)
                   for _ in range(c.num_layers)]
    self.ln_f = nn.LayerNorm()
    self.head = nn.Dense(c.vocab)

  def hidden(self, tokens):
    h = self.embed(tokens) + self.pos[:tokens.shape[1]]
    for block in self.blocks:
      h = block(h)
    return self.ln_f(h)

  def __call__(self, tokens):
    return self.head(self.hidden(tokens))


# ---------------------------------------------------------------------------
# The synthetic language.
# ---------------------------------------------------------------------------


def _prompts(key, n):
  return jax.random.randint(key, (n, PROMPT_LEN), FIRST_CONTENT,
                            FIRST_CONTENT + DIALECT_SIZE)


def render(prompts, reverse, dialect):
  """Responses: the prompt reversed (or copied) in dialect 0 (A) or 1 (B)."""
  reverse = jnp.asarray(reverse, bool)
  dialect = jnp.asarray(dialect, prompts.dtype)
  body = jnp.where(reverse[:, None], prompts[:, ::-1], prompts)
  return body + DIALECT_SIZE * dialect[:, None]


def sequences(prompts, responses):
  """``BOS prompt SEP response EOS PAD`` token rows of length ``SEQ_LEN``."""
  n = prompts.shape[0]
  col = lambda v: jnp.full((n, 1), v, prompts.dtype)
  return jnp.concatenate([col(BOS), prompts, col(SEP), responses, col(EOS),
                          col(PAD)], axis=1)


def pretraining_batch(key, n):
  """``n`` rows of the pre-training corpus (all four behaviours equally likely)."""
  kp, kr, kd = jax.random.split(key, 3)
  prompts = _prompts(kp, n)
  reverse = jax.random.bernoulli(kr, 0.5, (n,))
  dialect = jax.random.bernoulli(kd, 0.5, (n,)).astype(prompts.dtype)
  return sequences(prompts, render(prompts, reverse, dialect))


def make_data(key, num_sft: int, num_pairs: int) -> dict:
  """SFT rows (reverse, dialect A) and DPO pairs (reverse vs copy, same dialect)."""
  ks, kp, kd = jax.random.split(key, 3)
  sft_prompts = _prompts(ks, num_sft)
  sft = sequences(sft_prompts, render(sft_prompts, jnp.ones(num_sft, bool),
                                      jnp.zeros(num_sft, jnp.int32)))
  prompts = _prompts(kp, num_pairs)
  dialect = jax.random.bernoulli(kd, 0.5, (num_pairs,)).astype(prompts.dtype)
  chosen = sequences(prompts, render(prompts, jnp.ones(num_pairs, bool),
                                     dialect))
  rejected = sequences(prompts, render(prompts, jnp.zeros(num_pairs, bool),
                                       dialect))
  return dict(sft=sft, chosen=chosen, rejected=rejected)


# ---------------------------------------------------------------------------
# Losses.
# ---------------------------------------------------------------------------


def _target_logprobs(logits, tokens):
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def response_logprob(logits, tokens) -> jax.Array:
  """Summed log-probability of each row's response tokens (prompt masked)."""
  mask = jnp.asarray(RESPONSE_MASK, logits.dtype)
  return jnp.sum(_target_logprobs(logits, tokens) * mask, axis=-1)


def sft_loss(logits, tokens) -> jax.Array:
  """Token-mean cross-entropy over the response tokens of all rows."""
  mask = jnp.broadcast_to(jnp.asarray(RESPONSE_MASK, logits.dtype),
                          tokens[:, 1:].shape)
  return -jnp.sum(_target_logprobs(logits, tokens) * mask) / jnp.sum(mask)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
             beta) -> tuple:
  """DPO loss, preference accuracy and mean reward margin.

  Args:
    policy_chosen: summed response log-probabilities of the chosen rows.
    policy_rejected: the same for the rejected rows.
    ref_chosen: the reference model's, chosen rows.
    ref_rejected: the reference model's, rejected rows.
    beta: DPO temperature β.

  Returns:
    ``(loss, accuracy, margin)``: the mean of
    :math:`-\\log\\sigma(\\beta[\\Delta_{policy}-\\Delta_{ref}])`, the fraction
    of pairs whose chosen reward :math:`\\beta(\\log\\pi-\\log\\pi_{ref})`
    exceeds the rejected one, and the mean reward difference.
  """
  beta = jnp.asarray(beta, policy_chosen.dtype)
  reward_chosen = beta * (policy_chosen - ref_chosen)
  reward_rejected = beta * (policy_rejected - ref_rejected)
  margin = reward_chosen - reward_rejected
  return (jnp.mean(-jax.nn.log_sigmoid(margin)),
          jnp.mean((margin > 0).astype(policy_chosen.dtype)),
          jnp.mean(margin))


# ---------------------------------------------------------------------------
# Pre-training.
# ---------------------------------------------------------------------------


def lm_loss(logits, tokens) -> jax.Array:
  """Next-token cross-entropy over every non-padding target."""
  mask = (tokens[:, 1:] != PAD).astype(logits.dtype)
  return -jnp.sum(_target_logprobs(logits, tokens) * mask) / jnp.sum(mask)


def pretrain(key, config: LMConfig = LMConfig(), *, steps: int = 1500,
             batch_size: int = 64, learning_rate: float = 3e-3,
             chunk: int = 50) -> tuple:
  """Pre-trains :class:`CausalLM` on fresh batches of the synthetic corpus.

  Adam (betas 0.9/0.95) with gradient clipping at 1, constant step, jitted
  ``lax.scan`` chunks of ``chunk`` steps.

  Returns:
    ``(params, info)``: the linen ``params`` dict and ``info`` with
    ``seconds`` (wall time including compilation), ``final_loss`` (mean of
    the last chunk) and ``losses`` (one mean per chunk).
  """
  steps = base.check_static_int(steps, "steps")
  model = CausalLM(config)
  key_init, key_data = jax.random.split(key)
  params = jax.jit(model.init)(key_init, jnp.zeros((1, config.max_len),
                                                  jnp.int32))["params"]
  params = _common.as_float32(params)
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adam(learning_rate, b1=0.9, b2=0.95))

  @jax.jit
  def run_chunk(params, opt_state, start):
    def body(carry, step):
      p, s = carry
      tokens = pretraining_batch(jax.random.fold_in(key_data, step),
                                 batch_size)
      loss, grads = jax.value_and_grad(
          lambda q: lm_loss(model.apply({"params": q}, tokens[:, :-1]),
                            tokens))(p)
      updates, s = opt.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), loss
    (params, opt_state), losses = jax.lax.scan(
        body, (params, opt_state), start + jnp.arange(chunk))
    return params, opt_state, jnp.mean(losses)

  start_time = time.perf_counter()
  opt_state = opt.init(params)
  losses = []
  for start in range(0, steps, chunk):
    params, opt_state, loss = run_chunk(params, opt_state, start)
    losses.append(float(loss))
  info = dict(seconds=time.perf_counter() - start_time,
              final_loss=losses[-1], losses=losses,
              steps=int(np.ceil(steps / chunk) * chunk))
  return params, info


# ---------------------------------------------------------------------------
# The bilevel problem.
# ---------------------------------------------------------------------------


def problem(*, seed: int = 0, config: LMConfig = LMConfig(),
            pretrain_steps: int = 1500, pretrained: Optional[dict] = None,
            lora_rank: int = 4, lora_alpha: float = 8.0, beta: float = 0.1,
            num_train: int = 512, num_eval: int = 128,
            batch_size: int = 32) -> _common.Application:
  """The DPO/SFT application (stochastic minibatches of pairs and SFT rows).

  Args:
    seed: seed of pre-training, the data and the adapters.
    config: model size.
    pretrain_steps: pre-training steps (ignored when ``pretrained`` is given).
    pretrained: linen params of an already pre-trained :class:`CausalLM`.
    lora_rank: r of the adapters on ``attn/(query|value)``.
    lora_alpha: α of the adapters (scale α/r).
    beta: DPO β.
    num_train: training DPO pairs and training SFT rows (each).
    num_eval: evaluation pairs and rows (each).
    batch_size: pairs and SFT rows per step (each).

  Returns:
    An :class:`~jaxbilevel.applications.Application` with
    ``x = {"adapters": ...}`` (LoRA) and ``y = {"head": ...}``, split with
    :func:`jaxbilevel.flax_utils.split_params`. ``evaluate`` returns
    ``upper_loss`` (evaluated DPO loss), ``lower_loss`` (evaluated SFT loss),
    ``preference_accuracy`` and ``reward_margin``; ``info`` has the model,
    the reference params, the :class:`~jaxbilevel.lora.LoRA`, the
    pre-training record and ``refit_sft``, the second half of the SFT
    training rows (for the stage-2 re-fit of :func:`make_transfer`).

  Examples:
    >>> import jax, optax, jaxbilevel as jbl
    >>> from jaxbilevel.applications import dpo_sft, batch_stream
    >>> small = dpo_sft.LMConfig(d_model=16, num_layers=1, num_heads=2)
    >>> app = dpo_sft.problem(config=small, pretrain_steps=20, num_train=64,
    ...                       num_eval=32, batch_size=8)
    >>> evaluate = jax.jit(app.evaluate)
    >>> round(float(evaluate(app.params)["upper_loss"]), 4)   # log 2
    0.6931
    >>> tx = jbl.pbgd_free(app.f, app.g, gamma=10.0,
    ...                    upper_optimizer=optax.adam(1e-3),
    ...                    lower_optimizer=optax.adam(1e-3))
    >>> params, _, _ = jbl.run(tx, app.params, num_steps=5,
    ...                        batches=batch_stream(app, jax.random.PRNGKey(1)))
    >>> sorted(evaluate(params))
    ['lower_loss', 'preference_accuracy', 'reward_margin', 'upper_loss']
  """
  key = jax.random.PRNGKey(seed)
  key_pre, key_data, key_eval, key_lora = jax.random.split(key, 4)
  model = CausalLM(config)
  if pretrained is None:
    pretrained, pre_info = pretrain(key_pre, config, steps=pretrain_steps)
  else:
    pretrained, pre_info = _common.as_float32(pretrained), dict(
        seconds=0.0, final_loss=float("nan"), losses=[], steps=0)
  adapter = lora_lib.lora(LORA_TARGET, rank=lora_rank, alpha=lora_alpha)
  trainable = {"adapters": adapter.init(key_lora, pretrained),
               "head": pretrained["head"]}
  params = flax_utils.split_params(trainable, flax_utils.is_lora)
  backbone = {k: v for k, v in pretrained.items() if k != "head"}

  def logits_of(x, y, tokens):
    parts = flax_utils.merge_params(x, y)
    full = adapter.merge(dict(backbone, head=parts["head"]),
                         parts["adapters"])
    return model.apply({"params": full}, tokens[:, :-1])

  @jax.jit
  def reference_logprob(tokens):
    return response_logprob(
        model.apply({"params": pretrained}, tokens[:, :-1]), tokens)

  def with_reference(data):
    return dict(data, ref_chosen=reference_logprob(data["chosen"]),
                ref_rejected=reference_logprob(data["rejected"]))

  data_fn = jax.jit(make_data, static_argnums=(1, 2))
  # 2 x num_train SFT rows: the first half for training (stage 1), the second
  # for the stage-2 head re-fit of `transfer`.
  train = with_reference(data_fn(key_data, 2 * num_train, num_train))
  refit_rows = train["sft"][num_train:]
  train["sft"] = train["sft"][:num_train]
  held_out = with_reference(data_fn(key_eval, num_eval, num_eval))

  def dpo_terms(x, y, data):
    n = data["chosen"].shape[0]
    tokens = jnp.concatenate([data["chosen"], data["rejected"]])
    logp = response_logprob(logits_of(x, y, tokens), tokens)
    return dpo_loss(logp[:n], logp[n:], data["ref_chosen"],
                    data["ref_rejected"], beta)

  def f(x, y, batch):
    return dpo_terms(x, y, batch)[0]

  def g(x, y, batch):
    return sft_loss(logits_of(x, y, batch["sft"]), batch["sft"])

  def sample(key):
    kd, ks = jax.random.split(key)
    pairs = jax.random.choice(kd, num_train, (batch_size,), replace=False)
    rows = jax.random.choice(ks, num_train, (batch_size,), replace=False)
    return dict(chosen=train["chosen"][pairs],
                rejected=train["rejected"][pairs],
                ref_chosen=train["ref_chosen"][pairs],
                ref_rejected=train["ref_rejected"][pairs],
                sft=train["sft"][rows])

  def evaluate(params):
    loss, accuracy, margin = dpo_terms(params.x, params.y, held_out)
    return dict(upper_loss=loss, lower_loss=g(params.x, params.y, held_out),
                preference_accuracy=accuracy, reward_margin=margin)

  info = dict(seed=seed, config=config._asdict(), model=model,
              refit_sft=refit_rows,
              reference_params=pretrained, lora=adapter, lora_target=LORA_TARGET,
              pretraining=pre_info, beta=beta, num_train=num_train,
              num_eval=num_eval, batch_size=batch_size,
              num_adapter_params=int(sum(np.size(v) for v in
                                         jax.tree.leaves(params.x))),
              num_head_params=int(sum(np.size(v) for v in
                                      jax.tree.leaves(params.y))),
              num_backbone_params=int(sum(np.size(v) for v in
                                          jax.tree.leaves(backbone))),
              upper_depends_on_x=True)
  return _common.Application("dpo_sft", f, g, params, None, sample, evaluate,
                             info)


def make_transfer(app: _common.Application, *, num_steps: int,
                  learning_rate: float = 1e-3, batch_size: int = 32,
                  seed: int = 0) -> Callable[[base.BilevelParams], dict]:
  """Stage 2 of the LLM protocol: freeze ``x``, re-fit the head on new SFT data.

  The returned function freezes the adapters ``params.x`` and trains the
  head on the SFT loss alone, on the second half of the SFT training rows
  (``app.info["refit_sft"]``), with Adam (betas 0.9/0.95, clipping at 1)
  for ``num_steps`` steps on minibatches of ``batch_size`` rows, starting
  from ``params.y``. It is compiled once, so calling it for several methods'
  results costs one compilation. Decision: an equal number of steps for
  every method (the paper gives each the same stage-2 time; head-only steps
  cost the same whatever method produced ``x``, so the two coincide).

  Returns:
    ``transfer(params) -> {"dpo": evaluated DPO loss at (x, re-fitted
    head), "sft_train": SFT loss of the re-fitted head on the re-fit rows,
    "params": the new BilevelParams}``.

  Examples:
    >>> import jax
    >>> from jaxbilevel.applications import dpo_sft
    >>> small = dpo_sft.LMConfig(d_model=16, num_layers=1, num_heads=2)
    >>> lm = dpo_sft.CausalLM(small)
    >>> weights = jax.jit(lm.init)(jax.random.PRNGKey(0), jax.numpy.zeros(
    ...     (1, small.max_len), "int32"))["params"]
    >>> app = dpo_sft.problem(config=small, pretrained=weights, num_train=32,
    ...                       num_eval=16, batch_size=8)
    >>> stage2 = dpo_sft.make_transfer(app, num_steps=20, learning_rate=1e-2)
    >>> out = stage2(app.params)
    >>> before = float(jax.jit(app.g)(app.params.x, app.params.y,
    ...                               {"sft": app.info["refit_sft"]}))
    >>> bool(out["sft_train"] < before)
    True
  """
  num_steps = base.check_static_int(num_steps, "num_steps")
  rows = app.info["refit_sft"]
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adam(learning_rate, b1=0.9, b2=0.95))
  size = min(batch_size, rows.shape[0])
  key = jax.random.PRNGKey(seed)

  @jax.jit
  def refit(x, y):
    def body(carry, step):
      y, state = carry
      pick = jax.random.choice(jax.random.fold_in(key, step), rows.shape[0],
                               (size,), replace=False)
      grads = jax.grad(app.g, argnums=1)(x, y, {"sft": rows[pick]})
      updates, state = opt.update(grads, state, y)
      return (optax.apply_updates(y, updates), state), None
    (y, _), _ = jax.lax.scan(body, (y, opt.init(y)), jnp.arange(num_steps))
    return y, app.g(x, y, {"sft": rows}), app.evaluate(
        base.BilevelParams(x, y))["upper_loss"]

  def transfer(params):
    y, sft_train, dpo = refit(params.x, params.y)
    return dict(dpo=float(dpo), sft_train=float(sft_train),
                params=base.BilevelParams(params.x, y))

  return transfer
