"""FSDP + data-parallel bilevel fine-tuning on 8 forced host devices.

One subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(the device count is fixed when JAX starts) builds the same tiny DPO / SFT
problem on one device and on a 2 x 4 mesh (examples over ``"data"``, large
parameters and frozen weights over ``"fsdp"``), runs PBGD-Free on both and
prints the measurements as JSON for the tests below.
"""

import inspect
import textwrap

import jax
import numpy as np
import pytest

from _helpers import maxdiff as _maxdiff
from _helpers import result_json as _result_json
from _helpers import run_python as _run_python
from _helpers import spec as _spec
from _helpers import tiny_preference_pairs as _tiny_preference_pairs
import jaxbilevel as jbl

pytest.importorskip("flax")

# The helpers travel as source (see _helpers.py).
_SCRIPT = "".join(inspect.getsource(fn) for fn in (
    _tiny_preference_pairs, _maxdiff, _spec)) + textwrap.dedent(r'''
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from jax.sharding import Mesh
    import jaxbilevel as jbl
    from jaxbilevel import llm

    out = {"device_count": jax.device_count()}
    config = llm.LMConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2)
    pairs = tiny_preference_pairs(64, n=40, t=12)

    def build(**kw):
      return llm.dpo_sft_problem(
          llm.CausalLM(config, rngs=nnx.Rngs(0)), None, pairs, num_steps=3,
          dpo_batch_size=8, sft_batch_size=8, eval_size=4, lora_rank=4,
          fsdp_min_size=512, **kw)

    def train(problem):
      """3 PBGD-Free steps; the frozen weights are a jit argument."""
      tx = jbl.pbgd_free(problem.f, problem.g, gamma=10.0, inner_steps=2,
                         upper_optimizer=optax.adam(3e-2),
                         lower_optimizer=optax.adam(1e-2))

      @jax.jit
      def go(params, frozen, batches):
        def batch_at(step):
          return dict(jax.tree.map(lambda b: b[step], batches), frozen=frozen)
        return jbl.scan_run(tx, params, num_steps=3, batches=batch_at,
                            diagnostics=True)[::2]

      return go(problem.params0, problem.frozen, problem.batches)

    ref = build()
    ref_params, ref_hist = train(ref)
    out["f"] = np.asarray(ref_hist["f"]).tolist()
    out["moved"] = maxdiff(ref_params, ref.params0)

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    sh = build(mesh=mesh, data_axis="data", fsdp_axis="fsdp")
    out["head_spec"] = spec(sh.params0.y["lm_head"]["kernel"])
    out["embed_spec"] = spec(sh.frozen["embed_tokens"]["embedding"])
    out["lora_a_spec"] = spec(jax.tree.leaves(sh.params0.x)[0])
    out["batch_spec"] = spec(sh.batches["dpo"]["chosen_ids"])
    out["ref_logp_diff"] = maxdiff(ref.batches["dpo"]["ref_chosen_logp"],
                                   sh.batches["dpo"]["ref_chosen_logp"])
    sh_params, sh_hist = train(sh)
    out["sharded_diff"] = maxdiff(ref_params, sh_params)
    out["sharded_f_diff"] = maxdiff(ref_hist["f"], sh_hist["f"])
    out["sharded_head_spec_after"] = spec(sh_params.y["lm_head"]["kernel"])
    out["eval_diff"] = max(abs(ref.evaluate(ref_params)[k]
                               - sh.evaluate(sh_params)[k])
                           for k in ref.evaluate(ref_params))

    # Data-parallel over all 8 devices with 2 micro-batches per device batch.
    mesh8 = Mesh(np.array(jax.devices()), ("data",))
    dp = build(mesh=mesh8, microbatches=2)
    dp_params, _ = train(dp)
    out["dp_microbatch_diff"] = maxdiff(ref_params, dp_params)

    # jax.make_mesh gives Explicit axes in recent JAX; dpo_sft_problem uses
    # the same devices with Auto axes (the embedding gather needs them).
    made = jax.make_mesh((2, 4), ("data", "fsdp"))
    out["made_axis_types"] = [str(t) for t in getattr(made, "axis_types", ())]
    mm = build(mesh=made, data_axis="data", fsdp_axis="fsdp")
    out["made_head_spec"] = spec(mm.params0.y["lm_head"]["kernel"])
    mm_params, _ = train(mm)
    out["made_mesh_diff"] = maxdiff(ref_params, mm_params)
    print("RESULT " + json.dumps(out))
''')


@pytest.fixture(scope="module")
def measured():
  return _result_json(_run_python(_SCRIPT, host_devices=8, timeout=300))


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_eight_devices(measured):
  assert measured["device_count"] == 8


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_placements(measured):
  # The head [32, 64] and the embedding [64, 32] are split along their
  # largest dimension (64) over "fsdp"; a LoRA A [32, 4] (128 < 512
  # elements) is replicated; batches are split along examples over "data".
  assert measured["head_spec"] == [None, "fsdp"]
  assert measured["embed_spec"] == ["fsdp", None]
  assert measured["lora_a_spec"] == []
  assert measured["batch_spec"] == [None, "data"]
  assert measured["sharded_head_spec_after"] == [None, "fsdp"]


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_sharded_run_equals_single_device_run(measured):
  assert measured["f"][0] == pytest.approx(np.log(2.0), abs=1e-6)
  assert measured["moved"] > 1e-3  # the steps did something
  assert measured["ref_logp_diff"] < 1e-4
  assert measured["sharded_f_diff"] < 1e-5
  assert measured["sharded_diff"] < 1e-5
  assert measured["eval_diff"] < 1e-5
  assert measured["dp_microbatch_diff"] < 1e-5


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_a_mesh_from_jax_make_mesh_works(measured):
  # Explicit axes (the jax.make_mesh default of recent JAX, e.g. 0.10) used
  # to fail in the embedding gather with a ShardingTypeError.
  assert set(measured["made_axis_types"]) <= {"AxisType.Explicit",
                                              "AxisType.Auto"}
  assert measured["made_head_spec"] == [None, "fsdp"]
  assert measured["made_mesh_diff"] < 1e-5


def test_fsdp_shardings_rules():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))
  tree = {"big": np.zeros((6, 10)), "tie": np.zeros((8, 8)),
          "small": np.zeros(3), "scalar": np.zeros(())}
  specs = jbl.fsdp_shardings(tree, mesh, min_size=10)
  assert tuple(specs["big"].spec) == (None, "fsdp")  # the largest dimension
  assert tuple(specs["tie"].spec) == ("fsdp", None)  # ties: the first one
  assert tuple(specs["small"].spec) == ()
  assert tuple(specs["scalar"].spec) == ()
  with pytest.raises(jbl.BilevelValidationError, match="'model' is not an axis"):
    jbl.fsdp_shardings(tree, mesh, "model")
  placed = jbl.shard_fsdp(tree, mesh, min_size=10)
  assert np.array_equal(np.asarray(placed["big"]), tree["big"])
