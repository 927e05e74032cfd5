"""The run driver at model scale and on bad values: guard, programs, memory, messages."""

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbilevel as jbl
from jaxbilevel._src import programs
from jaxbilevel._src import run as run_lib


def _quadratic(n):
  """n leaves per level; f, g separable so the solution is known per leaf."""
  x = {f"x{i}": jnp.full((3,), 0.5 + i) for i in range(n)}
  y = {f"y{i}": jnp.zeros(3) for i in range(n)}

  def f(x, y, batch):
    return sum(jnp.sum((v - 1.0) ** 2) for v in y.values()) + sum(
        jnp.sum(v ** 2) for v in x.values())

  def g(x, y, batch):
    return sum(jnp.sum((y[f"y{i}"] - x[f"x{i}"]) ** 2) for i in range(n))

  return f, g, jbl.BilevelParams(x, y)


def _free(f, g, gamma=10.0, lr=0.1):
  return jbl.pbgd_free(f, g, gamma=gamma, upper_optimizer=optax.sgd(lr),
                       lower_optimizer=optax.sgd(0.1))


def test_unguarded_chunks_equal_the_guarded_scan():
  # run's chunks carry no per-step select; scan_run('stop') does. Same result.
  f, g, p0 = _quadratic(5)
  tx = _free(f, g)
  params, _, hist = jbl.run(tx, p0, num_steps=40, chunk_size=15,
                            diagnostics=True)
  expected, _, expected_hist = jbl.scan_run(tx, p0, num_steps=40,
                                            diagnostics=True)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  np.testing.assert_allclose(hist["f"], expected_hist["f"], rtol=1e-6)
  assert hist["finite"].all() and hist["step"].tolist() == list(range(40))


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


def test_gamma_hints():
  f, g, p0 = _quadratic(1)

  @jax.jit
  def one(gamma):
    return jbl.scan_run(_free(f, g, gamma=gamma), p0, num_steps=2,
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
  report = run_lib._nonfinite_report(  # pylint: disable=protected-access
      {"step": np.array([3]), "gamma": np.array([np.nan]),
       "finite": np.array([False])}, 0,
      jbl.bome(f, g, upper_optimizer=optax.sgd(0.1),
               lower_optimizer=optax.sgd(0.1), eta=0.5).init(p0))
  assert report[0] == 3 and "gamma" in report[1] and report[2] == ""


def test_run_inside_jit_points_to_scan_run():
  f, g, p0 = _quadratic(1)
  tx = _free(f, g)
  with pytest.raises(jbl.BilevelValidationError, match=r"jaxbilevel.scan_run"):
    jax.jit(lambda p: jbl.run(tx, p, num_steps=3)[0])(p0)


def test_diagnostics_are_opt_in_and_a_missing_one_says_how():
  f, g, p0 = _quadratic(2)
  _, _, hist = jbl.run(_free(f, g), p0, num_steps=4)
  assert sorted(hist) == ["finite", "state_finite", "step", "updates_finite"]
  with pytest.raises(KeyError, match=r"diagnostics=True"):
    hist["f"]  # pylint: disable=pointless-statement
  _, _, hist = jbl.run(_free(f, g), p0, num_steps=4, diagnostics=True)
  assert {"f", "g", "upper_grad_norm", "gamma"} <= set(hist)


def test_record_every_records_after_every_nth_step():
  f, g, p0 = _quadratic(1)
  tx = _free(f, g)
  record = lambda params, state: state.count
  _, _, hist = jbl.run(tx, p0, num_steps=12, record=record, record_every=4,
                       chunk_size=6)  # rounded to a multiple of 4
  assert hist["record"].tolist() == [4, 8, 12]
  _, _, hist = jbl.scan_run(tx, p0, num_steps=12, record=record,
                            record_every=3)
  assert hist["record"].tolist() == [3, 6, 9, 12]
  with pytest.raises(jbl.BilevelValidationError, match=r"multiple of"):
    jbl.run(tx, p0, num_steps=10, record=record, record_every=4)


def test_finished_runs_release_their_transformations():
  # 30 runs, each with a newly built identical method: one program, and the
  # transformations (with everything they close over) are released.
  f, g, p0 = _quadratic(2)
  run_lib._PROGRAMS.clear()  # pylint: disable=protected-access
  refs = []
  for _ in range(30):
    tx = _free(f, g)
    jbl.run(tx, p0, num_steps=3)
    refs.append(weakref.ref(tx.update))
    del tx
  gc.collect()
  assert len(run_lib._PROGRAMS) == 1  # pylint: disable=protected-access
  assert sum(r() is not None for r in refs) == 0


def test_program_keys_compare_optimizers_by_content():
  f, g, _ = _quadratic(1)
  key = lambda tx: programs.program_of(tx).key
  assert key(_free(f, g, gamma=1.0)) == key(_free(f, g, gamma=7.0))
  assert key(_free(f, g, lr=0.1)) != key(_free(f, g, lr=0.2))
  assert key(_free(f, g)) != key(_free(lambda x, y, b: f(x, y, b), g))


def test_sweep_without_failures_runs_unguarded_and_freezes_failed_points():
  f, g, p0 = _quadratic(3)
  make_tx = lambda lr: _free(f, g, lr=lr)
  params, _, hist = jbl.sweep(make_tx, p0, {"lr": jnp.array([0.1, 0.2])},
                              num_steps=30)
  assert hist["finite"].all()
  expected, _, _ = jbl.scan_run(make_tx(0.2), p0, num_steps=30)
  np.testing.assert_allclose(params.x["x1"][1], expected.x["x1"], rtol=1e-6)
  # lr = 30 diverges to inf/NaN: that point is frozen at its last finite
  # iterate, the other is untouched.
  with pytest.warns(RuntimeWarning, match=r"1 of 2 grid points"):
    params, _, hist = jbl.sweep(make_tx, p0, {"lr": jnp.array([0.1, 30.0])},
                                num_steps=200)
  assert hist["finite"][0].all() and not hist["finite"][1].all()
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(params))
  expected, _, _ = jbl.scan_run(make_tx(0.1), p0, num_steps=200)
  np.testing.assert_allclose(params.x["x2"][0], expected.x["x2"], rtol=1e-6)


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


def test_optax_projections_work_as_proj_arguments():
  # The lower level min ||y - x||^2 over the unit ball: y*(x) = x / max(1, |x|).
  f = lambda x, y, batch: jnp.sum((y - jnp.array([3.0, 4.0])) ** 2) + 0.0 * jnp.sum(x)
  g = lambda x, y, batch: jnp.sum((y - x) ** 2)
  tx = jbl.pbgd_free(
      f, g, gamma=1e6, upper_optimizer=optax.sgd(0.0),
      lower_optimizer=optax.sgd(0.25), inner_steps=50,
      proj_y=lambda y: optax.projections.projection_l2_ball(y, 1.0))
  p0 = jbl.BilevelParams(jnp.array([6.0, 8.0]), jnp.zeros(2))
  params, _, _ = jbl.run(tx, p0, num_steps=2)
  np.testing.assert_allclose(params.y, [0.6, 0.8], atol=1e-4)
  proj = jbl.projections.nonnegative()
  np.testing.assert_array_equal(proj({"a": jnp.array([-1.0, 2.0])})["a"],
                                [0.0, 2.0])


def test_committed_compile_and_memory_study_meets_its_targets(tmp_path):
  # benchmarks/results/compile_memory.json (written by
  # benchmarks/compile_memory.py): at 1,000 leaves per level jbl.run compiles
  # within 1.5x of the hand-written scan, and 100 runs in one process hold
  # resident memory within 50 MB. The table regenerates from the JSON.
  import json  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  root = pathlib.Path(__file__).resolve().parents[1]
  results = root / "benchmarks" / "results" / "compile_memory.json"
  data = json.loads(results.read_text())
  big = [r for r in data["rows"] if r["leaves_per_level"] == 1000][0]
  assert big["run_over_hand"] <= 1.5 and big["sweep_over_hand"] <= 1.5
  assert data["many_runs"]["runs"] == 100
  assert abs(data["many_runs"]["growth_mb"]) <= 50
  copy = tmp_path / "compile_memory.json"
  shutil.copy(results, copy)
  subprocess.run([sys.executable, str(root / "benchmarks" / "compile_memory.py"),
                  "--markdown", str(copy)], check=True, capture_output=True)
  assert (tmp_path / "compile_memory.md").read_text() == (
      results.with_suffix(".md").read_text())
