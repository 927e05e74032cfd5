"""jaxbilevel.sweep: a grid of hyperparameters in one compiled program."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _helpers import quadratic_free as _quadratic_free
from _helpers import separable_quadratic as _quadratic
import jaxbilevel as jbl


def _f(x, y, batch):
  del batch
  return (y - 1.0) ** 2 + x ** 2


def _g(x, y, batch):
  del batch
  return (y - x) ** 2


def _make_alt(gamma, lr):
  """ALT-PBGD with a swept penalty and upper learning rate."""
  return jbl.alt_pbgd(_f, _g, gamma=gamma, upper_optimizer=optax.sgd(lr),
                      lower_optimizer=optax.sgd(0.2), inner_steps=5)


_P0 = jbl.BilevelParams(x=jnp.asarray(0.0, jnp.float32),
                        y=jnp.asarray(0.0, jnp.float32))


class _CompileCounter:
  """Counts XLA backend compilations (the jax.monitoring event)."""

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1


_COUNTER = _CompileCounter()


def test_product_grid_order_and_errors():
  grid = jbl.product_grid(a=[1.0, 2.0], b=[10, 20, 30])
  np.testing.assert_array_equal(grid["a"], [1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(grid["b"], [10, 20, 30, 10, 20, 30])
  with pytest.raises(jbl.BilevelValidationError, match="non-empty 1-D"):
    jbl.product_grid(a=[])
  with pytest.raises(jbl.BilevelValidationError, match="at least one axis"):
    jbl.product_grid()


def test_sweep_reaches_closed_form_argmin_for_every_point():
  # F_gamma(x) = x^2 + gamma/(1+gamma) (x-1)^2: argmin = gamma / (2 gamma + 1).
  gammas = np.array([1.0, 4.0, 10.0, 100.0])
  grid = jbl.product_grid(gamma=gammas, lr=[0.1, 0.2])
  params, state, history = jbl.sweep(_make_alt, _P0, grid, num_steps=300,
                                     diagnostics=True)
  np.testing.assert_allclose(params.x, grid["gamma"] / (2 * grid["gamma"] + 1),
                             atol=2e-6)
  assert params.x.dtype == jnp.float32 and params.y.dtype == jnp.float32
  assert history["f"].shape == (8, 300)
  np.testing.assert_array_equal(state.count, np.full(8, 300))
  np.testing.assert_allclose(history["gamma"][:, 0], grid["gamma"])


def test_sweep_equals_separate_runs():
  grid = {"gamma": jnp.array([3.0, 30.0, 7.0]), "lr": jnp.array([0.05, 0.1,
                                                                 0.3])}
  params, _, history = jbl.sweep(_make_alt, _P0, grid, num_steps=50,
                                 diagnostics=True)
  for i in range(3):
    tx = _make_alt(float(grid["gamma"][i]), float(grid["lr"][i]))
    p_i, _, h_i = jbl.run(tx, _P0, num_steps=50, diagnostics=True)
    # vmapped and single runs may round float32 differently.
    np.testing.assert_allclose(params.x[i], p_i.x, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(params.y[i], p_i.y, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(history["f"][i], h_i["f"], rtol=1e-5,
                               atol=1e-7)


def test_new_grid_values_do_not_recompile():
  grid = jbl.product_grid(gamma=[2.0, 20.0], lr=[0.1, 0.2])
  first, _, _ = jbl.sweep(_make_alt, _P0, grid, num_steps=40)
  before = _COUNTER.count
  other = jbl.product_grid(gamma=[5.0, 50.0], lr=[0.15, 0.25])
  second, _, _ = jbl.sweep(_make_alt, _P0, other, num_steps=40)
  assert _COUNTER.count == before  # new values, same program
  assert not np.allclose(first.x, second.x)
  np.testing.assert_allclose(
      second.x[-1], jbl.run(_make_alt(50.0, 0.25), _P0, num_steps=40)[0].x,
      rtol=2e-5)
  # Another number of points is another program.
  jbl.sweep(_make_alt, _P0, {"gamma": jnp.ones(3), "lr": jnp.ones(3) / 10},
            num_steps=40)
  assert _COUNTER.count > before


def test_inject_hyperparams_optimizer_and_schedule_in_a_sweep():
  """Each level's optimizer is any optax chain; its values can be swept."""

  def make_tx(lr, decay):
    # optax.linear_schedule takes traced values (exponential_decay checks its
    # decay_rate in Python, so it cannot be swept this way).
    upper = optax.chain(
        optax.clip_by_global_norm(10.0),
        optax.inject_hyperparams(optax.sgd)(
            learning_rate=optax.linear_schedule(lr, lr * decay, 100)))
    return jbl.pbgd_free(_f, _g, gamma=10.0, upper_optimizer=upper,
                         lower_optimizer=optax.sgd(0.3), inner_steps=3)

  grid = {"lr": jnp.array([0.1, 0.2]), "decay": jnp.array([0.5, 0.9])}
  params, state, _ = jbl.sweep(make_tx, _P0, grid, num_steps=60)
  # The injected learning rate of the 60th step (count 59) is
  # lr + (lr * decay - lr) * 59 / 100.
  lr_now = state.upper_state[1].hyperparams["learning_rate"]
  np.testing.assert_allclose(
      lr_now, grid["lr"] * (1 - (1 - grid["decay"]) * 0.59), rtol=1e-6)
  for i in range(2):
    p_i, _, _ = jbl.run(make_tx(float(grid["lr"][i]),
                                float(grid["decay"][i])), _P0, num_steps=60)
    np.testing.assert_allclose(params.x[i], p_i.x, rtol=2e-5)


def test_params_per_point_and_shared_batches():
  def f(x, y, batch):
    return jnp.mean((y - batch["t"]) ** 2) + jnp.sum(x ** 2)

  def g(x, y, batch):
    del batch
    return jnp.sum((y - x) ** 2)

  def make_tx(gamma, seed):
    del seed
    return jbl.pbgd_free(f, g, gamma=gamma, upper_optimizer=optax.sgd(0.1),
                         lower_optimizer=optax.sgd(0.2))

  def init(point):
    x0 = jax.random.normal(jax.random.key(point["seed"]), (2,), jnp.float32)
    return jbl.BilevelParams(x=x0, y=jnp.zeros(2, jnp.float32))

  batches = {"t": jnp.linspace(0.0, 1.0, 20 * 2, dtype=jnp.float32).reshape(
      20, 2)}
  grid = {"gamma": jnp.array([5.0, 5.0]), "seed": jnp.array([0, 1])}
  params, _, _ = jbl.sweep(make_tx, init, grid, num_steps=20,
                           batches=batches)
  for i in range(2):
    point = {k: v[i] for k, v in grid.items()}
    p_i, _, _ = jbl.run(make_tx(5.0, None), init(point), num_steps=20,
                        batches=batches)
    np.testing.assert_allclose(params.x[i], p_i.x, rtol=2e-5, atol=1e-7)
  assert not np.allclose(params.x[0], params.x[1])  # different inits


def test_nonfinite_point_is_reported_and_others_unaffected():
  grid = {"gamma": jnp.array([10.0, 10.0]), "lr": jnp.array([0.1, 1e30])}
  with pytest.warns(RuntimeWarning, match=r"1 of 2 grid points.*point 1"):
    params, _, history = jbl.sweep(_make_alt, _P0, grid, num_steps=100)
  assert history["finite"][0].all() and not history["finite"][1].all()
  np.testing.assert_allclose(params.x[0], 10.0 / 21.0, atol=1e-5)
  assert np.isfinite(params.x[1])  # "stop": the last finite iterate


def test_sweep_without_failures_runs_unguarded_and_freezes_failed_points():
  f, g, p0 = _quadratic(3)
  make_tx = lambda lr: _quadratic_free(f, g, lr=lr)
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


SWEEP_ERRORS = [
    (dict(grid={}), "grid must be a non-empty dict"),
    (dict(grid=[1.0]), "grid must be a non-empty dict"),
    (dict(grid={"gamma": 1.0, "lr": 0.1}), r"grid\['gamma'\] must be a 1-D"),
    (dict(grid={"gamma": [1.0, 2.0], "lr": [0.1]}),
     "same number of points"),
    (dict(grid={"gamma": [1.0], "step": [0.1]}),
     r"cannot be called as make_tx\(\*\*point\)"),
    (dict(grid={"gamma": ["a"], "lr": [0.1]}), "must hold numbers"),
    (dict(make_tx=3), "make_tx must be a callable"),
    (dict(make_tx=lambda gamma, lr: "not a transformation"),
     "must return an optax gradient transformation"),
    (dict(params=(1.0, 2.0)), "params must be a jaxbilevel.BilevelParams"),
    (dict(num_steps=0), "num_steps must be >= 1"),
    (dict(on_nonfinite="raise"), "cannot raise from inside"),
    (dict(batches={"a": jnp.ones(3)}), "leading axis of length >= num_steps"),
    (dict(mesh="cpu"), "mesh must be a jax.sharding.Mesh"),
]


@pytest.mark.parametrize("overrides,message", SWEEP_ERRORS)
def test_sweep_validation(overrides, message):
  args = dict(make_tx=_make_alt, params=_P0,
              grid={"gamma": [1.0], "lr": [0.1]}, num_steps=5)
  args.update(overrides)
  with pytest.raises(jbl.BilevelValidationError, match=message):
    jbl.sweep(args.pop("make_tx"), args.pop("params"), args.pop("grid"),
              **args)
