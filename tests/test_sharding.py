"""Data-parallel, sharded and sweep-sharded runs on 8 host devices.

The multi-device checks run in one subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the device count is
fixed when JAX starts); it prints its measurements as JSON, which the tests
below assert on.
"""

import inspect
import os
import re
import textwrap

import jax
import numpy as np
import pytest

from _helpers import maxdiff as _maxdiff
from _helpers import result_json as _result_json
from _helpers import run_python as _run_python
from _helpers import spec as _spec
import jaxbilevel as jbl

# maxdiff and spec travel as source (see _helpers.py).
_SCRIPT = "".join(inspect.getsource(fn) for fn in (
    _maxdiff, _spec)) + textwrap.dedent(r'''
    import json, os, sys, tempfile
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jaxbilevel as jbl
    from jaxbilevel import checkpoint

    out = {"device_count": jax.device_count()}

    # A regularized least-squares lower level; the upper level scores the
    # lower solution on the validation rows (hyperparameter x = log penalty).
    rng = np.random.default_rng(0)
    A = rng.normal(size=(64, 16))
    b = A @ rng.normal(size=16) + 0.3 * rng.normal(size=64)
    val = (np.arange(64) % 4 == 0).astype(np.float64)

    def g(x, y, batch):
      r = batch["a"] @ y - batch["b"]
      w = 1.0 - batch["val"]
      return jnp.sum(w * r ** 2) / 48.0 + jnp.exp(x) * jnp.sum(y ** 2)

    def f(x, y, batch):
      r = batch["a"] @ y - batch["b"]
      return jnp.sum(batch["val"] * r ** 2) / 16.0 + 0.01 * x ** 2

    def make_tx(gamma=10.0, lr=0.05):
      return jbl.alt_pbgd(f, g, gamma=gamma, upper_optimizer=optax.adam(lr),
                          lower_optimizer=optax.sgd(0.05), inner_steps=1)

    tx = make_tx()
    for dtype in ("float64", "float32"):
      batch = {"a": jnp.asarray(A, dtype), "b": jnp.asarray(b, dtype),
               "val": jnp.asarray(val, dtype)}
      p0 = jbl.BilevelParams(x=jnp.asarray(0.0, dtype),
                             y=jnp.zeros(16, dtype))
      ref = jbl.run(tx, p0, num_steps=60, batch=batch)
      mesh = Mesh(np.array(jax.devices()), ("data",))
      dp = jbl.run(tx, jbl.replicate(p0, mesh), num_steps=60,
                   batch=jbl.shard_batch(batch, mesh, "data"))
      out[f"dp_{dtype}_diff"] = maxdiff(ref, dp)
      out[f"dp_{dtype}_scale"] = float(np.max(np.abs(ref[0].y)))
      out[f"dp_{dtype}_dtype"] = str(dp[0].y.dtype)
      out[f"dp_{dtype}_batch_devices"] = len(
          jbl.shard_batch(batch, mesh)["a"].sharding.device_set)
      out[f"dp_{dtype}_param_replicated"] = bool(
          dp[0].y.sharding.is_fully_replicated)

    batch = {"a": jnp.asarray(A), "b": jnp.asarray(b), "val": jnp.asarray(val)}
    p0 = jbl.BilevelParams(x=jnp.asarray(0.0), y=jnp.zeros(16))
    ref = jbl.run(tx, p0, num_steps=60, batch=batch)

    # 2-D mesh: batch over "data", the lower variables sharded over "model".
    mesh2 = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    p_sh = jbl.BilevelParams(
        x=jbl.replicate(p0.x, mesh2),
        y=jax.device_put(p0.y, NamedSharding(mesh2, P("model"))))
    sh = jbl.run(tx, p_sh, num_steps=60,
                 batch=jbl.shard_batch(batch, mesh2, "data"))
    out["model_sharded_diff"] = maxdiff(ref, sh)
    out["model_sharded_y_spec"] = spec(sh[0].y)
    out["model_sharded_y_devices"] = len(sh[0].y.sharding.device_set)

    # Per-step batches (steps x examples) sharded along the example axis.
    noise = rng.normal(size=(30, 64)) * 0.01
    batches = {"a": jnp.broadcast_to(jnp.asarray(A), (30, 64, 16)),
               "b": jnp.asarray(b) + jnp.asarray(noise),
               "val": jnp.broadcast_to(jnp.asarray(val), (30, 64))}
    ref_b = jbl.run(tx, p0, num_steps=30, batches=batches)
    sh_b = jbl.run(tx, p0, num_steps=30, batches=jbl.shard_batch(
        batches, mesh, "data", batch_axis=1))
    out["per_step_batches_diff"] = maxdiff(ref_b, sh_b)
    out["per_step_batches_spec"] = spec(jbl.shard_batch(
        batches, mesh, "data", batch_axis=1)["b"])

    # A sweep with its grid sharded over the 8 devices (12 points: padded).
    grid = jbl.product_grid(gamma=[2.0, 10.0, 50.0], lr=[0.01, 0.03, 0.05,
                                                         0.1])
    ref_s = jbl.sweep(make_tx, p0, grid, num_steps=40, batch=batch,
                      diagnostics=True)
    grid_mesh = Mesh(np.array(jax.devices()), ("grid",))
    sh_s = jbl.sweep(make_tx, p0, grid, num_steps=40, batch=batch,
                     mesh=grid_mesh, diagnostics=True)
    out["sweep_points"] = int(sh_s[0].x.shape[0])
    out["sweep_diff"] = maxdiff(ref_s, sh_s)
    grid8 = {k: v[:8] for k, v in grid.items()}
    sh8 = jbl.sweep(make_tx, p0, grid8, num_steps=40, batch=batch,
                    mesh=grid_mesh, diagnostics=True)
    out["sweep8_diff"] = maxdiff(jax.tree.map(lambda v: v[:8], ref_s), sh8)
    out["sweep8_spec"] = spec(sh8[0].x)
    out["sweep8_devices"] = len(sh8[0].x.sharding.device_set)
    out["sweep8_history_spec"] = spec(sh8[2]["f"])

    # 2-D mesh: grid points over "grid", each run data-parallel over "data".
    mesh_gd = Mesh(np.array(jax.devices()).reshape(4, 2), ("grid", "data"))
    sh_gd = jbl.sweep(make_tx, p0, grid8, num_steps=40,
                      batch=jbl.shard_batch(batch, mesh_gd, "data"),
                      mesh=mesh_gd, axis="grid", diagnostics=True)
    out["sweep_grid_data_diff"] = maxdiff(
        jax.tree.map(lambda v: v[:8], ref_s), sh_gd)
    out["sweep_grid_data_spec"] = spec(sh_gd[0].x)

    # Checkpoints of sharded runs: restore sharded, or onto one device.
    d = tempfile.mkdtemp()
    checkpoint.save(d, sh[0], sh[1], step=60, history=sh[2])
    template = jbl.BilevelParams(
        x=jbl.replicate(p0.x, mesh2),
        y=jax.device_put(p0.y, NamedSharding(mesh2, P("model"))))
    state_t = jax.jit(tx.init)(template)
    r = checkpoint.restore(d, template, state_t)
    out["ckpt_sharded_diff"] = maxdiff((r.params, r.state), (sh[0], sh[1]))
    out["ckpt_sharded_y_spec"] = spec(r.params.y)
    r1 = checkpoint.restore(d, p0, tx.init(p0))
    out["ckpt_single_diff"] = maxdiff((r1.params, r1.state), (sh[0], sh[1]))
    out["ckpt_single_devices"] = len(r1.params.y.sharding.device_set)

    try:
      jbl.shard_batch({"a": np.ones((10, 3))}, mesh)
    except jbl.BilevelValidationError as err:
      out["indivisible_error"] = str(err)
    print("RESULT" + json.dumps(out))
''')


@pytest.fixture(scope="module", name="results")
def results_fixture():
  return _result_json(_run_python(_SCRIPT, host_devices=8, timeout=300))


def test_eight_host_devices(results):
  assert results["device_count"] == 8


def test_data_parallel_run_equals_single_device_run(results):
  # float64: equal up to the order of the batch sums.
  assert results["dp_float64_diff"] < 1e-12 * max(1.0,
                                                  results["dp_float64_scale"])
  assert results["dp_float32_diff"] < 2e-5 * max(1.0,
                                                 results["dp_float32_scale"])
  assert results["dp_float32_dtype"] == "float32"
  assert results["dp_float64_batch_devices"] == 8
  assert results["dp_float64_param_replicated"]


def test_sharded_parameters_and_per_step_batches(results):
  assert results["model_sharded_diff"] < 1e-12
  assert results["model_sharded_y_devices"] == 8
  assert results["per_step_batches_diff"] < 1e-12
  assert results["per_step_batches_spec"] == [None, "data"]


def test_sweep_sharded_across_devices_equals_unsharded(results):
  assert results["sweep_points"] == 12  # the padding is dropped
  assert results["sweep_diff"] < 1e-12
  assert results["sweep8_diff"] < 1e-12
  assert results["sweep8_spec"] == ["grid"]
  assert results["sweep8_devices"] == 8
  assert results["sweep8_history_spec"][0] == "grid"
  assert results["sweep_grid_data_diff"] < 1e-12
  assert results["sweep_grid_data_spec"][0] == "grid"


def test_checkpoint_of_sharded_run(results):
  assert results["ckpt_sharded_diff"] == 0.0
  assert results["ckpt_sharded_y_spec"] == ["model"]
  assert results["ckpt_single_diff"] == 0.0
  assert results["ckpt_single_devices"] == 1


def test_indivisible_batch_error(results):
  assert "10 examples along dimension 0, not divisible by the 8 devices" in (
      results["indivisible_error"])


def _one_device_mesh(name="data"):
  return jax.sharding.Mesh(np.array(jax.devices()[:1]), (name,))


@pytest.mark.parametrize("call,message", [
    (lambda: jbl.shard_batch({"a": np.ones(4)}, "mesh"),
     "mesh must be a jax.sharding.Mesh"),
    (lambda: jbl.shard_batch({"a": np.ones(4)}, _one_device_mesh(), "model"),
     r"'model' is not an axis of the mesh; its axes are \('data',\)"),
    (lambda: jbl.shard_batch({"a": np.ones(4)}, _one_device_mesh(),
                             batch_axis=1),
     r"batch\['a'\] has shape \(4,\), which has no dimension 1"),
    (lambda: jbl.shard_batch({}, _one_device_mesh()), "no array leaves"),
    (lambda: jbl.replicate(np.ones(2), None), "mesh must be a"),
])
def test_sharding_helper_validation(call, message):
  with pytest.raises(jbl.BilevelValidationError, match=message):
    call()


def test_process_local_equals_global_on_one_process():
  mesh = _one_device_mesh()
  data = {"a": np.arange(12.0).reshape(4, 3)}
  local = jbl.shard_batch(data, mesh, process_local=True)
  np.testing.assert_array_equal(local["a"], data["a"])
  assert local["a"].sharding.spec == jax.sharding.PartitionSpec("data")


_DOCS_SCRIPT = textwrap.dedent(r'''
    import re, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    text = open(sys.argv[1]).read()
    namespace = {}
    ran = 0
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", text, re.S)):
      if block.startswith("# (not run"):
        continue
      exec(compile(block, f"docs/scaling.md, python block {i}", "exec"),
           namespace)
      ran += 1
    print(f"RAN {ran} {jax.device_count()}")
''')


@pytest.mark.slow
def test_docs_scaling_examples_run_on_eight_devices():
  """Every python block of docs/scaling.md runs (about 30 s: marked slow)."""
  doc = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                     "docs", "scaling.md")
  with open(doc) as fh:
    blocks = re.findall(r"```python\n(.*?)```", fh.read(), re.S)
  expected = sum(not b.startswith("# (not run") for b in blocks)
  assert expected >= 9
  stdout = _run_python(_DOCS_SCRIPT, doc, host_devices=8, timeout=600)
  assert f"RAN {expected} 8" in stdout
