"""The parts that the penalty methods' steps are composed of (method_parts)."""

import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbilevel as jbl
from jaxbilevel._src import method_parts


class _State(NamedTuple):
  count: jax.Array
  upper_state: optax.OptState
  lower_state: optax.OptState
  value_state: optax.OptState
  y_g: jax.Array
  diagnostics: dict


def _f(x, y, batch):
  del batch
  return 0.5 * (y - 3.0) ** 2 + x * y


def _g(x, y, batch):
  del batch
  return (y - x) ** 2


def _start(y_g=2.0):
  params = jbl.BilevelParams(x=jnp.array(1.0), y=jnp.array(0.0))
  sgd = optax.sgd(0.25)
  state = _State(jnp.zeros([], jnp.int32), sgd.init(params.x),
                 sgd.init(params.y), optax.sgd(0.1, momentum=0.9).init(
                     params.y), jnp.array(y_g), {})
  return params, state


def test_value_tracker_warm_starts_or_restarts_from_y():
  params, state = _start(y_g=2.0)
  step = method_parts.begin(params, state, False, "demo", ())
  opt = optax.sgd(0.1, momentum=0.9)
  # Warm start: from state.y_g = 2: y - 0.1 * 2 (y - x) = 2 - 0.2 = 1.8.
  warm = method_parts.ValueTracker(_g, opt, 1, None).update(step, state, None)
  assert float(warm.iterate) == pytest.approx(1.8)
  assert set(warm.fields) == {"y_g", "value_state"} and not warm.diagnostics
  # From params.y = 0 with a fresh state: 0 - 0.1 * 2 (0 - 1) = 0.2.
  fresh = method_parts.ValueTracker(_g, opt, 1, None, start="y").update(
      step, state, None)
  assert float(fresh.iterate) == pytest.approx(0.2)
  assert float(fresh.fields["y_g"]) == pytest.approx(0.2)


def test_penalized_tracker_records_f_and_g_at_the_incoming_iterate():
  params, state = _start()
  step = method_parts.begin(params, state, True, "demo",
                            ("f", "g", "lower_grad_norm"))
  gamma = jnp.array(2.0)
  for start in ("previous", "y_g"):
    part = method_parts.PenalizedTracker(
        _f, _g, optax.sgd(0.25), 1, None, start=start).update(
            step, state, gamma, None, y_g=jnp.array(2.0))
    diag = {k: v() if callable(v) else v for k, v in part.diagnostics.items()}
    # f, g at (x, y) = (1, 0) whatever the start: f = 4.5, g = 1.
    assert float(diag["f"]) == pytest.approx(4.5)
    assert float(diag["g"]) == pytest.approx(1.0)
    # lower_grad_norm = |d/dy g| = |2 (y - x)| at (x, y) = (1, 0), whatever
    # the start.
    assert float(diag["lower_grad_norm"]) == pytest.approx(2.0)
    # The step: d/dy [f / 2 + g] = (y - 3 + x) / 2 + 2 (y - x) at the start.
    y0 = 0.0 if start == "previous" else 2.0
    grad = (y0 - 3.0 + 1.0) / 2.0 + 2.0 * (y0 - 1.0)
    assert float(part.iterate) == pytest.approx(y0 - 0.25 * grad)
    assert set(part.fields) == {"lower_state"}


def test_finish_assembles_the_state_and_refuses_a_missing_diagnostic():
  params, state = _start()
  step = method_parts.begin(params, state, ("g_gap", "lower_grad_norm"),
                            "demo", ("upper_grad_norm", "lower_grad_norm",
                                     "g_gap"))
  # A joint method's lower step records nothing (the shared lower_grad_norm
  # is |grad_y g| at the incoming point, which the method passes itself).
  upper = method_parts.ProjectedStep(optax.sgd(0.25), None).update(
      step, state, jnp.array(2.0))
  lower = method_parts.ProjectedStep(optax.sgd(0.25), None, "y").update(
      step, state, jnp.array(-4.0))
  value = method_parts.Part(jnp.array(5.0), {"y_g": jnp.array(5.0),
                                             "value_state": state.value_state},
                            {})
  assert lower.diagnostics == {}
  new_params, new_state = step.finish(_State, upper, lower, value,
                                      g_gap=jnp.array(0.5),
                                      lower_grad_norm=jnp.array(4.0))
  assert (float(new_params.x), float(new_params.y)) == (0.5, 1.0)
  assert int(new_state.count) == 1 and float(new_state.y_g) == 5.0
  assert list(new_state.diagnostics) == ["upper_grad_norm",
                                         "lower_grad_norm", "g_gap"]
  assert float(new_state.diagnostics["g_gap"]) == 0.5
  assert float(new_state.diagnostics["lower_grad_norm"]) == 4.0
  assert np.isnan(new_state.diagnostics["upper_grad_norm"])  # not recorded
  with pytest.raises(ValueError, match="g_gap"):
    step.finish(_State, upper, lower, value)


def test_gamma_auto_keeps_the_signature_and_the_iterates_of_a_fixed_gamma():
  assert "gamma" in inspect.signature(jbl.alt_pbgd).parameters
  assert inspect.signature(jbl.pbgd_blocc).parameters["dual_steps"].default == 20
  with pytest.raises(TypeError, match="alt_pbgd.*upper_optimizer"):
    jbl.alt_pbgd(_f, _g, gamma="auto", lower_optimizer=optax.sgd(0.1))
  # Continuation that never grows gamma runs the method at its start.
  settings = jbl.GammaContinuation(start=3.0, max=3.0)
  kwargs = dict(upper_optimizer=optax.sgd(0.1), lower_optimizer=optax.sgd(0.1),
                inner_steps=2)
  params = jbl.BilevelParams(x=jnp.array(1.0), y=jnp.array(0.0))
  auto, _, _ = jbl.run(jbl.alt_pbgd(_f, _g, gamma=settings, **kwargs),
                       params, num_steps=5)
  fixed, _, _ = jbl.run(jbl.alt_pbgd(_f, _g, gamma=3.0, **kwargs), params,
                        num_steps=5)
  np.testing.assert_allclose(auto.x, fixed.x, rtol=1e-6)
  np.testing.assert_allclose(auto.y, fixed.y, rtol=1e-6)


@pytest.mark.parametrize("num_steps", [1, 2, 7])
def test_inner_solve_trace_first_takes_the_same_steps(num_steps):
  # trace="first" records the first step only and leaves the rest of the
  # loop untraced (gradients only): the same iterates and optimizer state,
  # and the first step's record equal to that of trace="every".
  opt = optax.adam(0.1)

  def objective(y):
    return (jnp.sum((y - 3.0) ** 2) + jnp.sum(jnp.sin(y)),
            {"total": jnp.sum(y)})

  y0 = jnp.array([0.0, 1.0, -2.0])
  every = jbl.inner_solve(objective, y0, opt.init(y0), optimizer=opt,
                          num_steps=num_steps, has_aux=True)
  first = jbl.inner_solve(objective, y0, opt.init(y0), optimizer=opt,
                          num_steps=num_steps, has_aux=True, trace="first")
  np.testing.assert_allclose(first[0], every[0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(first[1]), jax.tree.leaves(every[1])):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert first[2].value.shape == (1,)
  assert every[2].value.shape == (num_steps,)
  for a, b in zip(jax.tree.leaves(first[2]), jax.tree.leaves(every[2])):
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
  np.testing.assert_allclose(first[2].value[0], objective(y0)[0], rtol=1e-6)


def test_inner_solve_rejects_an_unknown_trace():
  opt = optax.sgd(0.1)
  with pytest.raises(jbl.BilevelValidationError, match="trace must be"):
    jbl.inner_solve(lambda y: y ** 2, 1.0, opt.init(1.0), optimizer=opt,
                    num_steps=2, trace="last")
