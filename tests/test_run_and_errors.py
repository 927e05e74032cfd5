"""The run driver (chunks, batches, resume, non-finite handling) and clear errors."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbilevel as jbl
from jaxbilevel import problems


def _dpo(dtype=jnp.float64):
  return problems.dpo_sft_toy(dtype)


def _free(prob, **kw):
  kw.setdefault("gamma", 16.0)
  return jbl.pbgd_free(prob.f, prob.g, upper_optimizer=optax.sgd(1e-2),
                       lower_optimizer=optax.sgd(1e-2), inner_steps=2, **kw)


# ---------------------------------------------------------------------------
# run / scan_run
# ---------------------------------------------------------------------------


def test_run_equals_manual_loop_and_scan_run():
  prob = _dpo()
  tx = _free(prob)
  params, state = prob.params0, tx.init(prob.params0)
  update = jax.jit(tx.update)
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


def test_progress_bar_written_to_stderr_when_asked(capsys):
  prob = _dpo()
  jbl.run(_free(prob), prob.params0, num_steps=20, chunk_size=5,
          progress=True, diagnostics=True)
  err = capsys.readouterr().err
  assert "20/20" in err and "it/s" in err and "f=" in err
  jbl.run(_free(prob), prob.params0, num_steps=20, chunk_size=5)
  assert capsys.readouterr().err == ""  # not a terminal: no bar by default


def _compiled_programs():
  from jaxbilevel._src import run as run_lib  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=protected-access
  return [fn._cache_size() for fn in run_lib._PROGRAMS._entries.values()]


def test_run_does_not_recompile_across_calls():
  prob = _dpo()
  tx = _free(prob)
  jbl.run(tx, prob.params0, num_steps=10, chunk_size=10)
  before = _compiled_programs()
  jbl.run(tx, jbl.BilevelParams(jnp.asarray(1.0), jnp.asarray(2.0)),
          num_steps=30, chunk_size=10)
  assert _compiled_programs() == before


def test_new_transformations_with_other_hyperparameters_reuse_the_program():
  # A Python loop that rebuilds the method for each gamma compiles once, and
  # the runs agree with runs whose gamma was compiled in.
  prob = _dpo()
  from jaxbilevel._src import run as run_lib  # pylint: disable=import-outside-toplevel
  run_lib._PROGRAMS.clear()  # pylint: disable=protected-access
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


def test_program_cache_is_bounded():
  from jaxbilevel._src import programs  # pylint: disable=import-outside-toplevel
  from jaxbilevel._src import run as run_lib  # pylint: disable=import-outside-toplevel
  prob = _dpo()
  for i in range(programs.MAX_PROGRAMS + 3):
    # A new objective each time: a different program.
    f = (lambda k: lambda x, y, batch: prob.f(x, y, batch) + 0.0 * k)(i)
    tx = jbl.pbgd_free(f, prob.g, gamma=4.0, upper_optimizer=optax.sgd(1e-2),
                       lower_optimizer=optax.sgd(1e-2))
    jbl.run(tx, prob.params0, num_steps=2)
  assert len(run_lib._PROGRAMS) == programs.MAX_PROGRAMS  # pylint: disable=protected-access


# ---------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------


def _q():
  return jbl.BilevelParams(jnp.zeros(2), jnp.zeros(3))


def _fq(x, y, batch):
  return jnp.sum(x ** 2) + jnp.sum(y)


def _gq(x, y, batch):
  return jnp.sum((y - jnp.sum(x)) ** 2)


@pytest.mark.parametrize("method", [jbl.pbgd_free, jbl.alt_pbgd, jbl.v_pbgd])
def test_non_scalar_objective_is_rejected_at_trace_time(method):
  tx = method(lambda x, y, b: x * 2.0 + jnp.sum(y), _gq, gamma=2.0,
              upper_optimizer=optax.sgd(0.1), lower_optimizer=optax.sgd(0.1))
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"objective f\(x, y, batch\) must return a scalar.*"
                     r"shape \(2,\)"):
    jax.jit(tx.update)(None, tx.init(_q()), _q())
  tx = method(_fq, lambda x, y, b: y, gamma=2.0,
              upper_optimizer=optax.sgd(0.1), lower_optimizer=optax.sgd(0.1))
  with pytest.raises(jbl.BilevelValidationError, match=r"objective g.*\(3,\)"):
    tx.update(None, tx.init(_q()), _q())


@pytest.mark.parametrize("method", [jbl.pbgd_free, jbl.alt_pbgd])
@pytest.mark.parametrize("gamma", [0.0, -1.0, np.float32(-3.0),
                                   jnp.asarray(0.0)])
def test_nonpositive_gamma_is_rejected(method, gamma):
  with pytest.raises(jbl.BilevelValidationError, match="gamma must be > 0"):
    method(_fq, _gq, gamma=gamma, upper_optimizer=optax.sgd(0.1),
           lower_optimizer=optax.sgd(0.1))


def test_other_bad_hyperparameters_are_rejected():
  kw = dict(upper_optimizer=optax.sgd(0.1), lower_optimizer=optax.sgd(0.1))
  with pytest.raises(jbl.BilevelValidationError, match="gamma must be >= 0"):
    jbl.v_pbgd(_fq, _gq, gamma=-1.0, **kw)
  with pytest.raises(jbl.BilevelValidationError, match="gamma must be finite"):
    jbl.pbgd_free(_fq, _gq, gamma=float("inf"), **kw)
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"gamma must be a scalar.*jax.vmap"):
    jbl.pbgd_free(_fq, _gq, gamma=np.array([1.0, 2.0]), **kw)
  with pytest.raises(jbl.BilevelValidationError,
                     match="inner_steps must be >= 1, got 0"):
    jbl.pbgd_free(_fq, _gq, gamma=1.0, inner_steps=0, **kw)
  with pytest.raises(jbl.BilevelValidationError,
                     match="inner_steps must be a Python int"):
    jbl.alt_pbgd(_fq, _gq, gamma=1.0, inner_steps=2.5, **kw)
  with pytest.raises(jbl.BilevelValidationError, match="inner_start"):
    jbl.alt_pbgd(_fq, _gq, gamma=1.0, inner_start="fresh", **kw)
  with pytest.raises(jbl.BilevelValidationError, match="proj_x must be"):
    jbl.pbgd_free(_fq, _gq, gamma=1.0, proj_x="box", **kw)
  with pytest.raises(jbl.BilevelValidationError, match="f must be a callable"):
    jbl.pbgd_free(None, _gq, gamma=1.0, **kw)


@pytest.mark.parametrize("method", [jbl.pbgd_free, jbl.alt_pbgd, jbl.v_pbgd])
def test_structure_mismatch_between_params_and_updates(method):
  tx = method(_fq, _gq, gamma=2.0, upper_optimizer=optax.sgd(0.1),
              lower_optimizer=optax.sgd(0.1))
  state = tx.init(_q())
  bad = jbl.BilevelParams({"a": jnp.zeros(2)}, jnp.zeros(3))
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"structure of updates.x does not match params.x"):
    tx.update(bad, state, _q())
  bad = jbl.BilevelParams(jnp.zeros(2), jnp.zeros(4))
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"updates.y has a leaf of shape \(4,\)"):
    tx.update(bad, state, _q())
  with pytest.raises(jbl.BilevelValidationError,
                     match="params must be a jaxbilevel.BilevelParams"):
    tx.update(None, state, (jnp.zeros(2), jnp.zeros(3)))
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"params.x has dtype int"):
    tx.init(jbl.BilevelParams(jnp.zeros(2, jnp.int32), jnp.zeros(3)))


@pytest.mark.parametrize("method", [jbl.alt_pbgd, jbl.v_pbgd])
def test_params_inconsistent_with_state_are_rejected(method):
  tx = method(_fq, _gq, gamma=2.0, upper_optimizer=optax.sgd(0.1),
              lower_optimizer=optax.sgd(0.1))
  state = tx.init(_q())
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"state\.y_g has a leaf of shape \(3,\)"):
    tx.update(None, state, jbl.BilevelParams(jnp.zeros(2), jnp.zeros(5)))


def test_pbgd_free_refuses_an_upper_objective_that_ignores_x():
  # Hyper-cleaning / regularization selection: x enters only through g.
  def f(x, y, batch):
    return jnp.sum((y - 1.0) ** 2)

  def g(x, y, batch):
    return jnp.sum(jnp.exp(x) * y ** 2) + jnp.sum((y - 2.0) ** 2)

  tx = jbl.pbgd_free(f, g, gamma=10.0, upper_optimizer=optax.sgd(0.1),
                     lower_optimizer=optax.sgd(0.1))
  params = jbl.BilevelParams(jnp.zeros(3), jnp.zeros(3))
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"does not depend on x.*identically zero.*"
                     r"jaxbilevel\.alt_pbgd"):
    jax.jit(tx.update)(None, tx.init(params), params)
  # ALT-PBGD handles the same problem and moves x.
  tx = jbl.alt_pbgd(f, g, gamma=10.0, upper_optimizer=optax.sgd(0.1),
                    lower_optimizer=optax.sgd(0.1), inner_steps=5)
  new, _, _ = jbl.run(tx, params, num_steps=20)
  assert float(jnp.linalg.norm(new.x)) > 1e-3


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


def test_objective_builders_are_pure_and_differentiable():
  prob = problems.negative_example(jnp.float64)
  lower = jbl.objectives.lower_penalized(prob.f, prob.g)
  gap = jbl.objectives.value_gap_penalty(prob.f, prob.g)
  gnp = jbl.objectives.grad_norm_penalty(prob.f, prob.g)
  x, gamma = 1.0, 15.0
  y_g = prob.info["y_g"](x)
  y_gam = prob.info["y_gamma"](x, gamma)
  # y_gamma* minimises f / gamma + g.
  assert abs(float(jax.grad(lower, argnums=1)(x, y_gam, gamma))) < 1e-12
  # The reduced-penalty gradient at the exact trackers is 2x + 10 (A1 in
  # docs/problems.md).
  np.testing.assert_allclose(jax.grad(gap)(x, y_gam, y_g, gamma), 12.0,
                             atol=1e-12)
  # vmap over gamma: gradient of F_gamma is 2x + 10 for every gamma.
  gammas = jnp.asarray([2.0, 15.0, 100.0])
  grads = jax.vmap(lambda gm: jax.grad(gap)(x, prob.info["y_gamma"](x, gm),
                                            y_g, gm))(gammas)
  np.testing.assert_allclose(grads, 12.0, atol=1e-10)
  # grad-norm penalty: f + gamma * (2 (y - x + 1))^2 and its y-derivative.
  np.testing.assert_allclose(gnp(1.0, 0.5, 2.0), 1.0 + 5.0 + 2.0 * 1.0,
                             atol=1e-12)
  eps = 1e-6
  fd = (gnp(1.0, 0.5 + eps, 2.0) - gnp(1.0, 0.5 - eps, 2.0)) / (2 * eps)
  np.testing.assert_allclose(jax.grad(gnp, argnums=1)(1.0, 0.5, 2.0), fd,
                             rtol=1e-7)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.jit(gap)(x, y_gam, y_g, gamma)
