"""gamma="auto" (penalty continuation), gamma_check and choose_method."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbilevel as jbl
from jaxbilevel._src import continuation

# The README's quickstart: y*(x) = x, F(x) = |x - 1|^2 + 0.1 |x|^2,
# x* = 1/1.1 in every coordinate, F(x*) = 0.3/1.1.
f = lambda x, y, batch: jnp.sum((y - 1.0) ** 2) + 0.1 * jnp.sum(x ** 2)
g = lambda x, y, batch: jnp.sum((y - x) ** 2)
P0 = jbl.BilevelParams(x=jnp.zeros(3), y=jnp.zeros(3))
X_STAR = 1.0 / 1.1


def _alt(gamma):
  return jbl.alt_pbgd(f, g, gamma=gamma, upper_optimizer=optax.sgd(0.1),
                      lower_optimizer=optax.sgd(0.2), inner_steps=5)


def test_gamma_grows_on_stall_and_stops_at_max():
  settings = jbl.GammaContinuation(start=10.0, factor=2.0, max=80.0,
                                   patience=5)
  params, state, history = jbl.run(_alt(settings), P0, num_steps=400,
                                   diagnostics=("gamma",))
  gammas = history["gamma"]
  assert gammas[0] == 10.0 and gammas[-1] == 80.0
  assert set(np.unique(gammas).tolist()) == {10.0, 20.0, 40.0, 80.0}
  assert np.all(np.diff(gammas) >= 0)
  assert float(state.gamma) == 80.0
  # The end point is argmin F_80, 1 / (1.1 + 0.1 / 80) in closed form.
  np.testing.assert_allclose(params.x, 1.0 / (1.1 + 0.1 / 80.0), rtol=1e-4)


def test_auto_starts_from_the_scale_and_reaches_the_solution():
  prob = jbl.problems.random_quadratic(0)
  tx = jbl.alt_pbgd(prob.f, prob.g, gamma="auto",
                    upper_optimizer=optax.sgd(0.1),
                    lower_optimizer=optax.sgd(0.2), inner_steps=5)
  params, state, history = jbl.run(tx, prob.params0, num_steps=2000,
                                   diagnostics=("gamma",))
  nf = optax.tree_utils.tree_norm(jax.grad(prob.f, 1)(*prob.params0, None))
  ng = optax.tree_utils.tree_norm(jax.grad(prob.g, 1)(*prob.params0, None))
  start = float(np.clip(10.0 * nf / ng, 1.0, 100.0))
  np.testing.assert_allclose(history["gamma"][0], start, rtol=1e-12)
  np.testing.assert_allclose(float(state.gamma_max), 100.0 * start,
                             rtol=1e-12)
  assert history["gamma"][-1] == pytest.approx(100.0 * start)
  coeffs = prob.info["coefficients"]
  np.testing.assert_allclose(params.x, coeffs.argmin_f_gamma(
      float(state.gamma)), atol=1e-5)
  np.testing.assert_allclose(params.x, coeffs.x_star(), atol=2e-3)


def test_fixed_gamma_path_is_unchanged():
  tx = _alt(1000.0)
  assert not isinstance(tx.init(P0), jbl.ContinuationState)
  params, _, _ = jbl.run(tx, P0, num_steps=500)
  # ALT-PBGD's fixed point at gamma = 1000 (argmin of F_gamma).
  np.testing.assert_allclose(params.x, 1.0 / (1.1 + 0.1 / 1000.0), rtol=1e-6)
  # A continuation that never grows takes the fixed-gamma steps (up to the
  # rounding of a differently fused program).
  frozen = jbl.GammaContinuation(start=1000.0, patience=10 ** 6)
  frozen_params, _, _ = jbl.run(_alt(frozen), P0, num_steps=500)
  np.testing.assert_allclose(frozen_params.x, params.x, rtol=1e-13)
  np.testing.assert_allclose(frozen_params.y, params.y, rtol=1e-13)


def test_plain_scan_without_diagnostics():
  tx = _alt("auto")

  @jax.jit
  def go(params):
    def body(carry, _):
      params, state = carry
      updates, state = tx.update(None, state, params)
      return (optax.apply_updates(params, updates), state), state.gamma
    return jax.lax.scan(body, (params, tx.init(params)), length=500)

  (params, state), gammas = go(P0)
  assert gammas[0] == 100.0  # grad_y g = 0 at the start: the top of [1, 100]
  assert gammas[-1] > gammas[0] and float(state.gamma) <= 1e4
  np.testing.assert_allclose(params.x, X_STAR, atol=1e-3)


def test_no_recompilation_over_settings_under_jit_vmap():
  traces = []

  @jax.jit
  @jax.vmap
  def sweep(factor, top):
    traces.append(1)
    tx = _alt(jbl.GammaContinuation(start=10.0, factor=factor, max=top,
                                    patience=5))
    _, state, _ = jbl.scan_run(tx, P0, num_steps=300)
    return state.gamma

  first = sweep(jnp.array([2.0, 4.0]), jnp.array([40.0, 160.0]))
  second = sweep(jnp.array([3.0, 2.0]), jnp.array([90.0, 20.0]))
  assert len(traces) == 1
  np.testing.assert_allclose(first, [40.0, 160.0])
  np.testing.assert_allclose(second, [90.0, 20.0])


def test_sweep_over_continuation_settings():
  def make_tx(factor, top):
    return _alt(jbl.GammaContinuation(start=10.0, factor=factor, max=top,
                                      patience=5))

  grid = jbl.product_grid(factor=[2.0, 4.0], top=[40.0, 160.0])
  params, state, history = jbl.sweep(make_tx, P0, grid, num_steps=400,
                                     diagnostics=("gamma",))
  np.testing.assert_allclose(state.gamma, grid["top"])
  np.testing.assert_allclose(history["gamma"][:, -1], grid["top"])
  np.testing.assert_allclose(params.x[:, 0], 1.0 / (1.1 + 0.1 / grid["top"]),
                             rtol=1e-4)


def test_run_reuses_its_program_across_settings():
  tx1 = _alt(jbl.GammaContinuation(start=10.0, max=40.0, patience=5))
  tx2 = _alt(jbl.GammaContinuation(start=20.0, max=80.0, patience=5))
  _, s1, _ = jbl.run(tx1, P0, num_steps=200)
  _, s2, _ = jbl.run(tx2, P0, num_steps=200)
  assert (float(s1.gamma), float(s2.gamma)) == (40.0, 80.0)


@pytest.mark.parametrize("method", ["pbgd_free", "v_pbgd", "f2sa"])
def test_other_penalty_methods_accept_auto(method):
  prob = jbl.problems.dpo_sft_toy(jnp.float32)
  # (F2SA's lower step is divided by 1 + gamma: a larger one.)
  kwargs = dict(upper_optimizer=optax.sgd(1e-2), lower_optimizer=optax.sgd(
      0.2 if method == "f2sa" else 1e-2))
  if method == "v_pbgd":
    kwargs["normalize"] = True
  settings = jbl.GammaContinuation(start=4.0, max=32.0, patience=5)
  tx = getattr(jbl, method)(prob.f, prob.g, gamma=settings, **kwargs)
  _, state, history = jbl.run(tx, prob.params0, num_steps=300,
                              diagnostics=("gamma",))
  assert history["gamma"][0] == 4.0 and history["gamma"][-1] == 32.0
  if method == "f2sa":  # the multiplier follows the continuation
    assert float(state.inner_state.gamma) == 32.0


@pytest.mark.parametrize("method", ["pbgd_blocc", "pbgd_free_cc"])
def test_coupled_constraint_methods_accept_auto(method):
  prob = jbl.problems.blocc_toy(1, jnp.float64)
  settings = jbl.GammaContinuation(start=5.0, max=20.0, patience=5)
  tx = getattr(jbl, method)(
      prob.f, prob.g, prob.info["c"], gamma=settings,
      upper_optimizer=optax.sgd(0.01), lower_optimizer=optax.sgd(0.1),
      dual_step_size=0.1, dual_steps=20, primal_steps=1,
      proj_x=jbl.projections.box(0.0, 3.0))
  params, state, history = jbl.run(tx, prob.params0, num_steps=300,
                                   diagnostics=("gamma",))
  assert history["gamma"][0] == 5.0 and history["gamma"][-1] == 20.0
  assert float(state.gamma) == 20.0 and np.isfinite(float(params.x))


def test_bad_settings_are_named():
  with pytest.raises(jbl.BilevelValidationError, match="factor must be > 1"):
    _alt(jbl.GammaContinuation(factor=1.0))
  with pytest.raises(jbl.BilevelValidationError, match="below start"):
    _alt(jbl.GammaContinuation(start=10.0, max=5.0))
  with pytest.raises(jbl.BilevelValidationError, match="gamma_increment"):
    jbl.f2sa(f, g, gamma="auto", upper_optimizer=optax.sgd(0.1),
             lower_optimizer=optax.sgd(0.1), gamma_increment=1.0)


def _check():
  return jbl.gamma_check(f, g, y_star=lambda x, batch: x)


def test_gamma_check_warns_when_gamma_is_too_small():
  params, state, _ = jbl.run(_alt(2.0), P0, num_steps=500)
  numbers = _check()(params, state)
  # ALT-PBGD at gamma = 2: x = 1/(1.1 + 0.05), y = (1/2 + x)/(3/2).
  x = 1.0 / 1.15
  y = (0.5 + x) / 1.5
  np.testing.assert_allclose(numbers["f_at_lower_solution"],
                             3 * (x - 1) ** 2 + 0.3 * x ** 2, rtol=1e-4)
  np.testing.assert_allclose(numbers["f_at_iterate"],
                             3 * (y - 1) ** 2 + 0.3 * x ** 2, rtol=1e-4)
  assert bool(numbers["too_small"])
  with pytest.warns(jbl.PenaltyGapWarning,
                    match=r"too small.*raise gamma.*'auto'"):
    jbl.run(_alt(2.0), P0, num_steps=500, check_gamma=_check())


def test_gamma_check_is_silent_at_a_good_gamma():
  with warnings.catch_warnings():
    warnings.simplefilter("error", jbl.PenaltyGapWarning)
    _, state, _ = jbl.run(_alt(1000.0), P0, num_steps=500,
                          check_gamma=_check())
    _, _, history = jbl.run(_alt("auto"), P0, num_steps=500,
                            record=_check(), record_every=100,
                            check_gamma=_check())
  assert history["record"]["disagreement"].shape == (5,)


def test_gamma_check_reports_the_first_recorded_row():
  with pytest.warns(jbl.PenaltyGapWarning, match="recorded row 0"):
    jbl.run(_alt(2.0), P0, num_steps=500, record=_check(), record_every=100,
            check_gamma=_check())


def test_choose_method_flat_problem_picks_pbgd_free():
  prob = jbl.problems.dpo_sft_toy(jnp.float64)
  choice = jbl.choose_method(prob.f, prob.g, prob.params0,
                             upper_optimizer=optax.sgd(1e-2),
                             lower_optimizer=optax.sgd(1e-2))
  assert choice.method == "pbgd_free" and choice.build is jbl.pbgd_free
  assert choice.flat and choice.bias_ratio < 0.1
  assert choice.probe_steps == 1000 and choice.seconds > 0


@pytest.mark.parametrize("name", ["negative_example", "quadratic_a8"])
def test_choose_method_non_flat_problem_picks_alt_pbgd(name):
  prob = getattr(jbl.problems, name)(jnp.float64)
  lr = 1e-2 if name == "negative_example" else 0.1
  choice = jbl.choose_method(prob.f, prob.g, prob.params0,
                             upper_optimizer=optax.sgd(lr),
                             lower_optimizer=optax.sgd(lr))
  assert choice.method == "alt_pbgd" and choice.build is jbl.alt_pbgd
  assert choice.bias_ratio > 0.5


def test_choose_method_never_picks_pbgd_free_when_f_ignores_x():
  prob = jbl.problems.ridge()
  choice = jbl.choose_method(prob.f, prob.g, prob.params0,
                             upper_optimizer=optax.sgd(0.1),
                             lower_optimizer=optax.sgd(0.1))
  assert choice.method == "alt_pbgd" and not choice.f_depends_on_x
  assert choice.probe_steps == 0 and "does not depend on x" in choice.reason


def test_is_continuation():
  assert continuation.is_continuation("auto")
  assert continuation.is_continuation(jbl.GammaContinuation())
  assert not continuation.is_continuation(10.0)
  assert not continuation.is_continuation(jnp.asarray(10.0))
