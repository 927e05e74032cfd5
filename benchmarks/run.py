"""Application benchmarks of jaxbilevel: every applicable method, side by side.

One entry point for the five applications of ``jaxbilevel.applications``
(data hyper-cleaning, regularisation selection, NLSY fair representation,
DPO/SFT fine-tuning, sinusoid meta-learning), plus a sweep-throughput measurement and, where they
install, peers from other libraries (jaxopt, TorchOpt).

For every application, every applicable method runs on the same data (the
same full batch, or the same stream of sampled minibatches) under the same
wall-clock budget of training time. Each method runs as jitted ``lax.scan``
chunks of ``jaxbilevel.scan_run``; compilation is timed separately and
excluded, evaluation on held-out data happens between chunks and is
excluded. Reported per method:

* the upper loss against training time and outer iterations (JSON + PNG);
* time and iterations to a target upper loss (90% of the best improvement
  reached by any method of the application);
* ms per outer iteration and the *floor ratio*: that time divided by the
  time of one fused jitted optax step on grad(f + g) for both levels, run by
  the same driver on the same model and batches; both are medians over
  repeats that interleave chunks of the method and of the floor, after the
  budget run (so that the load of a shared machine affects both alike);
* peak memory of the compiled chunk (XLA's memory analysis: arguments +
  outputs + temporaries - aliased), and the bytes of the method's state;
* the final metrics of the application.

Methods that do not apply to an application are listed with the reason.

Usage::

  python benchmarks/run.py              # full mode (about 13 min on 2 CPUs)
  python benchmarks/run.py --quick      # seconds per application (CI)
  python benchmarks/run.py --only nlsy --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Any, Callable, NamedTuple, Optional

if __name__ == "__main__" and "--quick" in sys.argv[1:]:
  # Quick mode checks the pipeline, not speed: let XLA compile faster.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import optax

import jaxbilevel as jbl
from jaxbilevel.applications import batch_stream
from jaxbilevel.applications import dpo_sft
from jaxbilevel.applications import hyper_cleaning
from jaxbilevel.applications import nlsy
from jaxbilevel.applications import one_batch
from jaxbilevel.applications import regularization
from jaxbilevel.applications import sinusoid

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
APPS = ("hyper_cleaning", "regularization", "nlsy", "dpo_sft", "sinusoid")
FLOOR = "floor: fused optax step on grad(f + g)"
TARGET_FRACTION = 0.9
EVAL_GROWTH = 1.1     # evaluations at training times growing by 10% at least


# ---------------------------------------------------------------------------
# Method specifications.
# ---------------------------------------------------------------------------


class Method(NamedTuple):
  """One row of an application's table.

  ``make`` builds the transformation (None when the method is not run, with
  ``reason`` saying why); ``settings`` describes its hyperparameters.
  """

  name: str
  make: Optional[Callable[[], Any]]
  settings: str
  reason: str = ""


class Budget(NamedTuple):
  seconds: float      # training wall time per method
  max_steps: int      # outer iterations at most
  chunk: int          # outer iterations per jitted chunk
  min_chunks: int = 3
  timing_chunk: Optional[int] = None   # chunk of the side-by-side timing


def _not_run(name, reason):
  return Method(name, None, "", reason)


def _floor_transformation(f, g, optimizer):
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


def _upper_ignores_x(app) -> bool:
  batch = one_batch(app, jax.random.PRNGKey(0))
  return not jbl._src.base.depends_on(  # pylint: disable=protected-access
      lambda x: app.f(x, app.params.y, batch), app.params.x)


def _hpo_not_applicable(app):
  """Rows for the methods that cannot or need not run when f ignores x."""
  assert _upper_ignores_x(app), "f depends on x: these reasons do not hold"
  return [
      _not_run("PBGD-Free",
               "f does not depend on x (x enters only g), so the upper step "
               "grad_x f(x, y) is identically zero and x never moves; "
               "jbl.pbgd_free raises for this reason (docs/choosing.md)."),
      _not_run("FO-BLO",
               "the first-order meta-gradient is grad_x f(x, y_r) + "
               "(d init/dx)^T grad_y f; with f and the inner start independent"
               " of x it is identically zero (docs/choosing.md)."),
      _not_run("UFO-BLO",
               "with g_FO = 0 (see FO-BLO) its estimate is (xi/q) times the "
               "exact unrolled hypergradient: ITD with random skipping, which "
               "the ITD row covers."),
      _not_run("ALRIGHT",
               "not a bilevel method: it minimises lambda f + (1 - lambda) g "
               "over (x, y) jointly, which drives x to lower g itself (e.g. "
               "all sample weights to 0) instead of solving the bilevel "
               "problem."),
  ]


def hyper_cleaning_methods(app):
  f, g = app.f, app.g
  up, lo = lambda: optax.adam(0.1), lambda: optax.sgd(1.0)
  k = 5
  return [
      Method("ALT-PBGD", lambda: jbl.alt_pbgd(
          f, g, gamma=10.0, upper_optimizer=up(), lower_optimizer=lo(),
          inner_steps=k), f"gamma=10, K_g=K_gamma={k}, adam(0.1)/sgd(1.0)"),
      Method("V-PBGD", lambda: jbl.v_pbgd(
          f, g, gamma=10.0, upper_optimizer=up(), lower_optimizer=optax.adam(0.01),
          value_optimizer=lo(), value_steps=k),
          f"gamma=10, T={k}, adam(0.1) x / adam(0.01) y / sgd(1.0) omega"),
      Method("BOME", lambda: jbl.bome(
          f, g, eta=0.5, upper_optimizer=up(), lower_optimizer=optax.adam(0.01),
          value_optimizer=lo(), value_steps=k),
          f"eta=0.5, T={k}, grad-norm rule, adam(0.1) x / adam(0.01) y"),
      Method("F2SA", lambda: jbl.f2sa(
          f, g, lambda0=10.0, lambda_increment=0.01, upper_optimizer=up(),
          lower_optimizer=lo(), inner_steps=k, scale_lower=True),
          f"lambda0=10 (+0.01/step), T={k}, adam(0.1)/sgd(1.0)"),
      Method("AID-CG", lambda: jbl.aid(
          f, g, upper_optimizer=up(), lower_optimizer=lo(), inner_steps=k,
          linear_steps=10), f"T={k}, CG 10, adam(0.1)/sgd(1.0)"),
      Method("ITD", lambda: jbl.itd(
          f, g, upper_optimizer=up(), lower_optimizer=lo(), inner_steps=k),
          f"T={k} unrolled (warm start), adam(0.1)/sgd(1.0)"),
  ] + _hpo_not_applicable(app)


def regularization_methods(app):
  f, g, box = app.f, app.g, app.info["proj_x"]
  up, lo = lambda: optax.adam(0.05), lambda: optax.adam(0.05)
  k = 5
  return [
      Method("ALT-PBGD", lambda: jbl.alt_pbgd(
          f, g, gamma=10.0, upper_optimizer=up(), lower_optimizer=lo(),
          inner_steps=k, proj_x=box),
          f"gamma=10, K_g=K_gamma={k}, adam(0.05) both"),
      Method("V-PBGD", lambda: jbl.v_pbgd(
          f, g, gamma=10.0, upper_optimizer=up(), lower_optimizer=optax.adam(0.01),
          value_optimizer=lo(), value_steps=k, proj_x=box),
          f"gamma=10, T={k}, adam(0.05) x / adam(0.01) y"),
      Method("BOME", lambda: jbl.bome(
          f, g, eta=0.5, upper_optimizer=up(), lower_optimizer=optax.adam(0.01),
          value_optimizer=lo(), value_steps=k, proj_x=box),
          f"eta=0.5, T={k}, adam(0.05) x / adam(0.01) y"),
      Method("F2SA", lambda: jbl.f2sa(
          f, g, lambda0=10.0, lambda_increment=0.01, upper_optimizer=up(),
          lower_optimizer=lo(), inner_steps=k, scale_lower=True, proj_x=box),
          f"lambda0=10 (+0.01/step), T={k}, adam(0.05) both"),
      Method("AID-CG", lambda: jbl.aid(
          f, g, upper_optimizer=up(), lower_optimizer=lo(), inner_steps=k,
          linear_steps=10, proj_x=box), f"T={k}, CG 10, adam(0.05) both"),
      Method("ITD", lambda: jbl.itd(
          f, g, upper_optimizer=up(),
          lower_optimizer=jbl.hypergradient.unrollable_adam(0.05),
          inner_steps=k, proj_x=box),
          f"T={k} unrolled Adam (eps_root 1e-8), adam(0.05)"),
  ] + _hpo_not_applicable(app)


def nlsy_methods(app):
  f, g = app.f, app.g
  adam = lambda: optax.adam(1e-3, eps=1e-3)    # the NLSY authors' optimizer
  return [
      Method("PBGD-Free", lambda: jbl.pbgd_free(
          f, g, gamma=10.0, upper_optimizer=adam(), lower_optimizer=adam()),
          "gamma=10, K=1, adam(1e-3, eps=1e-3) (authors' protocol)"),
      Method("ALT-PBGD", lambda: jbl.alt_pbgd(
          f, g, gamma=10.0, upper_optimizer=adam(), lower_optimizer=adam(),
          value_steps=5), "gamma=10, K_g=5, K_gamma=1, adam(1e-3, eps=1e-3)"),
      Method("V-PBGD", lambda: jbl.v_pbgd(
          f, g, gamma=10.0, upper_optimizer=adam(), lower_optimizer=adam(),
          value_optimizer=adam(), value_steps=5),
          "gamma=10, T=5 (the authors' 'PBGD' baseline), adam(1e-3)"),
      Method("BOME", lambda: jbl.bome(
          f, g, eta=0.5, upper_optimizer=adam(), lower_optimizer=adam(),
          value_steps=5), "eta=0.5, T=5, adam(1e-3, eps=1e-3)"),
      Method("F2SA", lambda: jbl.f2sa(
          f, g, lambda0=10.0, upper_optimizer=adam(), lower_optimizer=adam(),
          inner_steps=1, scale_lower=True),
          "lambda=10 constant, T=1, adam(1e-3, eps=1e-3)"),
      Method("AID-CG", lambda: jbl.aid(
          f, g, upper_optimizer=adam(), lower_optimizer=adam(),
          inner_steps=5, linear_steps=10),
          "T=5, CG 10 (the authors' 'implicit' baseline: 20/10)"),
      Method("ITD", lambda: jbl.itd(
          f, g, upper_optimizer=adam(),
          lower_optimizer=jbl.hypergradient.unrollable_adam(1e-3, eps=1e-3),
          inner_steps=5), "T=5 unrolled Adam (eps_root 1e-8)"),
      _not_run("FO-BLO",
               "the head is warm-started (its start does not depend on x), "
               "so FO-BLO's direction is grad_x f(x, y_r): PBGD-Free without "
               "the penalty, covered by the PBGD-Free row."),
      _not_run("UFO-BLO",
               "built for meta-learning starts y_0 = init(x); with a warm-"
               "started head it is ITD with random skipping (ITD row)."),
      _not_run("ALRIGHT",
               "bi-objective, not bilevel (lambda MSE_0 + (1 - lambda) MSE_1 "
               "over both blocks); the authors compare it only on DPO/SFT "
               "(Jiang et al., NeurIPS 2025)."),
  ]


def dpo_sft_methods(app):
  f, g = app.f, app.g
  lr = 1e-3

  def adam():  # the authors' LLM setting: betas (0.9, 0.95), clip 1.0
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adam(lr, b1=0.9, b2=0.95))

  k = 3
  return [
      Method("PBGD-Free", lambda: jbl.pbgd_free(
          f, g, gamma=10.0, upper_optimizer=adam(), lower_optimizer=adam()),
          f"gamma=10, K=1, adam({lr}, 0.9/0.95), clip 1"),
      Method("ALT-PBGD", lambda: jbl.alt_pbgd(
          f, g, gamma=10.0, upper_optimizer=adam(), lower_optimizer=adam(),
          inner_steps=k), f"gamma=10, K_g=K_gamma={k} (the authors' Llama setting)"),
      Method("BOME", lambda: jbl.bome(
          f, g, eta=0.5, upper_optimizer=adam(), lower_optimizer=adam(),
          value_steps=k, value_start="previous"),
          f"eta=0.5, T={k}, tracker warm-started (the authors' LLM code)"),
      Method("ALRIGHT", lambda: jbl.alright(
          f, g, probability=0.5, upper_optimizer=adam(),
          lower_optimizer=adam(), key=jax.random.PRNGKey(0),
          g_updates="lower"),
          "lambda=0.5; DPO step on LoRA + head, SFT step on the head"),
      Method("V-PBGD", lambda: jbl.v_pbgd(
          f, g, gamma=10.0, upper_optimizer=adam(), lower_optimizer=adam(),
          value_steps=k), f"gamma=10, T={k}"),
      Method("F2SA", lambda: jbl.f2sa(
          f, g, lambda0=10.0, upper_optimizer=adam(), lower_optimizer=adam(),
          inner_steps=k, scale_lower=True),
          f"lambda=10 constant, T={k}"),
      Method("AID-CG", lambda: jbl.aid(
          f, g, upper_optimizer=adam(), lower_optimizer=adam(),
          inner_steps=k, linear_steps=10), f"T={k}, CG 10"),
      Method("ITD", lambda: jbl.itd(
          f, g, upper_optimizer=adam(),
          lower_optimizer=optax.chain(
              optax.clip_by_global_norm(1.0),
              jbl.hypergradient.unrollable_adam(lr, b1=0.9, b2=0.95)),
          inner_steps=k),
          f"T={k} unrolled Adam (eps_root 1e-8, clip 1), warm start"),
      _not_run("FO-BLO",
               "the head is warm-started (its start does not depend on x): "
               "FO-BLO would be PBGD-Free without the penalty (see that row)."),
      _not_run("UFO-BLO",
               "meta-learning estimator; with a warm-started head it is ITD "
               "with random skipping."),
  ]


def sinusoid_methods(app):
  f, g = app.f, app.g
  r, alpha = app.info["inner_steps"], app.info["inner_lr"]
  meta = lambda: optax.adam(1e-3)
  inner = lambda: optax.sgd(alpha)
  penalty_reason = (
      "penalty/value-function methods adapt y on f/gamma + g, i.e. with the "
      "query labels, and warm-start y across meta-batches of different tasks;"
      " their lower iterate is not the r-step adaptation evaluated at "
      "meta-test (this benchmark compares the meta-learning estimators).")
  return [
      Method("FO-BLO", lambda: jbl.fo_blo(
          f, g, upper_optimizer=meta(), lower_optimizer=inner(),
          inner_steps=r, inner_start=app.info["init"]),
          f"first-order MAML, r={r}, alpha={alpha}, adam(1e-3)"),
      Method("UFO-BLO", lambda: jbl.ufo_blo(
          f, g, upper_optimizer=meta(), lower_optimizer=inner(),
          inner_steps=r, key=jax.random.PRNGKey(0),
          inner_start=app.info["init"]),
          f"Bernoulli estimator, q=1/r={1 / r:.2f}, r={r}"),
      Method("ITD", lambda: jbl.itd(
          f, g, upper_optimizer=meta(), lower_optimizer=inner(),
          inner_steps=r, inner_start="initial"),
          f"exact MAML: unrolled r={r} steps from delta=0"),
      Method("AID-CG", lambda: jbl.aid(
          f, g, upper_optimizer=meta(), lower_optimizer=inner(),
          inner_steps=r, linear_steps=10, inner_start=app.info["init"]),
          f"iMAML-style implicit, T={r} from delta=0, CG 10, "
          f"lambda={app.info['proximal']}"),
  ] + [_not_run(name, penalty_reason) for name in
       ("PBGD-Free", "ALT-PBGD", "V-PBGD", "BOME", "F2SA")] + [
           _not_run("ALRIGHT", "not bilevel; no meta-learning form.")]


# ---------------------------------------------------------------------------
# Running one method under a budget.
# ---------------------------------------------------------------------------


def _floats(metrics):
  return {k: float(v) for k, v in metrics.items()}


def _tree_bytes(tree):
  return int(sum(np.size(v) * np.dtype(v.dtype).itemsize
                 for v in jax.tree.leaves(tree) if hasattr(v, "dtype")))


def _memory(compiled):
  """Peak bytes of a compiled program from XLA's memory analysis."""
  out = {}
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):  # not on every backend
    m = None
  if m is not None:
    out = dict(argument=int(m.argument_size_in_bytes),
               output=int(m.output_size_in_bytes),
               temp=int(m.temp_size_in_bytes),
               alias=int(m.alias_size_in_bytes))
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  if jax.default_backend() != "cpu":
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      out["device_peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
  return out


def budget_loop(run_chunk: Callable[[int], None],
                upper_loss: Callable[[], float], budget: Budget) -> tuple:
  """Calls ``run_chunk(i)`` until the budget is spent; returns (curve, times).

  Only ``run_chunk`` is timed (it must block until its work is done). The
  held-out ``upper_loss()`` is evaluated at geometrically spaced training
  times (each at least ``EVAL_GROWTH`` times the previous one, so that the
  curves are resolved on a log time axis) and after the last chunk.
  """
  curve = dict(steps=[0], seconds=[0.0], upper_loss=[upper_loss()])
  times, steps, train_s, next_eval = [], 0, 0.0, 0.0

  def more():
    return ((train_s < budget.seconds or len(times) < budget.min_chunks)
            and steps + budget.chunk <= budget.max_steps)

  while more():
    start = time.perf_counter()
    run_chunk(len(times))
    times.append(time.perf_counter() - start)
    train_s += times[-1]
    steps += budget.chunk
    if train_s >= next_eval or not more():
      next_eval = EVAL_GROWTH * train_s
      curve["steps"].append(steps)
      curve["seconds"].append(train_s)
      curve["upper_loss"].append(upper_loss())
  return curve, times


class Runner(NamedTuple):
  """A compiled chunk of a method and where its run ended (for timing)."""

  compiled: Any
  params: Any
  state: Any


def run_budget(app, tx, budget: Budget, key, evaluate):
  """Runs ``tx`` in jitted chunks until the time or step budget is spent.

  Returns the row's results and a :class:`Runner` for the side-by-side
  timing.
  """
  params = app.params
  state = tx.init(params)

  def chunk_fn(params, state, chunk_key, length):
    kwargs = (dict(batch=app.batch) if app.sample is None
              else dict(batches=batch_stream(app, chunk_key)))
    params, state, history = jbl.scan_run(tx, params, state=state,
                                          num_steps=length,
                                          on_nonfinite="skip", **kwargs)
    return params, state, jnp.sum(~history["finite"])

  def compile_chunk(length):
    return jax.jit(functools.partial(chunk_fn, length=length)).lower(
        params, state, key).compile()

  start = time.perf_counter()
  compiled = compile_chunk(budget.chunk)
  compile_s = time.perf_counter() - start
  memory = _memory(compiled)
  memory["state"] = _tree_bytes(state)

  # One untimed call (its result is discarded) so that one-time costs of the
  # first execution do not enter the timings.
  jax.block_until_ready(compiled(params, state,
                                 jax.random.fold_in(key, 2 ** 30)))
  box = dict(params=params, state=state, nonfinite=0)

  def run_chunk(i):
    box["params"], box["state"], bad = compiled(
        box["params"], box["state"], jax.random.fold_in(key, i))
    jax.block_until_ready((box["params"], box["state"]))
    box["nonfinite"] += int(bad)

  curve, times = budget_loop(
      run_chunk, lambda: float(evaluate(box["params"])["upper_loss"]), budget)
  params, state, nonfinite = box["params"], box["state"], box["nonfinite"]
  steps, train_s = len(times) * budget.chunk, sum(times)
  final = _floats(evaluate(params))
  row = dict(status="ok" if nonfinite == 0 else
             f"ok, {nonfinite} non-finite steps skipped",
             steps=steps, train_seconds=train_s, compile_seconds=compile_s,
             budget_ms_per_step=1e3 * statistics.median(times) / budget.chunk,
             chunk=budget.chunk, chunks=len(times), nonfinite_steps=nonfinite,
             memory=memory, final=final, curve=curve)
  timing = compiled
  if budget.timing_chunk not in (None, budget.chunk):
    timing = compile_chunk(budget.timing_chunk)
  return row, Runner(timing, params, state)


def side_by_side(floor: Runner, method: Runner, chunk: int, repeats: int,
                 key) -> dict:
  """Interleaved chunks of the floor and of a method: medians and their ratio.

  Alternating the two (and their order) cancels most of the drift of a
  shared machine's load; the ratio is the median of per-repeat ratios.
  """
  runners = {"floor": floor, "method": method}
  times = {"floor": [], "method": []}
  for r in range(repeats):
    order = ("floor", "method") if r % 2 == 0 else ("method", "floor")
    chunk_key = jax.random.fold_in(key, 2 ** 29 + r)
    for name in order:
      run = runners[name]
      start = time.perf_counter()
      params, state, _ = run.compiled(run.params, run.state, chunk_key)
      jax.block_until_ready((params, state))
      times[name].append(time.perf_counter() - start)
      runners[name] = Runner(run.compiled, params, state)
  ratios = [m / f for m, f in zip(times["method"], times["floor"])]
  return dict(ms_per_step=1e3 * statistics.median(times["method"]) / chunk,
              floor_ms_per_step=1e3 * statistics.median(times["floor"])
              / chunk,
              floor_ratio=statistics.median(ratios), timing_repeats=repeats)


def _with_target(rows):
  """Adds time and iterations to the target upper loss to every finished row."""
  finished = [r for r in rows if "curve" in r and r.get("role") != "floor"]
  finals = [r["final"]["upper_loss"] for r in finished
            if math.isfinite(r["final"]["upper_loss"])]
  if not finished or not finals:
    return None
  start = finished[0]["curve"]["upper_loss"][0]
  best = min(finals)
  target = start - TARGET_FRACTION * (start - best)
  for row in rows:
    if "curve" not in row:
      continue
    hit = [j for j, v in enumerate(row["curve"]["upper_loss"])
           if math.isfinite(v) and v <= target]
    row["steps_to_target"] = row["curve"]["steps"][hit[0]] if hit else None
    row["seconds_to_target"] = row["curve"]["seconds"][hit[0]] if hit else None
  return dict(start=start, best_final=best, target=target,
              rule=f"start - {TARGET_FRACTION} x (start - best final)")


def run_application(name, app, methods, budget, seed, peers=(), repeats=7,
                    after=None):
  """All rows of one application: the floor, every method, the peers.

  ``after(params) -> dict`` adds metrics computed from each method's final
  params (DPO/SFT's stage 2).
  """
  key = jax.random.PRNGKey(seed)
  evaluate = jax.jit(app.evaluate)
  start_metrics = _floats(evaluate(app.params))
  rows, runners = [], {}
  floor_tx = _floor_transformation(app.f, app.g, FLOOR_OPTIMIZERS[name]())
  todo = [Method(FLOOR, lambda: floor_tx, "one adam step on grad(f + g) over "
                 "(x, y); a timing reference, not a bilevel solver")] + list(
                     methods)
  for method in todo:
    row = dict(method=method.name, settings=method.settings,
               role="floor" if method.name == FLOOR else "method")
    if method.make is None:
      row.update(status="not run", reason=method.reason)
      rows.append(row)
      continue
    print(f"  {name}: {method.name} ...", flush=True)
    try:
      result, runners[method.name] = run_budget(app, method.make(), budget,
                                                key, evaluate)
      row.update(result)
    except Exception as err:  # pylint: disable=broad-except
      row.update(status="failed", reason=f"{type(err).__name__}: {err}")
      traceback.print_exc()
    rows.append(row)
  for peer in peers:
    print(f"  {name}: peer {peer.__name__} ...", flush=True)
    try:
      row = peer(app, budget)
    except Exception as err:  # pylint: disable=broad-except
      row = dict(method=peer.__name__, role="peer", status="failed",
                 reason=f"{type(err).__name__}: {err}")
      traceback.print_exc()
    rows.append(row)
  if FLOOR in runners:
    print(f"  {name}: side-by-side timing ...", flush=True)
    floor_times = []
    for row in rows:
      if row["method"] in runners and row["method"] != FLOOR:
        row.update(side_by_side(runners[FLOOR], runners[row["method"]],
                                budget.timing_chunk or budget.chunk, repeats,
                                key))
        floor_times.append(row["floor_ms_per_step"])
    if after is not None:
      print(f"  {name}: stage 2 ...", flush=True)
      for row in rows:
        if row["method"] in runners:
          row["final"].update(after(runners[row["method"]].params))
    floor_row = next(r for r in rows if r["method"] == FLOOR)
    floor_row.update(ms_per_step=statistics.median(floor_times)
                     if floor_times else floor_row["budget_ms_per_step"],
                     floor_ratio=1.0)
  for row in rows:
    if row.get("role") == "peer" and "budget_ms_per_step" in row:
      row["ms_per_step"] = row["budget_ms_per_step"]
  target = _with_target(rows)
  return dict(rows=rows, target=target, start=start_metrics)


FLOOR_OPTIMIZERS = {
    "hyper_cleaning": lambda: optax.adam(0.1),
    "regularization": lambda: optax.adam(0.05),
    "nlsy": lambda: optax.adam(1e-3, eps=1e-3),
    "dpo_sft": lambda: optax.chain(optax.clip_by_global_norm(1.0),
                                   optax.adam(1e-3, b1=0.9, b2=0.95)),
    "sinusoid": lambda: optax.adam(1e-3),
}


# ---------------------------------------------------------------------------
# Peers on the regularisation problem (optional: jaxopt, TorchOpt).
# ---------------------------------------------------------------------------


def _peer_row(name, settings, curve, times, chunk, compile_s, final,
              memory=None):
  return dict(method=name, role="peer", settings=settings, status="ok",
              steps=curve["steps"][-1], train_seconds=curve["seconds"][-1],
              compile_seconds=compile_s,
              budget_ms_per_step=1e3 * statistics.median(times) / chunk,
              chunk=chunk, chunks=len(times), nonfinite_steps=0,
              memory=memory or {}, final=final, curve=curve)


def jaxopt_implicit(app, budget):
  """jaxopt: OptaxSolver(adam, T steps) with implicit differentiation (CG 10)."""
  import jaxopt  # pylint: disable=import-outside-toplevel
  k = 5
  inner = jaxopt.OptaxSolver(
      fun=lambda y, x, batch: app.g(x, y, batch), opt=optax.adam(0.05),
      maxiter=k, tol=1e-8, implicit_diff=True,
      implicit_diff_solve=functools.partial(jaxopt.linear_solve.solve_cg,
                                            maxiter=10))
  outer = optax.adam(0.05)

  def outer_loss(x, y0, batch):
    y = inner.run(y0, x, batch).params
    return app.f(x, y, batch), y

  def chunk_fn(carry, batch):
    def body(carry, _):
      x, y, s = carry
      (_, y), grad = jax.value_and_grad(outer_loss, has_aux=True)(x, y, batch)
      updates, s = outer.update(grad, s, x)
      return (app.info["proj_x"](optax.apply_updates(x, updates)), y, s), None
    return jax.lax.scan(body, carry, None, length=budget.chunk)[0]

  x, y = app.params
  carry = (x, y, outer.init(x))
  start = time.perf_counter()
  compiled = jax.jit(chunk_fn).lower(carry, app.batch).compile()
  compile_s = time.perf_counter() - start
  evaluate = jax.jit(app.evaluate)
  loss = lambda c: float(evaluate(jbl.BilevelParams(c[0], c[1]))["upper_loss"])
  box = dict(carry=carry)

  def run_chunk(i):
    del i
    box["carry"] = jax.block_until_ready(compiled(box["carry"], app.batch))

  curve, times = budget_loop(run_chunk, lambda: loss(box["carry"]), budget)
  carry = box["carry"]
  final = _floats(evaluate(jbl.BilevelParams(carry[0], carry[1])))
  return _peer_row(f"jaxopt {_version('jaxopt')} (implicit diff)",
                   f"OptaxSolver adam(0.05) T={k} (restarts its Adam state), "
                   "implicit diff with CG 10, outer adam(0.05)", curve, times,
                   budget.chunk, compile_s, final, _memory(compiled))


def torchopt_implicit(app, budget):
  """TorchOpt (CPU PyTorch, eager): the same problem with torchopt.diff.implicit."""
  budget = budget._replace(chunk=10)   # eager steps are slow: time small chunks
  import warnings  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import torchopt  # pylint: disable=import-outside-toplevel
  warnings.filterwarnings("ignore", category=FutureWarning,
                          module="torchopt.*")
  torch.set_num_threads(max(1, os.cpu_count() or 1))
  torch.manual_seed(0)
  data = app.info["numpy_data"]
  t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)
  a_tr, b_tr = t(data["train_x"]), t(data["train_labels"])
  a_va, b_va = t(data["val_x"]), t(data["val_labels"])
  k, lr = 5, 0.05

  def lower(w, c, x):
    margins = b_tr * (a_tr @ w + c)
    return (torch.nn.functional.softplus(-margins).mean()
            + 0.5 * (torch.exp(x) * w ** 2).sum())

  def upper(w, c):
    return torch.nn.functional.softplus(-b_va * (a_va @ w + c)).mean()

  def optimality(params, x):  # grad_y g, written with torch.func (functorch)
    return torch.func.grad(lambda p: lower(p[0], p[1], x))(tuple(params))

  @torchopt.diff.implicit.custom_root(
      optimality, argnums=1,
      solve=torchopt.linear_solve.solve_cg(maxiter=10))
  def solve(params, x):
    w, c = (p.detach().clone().requires_grad_(True) for p in params)
    opt = torch.optim.Adam([w, c], lr=lr)
    with torch.enable_grad():
      for _ in range(k):
        opt.zero_grad()
        lower(w, c, x.detach()).backward()
        opt.step()
    return w.detach(), c.detach()

  x = torch.zeros(a_tr.shape[1], requires_grad=True)
  params = (torch.zeros(a_tr.shape[1]), torch.zeros(()))
  outer = torch.optim.Adam([x], lr=lr)

  def evaluate(params):
    w, c = params
    metrics = app.evaluate(jbl.BilevelParams(
        jnp.asarray(x.detach().numpy()),
        {"w": jnp.asarray(w.detach().numpy()),
         "c": jnp.asarray(c.detach().numpy())}))
    return _floats(metrics)

  box = dict(params=params)

  def run_chunk(i):
    del i
    for _ in range(budget.chunk):
      w, c = solve(box["params"], x)
      outer.zero_grad()
      upper(w, c).backward()
      outer.step()
      with torch.no_grad():
        x.clamp_(*regularization.LOG_STRENGTH_BOUNDS)
      box["params"] = (w.detach(), c.detach())

  curve, times = budget_loop(
      run_chunk, lambda: evaluate(box["params"])["upper_loss"], budget)
  params = box["params"]
  return _peer_row(
      f"TorchOpt {torchopt.__version__} (torch {torch.__version__}, implicit)",
      f"torch.optim.Adam({lr}) T={k} inner steps (restarted state), "
      "torchopt.diff.implicit.custom_root with CG 10, outer Adam(0.05); eager",
      curve, times, budget.chunk, 0.0, evaluate(params))


def _version(module):
  import importlib.metadata  # pylint: disable=import-outside-toplevel
  try:
    return importlib.metadata.version(module)
  except importlib.metadata.PackageNotFoundError:
    return "?"


def available_peers():
  """The peers that import here, and notes on those that do not."""
  peers, notes = [], {}
  for fn, module in ((jaxopt_implicit, "jaxopt"),
                     (torchopt_implicit, "torchopt")):
    try:
      __import__(module)
      if module == "torchopt":
        __import__("torch")
      peers.append(fn)
    except Exception as err:  # pylint: disable=broad-except
      notes[module] = f"not run: import failed ({type(err).__name__}: {err})"
  return peers, notes


# ---------------------------------------------------------------------------
# Sweep throughput.
# ---------------------------------------------------------------------------


def sweep_throughput(app, num_points_axis: int, num_steps: int) -> dict:
  """One jitted vmap over (gamma, lr) settings vs a Python loop of jitted runs."""
  f, g = app.f, app.g

  def make_tx(gamma, lr):
    return jbl.alt_pbgd(f, g, gamma=gamma, upper_optimizer=optax.adam(lr),
                        lower_optimizer=optax.adam(0.05), inner_steps=5)

  grid = jbl.product_grid(
      gamma=np.logspace(0.5, 2.0, num_points_axis).astype(np.float32),
      lr=np.logspace(-3.0, -1.0, num_points_axis).astype(np.float32))
  points = len(grid["gamma"])

  start = time.perf_counter()
  out = jbl.sweep(make_tx, app.params, grid, num_steps=num_steps,
                  batch=app.batch, on_nonfinite="ignore")
  jax.block_until_ready(out)
  first = time.perf_counter() - start
  runs = []
  for _ in range(3):
    start = time.perf_counter()
    out = jbl.sweep(make_tx, app.params, grid, num_steps=num_steps,
                    batch=app.batch, on_nonfinite="ignore")
    jax.block_until_ready(out)
    runs.append(time.perf_counter() - start)
  sweep_s = statistics.median(runs)

  @jax.jit
  def single(gamma, lr):
    return jbl.scan_run(make_tx(gamma, lr), app.params, num_steps=num_steps,
                        batch=app.batch, on_nonfinite="ignore")[0]

  gammas, lrs = jnp.asarray(grid["gamma"]), jnp.asarray(grid["lr"])
  start = time.perf_counter()
  jax.block_until_ready(single(gammas[0], lrs[0]))
  single_first = time.perf_counter() - start
  start = time.perf_counter()
  loop = [single(gammas[i], lrs[i]) for i in range(points)]
  jax.block_until_ready(loop)
  loop_s = time.perf_counter() - start
  # Agreement on the upper loss: with Adam, coordinates of x along which
  # the loss is flat follow the sign of rounding noise, so x itself may
  # differ between the two compiled programs while the loss does not.
  upper = jax.jit(jax.vmap(lambda p: app.evaluate(p)["upper_loss"]))
  stacked = jax.tree.map(lambda *v: jnp.stack(v), *loop)
  agree = float(jnp.max(jnp.abs(upper(stacked) - upper(out[0]))))
  agree_x = float(jnp.max(jnp.abs(stacked.x - out[0].x)))
  return dict(problem="regularization (breast cancer), ALT-PBGD K=5",
              points=points, steps_per_run=num_steps,
              vmap_seconds=sweep_s, vmap_compile_seconds=first - sweep_s,
              loop_seconds=loop_s,
              loop_compile_seconds=max(single_first - loop_s / points, 0.0),
              speedup=loop_s / sweep_s,
              runs_per_second_vmap=points / sweep_s,
              runs_per_second_loop=points / loop_s,
              max_abs_difference_upper_loss=agree,
              max_abs_difference_x=agree_x)


# ---------------------------------------------------------------------------
# Sinusoid: time and memory against the number of inner steps r.
# ---------------------------------------------------------------------------


def sinusoid_scaling(app_fn, rs, steps: int, repeats: int) -> list:
  """ms per step and compiled peak memory of FO-BLO and ITD for several r."""
  rows = []
  for r in rs:
    app = app_fn(r)
    batch = one_batch(app, jax.random.PRNGKey(0))
    for name, make in (
        ("FO-BLO", lambda: jbl.fo_blo(
            app.f, app.g, upper_optimizer=optax.adam(1e-3),
            lower_optimizer=optax.sgd(app.info["inner_lr"]), inner_steps=r,
            inner_start=app.info["init"])),
        ("ITD", lambda: jbl.itd(
            app.f, app.g, upper_optimizer=optax.adam(1e-3),
            lower_optimizer=optax.sgd(app.info["inner_lr"]), inner_steps=r,
            inner_start="initial"))):
      tx = make()
      state = tx.init(app.params)
      fn = jax.jit(lambda p, s, tx=tx: jbl.scan_run(
          tx, p, state=s, num_steps=steps, batch=batch,
          on_nonfinite="ignore")[:2])
      compiled = fn.lower(app.params, state).compile()
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(app.params, state))
        times.append(time.perf_counter() - start)
      rows.append(dict(method=name, r=r,
                       ms_per_step=1e3 * statistics.median(times) / steps,
                       peak_bytes=_memory(compiled).get("peak")))
  return rows


def sinusoid_implicit_check(app_fn, proximals, num_batches: int,
                            seed: int) -> list:
  """How well AID's implicit meta-gradient matches exact MAML, per lambda.

  At the initial meta-parameters, on ``num_batches`` meta-batches: AID's
  relative CG residual ``||grad_y f - H v|| / ||grad_y f||`` (small only when
  the proximal weight makes the lower Hessian positive definite) and the
  cosine of AID's and FO-BLO's directions with ITD's (the exact gradient of
  the r-step adaptation that meta-test evaluates). Medians over the batches.
  """
  rows = []
  for proximal in proximals:
    app = app_fn(proximal)
    r, alpha = app.info["inner_steps"], app.info["inner_lr"]
    common = dict(upper_optimizer=optax.sgd(1.0),
                  lower_optimizer=optax.sgd(alpha), inner_steps=r)
    txs = dict(
        aid=jbl.aid(app.f, app.g, linear_steps=10, inner_start=app.info["init"],
                    **common),
        itd=jbl.itd(app.f, app.g, inner_start=app.info["init"], **common),
        fo=jbl.fo_blo(app.f, app.g, inner_start=app.info["init"], **common))

    @jax.jit
    def directions(batch, txs=txs, app=app):
      out = {}
      for name, tx in txs.items():
        updates, state = tx.update(None, tx.init(app.params), app.params,
                                   batch=batch)
        out[name] = ravel_pytree(updates.x)[0]
        if name == "aid":
          y_new = optax.apply_updates(app.params, updates).y
          rhs = jax.grad(app.f, argnums=1)(app.params.x, y_new, batch)
          out["relative_residual"] = (state.diagnostics["linear_residual"]
                                      / jnp.linalg.norm(ravel_pytree(rhs)[0]))
      return out

    cos = lambda a, b: float(a.dot(b) / jnp.linalg.norm(a) / jnp.linalg.norm(b))
    stats = dict(relative_residual=[], cos_aid_itd=[], cos_fo_itd=[])
    for key in jax.random.split(jax.random.PRNGKey(seed + 1), num_batches):
      out = directions(app.sample(key))
      stats["relative_residual"].append(float(out["relative_residual"]))
      stats["cos_aid_itd"].append(cos(out["aid"], out["itd"]))
      stats["cos_fo_itd"].append(cos(out["fo"], out["itd"]))
    rows.append(dict(proximal=proximal, num_batches=num_batches,
                     **{k: statistics.median(v) for k, v in stats.items()}))
  return rows


# ---------------------------------------------------------------------------
# Applications and modes.
# ---------------------------------------------------------------------------


class Mode(NamedTuple):
  budgets: dict
  hyper_cleaning: dict
  nlsy_batch: int
  nlsy_hidden: int
  dpo: dict
  sinusoid: dict
  sweep_axis: int
  sweep_steps: int
  scaling_rs: tuple
  scaling_steps: int
  implicit_batches: int = 20
  repeats: int = 7
  stage2_steps: int = 300


FULL = Mode(
    budgets=dict(hyper_cleaning=Budget(10.0, 10 ** 6, 20, timing_chunk=200),
                 regularization=Budget(5.0, 10 ** 6, 50, timing_chunk=1000),
                 nlsy=Budget(20.0, 10 ** 6, 20),
                 dpo_sft=Budget(25.0, 10 ** 6, 10),
                 sinusoid=Budget(15.0, 10 ** 6, 50)),
    hyper_cleaning=dict(),
    nlsy_batch=500, nlsy_hidden=200,
    dpo=dict(pretrain_steps=3000),
    sinusoid=dict(meta_batch=25, num_eval_tasks=1000),
    sweep_axis=16, sweep_steps=100, scaling_rs=(1, 5, 10, 20),
    scaling_steps=20)

QUICK = Mode(
    budgets=dict(hyper_cleaning=Budget(0.2, 60, 10, 2),
                 regularization=Budget(0.2, 60, 10, 2),
                 nlsy=Budget(0.2, 40, 5, 2),
                 dpo_sft=Budget(0.2, 20, 5, 2),
                 sinusoid=Budget(0.2, 40, 5, 2)),
    hyper_cleaning=dict(num_train=200, num_val=100),
    nlsy_batch=50, nlsy_hidden=16,
    dpo=dict(pretrain_steps=50, config=dpo_sft.LMConfig(d_model=16,
                                                        num_layers=1,
                                                        num_heads=2),
             num_train=64, num_eval=32, batch_size=8),
    sinusoid=dict(meta_batch=4, num_eval_tasks=50, hidden=16),
    sweep_axis=16, sweep_steps=10, scaling_rs=(2,), scaling_steps=5,
    implicit_batches=2, repeats=3, stage2_steps=5)


def build_app(name, mode: Mode, args):
  """The application and notes about its data."""
  if name == "hyper_cleaning":
    return hyper_cleaning.problem(seed=args.seed, **mode.hyper_cleaning), {}
  if name == "regularization":
    return regularization.problem(seed=args.seed), {}
  if name == "nlsy":
    path = os.path.join(args.data_dir, "nlsy79_processed.csv")
    note = {}
    if args.quick and not args.data_dir_given:
      path = nlsy.sample_path()
      note["data"] = "the 200-row sample shipped with jaxbilevel (quick mode)"
    elif not os.path.isfile(path):
      note["data"] = (f"{path} not found: ran on the 200-row sample shipped "
                      "with jaxbilevel instead")
      path = nlsy.sample_path()
    else:
      note["data"] = os.path.abspath(path)
    return nlsy.problem(path, seed=args.seed, batch_size=mode.nlsy_batch,
                        hidden=mode.nlsy_hidden), note
  if name == "dpo_sft":
    app = dpo_sft.problem(seed=args.seed, **mode.dpo)
    pre = app.info["pretraining"]
    return app, dict(start_accuracy=(
        "at the start the policy equals the reference, so the reward margins "
        "are float noise (about 1e-8) and the preference accuracy is a coin "
        "flip"),
                     pretraining_seconds=pre["seconds"],
                     pretraining_steps=pre["steps"],
                     pretraining_final_loss=pre["final_loss"],
                     adapter_params=app.info["num_adapter_params"],
                     head_params=app.info["num_head_params"],
                     backbone_params=app.info["num_backbone_params"],
                     model=app.info["config"])
  if name == "sinusoid":
    return sinusoid.problem(seed=args.seed, **mode.sinusoid), {}
  raise ValueError(name)


METHOD_TABLES = dict(hyper_cleaning=hyper_cleaning_methods,
                     regularization=regularization_methods,
                     nlsy=nlsy_methods, dpo_sft=dpo_sft_methods,
                     sinusoid=sinusoid_methods)

EXTRA_METRICS = dict(
    hyper_cleaning=(("test_accuracy", "test acc"), ("f1", "F1 clean")),
    regularization=(("test_loss", "test loss"), ("test_accuracy", "test acc")),
    nlsy=(("lower_loss", "test MSE g1"), ("test_mse", "test MSE avg"),
          ("parity_gap", "parity gap")),
    dpo_sft=(("lower_loss", "eval SFT"),
             ("preference_accuracy", "pref. acc"),
             ("s2_dpo", "S2 eval DPO"), ("s2_sft_train", "S2 train SFT")),
    sinusoid=(("ci95", "±95% CI"), ("unadapted_loss", "pre-adapt MSE")))

UPPER_NAMES = dict(hyper_cleaning="val CE", regularization="val loss",
                   nlsy="test MSE g0", dpo_sft="eval DPO",
                   sinusoid="meta-test MSE")


# ---------------------------------------------------------------------------
# Output: JSON, Markdown, PNG.
# ---------------------------------------------------------------------------


def _fmt(v, digits=4):
  if v is None:
    return "—"
  if isinstance(v, str):
    return v
  if not math.isfinite(v):
    return str(v)
  if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
    return f"{v:.2e}"
  return f"{v:.{digits}g}"


def markdown(results) -> str:
  machine = results["machine"]
  lines = [
      "# Application benchmarks", "",
      f"Machine: {machine['platform']}, {machine['cpu_count']} CPU cores "
      f"({machine['processor']}), backend `{machine['backend']}` "
      f"({machine['device']}); jax {results['versions']['jax']}, optax "
      f"{results['versions']['optax']}, flax {results['versions']['flax']}. "
      f"Mode: {'quick' if results['quick'] else 'full'}; total "
      f"{results['total_seconds']:.0f} s. Generated by "
      "`python benchmarks/run.py"
      f"{' --quick' if results['quick'] else ''}`.", "",
      "Protocol: every method of an application runs on the same data (the "
      "same full batch, or the same seeded stream of minibatches) for the "
      "same wall-clock budget of training time, in jitted `lax.scan` chunks "
      "of `jaxbilevel.scan_run`; compilation and evaluation are excluded "
      "and reported separately. *ms/step* is the median over chunks of the "
      "time per outer iteration; *floor ratio* divides it by the same "
      "quantity for one fused jitted optax step on grad(f + g) over both "
      "levels (the first row of each table), on the same model and batches. "
      "*Peak MiB* is XLA's compiled memory analysis of a chunk (arguments + "
      "outputs + temporaries − aliased); *state KiB* is the size of the "
      "method's state. The target upper loss is `start − 0.9 × (start − best "
      "final)` over the methods of the application. The machine is shared "
      "with other work, so timings are noisy (±20%).", ""]
  for name in results["applications"]:
    app = results["applications"][name]
    if "error" in app:
      lines += [f"## {name}", "", f"Failed: {app['error']}", ""]
      continue
    extra = EXTRA_METRICS[name]
    budget = app["budget"]
    lines += [f"## {name}", "", app["description"], ""]
    for key, value in app.get("notes", {}).items():
      lines.append(f"- {key}: {value}")
    target = app.get("target") or {}
    lines.append("- at the start: " + ", ".join(
        f"{k} {_fmt(v)}" for k, v in app.get("start", {}).items()))
    lines += [
        f"- budget: {budget['seconds']} s of training per method (at most "
        f"{budget['max_steps']} steps), chunks of {budget['chunk']} steps "
        f"(side-by-side timing: {budget['timing_chunk'] or budget['chunk']})",
        f"- target {UPPER_NAMES[name]}: {_fmt(target.get('target'))} "
        f"(start {_fmt(target.get('start'))}, best final "
        f"{_fmt(target.get('best_final'))})",
        (f"- plot: [{name}.png]({name}.png)" if app.get("plot") else
         "- plot: not written (matplotlib is not installed)"), "",
        "| method | status | steps | ms/step | floor ratio | compile s | "
        f"peak MiB | state KiB | final {UPPER_NAMES[name]} | "
        + " | ".join(label for _, label in extra)
        + " | s to target | steps to target | settings |",
        "|" + "---|" * (12 + len(extra))]
    for row in app["rows"]:
      if "final" not in row:
        lines.append(
            f"| {row['method']} | {row['status']}: {row.get('reason', '')} |"
            + " |" * (11 + len(extra)))
        continue
      mem = row.get("memory", {})
      lines.append(
          f"| {row['method']} | {row['status']} | {row['steps']} | "
          f"{_fmt(row.get('ms_per_step'), 3)} | "
          f"{_fmt(row.get('floor_ratio'), 3)} | "
          f"{_fmt(row['compile_seconds'], 3)} | "
          f"{_fmt(mem['peak'] / 2 ** 20 if 'peak' in mem else None, 3)} | "
          f"{_fmt(mem['state'] / 2 ** 10 if 'state' in mem else None, 4)} | "
          f"{_fmt(row['final']['upper_loss'])} | "
          + " | ".join(_fmt(row["final"].get(k)) for k, _ in extra)
          + f" | {_fmt(row.get('seconds_to_target'), 3)} | "
          f"{_fmt(row.get('steps_to_target'))} | {row['settings']} |")
    if name == "sinusoid" and results.get("sinusoid_scaling"):
      lines += ["", "Time and compiled peak memory per outer step against the "
                "number r of inner steps (expected: FO-BLO flat, ITD "
                "linear):", "", "| method | r | ms/step | peak MiB |",
                "|---|---|---|---|"]
      for row in results["sinusoid_scaling"]:
        lines.append(f"| {row['method']} | {row['r']} | "
                     f"{_fmt(row['ms_per_step'], 3)} | "
                     f"{_fmt((row['peak_bytes'] or 0) / 2 ** 20, 3)} |")
    if name == "sinusoid" and results.get("sinusoid_implicit"):
      lines += ["", "AID's implicit meta-gradient against exact MAML (ITD through the r steps) at the initial "
                "meta-parameters, for the application's proximal weight "
                "lambda and for lambda = 1/(r alpha); medians over "
                f"{results['sinusoid_implicit'][0]['num_batches']} "
                "meta-batches. The residual is CG's (10 iterations) relative "
                "to the right-hand side grad_y f; it is small only when "
                "lambda makes the lower Hessian positive definite.", "",
                "| lambda | CG relative residual | cos(AID, ITD) | "
                "cos(FO-BLO, ITD) |", "|---|---|---|---|"]
      for row in results["sinusoid_implicit"]:
        lines.append(f"| {_fmt(row['proximal'])} | "
                     f"{_fmt(row['relative_residual'], 3)} | "
                     f"{_fmt(row['cos_aid_itd'], 3)} | "
                     f"{_fmt(row['cos_fo_itd'], 3)} |")
    lines.append("")
  if results.get("peer_notes"):
    lines += ["## Peers", ""]
    for peer, note in results["peer_notes"].items():
      lines.append(f"- {peer}: {note}")
    lines.append("")
  sweep = results.get("sweep")
  if sweep:
    lines += [
        "## Sweep throughput", "",
        f"{sweep['points']} (gamma, lr) settings of {sweep['problem']}, "
        f"{sweep['steps_per_run']} steps each: one jitted `jbl.sweep` (vmap) "
        "against a Python loop over the jitted single run (compiled once, "
        "traced hyperparameters). Compile time excluded (reported).", "",
        "| | seconds | runs/s | compile s |", "|---|---|---|---|",
        f"| vmap (`jbl.sweep`) | {_fmt(sweep['vmap_seconds'], 3)} | "
        f"{_fmt(sweep['runs_per_second_vmap'], 4)} | "
        f"{_fmt(sweep['vmap_compile_seconds'], 3)} |",
        f"| Python loop | {_fmt(sweep['loop_seconds'], 3)} | "
        f"{_fmt(sweep['runs_per_second_loop'], 4)} | "
        f"{_fmt(sweep['loop_compile_seconds'], 3)} |", "",
        f"Speed-up of the vmap: {sweep['speedup']:.1f}x. Largest difference "
        "between the two of the final validation loss: "
        f"{sweep['max_abs_difference_upper_loss']:.1e} (of x: "
        f"{sweep['max_abs_difference_x']:.1e}, in directions where the loss "
        "is flat and Adam follows the sign of rounding noise).", ""]
  return "\n".join(lines) + "\n"


def plot(name, app_result, path):
  """Upper loss against training time and iterations, one line per method."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import matplotlib.ticker  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  positive = True
  for row in app_result["rows"]:
    if "curve" not in row or row["role"] == "floor":
      continue
    curve = row["curve"]
    values = np.asarray(curve["upper_loss"], float)
    positive &= bool(np.all(values[np.isfinite(values)] > 0))
    style = dict(linestyle=":") if row["role"] == "peer" else {}
    label = row["method"]
    # Log time/iteration axes (the first point, at 0, is the start line).
    axes[0].plot(curve["seconds"][1:], values[1:], label=label, **style)
    axes[1].plot(curve["steps"][1:], values[1:], label=label, **style)
  target = (app_result.get("target") or {}).get("target")
  start = (app_result.get("target") or {}).get("start")
  for ax, xlabel in zip(axes, ("training time (s)", "outer iterations")):
    if target is not None and math.isfinite(target):
      ax.axhline(target, color="k", linewidth=0.6)
    if start is not None and math.isfinite(start):
      ax.axhline(start, color="0.6", linewidth=0.6, linestyle="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(UPPER_NAMES[name])
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if positive:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7)
  fig.suptitle(f"{name}: upper loss (solid line: target, dashed: start)")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


DESCRIPTIONS = dict(
    hyper_cleaning="Data hyper-cleaning on sklearn digits: "
    "x = per-sample weight logits, y = linear softmax classifier, half the "
    "training labels moved to a different class. Upper loss: validation "
    "cross-entropy; F1: kept samples (sigmoid(x) > 1/2) vs clean samples.",
    regularization="Per-feature L2 regularisation of logistic regression on "
    "sklearn breast cancer: x = log strengths (30), y = classifier. "
    "Implicit differentiation (AID, jaxopt) is the natural reference; peers "
    "run the same problem, data and optimizers.",
    nlsy="NLSY79 fair representation: x = MLP 21-200-200 feature "
    "extractor, y = linear head, f = MSE on group 0, g = MSE on group 1, "
    "500 samples per group per step, fixed seeds. Upper loss: group-0 test "
    "MSE.",
    dpo_sft="DPO (upper, over LoRA r=4 adapters on attention query/value) / "
    "SFT (lower, over the untied output head) of a small flax transformer LM "
    "pre-trained inside the benchmark on a synthetic language "
    "(jaxbilevel.applications.dpo_sft), equal wall-time budget as in "
    "the PBGD-Free LLM experiment. Upper loss: evaluated DPO loss (log 2 at the start: "
    "policy = reference). Stage 2 (S2, transfer): x frozen, the head re-fit "
    "by 300 Adam steps on the other half of the SFT rows; *S2 eval DPO* is "
    "the DPO loss with that head, *S2 train SFT* its SFT loss on those "
    "rows.",
    sinusoid="Few-shot sinusoid regression: x = initialisation of an MLP "
    "1-40-40-1, y = per-task offsets adapted by r = 5 SGD steps (alpha = "
    "0.01) on support MSE + prox, meta-batch 25, 10 shots. Upper loss: "
    "meta-test query MSE after adaptation on held-out tasks.")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny budgets and models (seconds per app)")
  parser.add_argument("--out", default=os.path.join(HERE, "results"),
                      help="output folder (JSON, Markdown, PNG)")
  parser.add_argument("--data-dir", default=None,
                      help="folder with nlsy79_processed.csv (default "
                      "../shared/data next to the repository)")
  parser.add_argument("--only", nargs="+", choices=APPS, default=None,
                      help="run only these applications")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-sweep", action="store_true")
  args = parser.parse_args(argv)
  args.data_dir_given = args.data_dir is not None
  if args.data_dir is None:
    args.data_dir = os.path.join(REPO, "..", "shared", "data")
  mode = QUICK if args.quick else FULL
  apps = args.only or list(APPS)
  os.makedirs(args.out, exist_ok=True)

  total_start = time.perf_counter()
  peers, peer_notes = available_peers()
  results = dict(
      benchmark="applications", quick=args.quick, seed=args.seed,
      machine=dict(platform=platform.platform(), processor=platform.machine(),
                   cpu_count=os.cpu_count(), backend=jax.default_backend(),
                   device=str(jax.devices()[0].device_kind),
                   python=sys.version.split()[0]),
      versions=dict(jax=jax.__version__, optax=optax.__version__,
                    flax=__import__("flax").__version__,
                    jaxbilevel=jbl.__version__),
      applications={}, peer_notes=peer_notes)
  for name in apps:
    print(f"[{name}]", flush=True)
    start = time.perf_counter()
    try:
      app, notes = build_app(name, mode, args)
      methods = METHOD_TABLES[name](app)
      app_peers = peers if name == "regularization" else ()
      after = None
      if name == "dpo_sft":
        transfer = dpo_sft.make_transfer(app, num_steps=mode.stage2_steps)
        after = lambda p: {f"s2_{k}": v for k, v in transfer(p).items()
                           if k != "params"}
      out = run_application(name, app, methods, mode.budgets[name], args.seed,
                            app_peers, mode.repeats, after)
      out.update(description=DESCRIPTIONS[name], notes=notes,
                 budget=mode.budgets[name]._asdict(),
                 info={k: v for k, v in app.info.items()
                       if isinstance(v, (int, float, str, bool, tuple))})
      if name == "sinusoid":
        results["sinusoid_scaling"] = sinusoid_scaling(
            lambda r: sinusoid.problem(seed=args.seed, inner_steps=r,
                                       **mode.sinusoid),
            mode.scaling_rs, mode.scaling_steps, 3)
        results["sinusoid_implicit"] = sinusoid_implicit_check(
            lambda lam: sinusoid.problem(seed=args.seed, proximal=lam,
                                         **mode.sinusoid),
            (1.0, 1.0 / (app.info["inner_steps"] * app.info["inner_lr"])),
            mode.implicit_batches, args.seed)
    except Exception as err:  # pylint: disable=broad-except
      traceback.print_exc()
      out = dict(error=f"{type(err).__name__}: {err}")
    out["seconds"] = time.perf_counter() - start
    results["applications"][name] = out
    if "rows" in out:
      try:
        plot(name, out, os.path.join(args.out, f"{name}.png"))
        out["plot"] = f"{name}.png"
      except ImportError as err:  # matplotlib is an optional extra
        out["plot"] = None
        print(f"  no plot ({err})", flush=True)
  for name in ("jaxopt", "torchopt"):
    if name not in peer_notes:
      peer_notes[name] = ("ran on the regularization problem (rows marked "
                          "peer)" if "regularization" in apps else
                          "installed; runs with the regularization problem")
  if not args.no_sweep:
    print("[sweep]", flush=True)
    results["sweep"] = sweep_throughput(
        regularization.problem(seed=args.seed), mode.sweep_axis,
        mode.sweep_steps)
  results["total_seconds"] = time.perf_counter() - total_start
  with open(os.path.join(args.out, "applications.json"), "w") as fh:
    json.dump(results, fh, indent=1, default=_json_default)
  table = markdown(results)
  with open(os.path.join(args.out, "README.md"), "w") as fh:
    fh.write(table)
  print(table)
  return results


def _json_default(value):
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  if isinstance(value, (np.ndarray, jax.Array)):
    return np.asarray(value).tolist()
  return str(value)


if __name__ == "__main__":
  main()
