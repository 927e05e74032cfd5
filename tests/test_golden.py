"""Every method reaches the iterates it reached before its core was refactored.

``tests/data/golden_iterates.json`` holds, for each method case of the
common suite (``test_common.METHOD_CASES``), the params, optimizer state and
diagnostics after 10 outer steps in float64 on the suite's nested quadratic
problem, written by ``tests/data/make_golden_iterates.py`` at commit 4416dfc
(the diagnostics ``f``, ``g`` and ``lower_grad_norm`` since rewritten by its
``--diagnostics`` mode, when they moved to the incoming point in every
method; the iterates and states are 4416dfc's).
The optax loop (``tx.update`` + ``optax.apply_updates``) must reproduce them
to 1e-12, and so must :func:`jaxbilevel.step`, which returns the new
iterates directly (the same values up to the rounding of ``new - old + old``).
"""

import functools
import json
import os

import jax
import numpy as np
import optax
import pytest

import jaxbilevel as jbl
import test_common

with open(os.path.join(os.path.dirname(__file__), "data",
                       "golden_iterates.json")) as _fh:
  GOLDEN = json.load(_fh)

OPTIMIZERS = {
    "sgd": lambda: (optax.sgd(test_common.LR), optax.sgd(test_common.LR)),
    "adam": lambda: (optax.adam(0.02), optax.sgd(test_common.LR)),
}


def _leaves(tree):
  return [np.asarray(v) for v in jax.tree.leaves(tree)]


def _run(name, optimizers, use_step):
  uo, lo = OPTIMIZERS[optimizers]()
  tx, params = test_common._build(name, uo=uo, lo=lo)  # pylint: disable=protected-access
  state = tx.init(params)
  if use_step:
    step = jax.jit(functools.partial(jbl.step, tx, diagnostics=True))
  else:
    update = jax.jit(functools.partial(tx.update, None, diagnostics=True))

    def step(params, state):
      updates, state = update(state, params)
      return optax.apply_updates(params, updates), state
  for _ in range(GOLDEN["steps"]):
    params, state = step(params, state)
  return params, state


def test_every_case_has_golden_values():
  expected = {f"{n}/{o}" for n in test_common.NAMES for o in OPTIMIZERS}
  assert set(GOLDEN["cases"]) == expected


# Both loops with SGD; the step alone with Adam (compilation dominates the
# time of these tests).
# The step variants run in .ci/run (step 1b): the default suite checks the
# optax loop, which update's derivation from step makes cover both.
@pytest.mark.parametrize("optimizers,use_step", [
    ("sgd", False),
    pytest.param("sgd", True, marks=pytest.mark.slow),
    pytest.param("adam", True, marks=pytest.mark.slow)],
                         ids=["sgd-update", "sgd-step", "adam-step"])
@pytest.mark.parametrize("name", test_common.NAMES)
def test_iterates_equal_the_golden_values(name, optimizers, use_step):
  golden = GOLDEN["cases"][f"{name}/{optimizers}"]
  params, state = _run(name, optimizers, use_step)
  got = _leaves(params)
  assert len(got) == len(golden["params"])
  for a, b in zip(got, golden["params"]):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
  got_state = _leaves(state._replace(diagnostics={}))
  assert len(got_state) == len(golden["state"])
  for a, b in zip(got_state, golden["state"]):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
  assert set(state.diagnostics) == set(golden["diagnostics"])
  for key, value in golden["diagnostics"].items():
    np.testing.assert_allclose(float(state.diagnostics[key]), value,
                               rtol=1e-12, atol=1e-13, err_msg=key)
