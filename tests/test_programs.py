"""Compiled programs shared between runs (jaxbilevel._src.programs).

A newly built transformation of the same method, objectives and optimizers
reuses the compiled program (its float hyperparameters are arguments); the
cache is bounded and releases finished runs' transformations.
"""

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _helpers import dpo_free as _free
from _helpers import dpo_toy as _dpo
from _helpers import quadratic_free as _quadratic_free
from _helpers import separable_quadratic as _quadratic
import jaxbilevel as jbl
from jaxbilevel._src import programs


def _compiled_programs():
  # pylint: disable-next=protected-access
  return [fn._cache_size() for fn in programs.PROGRAMS._entries.values()]


def test_run_does_not_recompile_across_calls():
  prob = _dpo()
  tx = _free(prob)
  # One chunk (which starts the state itself), then three chunks (the state
  # is started apart and passed in): each compiles once, whatever the values.
  for num_steps in (10, 30):
    jbl.run(tx, prob.params0, num_steps=num_steps, chunk_size=10)
    before = _compiled_programs()
    jbl.run(tx, jbl.BilevelParams(jnp.asarray(1.0), jnp.asarray(2.0)),
            num_steps=num_steps, chunk_size=10)
    assert _compiled_programs() == before


def test_new_transformations_with_other_hyperparameters_reuse_the_program():
  # A Python loop that rebuilds the method for each gamma compiles once, and
  # the runs agree with runs whose gamma was compiled in.
  prob = _dpo()
  programs.PROGRAMS.clear()
  finals = []
  sgd = optax.sgd(1e-2)  # optimizers compare by identity
  for gamma in (4.0, 16.0, 64.0):
    tx = jbl.pbgd_free(prob.f, prob.g, gamma=gamma, upper_optimizer=sgd,
                       lower_optimizer=sgd)
    params, _, hist = jbl.run(tx, prob.params0, num_steps=20,
                              diagnostics=True)
    finals.append(params)
    assert float(hist["gamma"][-1]) == gamma
    assert _compiled_programs() == [1]
  for gamma, params in zip((4.0, 16.0, 64.0), finals):
    tx = jbl.pbgd_free(prob.f, prob.g, gamma=gamma,
                       upper_optimizer=optax.sgd(1e-2),
                       lower_optimizer=optax.sgd(1e-2))
    expected, _, _ = jbl.scan_run(tx, prob.params0, num_steps=20)
    np.testing.assert_allclose(params.x, expected.x, rtol=1e-6)
    np.testing.assert_allclose(params.y, expected.y, rtol=1e-6)


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_program_cache_is_bounded():
  from jaxbilevel._src import programs  # pylint: disable=import-outside-toplevel
  prob = _dpo()
  for i in range(programs.MAX_PROGRAMS + 3):
    # A new objective each time: a different program.
    f = (lambda k: lambda x, y, batch: prob.f(x, y, batch) + 0.0 * k)(i)
    tx = jbl.pbgd_free(f, prob.g, gamma=4.0, upper_optimizer=optax.sgd(1e-2),
                       lower_optimizer=optax.sgd(1e-2))
    jbl.run(tx, prob.params0, num_steps=2)
  assert len(programs.PROGRAMS) == programs.MAX_PROGRAMS


_SGD = jbl.as_value(optax.sgd)


def _valued_free(f, g, gamma=10.0, lr=0.1):
  # PBGD-Free whose optimizers are values: lr is a leaf like gamma.
  return jbl.pbgd_free(f, g, gamma=gamma, upper_optimizer=_SGD(lr),
                       lower_optimizer=_SGD(0.1))


def test_finished_runs_release_their_transformations():
  # 30 runs, each with a newly built identical method (new optimizers
  # included): one program, and the transformations are released.
  f, g, p0 = _quadratic(2)
  programs.PROGRAMS.clear()
  refs = []
  for _ in range(30):
    tx = _valued_free(f, g)
    jbl.run(tx, p0, num_steps=3)
    refs.append(weakref.ref(tx.update))
    del tx
  gc.collect()
  assert len(programs.PROGRAMS) == 1
  assert _compiled_programs() == [1]
  assert sum(r() is not None for r in refs) == 0


def test_methods_are_pytrees_of_their_hyperparameters():
  f, g, _ = _quadratic(1)
  structure = lambda tx: jax.tree.structure(tx)
  sgd = optax.sgd(0.1)
  tx = jbl.pbgd_free(f, g, gamma=3.0, upper_optimizer=sgd,
                     lower_optimizer=sgd)
  leaves = jax.tree_util.tree_leaves_with_path(tx)
  assert [(jax.tree_util.keystr(p), v) for p, v in leaves] == [(".gamma", 3.0)]
  # gamma is a leaf; objectives and optimizers are compared by identity.
  assert structure(_quadratic_free(f, g, gamma=1.0)) != structure(
      _quadratic_free(f, g, gamma=7.0))   # new optax.sgd objects
  assert structure(tx) == structure(jbl.pbgd_free(
      f, g, gamma=7.0, upper_optimizer=sgd, lower_optimizer=sgd))
  assert structure(tx) != structure(jbl.pbgd_free(
      lambda x, y, b: f(x, y, b), g, gamma=7.0, upper_optimizer=sgd,
      lower_optimizer=sgd))
  # Optimizers built with jbl.as_value are values too: lr is a leaf.
  assert structure(_valued_free(f, g, lr=0.1)) == structure(
      _valued_free(f, g, gamma=2.0, lr=jnp.asarray(0.2)))
  leaves = jax.tree_util.tree_leaves_with_path(
      _valued_free(f, g, gamma=2.0, lr=0.3))
  assert {jax.tree_util.keystr(p): v for p, v in leaves} == {
      ".gamma": 2.0, ".upper_optimizer[0]": 0.3,
      ".lower_optimizer[0]": 0.1}
  assert structure(jbl.pbgd_free(f, g, gamma=7.0, upper_optimizer=sgd,
                                 lower_optimizer=sgd, inner_steps=2)) != (
                                     structure(tx))


def test_jit_and_vmap_over_methods_come_from_jax():
  # A method is an argument of a jitted function: one compilation for every
  # gamma and lr, and vmap over a stack of methods equals separate runs.
  f, g, p0 = _quadratic(2)
  traced = []

  @jax.jit
  def final_x(tx):
    traced.append(1)
    return jbl.scan_run(tx, p0, num_steps=30)[0].x

  txs = [_valued_free(f, g, gamma=gm, lr=lr)
         for gm, lr in ((2.0, 0.1), (8.0, 0.05), (32.0, 0.02))]
  separate = [final_x(tx) for tx in txs]
  assert len(traced) == 1
  stacked = jax.tree.map(lambda *v: jnp.stack(v), *txs)
  mapped = jax.vmap(final_x)(stacked)
  for i, x in enumerate(separate):
    jax.tree.map(lambda m, s, i=i: np.testing.assert_allclose(
        m[i], s, rtol=1e-6), mapped, x)
  first, second = (jax.tree.leaves(x) for x in separate[:2])
  assert not np.allclose(first[0], second[0])


def test_an_array_learning_rate_does_not_recompile():
  # A Python loop over learning rates given as arrays, each with a newly
  # built method and optimizer: one compiled program.
  prob = _dpo()
  programs.PROGRAMS.clear()
  for lr in (1e-2, 2e-2, 5e-2):
    tx = jbl.pbgd_free(prob.f, prob.g, gamma=4.0,
                       upper_optimizer=_SGD(jnp.asarray(lr)),
                       lower_optimizer=_SGD(1e-2))
    jbl.run(tx, prob.params0, num_steps=5)
  assert _compiled_programs() == [1]


def test_scaling_doc_methods_as_values_block_runs():
  """docs/scaling.md: the block of "Methods are values" (jit once, vmap)."""
  import os  # pylint: disable=import-outside-toplevel
  import re  # pylint: disable=import-outside-toplevel
  doc = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                     "docs", "scaling.md")
  blocks = re.findall(r"```python\n(.*?)```", open(doc).read(), re.S)
  block = [b for b in blocks if "jbl.as_value(optax.adam)" in b][0]
  namespace = {}
  exec(compile(blocks[0], "docs/scaling.md block 0", "exec"), namespace)  # pylint: disable=exec-used
  exec(compile(block, "docs/scaling.md methods as values", "exec"), namespace)  # pylint: disable=exec-used
  # The three settings share one compiled program.
  assert namespace["final_x"]._cache_size() == 1  # pylint: disable=protected-access
  xs = namespace["xs"]
  assert len({round(float(x), 4) for x in xs}) == 3   # the settings differ


def test_tree_map_over_a_method_rebuilds_it_with_the_new_values():
  f, g, p0 = _quadratic(2)
  sgd = optax.sgd(0.1)
  tx = jbl.pbgd_free(f, g, gamma=2.0, upper_optimizer=sgd,
                     lower_optimizer=sgd)
  doubled = jax.tree.map(lambda v: 4.0 * v, tx)
  assert doubled.arguments.kwargs["gamma"] == 8.0
  assert jax.tree.structure(doubled) == jax.tree.structure(tx)
  expected = jbl.pbgd_free(f, g, gamma=8.0, upper_optimizer=sgd,
                           lower_optimizer=sgd)
  got, _, _ = jbl.scan_run(doubled, p0, num_steps=10)
  want, _, _ = jbl.scan_run(expected, p0, num_steps=10)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  # A placeholder leaf (as JAX's own tree utilities use) is not checked
  # until the method is used.
  placeholder = jax.tree.unflatten(jax.tree.structure(tx), [object()])
  assert isinstance(placeholder, jbl.BilevelTransformation)
  with pytest.raises(jbl.BilevelValidationError, match="gamma"):
    placeholder.init(p0)


def test_a_typed_prng_key_argument_is_a_leaf_and_runs():
  # A typed key (jax.random.key) is an array leaf NumPy cannot convert.
  f, g, p0 = _quadratic(2)
  sgd = optax.sgd(0.05)
  txs = [jbl.ufo_blo(f, g, upper_optimizer=sgd, lower_optimizer=sgd,
                     key=jax.random.key(seed), inner_steps=2,
                     inner_start="previous")
         for seed in (0, 1)]
  assert jax.tree.structure(txs[0]) == jax.tree.structure(txs[1])
  programs.PROGRAMS.clear()
  finals = [jbl.run(tx, p0, num_steps=20)[0] for tx in txs]
  assert _compiled_programs() == [1]
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(finals))


def test_as_value_of_the_same_factory_is_the_same_wrapper():
  # The wrapper is the static part of its optimizers: built twice, the
  # structures match, so a loop that calls jbl.as_value each time does not
  # recompile.
  assert jbl.as_value(optax.adam) is jbl.as_value(optax.adam)
  assert jax.tree.structure(jbl.as_value(optax.adam)(0.1)) == (
      jax.tree.structure(jbl.as_value(optax.adam)(0.3)))
