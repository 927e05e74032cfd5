"""Checks shared by every method (jaxbilevel._src.base).

Arguments, objectives, params and updates are validated with a message that
names what is wrong; diagnostics are computed only when they are recorded.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _helpers import mlp_problem as _mlp
from _helpers import tx_step as _tx_step
import jaxbilevel as jbl
from jaxbilevel._src import base


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


# ---------------------------------------------------------------------------
# No work done only for the record
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["itd", "fo_blo", "aid", "alt_pbgd"])
def test_values_only_for_the_record_are_not_computed(method):
  f, g, params, data = _mlp()
  opt = lambda: optax.sgd(0.05)

  def make(g_):
    return {
        "itd": lambda: jbl.itd(f, g_, upper_optimizer=opt(),
                               lower_optimizer=opt(), inner_steps=3),
        "fo_blo": lambda: jbl.fo_blo(f, g_, upper_optimizer=opt(),
                                     lower_optimizer=opt(), inner_steps=3,
                                     inner_start=lambda x, y: y),
        "aid": lambda: jbl.aid(f, g_, upper_optimizer=opt(),
                               lower_optimizer=opt(), inner_steps=3,
                               linear_steps=3),
        "alt_pbgd": lambda: jbl.alt_pbgd(f, g_, gamma=10.0,
                                         upper_optimizer=opt(),
                                         lower_optimizer=opt(),
                                         inner_start="y_g"),
    }[method]()

  tx = make(g)
  state = tx.init(params)

  def traced_g_calls(enabled):
    calls = []

    def counting_g(x, y, batch):
      calls.append(1)
      return g(x, y, batch)

    counted = make(counting_g)
    jax.eval_shape(_tx_step(counted, diagnostics=enabled), params, state,
                   data)
    return len(calls)

  # One evaluation of g and of its gradient in y (one pass, for g and
  # lower_grad_norm at the incoming point) fewer when nothing is recorded.
  # AID's inner solve starts there: its recorded g and lower_grad_norm are
  # those of its first step, which it then takes outside the loop
  # (inner_solve(trace="first")): one more trace of g, no more evaluations.
  assert traced_g_calls(False) == traced_g_calls(True) - 1
  # Not recorded: NaN, never a value that looks computed.
  _, quiet = jax.jit(_tx_step(tx))(params, state, data)
  assert all(np.isnan(float(v)) for v in quiet.diagnostics.values())
  _, loud = jax.jit(_tx_step(tx, diagnostics=("g",)))(params, state, data)
  assert np.isfinite(float(loud.diagnostics["g"]))
  assert np.isnan(float(loud.diagnostics["f"]))


def test_diagnostics_are_chosen_by_argument_and_checked():
  assert base.recorded_names(False, ("f", "g"), "m") == frozenset()
  assert base.recorded_names(None, ("f", "g"), "m") == frozenset()
  assert base.recorded_names(True, ("f", "g"), "m") == {"f", "g"}
  assert base.recorded_names("g", ("f", "g"), "m") == {"g"}
  with pytest.raises(jbl.BilevelValidationError, match=r"\['h'\] not recorded"):
    base.recorded_names(("h",), ("f", "g"), "m")
  with pytest.raises(jbl.BilevelValidationError, match="static Python value"):
    base.recorded_names(jnp.array(True), ("f", "g"), "m")


def test_check_static_int_refuses_values_beyond_int32():
  assert base.check_static_int(2 ** 31 - 1, "num_steps") == 2 ** 31 - 1
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"num_steps must fit in int32 \(at most "
                           r"2147483647\), got 2147483648"):
    base.check_static_int(2 ** 31, "num_steps")


def test_resolve_hyperparameter_names_an_overflow_or_underflow():
  count = jnp.zeros([], jnp.int32)
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"gamma = 1e\+40 overflows to inf in float32, the "
                           r"dtype of the parameters: use a smaller value"):
    base.resolve_hyperparameter(1e40, count, jnp.float32, name="gamma")
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"^a hyperparameter = 1e-50 underflows to 0 in "
                           r"float32"):
    base.resolve_hyperparameter(1e-50, count, jnp.float32)
  # In range (and in a wider dtype) the value is returned as before.
  assert float(base.resolve_hyperparameter(1e40, count, jnp.float64,
                                           name="gamma")) == 1e40
  assert float(base.resolve_hyperparameter(2.0, count, jnp.float32,
                                           name="gamma")) == 2.0
