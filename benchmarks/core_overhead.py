"""Time per outer iteration of the core methods against the floor, side by side.

The floor is one fused, jitted optax step on the gradient of ``f + g`` with
respect to both levels (what a single-level training loop would cost on the
same model and batch). Each method runs ``--steps`` outer iterations inside
one jitted ``lax.scan`` (``jaxbilevel.scan_run``); the floor runs the same
number of steps inside an equally jitted scan. Compile time is measured
separately and excluded; times are medians over ``--repeats`` runs.

Model: an MLP feature extractor ``x`` (``--features`` -> hidden -> hidden,
ReLU) and a linear head ``y``, upper loss = MSE on one group, lower loss = MSE
on another (the shape of the NLSY fair-representation experiment, on
synthetic data so that the script needs no files).

Usage: ``python benchmarks/core_overhead.py [--quick] [--out benchmarks/results]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbilevel as jbl


def make_problem(features, hidden, batch, seed=0):
  key = jax.random.PRNGKey(seed)
  k = jax.random.split(key, 6)
  scale1, scale2 = 1 / np.sqrt(features), 1 / np.sqrt(hidden)
  x = {"w1": scale1 * jax.random.normal(k[0], (features, hidden)),
       "b1": jnp.zeros(hidden),
       "w2": scale2 * jax.random.normal(k[1], (hidden, hidden)),
       "b2": jnp.zeros(hidden)}
  y = {"w": scale2 * jax.random.normal(k[2], (hidden,)), "b": jnp.zeros(())}
  true_w = jax.random.normal(k[3], (features,))
  a0 = jax.random.normal(k[4], (batch, features))
  a1 = jax.random.normal(k[5], (batch, features)) + 0.5
  data = {"a0": a0, "t0": jnp.tanh(a0 @ true_w),
          "a1": a1, "t1": jnp.tanh(a1 @ true_w) + 0.3}

  def net(x, y, a):
    h = jax.nn.relu(a @ x["w1"] + x["b1"])
    h = jax.nn.relu(h @ x["w2"] + x["b2"])
    return h @ y["w"] + y["b"]

  def f(x, y, batch):
    return jnp.mean((net(x, y, batch["a0"]) - batch["t0"]) ** 2)

  def g(x, y, batch):
    return jnp.mean((net(x, y, batch["a1"]) - batch["t1"]) ** 2)

  return f, g, jbl.BilevelParams(x, y), data


def floor_fn(f, g, steps):
  """``steps`` fused optax steps on grad(f + g) over both levels, in a scan."""
  opt = optax.adam(1e-3, eps=1e-3)

  @jax.jit
  def run(params, batch):
    def body(carry, _):
      p, s = carry
      grads = jax.grad(lambda q: f(q.x, q.y, batch) + g(q.x, q.y, batch))(p)
      upd, s = opt.update(grads, s, p)
      return (optax.apply_updates(p, upd), s), None
    return jax.lax.scan(body, (params, opt.init(params)), None,
                        length=steps)[0][0]
  return run


def method_fn(tx, steps):
  @jax.jit
  def run(params, batch):
    return jbl.scan_run(tx, params, num_steps=steps, batch=batch,
                        on_nonfinite="ignore")[0]
  return run


def timed(fn, params, batch, repeats):
  start = time.perf_counter()
  jax.block_until_ready(fn(params, batch))
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(params, batch))
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  return median, max(first - median, 0.0)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results"))
  args = parser.parse_args(argv)
  if args.quick:
    features, hidden, batch, steps, repeats = 21, 32, 64, 20, 3
  else:
    features, hidden, batch, steps, repeats = 21, 200, 500, args.steps, (
        args.repeats)

  f, g, params, data = make_problem(features, hidden, batch)
  adam = lambda: optax.adam(1e-3, eps=1e-3)
  methods = {
      "PBGD-Free (K=1)": jbl.pbgd_free(
          f, g, gamma=10.0, upper_optimizer=adam(), lower_optimizer=adam()),
      "ALT-PBGD (K=1)": jbl.alt_pbgd(
          f, g, gamma=10.0, upper_optimizer=adam(), lower_optimizer=adam()),
      "ALT-PBGD (K=5)": jbl.alt_pbgd(
          f, g, gamma=10.0, upper_optimizer=adam(), lower_optimizer=adam(),
          inner_steps=5),
      "V-PBGD (T=1)": jbl.v_pbgd(
          f, g, gamma=10.0, upper_optimizer=adam(), lower_optimizer=adam()),
  }
  floor_time, floor_compile = timed(floor_fn(f, g, steps), params, data,
                                    repeats)
  rows = [dict(method="floor: fused optax step on grad(f + g)",
               ms_per_step=1e3 * floor_time / steps, ratio_to_floor=1.0,
               compile_s=floor_compile)]
  for name, tx in methods.items():
    seconds, compile_s = timed(method_fn(tx, steps), params, data, repeats)
    rows.append(dict(method=name, ms_per_step=1e3 * seconds / steps,
                     ratio_to_floor=seconds / floor_time, compile_s=compile_s))

  result = dict(
      benchmark="core_overhead", quick=args.quick,
      machine=dict(platform=platform.platform(), processor=platform.machine(),
                   cpu_count=os.cpu_count(),
                   device=str(jax.devices()[0].device_kind),
                   backend=jax.default_backend()),
      versions=dict(jax=jax.__version__, optax=optax.__version__,
                    jaxbilevel=jbl.__version__),
      model=dict(features=features, hidden=hidden, batch_per_group=batch),
      steps_per_timing=steps, repeats=repeats, rows=rows)
  lines = [
      "# Core methods: time per outer iteration vs the floor", "",
      f"Machine: {result['machine']['platform']}, {os.cpu_count()} CPUs, "
      f"backend {result['machine']['backend']}; jax {jax.__version__}. "
      f"MLP {features}->{hidden}->{hidden} + linear head, {batch} samples per "
      f"group; {steps} steps per timing, median of {repeats}, compile time "
      "excluded.", "",
      "| method | ms / outer step | ratio to floor | compile (s) |",
      "|---|---|---|---|"]
  for row in rows:
    lines.append(f"| {row['method']} | {row['ms_per_step']:.3f} | "
                 f"{row['ratio_to_floor']:.2f} | {row['compile_s']:.2f} |")
  table = "\n".join(lines) + "\n"
  print(table)
  if not args.quick:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "core_overhead.json"), "w") as fh:
      json.dump(result, fh, indent=2)
    with open(os.path.join(args.out, "core_overhead.md"), "w") as fh:
      fh.write(table)
  return result


if __name__ == "__main__":
  main()
