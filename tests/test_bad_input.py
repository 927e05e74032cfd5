"""Bad input is rejected with a clear message by every public method.

One table of bad inputs, run against every method constructor: the shared
checks in ``jaxbilevel/_src/base.py`` and ``inner.projected_step`` must give
each method the same message naming the argument. Errors are raised when the
method is built or when its update is traced (``jax.eval_shape``), so nothing
is run. The last tests check invalid *traced* values (a sweep), which cannot
be rejected when the method is built and must surface as a NaN the run names.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbilevel as jbl
from jaxbilevel import hypergradient

# ---------------------------------------------------------------------------
# A tiny problem and every method built on it.
# ---------------------------------------------------------------------------


def _f(x, y, batch):
  del batch
  return jnp.sum(x ** 2) + jnp.sum((y - 1.0) ** 2)


def _g(x, y, batch):
  del batch
  return jnp.sum((y - x) ** 2)


def _c(x, y, batch=None):
  """One coupled constraint sum(y) - 1 - 0.1 sum(x) <= 0."""
  del batch
  return jnp.stack([jnp.sum(y) - 1.0 - 0.1 * jnp.sum(x)])


_P = jbl.BilevelParams(jnp.ones(2), jnp.ones(2))
_SGD = optax.sgd(0.1)
_KEY = jax.random.PRNGKey(0)

# name -> (builder(f, g, **overrides) -> tx, the name of its float
# hyperparameter and a valid value, or None when it has none). f2sa's lambda0
# cannot be a schedule; its lambda_increment is the one that is scheduled.
METHODS = {
    "pbgd_free": (lambda f, g, **kw: jbl.pbgd_free(
        f, g, **{"gamma": 2.0, **kw}), ("gamma", 2.0)),
    "alt_pbgd": (lambda f, g, **kw: jbl.alt_pbgd(
        f, g, **{"gamma": 2.0, "inner_steps": 2, **kw}), ("gamma", 2.0)),
    "v_pbgd": (lambda f, g, **kw: jbl.v_pbgd(
        f, g, **{"gamma": 2.0, **kw}), ("gamma", 2.0)),
    "bome": (lambda f, g, **kw: jbl.bome(
        f, g, **{"eta": 0.5, "value_steps": 2, **kw}), ("eta", 0.5)),
    "f2sa": (lambda f, g, **kw: jbl.f2sa(
        f, g, **{"lambda0": 2.0, "inner_steps": 2, **kw}), ("lambda0", 2.0)),
    "alright": (lambda f, g, **kw: jbl.alright(
        f, g, **{"probability": 0.5, "key": _KEY, **kw}),
                ("probability", 0.5)),
    "aid": (lambda f, g, **kw: jbl.aid(
        f, g, **{"inner_steps": 2, "linear_steps": 2, **kw}), ("tol", 1e-8)),
    "itd": (lambda f, g, **kw: jbl.itd(
        f, g, **{"inner_steps": 2, **kw}), None),
    "fo_blo": (lambda f, g, **kw: jbl.fo_blo(
        f, g, **{"inner_steps": 2, **kw}), None),
    "ufo_blo": (lambda f, g, **kw: jbl.ufo_blo(
        f, g, **{"inner_steps": 2, "key": _KEY, "correction_probability": 0.5,
                 **kw}), ("correction_probability", 0.5)),
    "pbgd_blocc": (lambda f, g, **kw: jbl.pbgd_blocc(
        f, g, _c, **{"gamma": 2.0, "dual_step_size": 0.1, "dual_steps": 2,
                     "primal_steps": 2, **kw}), ("gamma", 2.0)),
    "pbgd_free_cc": (lambda f, g, **kw: jbl.pbgd_free_cc(
        f, g, _c, **{"gamma": 2.0, "dual_step_size": 0.1, "dual_steps": 2,
                     "primal_steps": 2, **kw}), ("gamma", 2.0)),
}


def test_the_table_covers_every_public_method():
  # A method added to jaxbilevel must be added here too.
  public = {"pbgd_free", "alt_pbgd", "v_pbgd", "bome", "f2sa", "alright",
            "aid", "itd", "fo_blo", "ufo_blo", "pbgd_blocc", "pbgd_free_cc"}
  assert set(METHODS) == public
  assert all(callable(getattr(jbl, name)) for name in public)


def _build(method, f=_f, g=_g, **overrides):
  builder, _ = METHODS[method]
  kw = {"upper_optimizer": _SGD, "lower_optimizer": _SGD, **overrides}
  return builder(f, g, **kw)


def _trace_update(tx, params=_P, updates=None):
  """Traces ``init`` and one ``update`` on abstract values (nothing runs)."""
  def step(p):
    return tx.update(updates, tx.init(p), p)
  return jax.eval_shape(step, params)


def _good_case(method):
  """The valid call every bad input is a variation of."""
  return _trace_update(_build(method))


# ---------------------------------------------------------------------------
# The table: (id, call(method), message). Each call changes one argument.
# ---------------------------------------------------------------------------

def _objective(returns):
  return lambda x, y, batch: returns(x, y)


BAD_INPUTS = [
    ("f non-scalar", lambda m: _trace_update(_build(
        m, f=_objective(lambda x, y: x * y))),
     r"objective f\(x, y, batch\) must return a scalar, but it returned an "
     r"array of shape \(2,\)"),
    ("f returns None", lambda m: _trace_update(_build(
        m, f=_objective(lambda x, y: None))),
     r"objective f\(x, y, batch\) must return a scalar, but it returned "
     r"None \(is a `return` statement missing\?\)"),
    ("g returns None", lambda m: _trace_update(_build(
        m, g=_objective(lambda x, y: None))),
     r"objective g\(x, y, batch\) must return a scalar, but it returned "
     r"None"),
    ("f returns tuple", lambda m: _trace_update(_build(
        m, f=_objective(lambda x, y: (jnp.sum(x * y), x)))),
     r"objective f\(x, y, batch\) must return a scalar, but it returned a "
     r"tuple \(2 element\(s\)\)"),
    ("f returns dict", lambda m: _trace_update(_build(
        m, f=_objective(lambda x, y: {"loss": jnp.sum(x * y)}))),
     r"objective f\(x, y, batch\) must return a scalar, but it returned a "
     r"dict"),
    ("f returns str", lambda m: _trace_update(_build(
        m, f=_objective(lambda x, y: "loss"))),
     r"objective f\(x, y, batch\) must return a scalar, but it returned the "
     r"string 'loss'"),
    ("f not callable", lambda m: _build(m, f="f"),
     r"f must be a callable f\(x, y, batch\) -> scalar, got str"),
    ("int params", lambda m: _build(m).init(
        jbl.BilevelParams(jnp.ones(2, jnp.int32), jnp.ones(2))),
     r"params.x has dtype int32; bilevel variables must be floating"),
    ("string params", lambda m: _build(m).init(
        jbl.BilevelParams("float32", jnp.ones(2))),
     r"params.x is 'float32' of type str, not an array"),
    ("string params leaf", lambda m: _build(m).init(
        jbl.BilevelParams(jnp.ones(2), {"w": jnp.ones(2), "b": "0.0"})),
     r"params.y\['b'\] is '0.0' of type str, not an array"),
    ("upper_optimizer not optax", lambda m: _build(m, upper_optimizer=0.1),
     r"upper_optimizer must be an optax GradientTransformation"),
    ("lower_optimizer not optax", lambda m: _build(m, lower_optimizer="sgd"),
     r"lower_optimizer must be an optax GradientTransformation"),
    ("lbfgs", lambda m: _build(m, upper_optimizer=optax.lbfgs()),
     r"upper_optimizer needs extra arguments \(value, grad, value_fn\) that a "
     r"bilevel method does not pass"),
    ("reduce_on_plateau", lambda m: _build(m, lower_optimizer=optax.chain(
        optax.sgd(0.1), optax.contrib.reduce_on_plateau())),
     r"lower_optimizer needs extra arguments \(value\) that a bilevel method "
     r"does not pass"),
    ("string learning rate", lambda m: _build(m,
                                              upper_optimizer=optax.sgd("0.1")),
     r"upper_optimizer holds a string where optax expects a number"),
    ("string momentum", lambda m: _build(m, lower_optimizer=optax.sgd(
        0.1, momentum="0.9")),
     r"lower_optimizer holds a string where optax expects a number "
     r"\(decay='0.9'\)"),
    ("proj_y returns a scalar", lambda m: _trace_update(_build(
        m, proj_y=jnp.sum)),
     r"proj_y returned shape \(\) for a leaf of shape \(2,\)\. proj_y must "
     r"return a pytree with the structure, shapes and dtypes of its input"),
    ("proj_x returns a scalar", lambda m: _trace_update(_build(
        m, proj_x=jnp.sum)),
     r"proj_x returned shape \(\) for a leaf of shape \(2,\)"),
    ("proj_y wrong shape", lambda m: _trace_update(_build(
        m, proj_y=lambda y: jnp.concatenate([y, y]))),
     r"proj_y returned shape \(4,\) for a leaf of shape \(2,\)"),
    ("proj_y wrong dtype", lambda m: _trace_update(_build(
        m, proj_y=lambda y: y.astype(jnp.float16))),
     rf"proj_y returned dtype float16 for a leaf of dtype {_P.y.dtype}"),
    ("proj_x changes structure", lambda m: _trace_update(_build(
        m, proj_x=lambda x: {"x": x})),
     r"proj_x changed the structure of the variables"),
    ("proj_x not callable", lambda m: _build(m, proj_x="box"),
     r"proj_x must be a callable pytree -> pytree"),
    ("updates structure", lambda m: _trace_update(
        _build(m), updates=jbl.BilevelParams({"a": jnp.ones(2)},
                                             jnp.ones(2))),
     r"the structure of updates.x does not match params.x"),
]


def _hyper_cases():
  """Bad values of each method's float hyperparameter (if it has one)."""
  cases = []
  for method, (_, hyper) in sorted(METHODS.items()):
    if hyper is None:
      continue
    name, good = hyper
    scheduled = "lambda_increment" if method == "f2sa" else name
    cases += [
        pytest.param(method, (lambda m, n=name: _build(m, **{n: "10"})),
                     rf"{name} must be a number, got the string '10'\. "
                     rf"Convert it first, e\.g\. {name}=float\('10'\)",
                     id=f"{method}-string {name}"),
        pytest.param(method, (lambda m, n=name: _build(m, **{n: [good]})),
                     rf"{name} must be a number, an array or a schedule",
                     id=f"{method}-list {name}"),
        pytest.param(method, (lambda m, n=scheduled: _trace_update(_build(
            m, **{n: lambda count: "0.5"}))),
                     rf"the value of the schedule {scheduled} must be a "
                     r"number, got the string '0.5'",
                     id=f"{method}-string schedule {scheduled}"),
    ]
  return cases


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_valid_call_traces(method):
  # The bad inputs below differ from this call in one argument only.
  updates, state = _good_case(method)
  assert jax.tree.structure(updates) == jax.tree.structure(_P)
  assert all(u.shape == (2,) and u.dtype == _P.x.dtype
             for u in jax.tree.leaves(updates))
  assert set(state.diagnostics) >= set(jbl.COMMON_DIAGNOSTICS)


@pytest.mark.parametrize(
    "method,call,message",
    [pytest.param(m, c, msg, id=f"{m}-{n}")
     for m in sorted(METHODS) for n, c, msg in BAD_INPUTS] + _hyper_cases())
def test_bad_input_gets_a_clear_message_in_every_method(method, call,
                                                        message):
  with pytest.raises(jbl.BilevelValidationError, match=message):
    call(method)


# ---------------------------------------------------------------------------
# Shared pieces used outside the methods.
# ---------------------------------------------------------------------------


def test_projected_step_checks_a_raw_projection():
  opt = optax.sgd(0.5)
  y = jnp.array([1.0, -2.0])
  new, _ = jbl.projected_step(opt, y, opt.init(y), y,
                              lambda v: jnp.maximum(v, 0.0))
  np.testing.assert_array_equal(new, [0.5, 0.0])
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"the projection returned shape \(\) for a leaf of "
                           r"shape \(2,\)"):
    jbl.projected_step(opt, y, opt.init(y), y, jnp.max)


def test_projected_step_names_an_optimizer_that_fails_at_trace_time():
  # optax.partition with per-leaf labels cannot be probed on a scalar when the
  # method is built, so the failure is explained when the update is traced.
  labels = {"a": "fixed", "b": "lbfgs"}
  opt = optax.partition({"fixed": optax.set_to_zero(),
                         "lbfgs": optax.lbfgs()}, labels)
  params = jbl.BilevelParams({"a": jnp.ones(2), "b": jnp.ones(2)},
                             jnp.ones(2))
  f = lambda x, y, b: jnp.sum(x["a"] ** 2 + x["b"] ** 2) + jnp.sum(y)
  g = lambda x, y, b: jnp.sum((y - x["a"]) ** 2)
  tx = _build("pbgd_free", f=f, g=g, upper_optimizer=opt)
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"needs extra arguments \(value, grad, value_fn\)"):
    _trace_update(tx, params)


def test_f2sa_lambda_max_below_lambda0_is_rejected():
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"f2sa: lambda_max=1.0 is below lambda0=5.0"):
    _build("f2sa", lambda0=5.0, lambda_max=1.0)
  # Equal is fine: the multiplier stays at lambda0 = lambda_max.
  tx = _build("f2sa", lambda0=2.0, lambda_max=2.0, lambda_increment=1.0)
  _, state, hist = jbl.run(tx, _P, num_steps=2, diagnostics=True)
  np.testing.assert_array_equal(hist["multiplier"], [2.0, 2.0])
  assert float(state.lagrange_multiplier) == 2.0


# ---------------------------------------------------------------------------
# Invalid traced values (sweeps) surface as NaN the run names.
# ---------------------------------------------------------------------------


def test_cg_with_a_nan_tolerance_returns_nan():
  h = jnp.array([[4.0, 1.0], [1.0, 3.0]])
  b = jnp.array([1.0, 2.0])
  good = hypergradient.conjugate_gradient(lambda v: h @ v, b, num_iters=2,
                                          tol=1e-8)
  np.testing.assert_allclose(good.solution, [1 / 11, 7 / 11], rtol=1e-6)
  bad = hypergradient.conjugate_gradient(lambda v: h @ v, b, num_iters=2,
                                         tol=jnp.nan)
  assert np.isnan(bad.solution).all() and np.isnan(bad.residual_norm)


def test_aid_sweep_reports_a_traced_negative_tol():
  # g = |y - x|^2, f = |x|^2 + |y - 1|^2: phi(x) = |x|^2 + |x - 1|^2, and AID
  # with exact inner and linear solves takes x <- x - 0.1 (4x - 2).
  def make_tx(tol):
    return jbl.aid(_f, _g, upper_optimizer=optax.sgd(0.1),
                   lower_optimizer=optax.sgd(0.5), inner_steps=2,
                   linear_steps=2, tol=tol)

  with pytest.warns(RuntimeWarning,
                    match=r"1 of 2 grid points.*'tol': -1\.0"):
    params, _, hist = jbl.sweep(make_tx, _P, {"tol": [1e-8, -1.0]},
                                num_steps=3, diagnostics=True)
  # The invalid point: tol and the linear residual are NaN, x never moved.
  assert np.isnan(hist["tol"][1]).all()
  assert np.isnan(hist["linear_residual"][1][0])
  np.testing.assert_array_equal(params.x[1], _P.x)
  # The valid point is untouched: three exact steps from x = 1.
  x = 1.0
  for _ in range(3):
    x -= 0.1 * (4 * x - 2)
  np.testing.assert_allclose(params.x[0], [x, x], rtol=1e-5)
  np.testing.assert_allclose(hist["tol"][0], 1e-8, rtol=1e-6)


def test_f2sa_sweep_reports_a_traced_lambda_max_below_lambda0():
  def make_tx(lambda_max):
    return jbl.f2sa(_f, _g, lambda0=1.0, lambda_max=lambda_max,
                    lambda_increment=0.5, upper_optimizer=optax.sgd(0.1),
                    lower_optimizer=optax.sgd(0.1), inner_steps=2)

  with pytest.warns(RuntimeWarning,
                    match=r"1 of 2 grid points.*'lambda_max': 0\.5"):
    _, state, hist = jbl.sweep(make_tx, _P, {"lambda_max": [2.0, 0.5]},
                               num_steps=3, diagnostics=True)
  assert np.isnan(hist["multiplier"][1]).all()
  # The valid point ramps 1.0, 1.5, 2.0 and is then capped at 2.0.
  np.testing.assert_allclose(hist["multiplier"][0], [1.0, 1.5, 2.0])
  np.testing.assert_allclose(state.lagrange_multiplier[0], 2.0)
