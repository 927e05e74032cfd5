"""flax_utils: splitting flax parameter trees into the two levels, and back."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen
from flax import nnx

import jaxbilevel as jbl
from jaxbilevel import flax_utils


def _tree_equal(a, b):
  return (jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(u, v) and u.dtype == v.dtype
      for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def _dict_params():
  return {"encoder": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3),
                      "lora_A": jnp.full((2, 1), 0.5),
                      "lora_B": jnp.zeros((1, 3))},
          "head": {"kernel": jnp.arange(3.0).reshape(3, 1),
                   "bias": jnp.zeros(1)}}


@pytest.mark.parametrize("selector", [
    "lora",                                           # regex
    re.compile(r"^encoder/lora_[AB]$"),               # compiled, anchored
    lambda path, leaf: path[-1].startswith("lora"),  # predicate
    flax_utils.is_lora,
])
def test_dict_split_and_merge_round_trip(selector):
  params = _dict_params()
  split = flax_utils.split_params(params, selector)
  assert isinstance(split, jbl.BilevelParams)
  assert split.x == {"encoder": {"lora_A": params["encoder"]["lora_A"],
                                 "lora_B": params["encoder"]["lora_B"]}}
  assert sorted(split.y) == ["encoder", "head"]
  assert sorted(split.y["encoder"]) == ["bias", "kernel"]
  merged = flax_utils.merge_params(split.x, split.y)
  assert _tree_equal(merged, params)


class _LoRAModel(nnx.Module):

  def __init__(self, rngs):
    self.backbone = nnx.LoRALinear(3, 2, lora_rank=1, rngs=rngs)
    self.head = nnx.Linear(2, 1, rngs=rngs)

  def __call__(self, inputs):
    return self.head(jnp.tanh(self.backbone(inputs)))[:, 0]


def _nnx_model():
  graphdef, state = nnx.split(_LoRAModel(nnx.Rngs(0)), nnx.Param)
  return graphdef, state


def test_nnx_state_split_by_variable_type_and_merge():
  graphdef, state = _nnx_model()
  split = flax_utils.split_params(state, flax_utils.is_lora)
  assert isinstance(split.x, nnx.State) and isinstance(split.y, nnx.State)
  x_vars = list(nnx.to_flat_state(split.x))
  assert [p for p, _ in x_vars] == [("backbone", "lora", "lora_a"),
                                    ("backbone", "lora", "lora_b")]
  assert all(isinstance(v, nnx.LoRAParam) for _, v in x_vars)
  assert not any(isinstance(v, nnx.LoRAParam)
                 for _, v in nnx.to_flat_state(split.y))
  by_type = flax_utils.split_params(
      state, lambda path, leaf: isinstance(leaf, nnx.LoRAParam))
  assert _tree_equal(by_type, split)
  merged = flax_utils.merge_params(split.x, split.y)
  assert _tree_equal(merged, state)
  inputs = jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(4, 3)
  np.testing.assert_array_equal(nnx.merge(graphdef, merged)(inputs),
                                nnx.merge(graphdef, state)(inputs))


def _regression_data():
  rng = np.random.default_rng(0)
  inputs = rng.normal(size=(16, 3)).astype(np.float32)
  targets = np.sin(inputs @ np.array([1.0, -2.0, 0.5])).astype(np.float32)
  return {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets),
          "val": jnp.asarray(np.arange(16) % 2, jnp.float32)}


def _losses(predict):
  """Upper: validation half; lower: training half (masked squared errors)."""

  def f(x, y, batch):
    err = predict(x, y, batch["inputs"]) - batch["targets"]
    return jnp.sum(batch["val"] * err ** 2) / 8

  def g(x, y, batch):
    err = predict(x, y, batch["inputs"]) - batch["targets"]
    return jnp.sum((1 - batch["val"]) * err ** 2) / 8 + 1e-3 * sum(
        jnp.sum(v ** 2) for v in jax.tree.leaves(y))

  return f, g


def test_bilevel_run_on_nnx_model_equals_plain_array_formulation():
  """x = LoRA adapters, y = the rest; checked against hand-written maths."""
  graphdef, state = _nnx_model()
  split = flax_utils.split_params(state, flax_utils.is_lora)

  def predict_nnx(x, y, inputs):
    return nnx.merge(graphdef, flax_utils.merge_params(x, y))(inputs)

  def predict_plain(x, y, inputs):
    hidden = (inputs @ y["kernel"] + y["bias"]
              + inputs @ x["lora_a"] @ x["lora_b"])
    return (jnp.tanh(hidden) @ y["head_kernel"] + y["head_bias"])[:, 0]

  plain = jbl.BilevelParams(
      x={"lora_a": state["backbone"]["lora"]["lora_a"][...],
         "lora_b": state["backbone"]["lora"]["lora_b"][...]},
      y={"kernel": state["backbone"]["kernel"][...],
         "bias": state["backbone"]["bias"][...],
         "head_kernel": state["head"]["kernel"][...],
         "head_bias": state["head"]["bias"][...]})
  data = _regression_data()
  runs = []
  for predict, p0 in ((predict_nnx, split), (predict_plain, plain)):
    f, g = _losses(predict)
    tx = jbl.alt_pbgd(f, g, gamma=10.0, upper_optimizer=optax.adam(0.05),
                      lower_optimizer=optax.sgd(0.1), inner_steps=1)
    runs.append(jbl.run(tx, p0, num_steps=40, batch=data, diagnostics=True))
  (p_nnx, _, h_nnx), (p_plain, _, h_plain) = runs
  np.testing.assert_allclose(h_nnx["f"], h_plain["f"], rtol=1e-5)
  np.testing.assert_allclose(p_nnx.x["backbone"]["lora"]["lora_b"][...],
                             p_plain.x["lora_b"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(p_nnx.y["head"]["kernel"][...],
                             p_plain.y["head_kernel"], rtol=1e-5, atol=1e-7)
  assert h_nnx["f"][-1] < 0.7 * h_nnx["f"][0]  # the adapters did learn
  assert p_nnx.x["backbone"]["lora"]["lora_a"][...].dtype == jnp.float32


def test_partition_per_level_freezes_a_group_exactly():
  """optax.partition + set_to_zero on a group == treating it as a constant."""
  graphdef, state = _nnx_model()
  split = flax_utils.split_params(state, flax_utils.is_lora)
  labels = flax_utils.param_labels({"frozen": r"^backbone/(kernel|bias)$"},
                                   default="train")
  label_tree = labels(split.y)
  assert isinstance(label_tree, nnx.State)
  assert sorted(jax.tree.leaves(label_tree)) == ["frozen", "frozen", "train",
                                                 "train"]
  lower = optax.partition({"train": optax.adam(0.05),
                           "frozen": optax.set_to_zero()}, labels)
  f, g = _losses(lambda x, y, inputs: nnx.merge(
      graphdef, flax_utils.merge_params(x, y))(inputs))
  data = _regression_data()
  tx = jbl.alt_pbgd(f, g, gamma=10.0, upper_optimizer=optax.adam(0.05),
                    lower_optimizer=lower, inner_steps=1)
  params, _, _ = jbl.run(tx, split, num_steps=30, batch=data)
  assert _tree_equal(params.y["backbone"], split.y["backbone"])  # frozen

  # Reference: the frozen group is a constant closed over by f and g.
  frozen = flax_utils.split_params(split.y, "^backbone/")
  f_c, g_c = _losses(lambda x, y, inputs: nnx.merge(
      graphdef, flax_utils.merge_params(
          x, flax_utils.merge_params(frozen.x, y)))(inputs))
  g_c_reg = lambda x, y, batch: g_c(x, y, batch) + 1e-3 * sum(
      jnp.sum(v ** 2) for v in jax.tree.leaves(frozen.x))
  tx_c = jbl.alt_pbgd(f_c, g_c_reg, gamma=10.0,
                      upper_optimizer=optax.adam(0.05),
                      lower_optimizer=optax.adam(0.05), inner_steps=1)
  ref, _, _ = jbl.run(tx_c, jbl.BilevelParams(split.x, frozen.y),
                      num_steps=30, batch=data)
  np.testing.assert_allclose(params.y["head"]["kernel"][...],
                             ref.y["head"]["kernel"][...], rtol=1e-5)
  np.testing.assert_allclose(params.x["backbone"]["lora"]["lora_b"][...],
                             ref.x["backbone"]["lora"]["lora_b"][...],
                             rtol=1e-5, atol=1e-7)


def test_linen_params_dict():
  model = linen.Sequential([linen.Dense(4), linen.tanh, linen.Dense(1)])
  inputs = _regression_data()["inputs"]
  variables = model.init(jax.random.key(0), inputs)
  split = flax_utils.split_params(variables["params"], r"^layers_0/")
  assert sorted(split.x) == ["layers_0"] and sorted(split.y) == ["layers_2"]

  def predict(x, y, inp):
    return model.apply({"params": flax_utils.merge_params(x, y)}, inp)[:, 0]

  np.testing.assert_array_equal(
      predict(split.x, split.y, inputs),
      model.apply(variables, inputs)[:, 0])
  f, g = _losses(predict)
  tx = jbl.pbgd_free(f, g, gamma=10.0, upper_optimizer=optax.sgd(0.05),
                     lower_optimizer=optax.sgd(0.05), inner_steps=1)
  params, _, history = jbl.run(tx, split, num_steps=30,
                               batch=_regression_data(), diagnostics=True)
  assert history["f"][-1] < history["f"][0]
  assert sorted(params.x["layers_0"]) == ["bias", "kernel"]


FLAX_ERRORS = [
    (lambda: flax_utils.split_params(_dict_params(), "nothing_matches"),
     "selects no parameter, so x would be empty.*encoder/kernel"),
    (lambda: flax_utils.split_params(_dict_params(), ".*"),
     "selects every parameter, so y would be empty"),
    (lambda: flax_utils.split_params([jnp.ones(2)], "a"),
     "expected an nnx.State .* or a nested dict.*got list"),
    (lambda: flax_utils.split_params(_dict_params(), "lora_[A"),
     "not a valid regular expression"),
    (lambda: flax_utils.split_params(_dict_params(), 3),
     "a selector must be a regular expression"),
    (lambda: flax_utils.merge_params({"a": jnp.ones(1)}, {"a": jnp.ones(1)}),
     r"x and y both hold the parameters \['a'\]"),
    (lambda: flax_utils.merge_params(_nnx_model()[1], {"a": jnp.ones(1)}),
     "x is an nnx.State but y is a dict"),
    (lambda: flax_utils.param_labels(["a"], default="b"),
     "rules must be a dict"),
]


@pytest.mark.parametrize("call,message", FLAX_ERRORS)
def test_flax_utils_validation(call, message):
  with pytest.raises(jbl.BilevelValidationError, match=message):
    call()


def test_merge_params_names_a_path_that_is_a_leaf_in_one_half_only():
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"merge_params: x has a parameter at 'a' where y "
                           r"has a subtree \(its parameter 'a/b'\)"):
    flax_utils.merge_params({"a": jnp.ones(2)}, {"a": {"b": jnp.ones(2)}})
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"y has a parameter at 'd/k' where x has a "
                           r"subtree \(its parameter 'd/k/w'\)"):
    flax_utils.merge_params({"d": {"k": {"w": jnp.ones(2)}}},
                            {"d": {"k": jnp.ones(2)}})
  # Disjoint halves under a shared prefix still merge.
  merged = flax_utils.merge_params({"d": {"a": jnp.ones(2)}},
                                   {"d": {"b": jnp.zeros(2)}})
  assert sorted(merged["d"]) == ["a", "b"]
