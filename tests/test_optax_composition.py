"""Bilevel methods inside optax combinators, on every method.

* ``jbl.inject_hyperparams`` (and ``optax.inject_hyperparams`` with the
  documented ``static_args``): a float hyperparameter changed in
  ``state.hyperparams`` gives the step of the method built with that value,
  with one compilation.
* ``jbl.apply_if_finite``: a non-finite bilevel step is skipped (zero updates,
  previous state), the next finite step is the plain method's step.
* ``optax.apply_if_finite`` and ``optax.MultiSteps`` are refused with a message
  naming what to use; non-None ``updates`` are rejected.
* ``jbl.objectives.accumulate``: k micro-batches give the full-batch values,
  gradients, Hessian-vector products and bilevel steps.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbilevel as jbl
from jaxbilevel import objectives

N, D = 8, 3  # examples per batch, features


def _data(dtype=jnp.float64):
  a = jnp.asarray(np.random.default_rng(0).normal(size=(N, D)), dtype)
  b = jnp.asarray(np.linspace(-1.0, 1.0, N), dtype)
  return {"a": a, "b": b}


def g(x, y, batch):
  """Ridge regression with regularisation exp(x): a mean over examples."""
  r = batch["a"] @ y - batch["b"]
  return 0.5 * jnp.mean(r ** 2) + 0.5 * jnp.exp(x) * jnp.sum(y ** 2)


def f(x, y, batch):
  """Validation loss on shifted targets (a mean over examples), plus x^2."""
  r = batch["a"] @ y - 0.5 * batch["b"] - 0.1
  return jnp.mean(r ** 2) + 0.01 * x ** 2


def c(x, y, batch=None):
  """One coupled constraint sum(y) - 1 - 0.1 x <= 0."""
  del batch
  return jnp.stack([jnp.sum(y) - 1.0 - 0.1 * x])


PARAMS = jbl.BilevelParams(x=jnp.asarray(0.2, jnp.float64),
                           y=jnp.asarray([0.1, -0.2, 0.3], jnp.float64))
UO, LO = optax.sgd(0.05), optax.sgd(0.1)

# name -> (method, fixed keyword arguments, {float hyperparameter: (v1, v2)}).
CASES = {
    "pbgd_free": (jbl.pbgd_free, dict(inner_steps=2), {"gamma": (4.0, 9.0)}),
    "alt_pbgd": (jbl.alt_pbgd, dict(inner_steps=2, value_steps=3),
                 {"gamma": (4.0, 9.0)}),
    "v_pbgd": (jbl.v_pbgd, dict(value_steps=2), {"gamma": (4.0, 9.0)}),
    "pbgd_blocc": (jbl.pbgd_blocc, dict(c=c, dual_step_size=0.1,
                                        dual_steps=3, primal_steps=2),
                   {"gamma": (4.0, 9.0)}),
    "pbgd_free_cc": (jbl.pbgd_free_cc, dict(c=c, dual_step_size=0.1,
                                            dual_steps=3, primal_steps=2),
                     {"gamma": (4.0, 9.0)}),
    "bome": (jbl.bome, dict(value_steps=3), {"eta": (0.5, 2.0)}),
    # lambda0 only sets the multiplier in init; the increment acts each step.
    "f2sa": (jbl.f2sa, dict(inner_steps=2, lambda0=4.0),
             {"lambda_increment": (0.5, 2.0)}),
    "alright": (jbl.alright, dict(key=jax.random.PRNGKey(1)),
                {"probability": (0.3, 0.8)}),
    "fo_blo": (jbl.fo_blo, dict(inner_steps=3, inner_start="previous"), {}),
    "ufo_blo": (jbl.ufo_blo, dict(inner_steps=3, key=jax.random.PRNGKey(0),
                                  inner_start="previous"),
                {"correction_probability": (0.3, 0.8)}),
    "aid": (jbl.aid, dict(inner_steps=3, solver="neumann", linear_steps=4),
            {"neumann_step": (0.2, 0.6)}),
    "itd": (jbl.itd, dict(inner_steps=4), {}),
}
NAMES = sorted(CASES)


def _kwargs(name, **hyper):
  method, fixed, hypers = CASES[name]
  values = {k: v[0] for k, v in hypers.items()}
  values.update(hyper)
  return method, dict(f=f, g=g, upper_optimizer=UO, lower_optimizer=LO,
                      **fixed, **values)


def _plain(name, **hyper):
  method, kw = _kwargs(name, **hyper)
  return method(**kw)


def _steps(tx, n, batch, state=None, step=None):
  """``n`` steps from PARAMS; returns (params, state)."""
  step = step or jax.jit(lambda s, p, b: tx.update(None, s, p, batch=b))
  params = PARAMS
  state = tx.init(params) if state is None else state
  for _ in range(n):
    updates, state = step(state, params, batch)
    params = optax.apply_updates(params, updates)
  return params, state


def _close(a, b, rtol=1e-10, atol=1e-12):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol,
                               atol=atol)


def _distance(a, b):
  return float(optax.tree_utils.tree_norm(optax.tree_utils.tree_sub(a, b)))


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


# ---------------------------------------------------------------------------
# Gradient accumulation inside one bilevel step
# ---------------------------------------------------------------------------


def _values_and_derivatives(h, x, y, batch):
  """h, both gradients, an HVP in y and the mixed derivative d/dx grad_y h."""
  v = jnp.asarray([0.3, -1.0, 0.5])
  grad_y = lambda x_, y_: jax.grad(h, 1)(x_, y_, batch)
  return {"value": h(x, y, batch),
          "grad_x": jax.grad(h, 0)(x, y, batch),
          "grad_y": grad_y(x, y),
          "hvp": jax.jvp(lambda y_: grad_y(x, y_), (y,), (v,))[1],
          "mixed": jax.jacfwd(grad_y, 0)(x, y)}


@pytest.mark.parametrize("k", [1, 4])
def test_accumulate_matches_full_batch_values_and_derivatives(k):
  batch = _data()

  @jax.jit
  def both(x, y, batch):
    return [(_values_and_derivatives(fn, x, y, batch),
             _values_and_derivatives(objectives.accumulate(fn, k), x, y,
                                     batch)) for fn in (f, g)]

  (f_full, f_acc), (g_full, g_acc) = both(*PARAMS, batch)
  _close(f_acc, f_full, rtol=1e-12, atol=1e-14)
  _close(g_acc, g_full, rtol=1e-12, atol=1e-14)
  assert float(jnp.abs(g_full["mixed"]).max()) > 1e-3  # g couples x and y


def test_accumulate_scans_over_checkpointed_micro_batches():
  acc = objectives.accumulate(g, num_microbatches=4)
  text = str(jax.make_jaxpr(jax.grad(acc, 1))(*PARAMS, _data()))
  assert "scan" in text and "length=4" in text
  assert "checkpoint" in text or "remat" in text


@pytest.mark.parametrize("name", ["pbgd_free", "alt_pbgd", "bome", "aid"])
def test_one_accumulated_bilevel_step_equals_the_full_batch_step(name):
  method, kw = _kwargs(name)
  kw.update(f=objectives.accumulate(f, 4), g=objectives.accumulate(g, 4))
  accumulated = _steps(method(**kw), 1, _data())
  full = _steps(_plain(name), 1, _data())
  _close(accumulated, full, rtol=1e-10, atol=1e-12)
  assert _distance(accumulated[0], PARAMS) > 1e-4


@pytest.mark.parametrize("k, batch, match", [
    (3, _data(), r"num_microbatches=3 does not divide the leading dimension "
                 r"8 of batch\['a'\] \(shape \(8, 3\)\)"),
    (0, _data(), r"num_microbatches must be >= 1, got 0"),
    (2.0, _data(), r"num_microbatches must be a Python int"),
    (2, {**_data(), "w": jnp.asarray(1.0)},
     r"batch\['w'\] is a scalar; every leaf of the batch needs a leading"),
    (2, None, r"batch has no array leaves"),
])
def test_accumulate_bad_input(k, batch, match):
  with pytest.raises(jbl.BilevelValidationError, match=match):
    objectives.accumulate(g, num_microbatches=k)(*PARAMS, batch)
