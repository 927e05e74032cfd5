"""Compiled programs shared between runs (jaxbilevel._src.programs).

A newly built transformation of the same method, objectives and optimizers
reuses the compiled program (its float hyperparameters are arguments); the
cache is bounded and releases finished runs' transformations.
"""

import gc
import weakref

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
  for gamma in (4.0, 16.0, 64.0):
    tx = jbl.pbgd_free(prob.f, prob.g, gamma=gamma,
                       upper_optimizer=optax.sgd(1e-2),
                       lower_optimizer=optax.sgd(1e-2))
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


def test_finished_runs_release_their_transformations():
  # 30 runs, each with a newly built identical method: one program, and the
  # transformations (with everything they close over) are released.
  f, g, p0 = _quadratic(2)
  programs.PROGRAMS.clear()
  refs = []
  for _ in range(30):
    tx = _quadratic_free(f, g)
    jbl.run(tx, p0, num_steps=3)
    refs.append(weakref.ref(tx.update))
    del tx
  gc.collect()
  assert len(programs.PROGRAMS) == 1
  assert sum(r() is not None for r in refs) == 0


def test_program_keys_compare_optimizers_by_content():
  f, g, _ = _quadratic(1)
  key = lambda tx: programs.program_of(tx).key
  assert key(_quadratic_free(f, g, gamma=1.0)) == key(_quadratic_free(f, g, gamma=7.0))
  assert key(_quadratic_free(f, g, lr=0.1)) != key(_quadratic_free(f, g, lr=0.2))
  assert key(_quadratic_free(f, g)) != key(_quadratic_free(lambda x, y, b: f(x, y, b), g))
