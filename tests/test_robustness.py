"""Robustness: non-finite data, input validation of every entry point,
property-based tests over random problems and pytrees, and a long run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from hypothesis import assume
from hypothesis import given
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import jaxbilevel as jbl
from jaxbilevel import checkpoint
from jaxbilevel import flax_utils
from jaxbilevel import objectives
from jaxbilevel import projections

# ---------------------------------------------------------------------------
# Non-finite values in the data.
# ---------------------------------------------------------------------------


def _data_problem():
  """A regression-like pair whose lower level reads per-step data."""

  def f(x, y, batch):
    return jnp.sum((x - 1.0) ** 2) + 0.1 * jnp.sum(y ** 2)

  def g(x, y, batch):
    return jnp.sum((y - batch["scale"] * x) ** 2)

  tx = jbl.alt_pbgd(f, g, gamma=10.0, upper_optimizer=optax.sgd(0.1),
                    lower_optimizer=optax.sgd(0.2), inner_steps=2)
  p0 = jbl.BilevelParams(jnp.zeros(2), jnp.zeros(2))
  scale = 1.0 + 0.1 * jnp.cos(jnp.arange(50.0))
  return tx, p0, scale


_TX, _P0, _SCALE = _data_problem()


def test_nan_in_data_stops_at_that_step_and_names_the_quantities():
  batches = {"scale": _SCALE.at[17].set(jnp.nan)}
  with pytest.warns(RuntimeWarning) as record:
    params, state, hist = jbl.run(_TX, _P0, num_steps=50, batches=batches,
                                  chunk_size=10)
  message = str(record[0].message)
  assert "non-finite g, g_gap, lower_grad_norm" in message
  assert "at step 17" in message and "last finite iterate" in message
  assert len(hist["step"]) == 18 and not hist["finite"][-1]
  ref, ref_state, _ = jbl.run(_TX, _P0, num_steps=17, batches=batches,
                              chunk_size=10)
  np.testing.assert_array_equal(params.x, ref.x)
  assert int(state.count) == int(ref_state.count) == 17
  with pytest.raises(jbl.NonFiniteError, match=r"non-finite g.* at step 17"):
    jbl.run(_TX, _P0, num_steps=50, batches=batches, chunk_size=10,
            on_nonfinite="raise")


def test_skipping_a_bad_batch_equals_leaving_it_out():
  bad = {"scale": _SCALE.at[12].set(jnp.inf)}
  with pytest.warns(RuntimeWarning,
                    match=r"skipped 1 non-finite step\(s\), the first at "
                          r"step 12"):
    params, state, hist = jbl.run(_TX, _P0, num_steps=30, batches=bad,
                                  on_nonfinite="skip", chunk_size=10)
  assert hist["finite"].sum() == 29 and not hist["finite"][12]
  # Same as 12 steps, then the remaining 17 batches after the bad one.
  p_a, s_a, _ = jbl.run(_TX, _P0, num_steps=12, batches=bad, chunk_size=10)
  rest = {"scale": bad["scale"][13:]}
  p_b, s_b, _ = jbl.run(_TX, p_a, state=s_a, num_steps=17, batches=rest,
                        chunk_size=10)
  np.testing.assert_array_equal(params.x, p_b.x)
  np.testing.assert_array_equal(params.y, p_b.y)
  assert int(state.count) == int(s_b.count) == 29


def test_ignore_mode_lets_nan_propagate():
  batches = {"scale": _SCALE.at[3].set(jnp.nan)}
  params, _, hist = jbl.run(_TX, _P0, num_steps=10, batches=batches,
                            chunk_size=10, on_nonfinite="ignore")
  assert not np.isfinite(np.asarray(params.y)).any()
  assert hist["finite"][:3].all() and not hist["finite"][3:].any()


def test_nonfinite_fixed_batch_is_reported_at_step_zero():
  with pytest.raises(jbl.NonFiniteError, match="at step 0"):
    jbl.run(_TX, _P0, num_steps=5, batch={"scale": jnp.asarray(np.inf)},
            on_nonfinite="raise")


def test_sweep_reports_traced_nonpositive_gamma():
  def make_tx(gamma):
    return jbl.pbgd_free(lambda x, y, b: jnp.sum(x ** 2) + jnp.sum(y),
                         lambda x, y, b: jnp.sum((y - x) ** 2), gamma=gamma,
                         upper_optimizer=optax.sgd(0.1),
                         lower_optimizer=optax.sgd(0.1))

  with pytest.warns(RuntimeWarning, match=r"1 of 2 grid points.*'gamma': "
                                          r"-1\.0"):
    params, _, hist = jbl.sweep(make_tx, _P0, {"gamma": [2.0, -1.0]},
                                num_steps=5, diagnostics=True)
  assert np.isnan(hist["gamma"][1]).all()
  assert np.isfinite(hist["gamma"][0]).all()
  np.testing.assert_array_equal(params.x[1], _P0.x)  # never moved


# ---------------------------------------------------------------------------
# Every public entry point validates its inputs (table-driven).
# ---------------------------------------------------------------------------


def _f(x, y, batch):
  return jnp.sum(x ** 2) + jnp.sum(y)


def _g(x, y, batch):
  return jnp.sum((y - x) ** 2)


_OPT = optax.sgd(0.1)
_P = jbl.BilevelParams(jnp.ones(2), jnp.ones(2))


def _method(name, **kw):
  fn = {"pbgd_free": jbl.pbgd_free, "alt_pbgd": jbl.alt_pbgd,
        "v_pbgd": jbl.v_pbgd}[name]
  args = dict(gamma=1.0, upper_optimizer=_OPT, lower_optimizer=_OPT)
  args.update(kw)
  f = args.pop("f", _f)
  g = args.pop("g", _g)
  return fn(f, g, **args)


def _update(name, params=_P, state_params=_P, updates=None, **kw):
  tx = _method(name, **kw)
  return tx.update(updates, tx.init(state_params), params)


_PFREE = _method("pbgd_free")

# (entry point, call, error message pattern). Each call gets one bad input.
BAD_INPUTS = [
    # Methods: construction.
    ("pbgd_free gamma=0", lambda: _method("pbgd_free", gamma=0.0),
     "gamma must be > 0, got 0.0"),
    ("pbgd_free gamma<0", lambda: _method("pbgd_free", gamma=-2.0),
     "gamma must be > 0, got -2.0"),
    ("pbgd_free gamma=nan", lambda: _method("pbgd_free", gamma=np.nan),
     "gamma must be finite"),
    ("pbgd_free gamma vector", lambda: _method("pbgd_free",
                                               gamma=jnp.ones(3)),
     r"gamma must be a scalar .*jax.vmap"),
    ("pbgd_free gamma=None", lambda: _method("pbgd_free", gamma=None),
     "gamma must be given"),
    ("pbgd_free gamma=True", lambda: _method("pbgd_free", gamma=True),
     "gamma must be a number"),
    ("pbgd_free inner_steps=0", lambda: _method("pbgd_free", inner_steps=0),
     "inner_steps must be >= 1, got 0"),
    ("pbgd_free inner_steps float", lambda: _method("pbgd_free",
                                                    inner_steps=2.0),
     "inner_steps must be a Python int"),
    ("pbgd_free f not callable", lambda: _method("pbgd_free", f="f"),
     r"f must be a callable f\(x, y, batch\) -> scalar"),
    ("pbgd_free proj_x not callable", lambda: _method("pbgd_free",
                                                      proj_x="box"),
     "proj_x must be a callable"),
    ("alt_pbgd gamma=0", lambda: _method("alt_pbgd", gamma=0.0),
     "gamma must be > 0"),
    ("alt_pbgd inner_steps=0", lambda: _method("alt_pbgd", inner_steps=0),
     "inner_steps must be >= 1"),
    ("alt_pbgd value_steps=0", lambda: _method("alt_pbgd", value_steps=0),
     "value_steps must be >= 1"),
    ("alt_pbgd inner_start", lambda: _method("alt_pbgd",
                                             inner_start="zero"),
     "inner_start must be one of"),
    ("v_pbgd gamma<0", lambda: _method("v_pbgd", gamma=-1.0),
     "gamma must be >= 0, got -1.0"),
    ("v_pbgd value_steps=0", lambda: _method("v_pbgd", value_steps=0),
     "value_steps must be >= 1"),
    # Methods: params, pytree structure, dtypes, objectives (trace time).
    ("pbgd_free params tuple", lambda: _PFREE.init((jnp.ones(2), jnp.ones(2))),
     r"params must be a jaxbilevel.BilevelParams\(x, y\), got tuple"),
    ("pbgd_free int params", lambda: _PFREE.init(
        jbl.BilevelParams(jnp.ones(2, jnp.int32), jnp.ones(2))),
     r"params.x has dtype int32; bilevel variables must be floating"),
    ("pbgd_free empty y", lambda: _PFREE.init(jbl.BilevelParams(jnp.ones(2),
                                                               {})),
     "params.y has no array leaves"),
    ("pbgd_free updates structure", lambda: _update(
        "pbgd_free", updates=jbl.BilevelParams({"a": jnp.ones(2)},
                                               jnp.ones(2))),
     "the structure of updates.x does not match params.x"),
    ("pbgd_free f vector-valued", lambda: _update(
        "pbgd_free", f=lambda x, y, b: x * y),
     r"f\(x, y, batch\) must return a scalar, .* shape \(2,\)"),
    ("pbgd_free g integer-valued", lambda: _update(
        "pbgd_free", g=lambda x, y, b: jnp.sum(y).astype(jnp.int32)),
     "must return a floating scalar"),
    ("pbgd_free f ignores x", lambda: _update(
        "pbgd_free", f=lambda x, y, b: jnp.sum(y ** 2)),
     "the upper objective f does not depend on x"),
    ("alt_pbgd state/params shapes", lambda: _update(
        "alt_pbgd", state_params=jbl.BilevelParams(jnp.ones(2), jnp.ones(3))),
     r"state.y_g has a leaf of shape \(3,\) where params.y has shape \(2,\)"),
    ("v_pbgd state/params shapes", lambda: _update(
        "v_pbgd", state_params=jbl.BilevelParams(jnp.ones(2), jnp.ones(3))),
     r"state.y_g has a leaf of shape \(3,\)"),
    # run and scan_run.
    ("run num_steps=0", lambda: jbl.run(_PFREE, _P, num_steps=0),
     "num_steps must be >= 1, got 0"),
    ("run num_steps float", lambda: jbl.run(_PFREE, _P, num_steps=10.0),
     "num_steps must be a Python int"),
    ("run chunk_size=0", lambda: jbl.run(_PFREE, _P, num_steps=3,
                                         chunk_size=0),
     "chunk_size must be >= 1"),
    ("run on_nonfinite", lambda: jbl.run(_PFREE, _P, num_steps=3,
                                         on_nonfinite="warn"),
     "on_nonfinite must be one of"),
    ("run batch and batches", lambda: jbl.run(_PFREE, _P, num_steps=3,
                                              batch=1.0, batches=jnp.ones(3)),
     "pass either batch= .* or batches="),
    ("run batches too short", lambda: jbl.run(_PFREE, _P, num_steps=5,
                                              batches={"a": jnp.ones((3, 2))}),
     r"leading axis of length >= num_steps=5 .* shape \(3, 2\)"),
    ("run batches scalar leaf", lambda: jbl.run(_PFREE, _P, num_steps=5,
                                                batches={"a": jnp.ones(())}),
     r"got a leaf of shape \(\)"),
    ("run batches empty", lambda: jbl.run(_PFREE, _P, num_steps=5,
                                          batches={}),
     "batches= has no array leaves"),
    ("run not a bilevel transformation", lambda: jbl.run(optax.sgd(0.1), _P,
                                                         num_steps=2),
     "this state has no `diagnostics`"),
    ("scan_run on_nonfinite=raise", lambda: jbl.scan_run(
        _PFREE, _P, num_steps=2, on_nonfinite="raise"),
     "scan_run: on_nonfinite must be 'stop', 'skip' or 'ignore'"),
    ("scan_run num_steps=0", lambda: jbl.scan_run(_PFREE, _P, num_steps=0),
     "num_steps must be >= 1"),
    # Objectives and projections.
    ("lower_penalized f None", lambda: objectives.lower_penalized(None, _g),
     "f must be a callable"),
    ("value_gap_penalty vector f", lambda: objectives.value_gap_penalty(
        lambda x, y, b: x * y, _g)(jnp.ones(2), jnp.ones(2), jnp.ones(2), 1.0),
     "must return a scalar"),
    ("grad_norm_penalty g None", lambda: objectives.grad_norm_penalty(_f,
                                                                      None),
     "g must be a callable"),
    ("box no bounds", projections.box, "box\\(\\) needs at least one of"),
    ("box lower > upper", lambda: projections.box(2.0, 1.0),
     "lower bound 2.0 exceeds upper bound 1.0"),
    # Sweeps, sharding, flax_utils, checkpoints.
    ("sweep grid lengths", lambda: jbl.sweep(
        lambda gamma, lr: _PFREE, _P, {"gamma": [1.0, 2.0], "lr": [0.1]},
        num_steps=2), "same number of points"),
    ("sweep grid name", lambda: jbl.sweep(
        lambda gamma: _PFREE, _P, {"lr": [1.0]}, num_steps=2),
     r"cannot be called as make_tx\(\*\*point\) with the grid names"),
    ("product_grid 2-D", lambda: jbl.product_grid(a=[[1.0]]),
     "non-empty 1-D sequence"),
    ("shard_batch mesh", lambda: jbl.shard_batch({"a": jnp.ones(2)}, None),
     "mesh must be a jax.sharding.Mesh"),
    ("split_params empty x", lambda: flax_utils.split_params(
        {"a": jnp.ones(2), "b": jnp.ones(2)}, "^c"),
     "selects no parameter, so x would be empty"),
    ("checkpoint step<0", lambda: checkpoint.save("/tmp/unused", _P, None,
                                                  step=-1),
     "step must be >= 0"),
    ("checkpoint directory type", lambda: checkpoint.latest_step(3),
     "checkpoint directory must be a path"),
    ("checkpoint key type", lambda: checkpoint.save("/tmp/unused", _P, None,
                                                    step=1, key="k"),
     "key must be a JAX PRNG key"),
    ("resumable_run save_every=0", lambda: checkpoint.resumable_run(
        _PFREE, _P, num_steps=2, directory="/tmp/unused", save_every=0),
     "save_every must be >= 1"),
    ("upper_optimizer not optax", lambda: _method("pbgd_free",
                                                  upper_optimizer=0.1),
     "upper_optimizer must be an optax"),
    ("lower_optimizer None", lambda: _method("alt_pbgd", lower_optimizer=None),
     "lower_optimizer must be an optax"),
    ("optimizer state of other params", lambda: _update(
        "pbgd_free", upper_optimizer=optax.adam(0.1),
        state_params=jbl.BilevelParams({"a": jnp.ones(2)}, jnp.ones(2))),
     "structure of state"),
]



@pytest.mark.parametrize(
    "call,message",
    [pytest.param(c, m, id=n) for n, c, m in BAD_INPUTS])
def test_bad_input_gets_a_clear_message(call, message):
  with pytest.raises(jbl.BilevelValidationError, match=message):
    call()


# ---------------------------------------------------------------------------
# Property-based: random quadratic problems with random nested-dict variables.
# ---------------------------------------------------------------------------


@st.composite
def _nested_layout(draw, size):
  """A nested dict of 1-D float64 zeros whose leaves hold ``size`` numbers."""
  cuts = sorted(draw(st.sets(st.integers(1, size - 1), max_size=size - 1))
                if size > 1 else [])
  lengths = np.diff([0] + list(cuts) + [size])
  flat = {}
  for i, n in enumerate(lengths):
    depth = draw(st.integers(0, 2))
    groups = tuple(f"g{draw(st.integers(0, 1))}" for _ in range(depth))
    flat[groups + (f"k{i}",)] = jnp.zeros(int(n))
  return traverse_util.unflatten_dict(flat)


def _tree_problem(seed, dim_x, dim_y, x_tree, y_tree):
  """random_quadratic with x and y given as nested dicts (raveled inside)."""
  prob = jbl.problems.random_quadratic(seed, dim_x, dim_y)
  _, unravel_x = ravel_pytree(x_tree)
  _, unravel_y = ravel_pytree(y_tree)

  def f(x, y, batch):
    return prob.f(ravel_pytree(x)[0], ravel_pytree(y)[0], batch)

  def g(x, y, batch):
    return prob.g(ravel_pytree(x)[0], ravel_pytree(y)[0], batch)

  p0 = jbl.BilevelParams(x_tree, y_tree)
  return f, g, p0, prob.info["coefficients"], unravel_x


def _jacobian(affine_fn, dim):
  """The matrix M of an affine map x -> M x + m."""
  m = affine_fn(np.zeros(dim))
  return np.stack([affine_fn(e) - m for e in np.eye(dim)], axis=1)


_PROPERTY_SETTINGS = settings(
    max_examples=4, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
_GAMMA = 10.0


def _draw_coefficients(data):
  """A random problem size and seed, and its closed-form coefficients."""
  seed = data.draw(st.integers(0, 10_000))
  dim_x, dim_y = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
  coeffs = jbl.problems.random_quadratic(seed, dim_x, dim_y).info[
      "coefficients"]
  return seed, dim_x, dim_y, coeffs


def _draw_tree_problem(data, seed, dim_x, dim_y):
  """The problem with x and y drawn as random nested dicts; the lower step."""
  x_tree = data.draw(_nested_layout(dim_x))
  y_tree = data.draw(_nested_layout(dim_y))
  f, g, p0, coeffs, unravel_x = _tree_problem(seed, dim_x, dim_y, x_tree,
                                              y_tree)
  lower_lr = 1.0 / (np.linalg.eigvalsh(coeffs.A)[-1] + 1.0 / _GAMMA)
  return f, g, p0, unravel_x, lower_lr


@_PROPERTY_SETTINGS
@given(st.data())
def test_alt_pbgd_reaches_argmin_f_gamma_on_random_trees(data):
  seed, dim_x, dim_y, coeffs = _draw_coefficients(data)
  # F_gamma is quadratic; its Hessian fixes the step and the condition.
  hess = _jacobian(lambda x: coeffs.P @ x + coeffs.q + coeffs.B @ coeffs
                   .y_gamma(x, _GAMMA) + _GAMMA * coeffs.C @ (
                       coeffs.y_gamma(x, _GAMMA) - coeffs.y_star(x)), dim_x)
  eig = np.linalg.eigvalsh((hess + hess.T) / 2)
  assume(eig[0] > 0 and eig[-1] / eig[0] < 30)
  f, g, p0, unravel_x, lower_lr = _draw_tree_problem(data, seed, dim_x, dim_y)
  tx = jbl.alt_pbgd(f, g, gamma=_GAMMA,
                    upper_optimizer=optax.sgd(1.0 / eig[-1]),
                    lower_optimizer=optax.sgd(lower_lr), inner_steps=5)
  params, _, hist = jbl.run(tx, p0, num_steps=1500)
  assert jax.tree.structure(params.x) == jax.tree.structure(p0.x)
  assert hist["finite"].all()
  expected = unravel_x(jnp.asarray(coeffs.argmin_f_gamma(_GAMMA)))
  for got, want in zip(jax.tree.leaves(params.x), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, atol=1e-7, rtol=1e-7)


@_PROPERTY_SETTINGS
@given(st.data())
def test_pbgd_free_fixed_point_is_the_closed_form_on_random_trees(data):
  seed, dim_x, dim_y, coeffs = _draw_coefficients(data)
  # x <- x - lr (P x + q + B y_gamma(x)): a linear iteration with matrix M.
  mat = _jacobian(lambda x: coeffs.P @ x + coeffs.q + coeffs.B @ coeffs
                  .y_gamma(x, _GAMMA), dim_x)
  eig = np.linalg.eigvals(mat)
  assume(eig.real.min() > 0 and np.abs(eig).max() / eig.real.min() < 30)
  lr = float(np.min(eig.real / np.abs(eig) ** 2))
  f, g, p0, unravel_x, lower_lr = _draw_tree_problem(data, seed, dim_x, dim_y)
  tx = jbl.pbgd_free(f, g, gamma=_GAMMA, upper_optimizer=optax.sgd(lr),
                     lower_optimizer=optax.sgd(lower_lr), inner_steps=5)
  params, _, hist = jbl.run(tx, p0, num_steps=1500)
  assert hist["finite"].all()
  expected = unravel_x(jnp.asarray(coeffs.pbgd_free_limit(_GAMMA)))
  for got, want in zip(jax.tree.leaves(params.x), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, atol=1e-7, rtol=1e-7)


# ---------------------------------------------------------------------------
# A long run stays finite and converged.
# ---------------------------------------------------------------------------


def test_long_run_stays_finite_and_converged():
  """10^5 PBGD-Free steps in float32 on the DPO/SFT toy (A2 in docs/problems.md)."""
  prob = jbl.problems.dpo_sft_toy(jnp.float32)
  tx = jbl.pbgd_free(prob.f, prob.g, gamma=16.0,
                     upper_optimizer=optax.sgd(0.1),
                     lower_optimizer=optax.sgd(0.5), inner_steps=1)
  params, state, hist = jbl.run(tx, prob.params0, num_steps=100_000,
                                chunk_size=25_000, diagnostics=True)
  assert int(state.count) == 100_000 and hist["finite"].all()
  assert params.x.dtype == jnp.float32
  # PBGD-Free's limit is gamma-independent (the toy is flat): -7.163917.
  np.testing.assert_allclose(float(params.x), prob.info["pbgd_free_limit"],
                             atol=2e-4)
  # Converged long ago and stayed there: the last 50k steps barely move.
  tail = hist["upper_grad_norm"][50_000:]
  assert np.all(np.isfinite(tail)) and tail.max() < 1e-3
  assert np.ptp(hist["f"][50_000:]) < 1e-5
