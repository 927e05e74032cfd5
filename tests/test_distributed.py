"""Multi-process (multi-host) data-parallel PBGD-Free on localhost.

Two processes join one ``jax.distributed`` job on CPU (gloo collectives),
each with one device and half of every batch; a global mesh spans both. Both
processes must end with the same parameters, equal to a run on one device
with the whole batches (computed by process 0 on its own device). Multi-host is JAX's own; this checks that the bilevel
problem, the methods and :func:`jaxbilevel.shard_batch`
(``process_local=True``) compose with it.
"""

import inspect
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from _helpers import result_json as _result_json
from _helpers import subprocess_env as _subprocess_env
from _helpers import tiny_preference_pairs as _tiny_preference_pairs

pytest.importorskip("flax")

# The pairs' helper travels as source (see _helpers.py).
_SCRIPT = inspect.getsource(_tiny_preference_pairs) + textwrap.dedent(r'''
    import json, sys
    mode, process_id, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    import jax
    if mode == "dist":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                                 num_processes=2, process_id=process_id)
    import numpy as np, optax
    from flax import nnx
    from jax.sharding import Mesh
    import jaxbilevel as jbl
    from jaxbilevel import llm

    config = llm.LMConfig(vocab_size=48, hidden_size=16, intermediate_size=32,
                          num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1)
    pairs = tiny_preference_pairs(48, n=24, t=12)
    problem = llm.dpo_sft_problem(
        llm.CausalLM(config, rngs=nnx.Rngs(0)), None, pairs, num_steps=4,
        dpo_batch_size=4, sft_batch_size=4, eval_size=2, lora_rank=2)
    tx = jbl.pbgd_free(problem.f, problem.g, gamma=10.0, inner_steps=2,
                       upper_optimizer=optax.adam(3e-2),
                       lower_optimizer=optax.adam(1e-2))
    batches = jax.tree.map(np.asarray, problem.batches)
    params = problem.params0
    run = jax.jit(lambda p, b: jbl.scan_run(tx, p, num_steps=4, batches=b,
                                            diagnostics=True)[::2])
    host = lambda a: np.asarray(a.addressable_data(0)).ravel().tolist()
    out = {}
    if process_id == 0:  # The reference: one process, one device, all data.
      ref_params, ref_history = run(params, batches)
      out["ref_leaves"] = [host(a) for a in jax.tree.leaves(ref_params)]
      out["ref_f"] = host(ref_history["f"])
    if mode == "dist":
      mesh = Mesh(np.array(jax.devices()), ("data",))
      half = 2  # this process's share of every batch of 4
      local = jax.tree.map(
          lambda b: b[:, process_id * half:(process_id + 1) * half], batches)
      batches = jbl.shard_batch(local, mesh, "data", batch_axis=1,
                                process_local=True)
      params = jbl.replicate(jax.tree.map(np.asarray, params), mesh)
    params, history = run(params, batches)
    out.update(leaves=[host(a) for a in jax.tree.leaves(params)],
               f=host(history["f"]), devices=jax.device_count(),
               processes=jax.process_count())
    if mode == "dist":
      out["batch_global_shape"] = list(batches["dpo"]["chosen_ids"].shape)
      out["batch_local_rows"] = int(batches["dpo"]["chosen_ids"]
                                    .addressable_data(0).shape[1])
    print("RESULT " + json.dumps(out))
    if mode == "dist":
      jax.distributed.shutdown()
''')


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _result(proc, timeout):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return _result_json(out)


@pytest.mark.slow  # 2 processes: ~30 s of CPU, 60-70 s wall on 2 busy cores.
def test_two_process_data_parallel_run_equals_single_process(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(_SCRIPT)
  env = _subprocess_env()  # one device per process: no XLA_FLAGS
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, str(script), mode, str(i), port],
                            env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for mode, i in (("dist", 0), ("dist", 1))]
  try:
    p0, p1 = [_result(p, 120) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert p0["devices"] == p1["devices"] == 2
  assert p0["processes"] == p1["processes"] == 2
  assert p0["batch_global_shape"] == [4, 4, 12]
  assert p0["batch_local_rows"] == 2
  flat = lambda r, k="leaves": np.concatenate([np.asarray(l) for l in r[k]])
  # Both processes hold the same replicated parameters...
  assert np.array_equal(flat(p0), flat(p1))
  # ...equal to the single-process run on the whole batches (float32 sums
  # in another order), and training moved them.
  err = np.max(np.abs(flat(p0) - flat(p0, "ref_leaves")))
  assert err < 1e-5, err
  assert np.allclose(p0["f"], p0["ref_f"], atol=1e-5)
  assert abs(p0["ref_f"][0] - np.log(2.0)) < 1e-6
  assert np.max(np.abs(np.diff(p0["ref_f"]))) > 1e-4
