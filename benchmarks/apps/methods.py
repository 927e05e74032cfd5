"""Every application's method table, as data.

A row is a method's name, its constructor (``jbl.alt_pbgd``, ...) and the
keyword arguments it is called with. Optimizers are recorded as
:class:`Call`s (the optax factory and its arguments), so the settings text
in the report is generated from the very arguments the benchmark runs with
(``gamma=10, inner_steps=5, upper_optimizer=adam(0.1), ...``) and cannot
drift from them. A free-text ``note`` may add context that is not an
argument (whose protocol a setting follows); it holds no argument values.

The first row of every table is the *floor*: one fused optax step on
grad(f + g) over both levels with the table's upper optimizer, the timing
reference of the floor ratio.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

import jaxbilevel as jbl
from jaxbilevel.applications import one_batch

FLOOR = "floor: fused optax step on grad(f + g)"


# ---------------------------------------------------------------------------
# Rows as data, and their settings text.
# ---------------------------------------------------------------------------


class Call(NamedTuple):
  """A call recorded as data: ``fn(*args, **kwargs)``, built on demand.

  Arguments that are themselves ``Call``s are built first, so that a chain
  of optax transformations is a tree of calls; ``str()`` prints the call as
  Python source, e.g. ``chain(clip_by_global_norm(1), adam(0.001))``.
  """

  fn: Callable
  args: tuple = ()
  kwargs: Optional[Mapping[str, Any]] = None

  def build(self):
    return self.fn(*(build(a) for a in self.args),
                   **{k: build(v) for k, v in (self.kwargs or {}).items()})

  def __str__(self):
    return f"{self.fn.__name__}({format_arguments(self.args, self.kwargs)})"


class Given(NamedTuple):
  """A value taken from the application (e.g. its projection), and its text."""

  value: Any
  text: str

  def build(self):
    return self.value

  def __str__(self):
    return self.text


def call(fn: Callable, *args, **kwargs) -> Call:
  return Call(fn, args, kwargs)


def build(value):
  return value.build() if isinstance(value, (Call, Given)) else value


def format_value(value) -> str:
  """Python-like text of one argument: ``10``, ``0.001``, ``'previous'``."""
  if isinstance(value, (Call, Given)):
    return str(value)
  if isinstance(value, bool) or value is None:
    return repr(value)
  if isinstance(value, float):
    text = f"{value:g}"
    return text if math.isnan(value) or float(text) == value else repr(value)
  if isinstance(value, (int, str)):
    return repr(value)
  if isinstance(value, (tuple, list)):
    inner = ", ".join(format_value(v) for v in value)
    return f"({inner},)" if isinstance(value, tuple) and len(value) == 1 else (
        f"({inner})" if isinstance(value, tuple) else f"[{inner}]")
  raise TypeError(
      f"cannot write the settings text of {value!r}: record it as "
      "call(factory, *args, **kwargs) or Given(value, text).")


def format_arguments(args=(), kwargs=None) -> str:
  """``a, b, key=value, ...`` for positional and keyword arguments.

  >>> format_arguments((0.1,), dict(eps=1e-3))
  '0.1, eps=0.001'
  """
  return ", ".join([format_value(a) for a in args]
                   + [f"{k}={format_value(v)}"
                      for k, v in (kwargs or {}).items()])


class Method(NamedTuple):
  """One row of an application's table.

  ``constructor(f, g, **kwargs)`` builds the transformation (``None`` when
  the method is not run, with ``reason`` saying why).
  """

  name: str
  constructor: Optional[Callable]
  kwargs: Mapping[str, Any]
  note: str = ""
  reason: str = ""

  @property
  def settings(self) -> str:
    if self.constructor is None:
      return ""
    text = format_arguments(kwargs=self.kwargs)
    return f"{text}; {self.note}" if self.note else text

  def make(self, f, g):
    return self.constructor(f, g, **{k: build(v)
                                     for k, v in self.kwargs.items()})


def method(name: str, constructor: Callable, note: str = "",
           **kwargs) -> Method:
  """A row that runs ``constructor(f, g, **kwargs)``.

  Raises:
    TypeError: a keyword is not a parameter of ``constructor`` (the settings
      text would name an argument the method does not have).
  """
  params = inspect.signature(constructor).parameters
  unknown = sorted(set(kwargs) - set(params))
  if unknown:
    raise TypeError(
        f"{name}: {constructor.__name__} has no parameter {unknown}; its "
        f"parameters are {list(params)}.")
  return Method(name, constructor, kwargs, note)


def not_run(name: str, reason: str) -> Method:
  return Method(name, None, {}, reason=reason)


def floor_transformation(f, g, *, optimizer):
  """One fused optax step on grad(f + g) over both levels (the floor)."""

  class FloorState(NamedTuple):
    opt_state: Any
    diagnostics: dict

  def loss(params, batch):
    fv, gv = f(params.x, params.y, batch), g(params.x, params.y, batch)
    return fv + gv, (fv, gv)

  def init_fn(params):
    zero = jnp.zeros((), jnp.result_type(*jax.tree.leaves(params)))
    return FloorState(optimizer.init(params), {"f": zero, "g": zero})

  def update_fn(updates, state, params=None, *, batch=None, **extra):
    del updates, extra
    (_, (fv, gv)), grads = jax.value_and_grad(loss, has_aux=True)(params,
                                                                  batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    return updates, FloorState(opt_state, {"f": fv, "g": gv})

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def floor(optimizer: Call) -> Method:
  return method(FLOOR, floor_transformation,
                "a timing reference over (x, y), not a bilevel solver",
                optimizer=optimizer)


# ---------------------------------------------------------------------------
# The tables.
# ---------------------------------------------------------------------------


def _upper_ignores_x(app) -> bool:
  batch = one_batch(app, jax.random.PRNGKey(0))
  return not jbl._src.base.depends_on(  # pylint: disable=protected-access
      lambda x: app.f(x, app.params.y, batch), app.params.x)


def _hpo_not_applicable(app):
  """Rows for the methods that cannot or need not run when f ignores x."""
  assert _upper_ignores_x(app), "f depends on x: these reasons do not hold"
  return [
      not_run("PBGD-Free",
              "f does not depend on x (x enters only g), so the upper step "
              "grad_x f(x, y) is identically zero and x never moves; "
              "jbl.pbgd_free raises for this reason (docs/choosing.md)."),
      not_run("FO-BLO",
              "the first-order meta-gradient is grad_x f(x, y_r) + "
              "(d init/dx)^T grad_y f; with f and the inner start independent"
              " of x it is identically zero (docs/choosing.md)."),
      not_run("UFO-BLO",
              "with g_FO = 0 (see FO-BLO) its estimate is (xi/q) times the "
              "exact unrolled hypergradient: ITD with random skipping, which "
              "the ITD row covers."),
      not_run("ALRIGHT",
              "not a bilevel method: it minimises lambda f + (1 - lambda) g "
              "over (x, y) jointly, which drives x to lower g itself (e.g. "
              "all sample weights to 0) instead of solving the bilevel "
              "problem."),
  ]


def hyper_cleaning_methods(app):
  up, lo, k = call(optax.adam, 0.1), call(optax.sgd, 1.0), 5
  lo_y = call(optax.adam, 0.01)
  return [
      floor(up),
      method("ALT-PBGD", jbl.alt_pbgd, gamma=10.0, inner_steps=k,
             upper_optimizer=up, lower_optimizer=lo),
      method("V-PBGD", jbl.v_pbgd, gamma=10.0, value_steps=k,
             upper_optimizer=up, lower_optimizer=lo_y, value_optimizer=lo),
      method("BOME", jbl.bome, eta=0.5, value_steps=k, upper_optimizer=up,
             lower_optimizer=lo_y, value_optimizer=lo),
      method("F2SA", jbl.f2sa, gamma=10.0, gamma_increment=0.01,
             inner_steps=k, scale_lower=True, upper_optimizer=up,
             lower_optimizer=lo),
      method("AID-CG", jbl.aid, inner_steps=k, linear_steps=10,
             upper_optimizer=up, lower_optimizer=lo),
      method("ITD", jbl.itd, inner_steps=k, upper_optimizer=up,
             lower_optimizer=lo, note="warm-started unroll"),
  ] + _hpo_not_applicable(app)


def regularization_methods(app):
  up = lo = call(optax.adam, 0.05)
  lo_y, k = call(optax.adam, 0.01), 5
  box = Given(app.info["proj_x"], "info['proj_x']")
  return [
      floor(up),
      method("ALT-PBGD", jbl.alt_pbgd, gamma=10.0, inner_steps=k,
             upper_optimizer=up, lower_optimizer=lo, proj_x=box),
      method("V-PBGD", jbl.v_pbgd, gamma=10.0, value_steps=k,
             upper_optimizer=up, lower_optimizer=lo_y, value_optimizer=lo,
             proj_x=box),
      method("BOME", jbl.bome, eta=0.5, value_steps=k, upper_optimizer=up,
             lower_optimizer=lo_y, value_optimizer=lo, proj_x=box),
      method("F2SA", jbl.f2sa, gamma=10.0, gamma_increment=0.01,
             inner_steps=k, scale_lower=True, upper_optimizer=up,
             lower_optimizer=lo, proj_x=box),
      method("AID-CG", jbl.aid, inner_steps=k, linear_steps=10,
             upper_optimizer=up, lower_optimizer=lo, proj_x=box),
      method("ITD", jbl.itd, inner_steps=k, upper_optimizer=up,
             lower_optimizer=call(jbl.hypergradient.unrollable_adam, 0.05),
             proj_x=box),
  ] + _hpo_not_applicable(app)


def nlsy_methods(app):
  del app
  adam = call(optax.adam, 1e-3, eps=1e-3)    # the NLSY authors' optimizer
  both = dict(upper_optimizer=adam, lower_optimizer=adam)
  return [
      floor(adam),
      method("PBGD-Free", jbl.pbgd_free, gamma=10.0, **both,
             note="the NLSY authors' protocol"),
      method("ALT-PBGD", jbl.alt_pbgd, gamma=10.0, value_steps=5, **both),
      method("V-PBGD", jbl.v_pbgd, gamma=10.0, value_steps=5, **both,
             value_optimizer=adam, note="the NLSY authors' 'PBGD' baseline"),
      method("BOME", jbl.bome, eta=0.5, value_steps=5, **both),
      method("F2SA", jbl.f2sa, gamma=10.0, inner_steps=1,
             scale_lower=True, **both, note="constant lambda"),
      method("AID-CG", jbl.aid, inner_steps=5, linear_steps=10, **both,
             note="the NLSY authors' 'implicit' baseline ran 20/10"),
      method("ITD", jbl.itd, inner_steps=5, upper_optimizer=adam,
             lower_optimizer=call(jbl.hypergradient.unrollable_adam, 1e-3,
                                  eps=1e-3)),
      not_run("FO-BLO",
              "the head is warm-started (its start does not depend on x), "
              "so FO-BLO's direction is grad_x f(x, y_r): PBGD-Free without "
              "the penalty, covered by the PBGD-Free row."),
      not_run("UFO-BLO",
              "built for meta-learning starts y_0 = init(x); with a warm-"
              "started head it is ITD with random skipping (ITD row)."),
      not_run("ALRIGHT",
              "bi-objective, not bilevel (lambda MSE_0 + (1 - lambda) MSE_1 "
              "over both blocks); the authors compare it only on DPO/SFT "
              "(Jiang et al., NeurIPS 2025)."),
  ]


def dpo_sft_methods(app):
  del app
  lr, k = 1e-3, 3
  # The authors' LLM setting: Adam with betas (0.9, 0.95), clipped at 1.
  adam = call(optax.chain, call(optax.clip_by_global_norm, 1.0),
              call(optax.adam, lr, b1=0.9, b2=0.95))
  both = dict(upper_optimizer=adam, lower_optimizer=adam)
  return [
      floor(adam),
      method("PBGD-Free", jbl.pbgd_free, gamma=10.0, **both),
      method("ALT-PBGD", jbl.alt_pbgd, gamma=10.0, inner_steps=k, **both,
             note="the authors' Llama setting"),
      method("BOME", jbl.bome, eta=0.5, value_steps=k,
             value_start="previous", **both, note="the authors' LLM code"),
      method("ALRIGHT", jbl.alright, probability=0.5, g_updates="lower",
             key=call(jax.random.PRNGKey, 0), **both,
             note="DPO step on LoRA + head, SFT step on the head"),
      method("V-PBGD", jbl.v_pbgd, gamma=10.0, value_steps=k, **both),
      method("F2SA", jbl.f2sa, gamma=10.0, inner_steps=k, scale_lower=True,
             **both, note="constant lambda"),
      method("AID-CG", jbl.aid, inner_steps=k, linear_steps=10, **both),
      method("ITD", jbl.itd, inner_steps=k, upper_optimizer=adam,
             lower_optimizer=call(
                 optax.chain, call(optax.clip_by_global_norm, 1.0),
                 call(jbl.hypergradient.unrollable_adam, lr, b1=0.9, b2=0.95)),
             note="warm-started unroll"),
      not_run("FO-BLO",
              "the head is warm-started (its start does not depend on x): "
              "FO-BLO would be PBGD-Free without the penalty (see that row)."),
      not_run("UFO-BLO",
              "meta-learning estimator; with a warm-started head it is ITD "
              "with random skipping."),
  ]


def sinusoid_methods(app):
  r, alpha = app.info["inner_steps"], app.info["inner_lr"]
  meta, inner = call(optax.adam, 1e-3), call(optax.sgd, alpha)
  init = Given(app.info["init"], "info['init'] (delta_0 = 0)")
  both = dict(upper_optimizer=meta, lower_optimizer=inner)
  penalty_reason = (
      "penalty/value-function methods adapt y on f/gamma + g, i.e. with the "
      "query labels, and warm-start y across meta-batches of different tasks;"
      " their lower iterate is not the r-step adaptation evaluated at "
      "meta-test (this benchmark compares the meta-learning estimators).")
  return [
      floor(meta),
      method("FO-BLO", jbl.fo_blo, inner_steps=r, inner_start=init, **both,
             note="first-order MAML"),
      method("UFO-BLO", jbl.ufo_blo, inner_steps=r,
             key=call(jax.random.PRNGKey, 0), inner_start=init, **both,
             note="Bernoulli estimator, correction probability "
             "1/inner_steps (the defaults)"),
      method("ITD", jbl.itd, inner_steps=r, inner_start="initial", **both,
             note="exact MAML: unrolled from delta = 0"),
      method("AID-CG", jbl.aid, inner_steps=r, linear_steps=10,
             inner_start=init, **both,
             note=f"iMAML-style implicit; the problem's proximal weight "
             f"lambda = {app.info['proximal']:g}"),
  ] + [not_run(name, penalty_reason) for name in
       ("PBGD-Free", "ALT-PBGD", "V-PBGD", "BOME", "F2SA")] + [
           not_run("ALRIGHT", "not bilevel; no meta-learning form.")]


METHOD_TABLES = dict(hyper_cleaning=hyper_cleaning_methods,
                     regularization=regularization_methods,
                     nlsy=nlsy_methods, dpo_sft=dpo_sft_methods,
                     sinusoid=sinusoid_methods)
