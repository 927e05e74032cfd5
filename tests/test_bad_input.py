"""Bad input is rejected with a clear message by every public method.

One table of bad inputs, run against every method constructor: the shared
checks in ``jaxbilevel/_src/base.py`` and ``inner.projected_step`` must give
each method the same message naming the argument. Errors are raised when the
method is built or when its update is traced (``jax.eval_shape``), so nothing
is run. A second table gives one bad input to every other public entry point
(run, scan_run, objectives, projections, sweeps, sharding, flax_utils,
checkpoints). The last tests check invalid *traced* values (a sweep), which
cannot be rejected when the method is built and must surface as a NaN the
run names.

A cross-method suite: it stays one file, beside the files of the modules.
"""

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbilevel as jbl
from jaxbilevel import checkpoint
from jaxbilevel import flax_utils
from jaxbilevel import hypergradient
from jaxbilevel import objectives
from jaxbilevel import projections

# A directory the checks refuse before anything is written (never created).
_UNUSED_DIR = os.path.join(tempfile.gettempdir(), "jaxbilevel-unused")

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
# hyperparameter and a valid value, or None when it has none). f2sa's gamma
# (the initial penalty) cannot be a schedule; its gamma_increment is the one
# that is scheduled.
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
        f, g, **{"gamma": 2.0, "inner_steps": 2, **kw}), ("gamma", 2.0)),
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
  # Every method of jbl.METHODS needs a builder here.
  assert set(METHODS) == set(jbl.METHODS), (
      "add a builder to METHODS in tests/test_bad_input.py",
      set(METHODS) ^ set(jbl.METHODS))


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
    # optax.inject_hyperparams would call f and g as schedules f(step).
    ("inject_hyperparams", lambda m: optax.inject_hyperparams(
        getattr(jbl, m))(_f, _g),
     r"cannot be wrapped in optax.inject_hyperparams: .* would call the "
     r"objectives as f\(step\) and fail. Use jaxbilevel.inject_hyperparams"
     r"\(method\)\(...\), .* jaxbilevel.sweep .* upper_optimizer="
     r"optax.inject_hyperparams\(optax.adam\)\(learning_rate="),
]


def _hyper_cases():
  """Bad values of each method's float hyperparameter (if it has one)."""
  cases = []
  for method, (_, hyper) in sorted(METHODS.items()):
    if hyper is None:
      continue
    name, good = hyper
    scheduled = "gamma_increment" if method == "f2sa" else name
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
# Every public entry point validates its inputs (table-driven).
# ---------------------------------------------------------------------------


def _entry_f(x, y, batch):
  return jnp.sum(x ** 2) + jnp.sum(y)


def _entry_g(x, y, batch):
  return jnp.sum((y - x) ** 2)


_OPT = optax.sgd(0.1)


def _method(name, **kw):
  fn = {"pbgd_free": jbl.pbgd_free, "alt_pbgd": jbl.alt_pbgd,
        "v_pbgd": jbl.v_pbgd}[name]
  args = dict(gamma=1.0, upper_optimizer=_OPT, lower_optimizer=_OPT)
  args.update(kw)
  f = args.pop("f", _entry_f)
  g = args.pop("g", _entry_g)
  return fn(f, g, **args)


def _update(name, params=_P, state_params=_P, updates=None, **kw):
  tx = _method(name, **kw)
  return tx.update(updates, tx.init(state_params), params)


_PFREE = _method("pbgd_free")
_P32 = jbl.BilevelParams(jnp.ones(2, jnp.float32), jnp.ones(2, jnp.float32))


# (entry point, call, error message pattern). Each call gets one bad input.
ENTRY_POINT_BAD_INPUTS = [
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
     "scan_run: on_nonfinite must be one of \\('stop', 'skip', 'ignore'\\)"),
    ("scan_run num_steps=0", lambda: jbl.scan_run(_PFREE, _P, num_steps=0),
     "num_steps must be >= 1"),
    ("run tx None", lambda: jbl.run(None, _P, num_steps=2),
     r"jaxbilevel.run: tx must be a jaxbilevel method .* or an optax "
     r"GradientTransformation around one .*, got None of type NoneType"),
    ("scan_run tx None", lambda: jbl.scan_run(None, _P, num_steps=2),
     r"scan_run: tx must be a jaxbilevel method"),
    ("run record returns a string", lambda: jbl.run(
        _PFREE, _P, num_steps=2, record=lambda p, s: {"name": "run 1"}),
     r"record must return a pytree of arrays or numbers .* "
     r"record\(params, state\)\['name'\] is 'run 1' of type str"),
    ("run state of another method", lambda: jbl.run(
        _method("alt_pbgd"), _P, num_steps=2, state=_PFREE.init(_P)),
     r"jaxbilevel.run: state is of type PBGDFreeState, but this "
     r"transformation's state is of type ALTPBGDState .* state=None"),
    ("scan_run state of another method", lambda: jbl.scan_run(
        _method("alt_pbgd"), _P, num_steps=2, state=_PFREE.init(_P)),
     r"scan_run: state is of type PBGDFreeState, but this transformation's "
     r"state is of type ALTPBGDState"),
    ("update state of another method", lambda: _method("alt_pbgd").update(
        None, _PFREE.init(_P), _P),
     r"alt_pbgd: state is of type PBGDFreeState, but alt_pbgd's state is of "
     r"type ALTPBGDState \(what its init returns\)"),
    ("step state of another method", lambda: jbl.step(
        _method("alt_pbgd"), _P, _PFREE.init(_P)),
     r"alt_pbgd: state is of type PBGDFreeState"),
    ("run gamma overflows float32", lambda: jbl.run(
        _method("pbgd_free", gamma=1e40), _P32, num_steps=2),
     r"jaxbilevel.run: gamma = 1e\+40 overflows to inf in float32, the "
     r"dtype of the parameters: use a smaller value or float64"),
    ("run gamma underflows float32", lambda: jbl.run(
        _method("pbgd_free", gamma=1e-50), _P32, num_steps=2),
     r"jaxbilevel.run: gamma = 1e-50 underflows to 0 in float32"),
    ("update gamma overflows float32", lambda: _update(
        "pbgd_free", params=_P32, state_params=_P32, gamma=1e40),
     r"gamma = 1e\+40 overflows to inf in float32"),
    ("alt_pbgd inner_steps beyond int32", lambda: _method(
        "alt_pbgd", inner_steps=2 ** 31 + 5),
     r"inner_steps must fit in int32 \(at most 2147483647\), got "
     r"2147483653"),
    # Objectives and projections.
    ("lower_penalized f None", lambda: objectives.lower_penalized(
        None, _entry_g), "f must be a callable"),
    ("value_gap_penalty vector f", lambda: objectives.value_gap_penalty(
        lambda x, y, b: x * y, _entry_g)(jnp.ones(2), jnp.ones(2),
                                         jnp.ones(2), 1.0),
     "must return a scalar"),
    ("grad_norm_penalty g None", lambda: objectives.grad_norm_penalty(
        _entry_f, None), "g must be a callable"),
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
    ("checkpoint step<0", lambda: checkpoint.save(_UNUSED_DIR, _P, None,
                                                  step=-1),
     "step must be >= 0"),
    ("checkpoint directory type", lambda: checkpoint.latest_step(3),
     "checkpoint directory must be a path"),
    ("checkpoint key type", lambda: checkpoint.save(_UNUSED_DIR, _P, None,
                                                    step=1, key="k"),
     "key must be a JAX PRNG key"),
    ("resumable_run save_every=0", lambda: checkpoint.resumable_run(
        _PFREE, _P, num_steps=2, directory=_UNUSED_DIR, save_every=0),
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
    [pytest.param(c, m, id=n) for n, c, m in ENTRY_POINT_BAD_INPUTS])
def test_bad_input_gets_a_clear_message(call, message):
  with pytest.raises(jbl.BilevelValidationError, match=message):
    call()


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


def test_f2sa_gamma_max_below_gamma_is_rejected():
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"f2sa: gamma_max=1.0 is below gamma=5.0"):
    _build("f2sa", gamma=5.0, gamma_max=1.0)
  # Equal is fine: the penalty stays at gamma = gamma_max.
  tx = _build("f2sa", gamma=2.0, gamma_max=2.0, gamma_increment=1.0)
  _, state, hist = jbl.run(tx, _P, num_steps=2, diagnostics=True)
  np.testing.assert_array_equal(hist["gamma"], [2.0, 2.0])
  assert float(state.gamma) == 2.0


# ---------------------------------------------------------------------------
# Invalid traced values (sweeps) surface as NaN the run names.
# ---------------------------------------------------------------------------


def test_cg_with_a_nan_tolerance_returns_nan():
  h = jnp.array([[4.0, 1.0], [1.0, 3.0]])
  b = jnp.array([1.0, 2.0])
  good = hypergradient.conjugate_gradient(lambda v: h @ v, b, num_steps=2,
                                          tol=1e-8)
  np.testing.assert_allclose(good.solution, [1 / 11, 7 / 11], rtol=1e-6)
  bad = hypergradient.conjugate_gradient(lambda v: h @ v, b, num_steps=2,
                                         tol=jnp.nan)
  assert np.isnan(bad.solution).all() and np.isnan(bad.residual_norm)


_P0 = jbl.BilevelParams(jnp.zeros(2), jnp.zeros(2))


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


def test_f2sa_sweep_reports_a_traced_gamma_max_below_gamma():
  def make_tx(gamma_max):
    return jbl.f2sa(_f, _g, gamma=1.0, gamma_max=gamma_max,
                    gamma_increment=0.5, upper_optimizer=optax.sgd(0.1),
                    lower_optimizer=optax.sgd(0.1), inner_steps=2)

  with pytest.warns(RuntimeWarning,
                    match=r"1 of 2 grid points.*'gamma_max': 0\.5"):
    _, state, hist = jbl.sweep(make_tx, _P, {"gamma_max": [2.0, 0.5]},
                               num_steps=3, diagnostics=True)
  assert np.isnan(hist["gamma"][1]).all()
  # The valid point ramps 1.0, 1.5, 2.0 and is then capped at 2.0.
  np.testing.assert_allclose(hist["gamma"][0], [1.0, 1.5, 2.0])
  np.testing.assert_allclose(state.gamma[0], 2.0)


def test_alright_sweep_reports_a_traced_probability_outside_0_1():
  # A NaN probability would make every draw a g step: the new iterates are
  # NaN instead, so the points are flagged even without diagnostics.
  def make_tx(probability):
    return jbl.alright(_f, _g, probability=probability, key=_KEY,
                       upper_optimizer=optax.sgd(0.1),
                       lower_optimizer=optax.sgd(0.1))

  with pytest.warns(RuntimeWarning,
                    match=r"2 of 3 grid points.*'probability': -1\.0"):
    params, _, hist = jbl.sweep(make_tx, _P0,
                                {"probability": [0.5, -1.0, 2.0]},
                                num_steps=5)
  np.testing.assert_array_equal(hist["finite"][1:], False)
  np.testing.assert_array_equal(params.x[1:], np.zeros((2, 2)))  # never moved
  # The valid point is the run with that probability, unchanged.
  alone, _, _ = jbl.run(make_tx(0.5), _P0, num_steps=5)
  np.testing.assert_array_equal(params.x[0], alone.x)
  np.testing.assert_array_equal(params.y[0], alone.y)
  assert hist["finite"][0].all()
