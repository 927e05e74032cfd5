"""jaxbilevel.run and scan_run (jaxbilevel._src.run): the chunked driver.

Chunks, batches, resume, non-finite steps and data (stop, skip, ignore,
replay of a failing chunk), the messages a run gives, and a long run.
"""

import functools
import re

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
from jaxbilevel._src import loop as loop_lib
from jaxbilevel._src import nonfinite as nonfinite_lib
from jaxbilevel._src import programs


# ---------------------------------------------------------------------------
# run / scan_run
# ---------------------------------------------------------------------------


def test_run_equals_manual_loop_and_scan_run():
  prob = _dpo()
  tx = _free(prob)
  params, state = prob.params0, tx.init(prob.params0)
  update = jax.jit(functools.partial(tx.update, diagnostics=True))
  fs = []
  for _ in range(25):
    updates, state = update(None, state, params)
    fs.append(float(state.diagnostics["f"]))
    params = optax.apply_updates(params, updates)
  p_run, s_run, hist = jbl.run(tx, prob.params0, num_steps=25, chunk_size=7,
                               diagnostics=True)
  p_scan, _, hist_scan = jbl.scan_run(tx, prob.params0, num_steps=25,
                                    diagnostics=True)
  for p in (p_run, p_scan):
    np.testing.assert_allclose([p.x, p.y], [params.x, params.y], rtol=1e-12)
  np.testing.assert_allclose(hist["f"], fs, rtol=1e-12)
  np.testing.assert_array_equal(hist["f"], np.asarray(hist_scan["f"]))
  np.testing.assert_array_equal(hist["step"], np.arange(25))
  assert int(s_run.count) == 25
  # f in the diagnostics is evaluated at the incoming iterate.
  np.testing.assert_allclose(hist["f"][0], prob.f(5.0, -9.9, None), rtol=1e-12)


def test_resumed_run_equals_uninterrupted_run():
  prob = _dpo()
  tx = _free(prob)
  p_all, s_all, h_all = jbl.run(tx, prob.params0, num_steps=300,
                                diagnostics=True)
  p_a, s_a, h_a = jbl.run(tx, prob.params0, num_steps=120, chunk_size=50,
                          diagnostics=True)
  p_b, s_b, h_b = jbl.run(tx, p_a, state=s_a, num_steps=180,
                          diagnostics=True)
  assert float(p_b.x) == float(p_all.x) and float(p_b.y) == float(p_all.y)
  np.testing.assert_array_equal(np.concatenate([h_a["f"], h_b["f"]]),
                                h_all["f"])
  assert int(s_b.count) == int(s_all.count) == 300


def test_run_with_stacked_and_callable_batches():
  # f, g read a per-step scale from the batch: stacked arrays and a callable
  # giving the same values must produce identical runs.
  def f(x, y, batch):
    return batch["s"] * (x - 1.0) ** 2 + 0.1 * y ** 2

  def g(x, y, batch):
    return (y - batch["s"] * x) ** 2

  tx = jbl.alt_pbgd(f, g, gamma=10.0, upper_optimizer=optax.sgd(0.1),
                    lower_optimizer=optax.sgd(0.2), inner_steps=3)
  p0 = jbl.BilevelParams(jnp.asarray(0.0), jnp.asarray(0.0))
  scales = 1.0 + 0.5 * jnp.sin(jnp.arange(40.0))
  p1, _, h1 = jbl.run(tx, p0, num_steps=30, batches={"s": scales},
                      chunk_size=8, diagnostics=True)
  p2, _, h2 = jbl.run(tx, p0, num_steps=30,
                      batches=lambda step: {"s": 1.0 + 0.5 * jnp.sin(
                          step.astype(jnp.float64))}, diagnostics=True)
  np.testing.assert_allclose(h1["f"], h2["f"], rtol=1e-12)
  np.testing.assert_allclose(float(p1.x), float(p2.x), rtol=1e-12)
  # A fixed batch differs from the varying one.
  p3, _, _ = jbl.run(tx, p0, num_steps=30, batch={"s": jnp.asarray(1.0)})
  assert abs(float(p3.x) - float(p1.x)) > 1e-6


def test_unguarded_chunks_equal_the_guarded_scan():
  # run's chunks carry no per-step select; scan_run('stop') does. Same result.
  f, g, p0 = _quadratic(5)
  tx = _quadratic_free(f, g)
  params, _, hist = jbl.run(tx, p0, num_steps=40, chunk_size=15,
                            diagnostics=True)
  expected, _, expected_hist = jbl.scan_run(tx, p0, num_steps=40,
                                            diagnostics=True)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  np.testing.assert_allclose(hist["f"], expected_hist["f"], rtol=1e-6)
  assert hist["finite"].all() and hist["step"].tolist() == list(range(40))


def test_shared_batch_and_per_step_batches_are_merged():
  # batch= holds what every step shares (e.g. frozen weights), batches= the
  # per-step data: each step sees {**batch, **batches[step]}.
  f = lambda x, y, b: jnp.sum((y - b["target"]) ** 2) + jnp.sum(x ** 2)
  g = lambda x, y, b: b["scale"] * jnp.sum((y - x) ** 2)
  tx = jbl.pbgd_free(f, g, gamma=10.0, upper_optimizer=optax.sgd(0.1),
                     lower_optimizer=optax.sgd(0.05))
  p0 = jbl.BilevelParams(jnp.zeros(2), jnp.zeros(2))
  targets = jnp.linspace(0.0, 1.0, 12)[:, None] * jnp.ones((12, 2))
  shared = {"scale": jnp.asarray(2.0)}
  params, _, _ = jbl.run(tx, p0, num_steps=12, batch=shared,
                         batches={"target": targets}, chunk_size=5)
  expected = jbl.scan_run(tx, p0, num_steps=12, batches={
      "target": targets, "scale": jnp.full((12,), 2.0)})[0]
  np.testing.assert_allclose(params.y, expected.y, rtol=1e-6)
  with pytest.raises(jbl.BilevelValidationError, match=r"different keys"):
    jbl.run(tx, p0, num_steps=2, batch={"target": targets[0]},
            batches={"target": targets})


def test_record_every_records_after_every_nth_step():
  f, g, p0 = _quadratic(1)
  tx = _quadratic_free(f, g)
  record = lambda params, state: state.count
  _, _, hist = jbl.run(tx, p0, num_steps=12, record=record, record_every=4,
                       chunk_size=6)  # rounded to a multiple of 4
  assert hist["record"].tolist() == [4, 8, 12]
  _, _, hist = jbl.scan_run(tx, p0, num_steps=12, record=record,
                            record_every=3)
  assert hist["record"].tolist() == [3, 6, 9, 12]
  with pytest.raises(jbl.BilevelValidationError, match=r"multiple of"):
    jbl.run(tx, p0, num_steps=10, record=record, record_every=4)


def test_diagnostics_are_opt_in_and_a_missing_one_says_how():
  f, g, p0 = _quadratic(2)
  _, _, hist = jbl.run(_quadratic_free(f, g), p0, num_steps=4)
  assert sorted(hist) == ["finite", "state_finite", "step", "updates_finite"]
  with pytest.raises(KeyError, match=r"diagnostics=True"):
    hist["f"]  # pylint: disable=pointless-statement
  _, _, hist = jbl.run(_quadratic_free(f, g), p0, num_steps=4, diagnostics=True)
  assert {"f", "g", "upper_grad_norm", "gamma"} <= set(hist)


def test_progress_bar_written_to_stderr_when_asked(capsys):
  prob = _dpo()
  jbl.run(_free(prob), prob.params0, num_steps=20, chunk_size=5,
          progress=True, diagnostics=True)
  err = capsys.readouterr().err
  assert "20/20" in err and "it/s" in err and "f=" in err
  jbl.run(_free(prob), prob.params0, num_steps=20, chunk_size=5)
  assert capsys.readouterr().err == ""  # not a terminal: no bar by default


# ---------------------------------------------------------------------------
# Non-finite steps
# ---------------------------------------------------------------------------


def test_run_reports_nonfinite_step_and_returns_last_finite_iterate():
  # log(x) becomes NaN once x < 0; the upper step pushes x down by 0.3 a step.
  def f(x, y, batch):
    return 0.3 * x + 0.0 * y + 0.0 * jnp.log(x)

  def g(x, y, batch):
    return (y - x) ** 2

  tx = jbl.pbgd_free(f, g, gamma=1.0, upper_optimizer=optax.sgd(1.0),
                     lower_optimizer=optax.sgd(0.1))
  p0 = jbl.BilevelParams(jnp.asarray(1.0), jnp.asarray(0.0))
  # Only the value f is NaN, so only a run that computes the diagnostics
  # sees it.
  with pytest.warns(RuntimeWarning,
                    match=r"non-finite .*f.* at step 4\b") as record:
    params, state, hist = jbl.run(tx, p0, num_steps=100, chunk_size=3,
                                  diagnostics=True)
  message = str(record[0].message)
  # Only f is NaN: its gradient 0.3 + 0 / x stays finite.
  assert "non-finite f at" in message and "last finite iterate" in message
  # x: 1.0, 0.7, 0.4, 0.1, -0.2 (step 4 evaluates log(-0.2)).
  np.testing.assert_allclose(float(params.x), -0.2, atol=1e-12)
  assert int(state.count) == 4
  assert len(hist["f"]) == 5 and not hist["finite"][-1]
  assert np.all(hist["finite"][:-1])

  with pytest.raises(jbl.NonFiniteError, match="at step 4"):
    jbl.run(tx, p0, num_steps=100, on_nonfinite="raise", diagnostics=True)


def test_run_skip_mode_rejects_nonfinite_steps_and_continues():
  # The batch poisons every third step with a NaN.
  def f(x, y, batch):
    return (x - 2.0) ** 2 + batch * 0.0 + 0.01 * y ** 2

  def g(x, y, batch):
    return (y - x) ** 2

  tx = jbl.pbgd_free(f, g, gamma=5.0, upper_optimizer=optax.sgd(0.1),
                     lower_optimizer=optax.sgd(0.3))
  batches = jnp.where(jnp.arange(60) % 3 == 2, jnp.nan, 1.0)
  p0 = jbl.BilevelParams(jnp.asarray(0.0), jnp.asarray(0.0))
  with pytest.warns(RuntimeWarning, match="skipped 20 non-finite step"):
    # The NaN reaches only the value f (a diagnostic), not the gradients.
    params, state, hist = jbl.run(tx, p0, num_steps=60, batches=batches,
                                  on_nonfinite="skip", diagnostics=True)
  assert np.sum(~hist["finite"]) == 20
  assert np.isfinite(float(params.x))
  # 40 accepted steps of x <- x - 0.1 * 2 (x - 2): |x - 2| = 2 * 0.8^40.
  np.testing.assert_allclose(float(params.x), 2.0 - 2.0 * 0.8 ** 40,
                             rtol=1e-9)
  assert int(state.count) == 40  # rejected steps leave the state untouched


def test_failing_chunk_is_replayed_to_the_last_finite_iterate():
  # x moves by -0.3 a step; log(x) is NaN once x < 0, first at step 4.
  def f(x, y, batch):
    return 0.3 * x + 0.0 * y + 0.0 * jnp.log(x)

  def g(x, y, batch):
    return (y - x) ** 2

  def f_grad(x, y, batch):  # the gradient 0.3 + 0 * 0.5 / sqrt(x) is NaN too
    return 0.3 * x + 0.0 * y + 0.0 * jnp.sqrt(x)

  p0 = jbl.BilevelParams(jnp.asarray(1.0), jnp.asarray(0.0))
  # f's value is NaN but every update is finite: with the diagnostics off
  # nothing non-finite is computed, and the run goes on.
  tx = jbl.pbgd_free(f, g, gamma=1.0, upper_optimizer=optax.sgd(1.0),
                     lower_optimizer=optax.sgd(0.1))
  _, _, hist = jbl.run(tx, p0, num_steps=10)
  assert hist["finite"].all()
  for objective, diagnostics, what in ((f, True, "f"),
                                       (f_grad, False, "parameter updates")):
    tx = jbl.pbgd_free(objective, g, gamma=1.0,
                       upper_optimizer=optax.sgd(1.0),
                       lower_optimizer=optax.sgd(0.1))
    expected, _, _ = jbl.scan_run(tx, p0, num_steps=4, on_nonfinite="ignore")
    with pytest.warns(RuntimeWarning, match=rf"non-finite .*{what}.* at step 4"):
      params, state, hist = jbl.run(tx, p0, num_steps=50, chunk_size=20,
                                    diagnostics=diagnostics)
    assert float(params.x) == float(expected.x)
    assert float(params.y) == float(expected.y)
    assert int(state.count) == 4
    assert hist["step"].tolist() == [0, 1, 2, 3, 4]
    assert hist["finite"].tolist() == [True] * 4 + [False]
    assert ("f" in hist) == diagnostics
    if not diagnostics:
      assert not hist["updates_finite"][-1]


def test_nan_at_step_zero_says_the_initial_parameters_are_returned():
  f = lambda x, y, batch: jnp.sqrt(x) + y ** 2
  g = lambda x, y, batch: (y - x) ** 2
  tx = jbl.pbgd_free(f, g, gamma=1.0, upper_optimizer=optax.sgd(0.1),
                     lower_optimizer=optax.sgd(0.1))
  p0 = jbl.BilevelParams(jnp.asarray(-1.0), jnp.asarray(0.0))
  with pytest.raises(jbl.NonFiniteError,
                     match=r"at step 0.*the initial params and state"):
    jbl.run(tx, p0, num_steps=10, on_nonfinite="raise")


def test_nonfinite_optimizer_state_is_detected():
  # float16 Adagrad: the accumulator of g^2 = (2 * 1000 * 10)^2 overflows to
  # inf at step 0 while the update lr * grad / sqrt(inf) stays finite (0).
  f = lambda x, y, batch: jnp.sum(x ** 2) + jnp.sum(y)
  g = lambda x, y, batch: 1000.0 * jnp.sum((y - x) ** 2)
  tx = jbl.pbgd_free(f, g, gamma=1.0, upper_optimizer=optax.sgd(0.1),
                     lower_optimizer=optax.adagrad(0.1))
  p0 = jbl.BilevelParams(jnp.zeros(2, jnp.float16),
                         jnp.full((2,), 10.0, jnp.float16))
  updates, state = tx.update(None, tx.init(p0), p0)
  assert bool(jnp.all(jnp.isfinite(updates.y)))
  assert not bool(jnp.all(jnp.isfinite(state.lower_state[0].sum_of_squares)))
  with pytest.warns(RuntimeWarning, match=r"optimizer state at step 0"):
    params, _, _ = jbl.run(tx, p0, num_steps=5)
  np.testing.assert_array_equal(params.y, p0.y)


def test_traced_nonpositive_gamma_is_reported_not_silently_used():
  prob = _dpo()

  @jax.jit
  def one_run(gamma):
    tx = _free(prob, gamma=gamma)
    return jbl.scan_run(tx, prob.params0, num_steps=3, diagnostics=True)

  params, _, hist = one_run(jnp.asarray(-1.0))
  assert np.all(np.isnan(hist["gamma"]))
  assert not np.any(hist["finite"])
  # The iterate is frozen at the start rather than moved by a wrong gamma.
  assert float(params.x) == 5.0
  params, _, hist = one_run(jnp.asarray(16.0))
  assert np.all(hist["finite"]) and float(params.x) != 5.0

  tx = jbl.pbgd_free(prob.f, prob.g, gamma=lambda step: 1.0 - step,
                     upper_optimizer=optax.sgd(1e-2),
                     lower_optimizer=optax.sgd(1e-2))
  with pytest.warns(RuntimeWarning, match=r"at step 1 \(gamma is not a finite positive"):
    jbl.run(tx, prob.params0, num_steps=5)


def test_gamma_hints():
  f, g, p0 = _quadratic(1)

  @jax.jit
  def one(gamma):
    return jbl.scan_run(_quadratic_free(f, g, gamma=gamma), p0, num_steps=2,
                        diagnostics=True)[2]

  hist = one(jnp.asarray(jnp.inf))  # +inf is invalid, not silently used
  assert np.isnan(hist["gamma"]).all() and not hist["finite"].any()
  p32 = jax.tree.map(lambda v: v.astype(jnp.float32), p0)
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"1e-50 underflows to 0 in float32"):
    jbl.run(jbl.pbgd_free(f, g, gamma=lambda step: 1e-50,
                          upper_optimizer=optax.sgd(0.1),
                          lower_optimizer=optax.sgd(0.1)), p32, num_steps=2)
  # BOME has no gamma: its report gives no gamma hint.
  report = nonfinite_lib.nonfinite_report(
      {"step": np.array([3]), "gamma": np.array([np.nan]),
       "finite": np.array([False])}, 0,
      jbl.bome(f, g, upper_optimizer=optax.sgd(0.1),
               lower_optimizer=optax.sgd(0.1), eta=0.5).init(p0))
  assert report[0] == 3 and "gamma" in report[1] and report[2] == ""


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


# ---------------------------------------------------------------------------
# Argument errors
# ---------------------------------------------------------------------------


def test_run_argument_errors():
  prob = _dpo()
  tx = _free(prob)
  with pytest.raises(jbl.BilevelValidationError, match="or both as dicts with different keys"):
    jbl.run(tx, prob.params0, num_steps=3, batch=1.0, batches=jnp.ones(3))
  with pytest.raises(jbl.BilevelValidationError,
                     match=re.escape("leading axis of length >= num_steps=5")):
    jbl.run(tx, prob.params0, num_steps=5, batches=jnp.ones(3))
  with pytest.raises(jbl.BilevelValidationError, match="on_nonfinite"):
    jbl.run(tx, prob.params0, num_steps=3, on_nonfinite="retry")
  with pytest.raises(jbl.BilevelValidationError, match="num_steps must be"):
    jbl.run(tx, prob.params0, num_steps=0)
  with pytest.raises(jbl.BilevelValidationError, match="has no `diagnostics`"):
    jbl.run(optax.sgd(0.1), prob.params0, num_steps=2)


def test_run_inside_jit_points_to_scan_run():
  f, g, p0 = _quadratic(1)
  tx = _quadratic_free(f, g)
  with pytest.raises(jbl.BilevelValidationError, match=r"jaxbilevel.scan_run"):
    jax.jit(lambda p: jbl.run(tx, p, num_steps=3)[0])(p0)


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

# ---------------------------------------------------------------------------
# The unchecked fast path: new params taken from the method, history rows,
# diagnostics by name.
# ---------------------------------------------------------------------------


def _fast_problem():
  t = jnp.array([1.0, -2.0, 0.5])
  f = lambda x, y, batch: (0.5 * jnp.sum((y - t) ** 2)
                           + 0.05 * jnp.sum((x - 1.0) ** 2))
  g = lambda x, y, batch: 0.5 * jnp.sum((y - x) ** 2)
  p0 = jbl.BilevelParams(x=jnp.zeros(3), y=jnp.zeros(3))
  return f, g, p0


def _fast_free(f, g, gamma=10.0):
  return jbl.pbgd_free(f, g, gamma=gamma, upper_optimizer=optax.adam(0.05),
                       lower_optimizer=optax.sgd(0.2))


def _optax_loop(tx, params, num_steps, batch=None):
  """The optax loop a user would write: update, then apply_updates (jitted)."""

  @jax.jit
  def step(params, state):
    updates, state = tx.update(None, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(num_steps):
    params, state = step(params, state)
  return params, state


def test_run_matches_the_optax_loop_for_every_penalty_method():
  f, g, p0 = _fast_problem()
  common = dict(upper_optimizer=optax.sgd(0.05), lower_optimizer=optax.sgd(0.2))
  for tx in (_fast_free(f, g),
             jbl.alt_pbgd(f, g, gamma=10.0, inner_steps=3, **common),
             jbl.v_pbgd(f, g, gamma=10.0, upper_optimizer=optax.sgd(0.05),
                        lower_optimizer=optax.sgd(0.02))):
    params, _, _ = jbl.run(tx, p0, num_steps=40)
    expected, _ = _optax_loop(tx, p0, 40)
    # The driver uses the method's new iterates; the optax loop adds
    # new - old back to old: equal up to float32 rounding.
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_step_returns_the_new_params_of_update():
  f, g, p0 = _fast_problem()
  tx = _fast_free(f, g)
  state = tx.init(p0)
  updates, via_update = tx.update(None, state, p0)
  new, via_step = tx.step(p0, state)
  np.testing.assert_allclose(new.x, p0.x + updates.x, atol=1e-7)
  np.testing.assert_allclose(new.y, p0.y + updates.y, atol=1e-7)
  jax.tree.map(np.testing.assert_allclose, via_step, via_update)
  # jbl.step: the method's own step, or update + apply_updates for a
  # transformation without one (an optax chain around the method).
  same, _ = jbl.step(tx, p0, state)
  jax.tree.map(np.testing.assert_array_equal, same, new)
  chain = optax.chain(tx, optax.scale(0.5))
  halved, _ = jbl.step(chain, p0, chain.init(p0))
  np.testing.assert_allclose(halved.x, p0.x + 0.5 * updates.x, atol=1e-7)


def test_a_chain_after_the_method_is_applied_by_the_driver():
  f, g, p0 = _fast_problem()
  tx = optax.chain(_fast_free(f, g), optax.scale(0.5))
  params, _, _ = jbl.run(tx, p0, num_steps=30)
  expected, _ = _optax_loop(tx, p0, 30)
  np.testing.assert_allclose(params.x, expected.x, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(params.y, expected.y, rtol=1e-5, atol=1e-7)
  unscaled, _, _ = jbl.run(_fast_free(f, g), p0, num_steps=30)
  assert float(jnp.max(jnp.abs(params.x - unscaled.x))) > 1e-3


def test_apply_if_finite_still_skips_a_non_finite_step_under_run():
  f0, g, p0 = _fast_problem()
  # f is NaN when batch["poison"] is 1: that step must leave params as they
  # were, although the method itself computed (NaN) new params.
  f = lambda x, y, batch: f0(x, y, batch) + jnp.where(
      batch["poison"] > 0, jnp.nan, 0.0) * jnp.sum(x)
  tx = jbl.apply_if_finite(_fast_free(f, g), max_consecutive_errors=5)
  poison = jnp.array([0.0, 0.0, 1.0, 0.0])
  params, _, _ = jbl.run(tx, p0, num_steps=4, batches={"poison": poison})
  clean = jnp.array([0.0, 0.0, 0.0])
  expected, _, _ = jbl.run(tx, p0, num_steps=3, batches={"poison": clean})
  np.testing.assert_allclose(params.x, expected.x, rtol=1e-6, atol=1e-7)
  assert bool(jnp.all(jnp.isfinite(params.x)))


def test_compiled_init_equals_eager_init():
  f, g, p0 = _fast_problem()
  for tx in (_fast_free(f, g), jbl.f2sa(f, g, gamma=2.0, gamma_increment=0.5,
                                   upper_optimizer=optax.adam(0.01),
                                   lower_optimizer=optax.sgd(0.1))):
    eager = tx.init(p0)
    jbl.run(tx, p0, num_steps=1)  # the program exists: init is compiled
    assert tx in programs.PROGRAMS
    compiled = programs.init_state(tx, p0)
    assert tx in programs.INITS
    assert jax.tree.structure(eager) == jax.tree.structure(compiled)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(compiled)):
      assert jnp.asarray(a).dtype == b.dtype
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_unchecked_chunks_number_their_steps(chunk_size):
  f, g, p0 = _fast_problem()
  _, _, history = jbl.run(_fast_free(f, g), p0, num_steps=25,
                          chunk_size=chunk_size)
  np.testing.assert_array_equal(history["step"], np.arange(25))
  for key in ("finite", "updates_finite", "state_finite"):
    assert history[key].shape == (25,) and history[key].all()


def test_diagnostics_by_name_record_only_those():
  f, g, p0 = _fast_problem()
  tx = _fast_free(f, g)
  _, state_all, all_ = jbl.run(tx, p0, num_steps=30, diagnostics=True)
  params, state_f, only_f = jbl.run(tx, p0, num_steps=30,
                                    diagnostics=("f",))
  assert "f" in only_f and "g" not in only_f and "gamma" not in only_f
  np.testing.assert_allclose(only_f["f"], all_["f"], rtol=1e-6)
  # The final state holds the last recorded values (and NaN for what is not
  # recorded: nothing computed it).
  assert float(state_all.diagnostics["f"]) == pytest.approx(
      float(all_["f"][-1]))
  assert float(state_all.diagnostics["g"]) == pytest.approx(
      float(all_["g"][-1]))
  assert float(state_f.diagnostics["f"]) == pytest.approx(
      float(only_f["f"][-1]))
  assert np.isnan(float(state_f.diagnostics["g"]))
  # scan_run and sweep take the same option; a string is one name.
  _, _, scanned = jbl.scan_run(tx, p0, num_steps=30, diagnostics="f")
  np.testing.assert_allclose(scanned["f"], all_["f"], rtol=1e-5)
  _, _, swept = jbl.sweep(lambda gamma: _fast_free(f, g, gamma), p0,
                          {"gamma": jnp.array([10.0, 20.0])}, num_steps=30,
                          diagnostics=["f", "gamma"])
  np.testing.assert_allclose(swept["f"][0], all_["f"], rtol=1e-5)
  np.testing.assert_allclose(swept["gamma"][1], 20.0)
  assert swept["step"].shape == (2, 30)
  np.testing.assert_array_equal(swept["step"][1], np.arange(30))
  assert "g" not in swept


def test_diagnostics_option_errors_name_the_fix():
  f, g, p0 = _fast_problem()
  tx = _fast_free(f, g)
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"\['multiplier'\] not recorded.*records \['f'"):
    jbl.run(tx, p0, num_steps=3, diagnostics=("multiplier",))
  for bad in (3, (), [1.0]):
    with pytest.raises(jbl.BilevelValidationError,
                       match="diagnostics must be True, False or a non-empty"):
      jbl.run(tx, p0, num_steps=3, diagnostics=bad)


def test_a_nan_in_a_recorded_diagnostic_is_reported_by_name():
  f0, g, p0 = _fast_problem()
  f = lambda x, y, batch: f0(x, y, batch) + 0.0 * jnp.log(x[0] - 5.0)
  with pytest.warns(RuntimeWarning, match="non-finite f at step 0"):
    jbl.run(_fast_free(f, g), p0, num_steps=5, diagnostics=("f",))


def test_one_chunk_unless_a_progress_bar_is_drawn(monkeypatch):
  lengths = []
  chunk = programs.run_chunk

  def counted(*args, **kwargs):
    lengths.append(kwargs["length"])
    return chunk(*args, **kwargs)

  monkeypatch.setattr(programs, "run_chunk", counted)
  f, g, p0 = _fast_problem()
  tx = _fast_free(f, g)
  quiet, _, _ = jbl.run(tx, p0, num_steps=2500, progress=False)
  assert lengths == [2500]
  lengths.clear()
  shown, _, _ = jbl.run(tx, p0, num_steps=2500, progress=True)
  assert lengths == [1000, 1000, 500]
  np.testing.assert_allclose(quiet.x, shown.x, rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_a_schedule_reads_the_step_count_that_run_does_not_carry(chunk_size):
  # Where every step is accepted, run sets a method's count from the number
  # of steps instead of carrying it; a gamma schedule must still see
  # 0, 1, 2, ... and a resumed run must continue from the state's count.
  f, g, p0 = _fast_problem()
  tx = jbl.pbgd_free(f, g, gamma=lambda k: 2.0 + 0.5 * k,
                     upper_optimizer=optax.adam(0.05),
                     lower_optimizer=optax.sgd(0.2))
  expected, expected_state = _optax_loop(tx, p0, 25)
  params, state, history = jbl.run(tx, p0, num_steps=25, diagnostics=True,
                                   chunk_size=chunk_size)
  np.testing.assert_allclose(params.x, expected.x, rtol=1e-5, atol=1e-7)
  assert int(state.count) == 25 == int(expected_state.count)
  np.testing.assert_allclose(history["gamma"], 2.0 + 0.5 * np.arange(25),
                             rtol=1e-6)
  # Resumed: 10 steps, then 15 more from the returned state.
  mid, mid_state, _ = jbl.run(tx, p0, num_steps=10, chunk_size=chunk_size)
  params, state, history = jbl.run(tx, mid, state=mid_state, num_steps=15,
                                   diagnostics=True, chunk_size=chunk_size)
  np.testing.assert_allclose(params.x, expected.x, rtol=1e-5, atol=1e-7)
  assert int(state.count) == 25
  np.testing.assert_allclose(history["gamma"],
                             2.0 + 0.5 * np.arange(10, 25), rtol=1e-6)
  # A sweep sets the count the same way.
  _, swept, history = jbl.sweep(
      lambda lr: jbl.pbgd_free(f, g, gamma=lambda k: 2.0 + 0.5 * k,
                               upper_optimizer=optax.adam(lr),
                               lower_optimizer=optax.sgd(0.2)),
      p0, {"lr": jnp.array([0.05, 0.05])}, num_steps=25, diagnostics=True)
  np.testing.assert_array_equal(swept.count, [25, 25])
  np.testing.assert_allclose(history["gamma"][1], 2.0 + 0.5 * np.arange(25),
                             rtol=1e-6)


@pytest.mark.slow  # run by .ci/run (step 1b)
@pytest.mark.parametrize("leaves", [2, 40])
def test_an_unchecked_run_finds_a_nan_on_either_side_of_the_leaf_limit(
    leaves):
  # Up to loop_lib.MAX_LEAVES_CHECKED_IN_PROGRAM leaves the compiled chunk
  # checks the final params and state; above, the host does. Either way a
  # NaN that reaches only the params (diagnostics off) stops the run at its
  # step, and a sweep warns about the point.
  assert (2 * 2 * leaves > loop_lib.MAX_LEAVES_CHECKED_IN_PROGRAM) == (
      leaves == 40)
  names = [f"v{i}" for i in range(leaves)]

  def f(x, y, batch):
    bad = jnp.where(batch["poison"] > 0, jnp.nan, 1.0)
    return sum((y[k] - 1.0) ** 2 + bad * x[k] ** 2 for k in names)

  g = lambda x, y, batch: sum((y[k] - x[k]) ** 2 for k in names)
  p0 = jbl.BilevelParams(x={k: jnp.asarray(0.5) for k in names},
                         y={k: jnp.asarray(0.0) for k in names})
  make = lambda lr: jbl.pbgd_free(f, g, gamma=10.0,
                                  upper_optimizer=optax.adam(lr),
                                  lower_optimizer=optax.sgd(0.1))
  poison = jnp.array([0.0, 0.0, 1.0, 0.0, 0.0])
  with pytest.warns(RuntimeWarning, match="at step 2"):
    params, _, history = jbl.run(make(0.05), p0, num_steps=5,
                                 batches={"poison": poison})
  assert len(history["step"]) == 3
  assert all(np.isfinite(float(v)) for v in jax.tree.leaves(params))
  with pytest.warns(RuntimeWarning, match="at step 2"):
    jbl.sweep(make, p0, {"lr": jnp.array([0.05, 0.1])}, num_steps=5,
              batches={"poison": poison})


def _nan_at_step(k, num_steps=12):
  """A quadratic whose batch at step ``k`` is NaN, with PBGD-Free on it."""
  f = lambda x, y, b: b["s"] * jnp.sum((y - 1.0) ** 2) + jnp.sum(x ** 2)
  g = lambda x, y, b: jnp.sum((y - x) ** 2)
  scale = np.ones(num_steps, np.float32)
  if k is not None:
    scale[k] = np.nan
  sgd = optax.sgd(0.1)
  tx = jbl.pbgd_free(f, g, gamma=5.0, upper_optimizer=sgd,
                     lower_optimizer=sgd)
  p0 = jbl.BilevelParams(jnp.ones(2), jnp.zeros(2))
  return tx, p0, {"s": jnp.asarray(scale)}


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_scan_run_guard_replays_only_when_a_step_is_not_finite(mode):
  # scan_run runs unguarded and replays with the per-step guard only when
  # the result is not finite: the same results as jbl.run's guard, under
  # jit and vmap, and the finite case is the unguarded loop.
  tx, p0, batches = _nan_at_step(5)
  got, state, hist = jax.jit(lambda b: jbl.scan_run(
      tx, p0, num_steps=12, batches=b, on_nonfinite=mode,
      diagnostics=("f",)))(batches)
  with pytest.warns(RuntimeWarning):
    want, _, want_hist = jbl.run(tx, p0, num_steps=12, batches=batches,
                                 on_nonfinite=mode, diagnostics=("f",))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  # (run's history ends at the stop; scan_run's has every step.)
  rows = len(want_hist["finite"])
  np.testing.assert_array_equal(hist["finite"][:rows], want_hist["finite"])
  np.testing.assert_array_equal(hist["step"], np.arange(12))
  assert not hist["finite"][5] and hist["finite"][4]
  if mode == "stop":
    before, _, _ = jbl.scan_run(tx, p0, num_steps=5, batches=batches)
    jax.tree.map(np.testing.assert_array_equal, got, before)
  # Finite: the same as the unguarded loop, with every flag true.
  clean_tx, _, clean = _nan_at_step(None)
  fast, _, _ = jbl.scan_run(clean_tx, p0, num_steps=12, batches=clean,
                            on_nonfinite="ignore")
  guarded, fstate, fhist = jbl.scan_run(clean_tx, p0, num_steps=12,
                                        batches=clean, on_nonfinite=mode,
                                        diagnostics=("f",))
  jax.tree.map(np.testing.assert_array_equal, fast, guarded)
  assert bool(np.all(fhist["finite"])) and int(fstate.count) == 12
  assert float(fstate.diagnostics["f"]) == float(fhist["f"][-1])
  # Under vmap, one point with a NaN step and one without: each gets its
  # own result.
  both = jax.tree.map(lambda a, b: jnp.stack([a, b]), batches, clean)
  mapped, _, mhist = jax.jit(jax.vmap(lambda b: jbl.scan_run(
      tx, p0, num_steps=12, batches=b, on_nonfinite=mode)))(both)
  jax.tree.map(lambda m, w: np.testing.assert_array_equal(m[0], w),
               mapped, want)
  jax.tree.map(lambda m, w: np.testing.assert_array_equal(m[1], w),
               mapped, fast)
  assert not mhist["finite"][0, 5] and bool(np.all(mhist["finite"][1]))
