"""LoRA adapters as a pure parameter transformation (jaxbilevel.lora)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbilevel as jbl
from jaxbilevel import flax_utils
from jaxbilevel import lora


class TwoLayer(nn.Module):

  @nn.compact
  def __call__(self, inputs):
    h = nn.Dense(6, name="query")(inputs)
    h = nn.Dense(5, name="value")(jnp.tanh(h))
    return nn.Dense(3, name="head")(h)


def _params():
  model = TwoLayer()
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.float32))
  return model, params["params"]


def test_init_shapes_zero_b_and_only_matched_kernels():
  _, params = _params()
  adapters = lora.init(jax.random.PRNGKey(1), params, target="query|value",
                       rank=2)
  assert sorted(adapters) == ["query", "value"]
  assert adapters["query"]["lora_a"].shape == (4, 2)
  assert adapters["query"]["lora_b"].shape == (2, 6)
  assert adapters["value"]["lora_a"].shape == (6, 2)
  assert adapters["value"]["lora_b"].shape == (2, 5)
  for leaf in (adapters["query"]["lora_b"], adapters["value"]["lora_b"]):
    np.testing.assert_array_equal(leaf, 0.0)
  assert adapters["query"]["lora_a"].dtype == jnp.float32
  # A is N(0, 1/d_in): a (4, 2) draw is far from zero.
  assert float(jnp.std(adapters["query"]["lora_a"])) > 0.1
  assert lora.matching_kernels(params, "value") == [("value", "kernel")]


def test_merged_model_equals_base_at_init_and_applies_w_plus_sab():
  model, params = _params()
  inputs = jax.random.normal(jax.random.PRNGKey(2), (7, 4), jnp.float32)
  adapter = lora.lora("query", rank=3, alpha=6.0)
  adapters = adapter.init(jax.random.PRNGKey(3), params)
  merged = adapter.merge(params, adapters)
  np.testing.assert_array_equal(model.apply({"params": merged}, inputs),
                                model.apply({"params": params}, inputs))
  # With a non-zero B the query kernel is W + (alpha/r) A B exactly.
  b = jax.random.normal(jax.random.PRNGKey(4), (3, 6), jnp.float32)
  adapters = {"query": {"lora_a": adapters["query"]["lora_a"], "lora_b": b}}
  merged = adapter.merge(params, adapters)
  expected = params["query"]["kernel"] + 2.0 * adapters["query"]["lora_a"] @ b
  np.testing.assert_allclose(merged["query"]["kernel"], expected, rtol=1e-6)
  np.testing.assert_array_equal(merged["value"]["kernel"],
                                params["value"]["kernel"])
  hidden = jnp.tanh(inputs @ expected + params["query"]["bias"])
  out = hidden @ params["value"]["kernel"] + params["value"]["bias"]
  out = out @ params["head"]["kernel"] + params["head"]["bias"]
  np.testing.assert_allclose(model.apply({"params": merged}, inputs), out,
                             rtol=1e-5, atol=1e-6)
  # The input tree is not modified.
  assert not np.allclose(params["query"]["kernel"], merged["query"]["kernel"])


def test_gradient_through_merge_matches_closed_form():
  """At B = 0: dL/dB = s A^T dL/dW and dL/dA = 0 (LoRA's start)."""
  _, params = _params()
  adapters = lora.init(jax.random.PRNGKey(5), params, target="query", rank=2)
  target = jax.random.normal(jax.random.PRNGKey(6), (4, 6), jnp.float32)

  def loss_of_kernel(kernel):
    return jnp.sum((kernel - target) ** 2)

  def loss(adapters, scale):
    merged = lora.merge(params, adapters, scale=scale)
    return loss_of_kernel(merged["query"]["kernel"])

  grads = jax.jit(jax.grad(loss))(adapters, 0.5)
  d_kernel = jax.grad(loss_of_kernel)(params["query"]["kernel"])
  np.testing.assert_allclose(grads["query"]["lora_b"],
                             0.5 * adapters["query"]["lora_a"].T @ d_kernel,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(grads["query"]["lora_a"], 0.0)
  # Central finite difference in one entry of B (float64 copy).
  params64 = jax.tree.map(lambda v: v.astype(jnp.float64), params)
  ad64 = jax.tree.map(lambda v: v.astype(jnp.float64), adapters)

  def loss64(b01):
    b = ad64["query"]["lora_b"].at[0, 1].set(b01)
    merged = lora.merge(params64, {"query": {"lora_a": ad64["query"]["lora_a"],
                                             "lora_b": b}}, scale=0.5)
    return jnp.sum((merged["query"]["kernel"] - target) ** 2)

  eps = 1e-6
  fd = (loss64(eps) - loss64(-eps)) / (2 * eps)
  np.testing.assert_allclose(float(grads["query"]["lora_b"][0, 1]), float(fd),
                             rtol=1e-4)


def test_scale_defaults_to_one_and_is_alpha_over_rank():
  assert lora.lora("q", rank=4).scale == 1.0
  assert lora.lora("q", rank=4, alpha=16.0).scale == 4.0


def test_adapters_are_the_upper_level_of_a_split():
  _, params = _params()
  adapters = lora.init(jax.random.PRNGKey(0), params, target="query", rank=2)
  split = flax_utils.split_params({"adapters": adapters,
                                   "head": params["head"]},
                                  flax_utils.is_lora)
  assert jax.tree.structure(split.x) == jax.tree.structure(
      {"adapters": adapters})
  assert sorted(split.y) == ["head"]


@pytest.mark.parametrize("target, message", [
    ("nothing_matches", "matches no 'kernel' leaf"),
    ("(", "not a valid regular expression"),
])
def test_init_errors(target, message):
  _, params = _params()
  with pytest.raises(jbl.BilevelValidationError, match=message):
    lora.init(jax.random.PRNGKey(0), params, target=target, rank=2)


def test_rejects_non_2d_kernels_and_bad_rank():
  params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}}
  with pytest.raises(jbl.BilevelValidationError, match="2-D Dense"):
    lora.init(jax.random.PRNGKey(0), params, target="conv", rank=2)
  with pytest.raises(jbl.BilevelValidationError, match="rank"):
    lora.lora("conv", rank=0)
  with pytest.raises(jbl.BilevelValidationError, match="rank"):
    lora.init(jax.random.PRNGKey(0), params, target="conv", rank=2.0)


def test_merge_errors():
  _, params = _params()
  adapters = lora.init(jax.random.PRNGKey(0), params, target="query", rank=2)
  with pytest.raises(jbl.BilevelValidationError, match="has no 'other/kernel'"):
    lora.merge(params, {"other": adapters["query"]})
  with pytest.raises(jbl.BilevelValidationError, match="needs both"):
    lora.merge(params, {"query": {"lora_a": adapters["query"]["lora_a"]}})
  bad = {"query": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 5))}}
  with pytest.raises(jbl.BilevelValidationError, match="do not give"):
    lora.merge(params, bad)
  with pytest.raises(jbl.BilevelValidationError, match="nested dict"):
    lora.merge([1, 2], adapters)


class FusedAttentionProjections(nn.Module):
  """DenseGeneral kernels: [d, heads, head_dim] in, [heads, head_dim, d] out."""

  @nn.compact
  def __call__(self, inputs):
    h = nn.DenseGeneral((2, 3), name="qkv")(inputs)         # [B, 2, 3]
    return nn.DenseGeneral(4, axis=(-2, -1), name="out")(jnp.tanh(h))


@pytest.mark.parametrize("target, in_axes", [("qkv", 1), ("out", 2)])
def test_dense_general_kernels_match_explicit_reshape(target, in_axes):
  model = FusedAttentionProjections()
  inputs = jax.random.normal(jax.random.PRNGKey(0), (5, 4), jnp.float32)
  params = model.init(jax.random.PRNGKey(1), inputs)["params"]
  adapter = lora.lora(target, rank=2, alpha=3.0, in_axes=in_axes)
  adapters = adapter.init(jax.random.PRNGKey(2), params)
  kernel = params[target]["kernel"]
  d_in = int(np.prod(kernel.shape[:in_axes]))
  d_out = int(np.prod(kernel.shape[in_axes:]))
  assert adapters[target]["lora_a"].shape == (d_in, 2)
  assert adapters[target]["lora_b"].shape == (2, d_out)
  np.testing.assert_array_equal(
      model.apply({"params": adapter.merge(params, adapters)}, inputs),
      model.apply({"params": params}, inputs))
  b = jax.random.normal(jax.random.PRNGKey(3), (2, d_out), jnp.float32)
  adapters = {target: {"lora_a": adapters[target]["lora_a"], "lora_b": b}}
  merged = adapter.merge(params, adapters)
  # Explicit computation: the kernel as the matrix [d_in, d_out] it applies.
  matrix = (kernel.reshape(d_in, d_out)
            + 1.5 * adapters[target]["lora_a"] @ b)
  np.testing.assert_allclose(merged[target]["kernel"].reshape(d_in, d_out),
                             matrix, rtol=1e-6, atol=1e-7)
  qkv = params["qkv"]["kernel"].reshape(4, 6)
  out = params["out"]["kernel"].reshape(6, 4)
  if target == "qkv":
    qkv = matrix
  else:
    out = matrix
  hidden = jnp.tanh(inputs @ qkv + params["qkv"]["bias"].reshape(6))
  expected = hidden @ out + params["out"]["bias"]
  np.testing.assert_allclose(model.apply({"params": merged}, inputs),
                             expected, rtol=1e-5, atol=1e-6)


def test_dense_general_errors():
  params = {"qkv": {"kernel": jnp.ones((4, 2, 3))}}
  with pytest.raises(jbl.BilevelValidationError, match="in_axes must be 1"):
    lora.init(jax.random.PRNGKey(0), params, target="qkv", rank=2, in_axes=3)
  bad = {"qkv": {"lora_a": jnp.ones((5, 2)), "lora_b": jnp.ones((2, 6))}}
  with pytest.raises(jbl.BilevelValidationError, match="do not give"):
    lora.merge(params, bad)


def test_init_refuses_an_integer_kernel():
  params = {"d": {"kernel": jnp.ones((2, 2), jnp.int32)}}
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"lora.init: the kernel d/kernel has dtype int32; "
                           r"LoRA adapts floating-point kernels only"):
    lora.init(jax.random.PRNGKey(0), params, target="d", rank=1)


@pytest.mark.parametrize("scale", [np.nan, float("inf"), jnp.asarray(np.nan)])
def test_merge_refuses_a_non_finite_scale(scale):
  params = {"d": {"kernel": jnp.zeros((2, 2))}}
  adapters = {"d": {"lora_a": jnp.ones((2, 1)), "lora_b": jnp.ones((1, 2))}}
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"lora.merge: scale must be finite"):
    lora.merge(params, adapters, scale=scale)
  # A traced scale is not checked (and a finite one merges as before).
  merged = jax.jit(lambda s: lora.merge(params, adapters, scale=s))(0.5)
  np.testing.assert_array_equal(merged["d"]["kernel"], 0.5 * np.ones((2, 2)))
