"""Bilevel methods inside optax combinators, on every method.

jaxbilevel._src.combinators and the optax wrappers it replaces:

* ``jbl.inject_hyperparams`` (and ``optax.inject_hyperparams`` with the
  documented ``static_args``): a float hyperparameter changed in
  ``state.hyperparams`` gives the step of the method built with that value,
  with one compilation.
* ``jbl.apply_if_finite``: a non-finite bilevel step is skipped (zero updates,
  previous state), the next finite step is the plain method's step.
* ``optax.apply_if_finite`` and ``optax.MultiSteps`` are refused with a message
  naming what to use; non-None ``updates`` are rejected.

The problem and the table of every method (``CASES``) are in _helpers.py,
shared with the gradient accumulation tests of test_objectives.py.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _helpers import assert_trees_close as _close
from _helpers import CASES
from _helpers import case_kwargs as _kwargs
from _helpers import LO
from _helpers import N
from _helpers import NAMES
from _helpers import plain as _plain
from _helpers import ridge_data as _data
from _helpers import ridge_f as f
from _helpers import ridge_g as g
from _helpers import RIDGE_PARAMS as PARAMS
from _helpers import steps_from_params as _steps
from _helpers import tree_distance as _distance
from _helpers import UO
import jaxbilevel as jbl


# ---------------------------------------------------------------------------
# inject_hyperparams
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_changes_value_without_recompiling(name):
  method, kw = _kwargs(name)
  hypers = CASES[name][2]
  tx = jbl.inject_hyperparams(method)(**kw)
  batch = _data()
  step = jax.jit(lambda s, p, b: tx.update(None, s, p, batch=b))
  state0 = tx.init(PARAMS)
  # Exactly the float arguments are injected (defaults included).
  bound = inspect.signature(method).bind(**kw)
  bound.apply_defaults()
  floats = {k for k, v in bound.arguments.items() if isinstance(v, float)}
  assert set(hypers) <= set(state0.hyperparams) == floats
  n = 2 if name == "f2sa" else 1  # f2sa's increment acts after a step
  p1, _ = _steps(tx, n, batch, state0, step)

  # The reference: the method built with the value, compiled once with the
  # value traced (every method accepts traced hyperparameters).
  @jax.jit
  def plain(values):
    return _steps(_plain(name, **values), n, batch)[0]

  _close(p1, plain({k: v[0] for k, v in hypers.items()}))
  for hname, (_, v2) in hypers.items():
    state = state0._replace(hyperparams={
        **state0.hyperparams,
        hname: jnp.asarray(v2, state0.hyperparams[hname].dtype)})
    p2, _ = _steps(tx, n, batch, state, step)
    _close(p2, plain({**{k: v[0] for k, v in hypers.items()}, hname: v2}))
    assert _distance(p1, p2) > 1e-6  # the value changed the step
  assert step._cache_size() == 1  # pylint: disable=protected-access


def test_optax_inject_hyperparams_with_documented_static_args():
  tx = optax.inject_hyperparams(
      jbl.alt_pbgd, static_args=("f", "g", "inner_steps", "value_steps"))(
          f, g, gamma=4.0, upper_optimizer=UO, lower_optimizer=LO,
          inner_steps=2, value_steps=3)
  batch = _data()
  state = tx.init(PARAMS)
  assert sorted(state.hyperparams) == ["gamma"]
  state = state._replace(hyperparams={"gamma": jnp.asarray(9.0)})
  _close(_steps(tx, 1, batch, state)[0],
         _steps(_plain("alt_pbgd", gamma=9.0), 1, batch)[0])


def test_optax_inject_hyperparams_needs_static_loop_lengths():
  with pytest.raises(jbl.BilevelValidationError,
                     match="inner_steps must be a Python int"):
    optax.inject_hyperparams(jbl.alt_pbgd, static_args=("f", "g"))(
        f, g, gamma=4.0, upper_optimizer=UO, lower_optimizer=LO,
        inner_steps=2, value_steps=3).init(PARAMS)


@pytest.mark.parametrize("static", [(), ("f",), ("inner_steps",)])
def test_optax_inject_hyperparams_with_traced_objectives_is_refused(static):
  # Without f and g in static_args optax would call them as schedules
  # f(step); the refusal names the replacements when the method is built.
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"alt_pbgd cannot be wrapped in "
                           r"optax.inject_hyperparams: .* Use "
                           r"jaxbilevel.inject_hyperparams\(method\)"):
    optax.inject_hyperparams(jbl.alt_pbgd, static_args=static)(
        f, g, gamma=4.0, upper_optimizer=UO, lower_optimizer=LO)


# ---------------------------------------------------------------------------
# apply_if_finite
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_apply_if_finite_skips_a_non_finite_bilevel_step(name):
  tx = jbl.apply_if_finite(_plain(name), max_consecutive_errors=2)
  step = jax.jit(lambda s, p, b: tx.update(None, s, p, batch=b))
  good = _data()
  bad = {**good, "b": good["b"].at[0].set(jnp.nan)}
  state0 = tx.init(PARAMS)
  updates, state1 = step(state0, PARAMS, bad)
  assert all(float(jnp.max(jnp.abs(u))) == 0.0
             for u in jax.tree.leaves(updates))
  _close(state1.inner_state, state0.inner_state, rtol=0, atol=0)
  assert (int(state1.notfinite_count), bool(state1.last_finite),
          int(state1.total_notfinite)) == (1, False, 1)
  # The next finite step is the first step from the initial state.
  updates2, state2 = step(state1, PARAMS, good)
  _close(updates2, step(state0, PARAMS, good)[0], rtol=0, atol=0)
  assert _distance(updates2, jax.tree.map(jnp.zeros_like, updates2)) > 1e-4
  assert (int(state2.notfinite_count), bool(state2.last_finite),
          int(state2.total_notfinite)) == (0, True, 1)
  assert int(state2.inner_state.count) == 1


@pytest.mark.parametrize("name", ["alt_pbgd", "aid"])
def test_apply_if_finite_passes_finite_steps_through(name):
  tx = jbl.apply_if_finite(_plain(name), max_consecutive_errors=2)
  _close(_steps(tx, 2, _data())[0], _steps(_plain(name), 2, _data())[0])


def test_apply_if_finite_gives_up_after_max_consecutive_errors():
  tx = jbl.apply_if_finite(_plain("alt_pbgd"), max_consecutive_errors=1)
  bad = {**_data(), "b": jnp.full((N,), jnp.inf)}
  step = jax.jit(lambda s, p, b: tx.update(None, s, p, batch=b))
  state = tx.init(PARAMS)
  counts = []
  for _ in range(3):
    updates, state = step(state, PARAMS, bad)
    counts.append((int(state.notfinite_count),
                   bool(np.isfinite(float(updates.x)))))
  # Rejected once (zero, finite updates), then accepted (non-finite).
  assert counts == [(1, True), (2, False), (3, False)]
  assert int(state.total_notfinite) == 3


def test_apply_if_finite_bad_argument():
  with pytest.raises(jbl.BilevelValidationError,
                     match="max_consecutive_errors must be >= 0"):
    jbl.apply_if_finite(_plain("pbgd_free"), -1)


# ---------------------------------------------------------------------------
# Refused optax wrappers and incoming updates
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_optax_wrappers_that_read_incoming_updates_are_refused(name):
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"optax.apply_if_finite: .*"
                     r"jaxbilevel.apply_if_finite\(tx"):
    optax.apply_if_finite(_plain(name), 3).init(PARAMS)
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"optax.MultiSteps: .*jaxbilevel.objectives."
                     r"accumulate\(f, num_microbatches\)"):
    optax.MultiSteps(_plain(name), every_k_schedule=2).init(PARAMS)


@pytest.mark.parametrize("name", NAMES)
def test_non_none_updates_are_rejected(name):
  tx = _plain(name)
  grads = jax.tree.map(jnp.zeros_like, PARAMS)
  with pytest.raises(jbl.BilevelValidationError,
                     match=f"{name}: updates must be None.*"
                     r"tx.update\(None, state, params, batch=batch\)"):
    jax.eval_shape(lambda p: tx.update(grads, tx.init(p), p, batch=_data()),
                   PARAMS)
  with pytest.raises(jbl.BilevelValidationError,
                     match=f"{name}: updates must be None .* got dict"):
    jax.eval_shape(lambda p: tx.update(dict(grads._asdict()), tx.init(p), p,
                                       batch=_data()), PARAMS)


def test_chain_of_level_optimizers_is_not_refused():
  """optax wrappers *inside* a level optimizer are the user's business."""
  method, kw = _kwargs("pbgd_free")
  kw.update(upper_optimizer=optax.apply_if_finite(UO, 3),
            lower_optimizer=optax.MultiSteps(LO, every_k_schedule=1))
  _close(_steps(method(**kw), 1, _data())[0],
         _steps(_plain("pbgd_free"), 1, _data())[0])
