"""Running methods under a budget and timing them against the floor.

Each method runs as jitted ``lax.scan`` chunks of ``jaxbilevel.scan_run``;
compilation is timed separately and excluded, evaluation on held-out data
happens between chunks and is excluded. After the budget run, chunks of
the method and of the floor are interleaved (``side_by_side``) so that the
load of a shared machine affects both alike; ms per step and the floor
ratio are medians over those repeats. Peak memory comes from XLA's memory
analysis of the compiled chunk.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
import traceback
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

import jaxbilevel as jbl
from jaxbilevel.applications import batch_stream

from .methods import FLOOR

TARGET_FRACTION = 0.9
EVAL_GROWTH = 1.1     # evaluations at training times growing by 10% at least


class Budget(NamedTuple):
  seconds: float      # training wall time per method
  max_steps: int      # outer iterations at most
  chunk: int          # outer iterations per jitted chunk
  min_chunks: int = 3
  timing_chunk: Optional[int] = None   # chunk of the side-by-side timing


def floats(metrics):
  return {k: float(v) for k, v in metrics.items()}


def tree_bytes(tree):
  return int(sum(np.size(v) * np.dtype(v.dtype).itemsize
                 for v in jax.tree.leaves(tree) if hasattr(v, "dtype")))


def compiled_memory(compiled):
  """Peak bytes of a compiled program from XLA's memory analysis."""
  out = {}
  # Not a stub: XLA's memory analysis is optional per backend; without it the
  # result is {} and the tables print no memory column.
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
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
  memory = compiled_memory(compiled)
  memory["state"] = tree_bytes(state)

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
  final = floats(evaluate(params))
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


def with_target(rows):
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

  ``methods`` is the application's table (``methods.METHOD_TABLES``), whose
  first row is the floor.

  ``after(params) -> dict`` adds metrics computed from each method's final
  params (DPO/SFT's stage 2).
  """
  key = jax.random.PRNGKey(seed)
  evaluate = jax.jit(app.evaluate)
  start_metrics = floats(evaluate(app.params))
  rows, runners = [], {}
  for method in methods:
    row = dict(method=method.name, settings=method.settings,
               role="floor" if method.name == FLOOR else "method")
    if method.constructor is None:
      row.update(status="not run", reason=method.reason)
      rows.append(row)
      continue
    print(f"  {name}: {method.name} ...", flush=True)
    try:
      result, runners[method.name] = run_budget(app, method.make(app.f, app.g),
                                                budget,
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
  target = with_target(rows)
  return dict(rows=rows, target=target, start=start_metrics)

