"""Compile time and memory against the number of parameter leaves, and memory across many runs.

For 10, 100 and 1,000 leaves per level (each leaf of shape (4,)), a fresh
Python process builds PBGD-Free (SGD on both levels, 50 steps) and times its
first call, compilation included, with one of three contenders:

* ``run``: ``jaxbilevel.run`` (default options);
* ``sweep``: ``jaxbilevel.sweep`` over 8 values of gamma;
* ``hand``: the same algorithm written by hand as a jitted ``lax.scan`` with
  gamma an argument of the compiled program, as in ``jbl.run`` (which reuses
  its program for every gamma) and, for the sweep, ``jit(vmap(...))`` over
  the 8 values;
* ``hand_const``: the hand-written scan with gamma = 10 compiled in as a
  constant, which XLA compiles faster but must compile again for each value.

Each measurement runs in its own process, so that nothing is cached and the
peak resident memory (``ru_maxrss``) belongs to that contender alone; the
contenders alternate (hand, run, sweep, hand, ...) over ``--rounds`` rounds
and the medians are reported. A second study calls ``jaxbilevel.run`` 100
times in one process with a freshly built (identical) transformation each time
and records the resident memory after each call.

Usage::

  python benchmarks/compile_memory.py            # writes benchmarks/results/
  python benchmarks/compile_memory.py --quick    # 10 and 100 leaves, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

_CHILD = r'''
import json, resource, sys, time
import jax, jax.numpy as jnp, optax
import jaxbilevel as jbl
n, who, steps, points = int(sys.argv[1]), sys.argv[2], 50, 8
x = {f"x{i}": jnp.full((4,), 0.1 * i) for i in range(n)}
y = {f"y{i}": jnp.zeros(4) for i in range(n)}
def f(x, y, batch):
  return (sum(jnp.sum((v - 1.0) ** 2) for v in y.values())
          + sum(jnp.sum(v ** 2) for v in x.values()))
def g(x, y, batch):
  return sum(jnp.sum((y[f"y{i}"] - x[f"x{i}"]) ** 2) for i in range(n))
def make_tx(gamma):
  return jbl.pbgd_free(f, g, gamma=gamma, upper_optimizer=optax.sgd(0.1),
                       lower_optimizer=optax.sgd(0.1))
def hand_run(x, y, gamma):
  def step(carry, _):
    x, y = carry
    gy = jax.grad(lambda y_: f(x, y_, None) / gamma + g(x, y_, None))(y)
    y = jax.tree.map(lambda a, b: a - 0.1 * b, y, gy)
    gx = jax.grad(f)(x, y, None)
    x = jax.tree.map(lambda a, b: a - 0.1 * b, x, gx)
    return (x, y), None
  return jax.lax.scan(step, (x, y), None, length=steps)[0]
p0 = jbl.BilevelParams(x, y)
gammas = jnp.linspace(5.0, 40.0, points)
start = time.perf_counter()
if who == "run":
  out = jbl.run(make_tx(10.0), p0, num_steps=steps)[0]
elif who == "sweep":
  out = jbl.sweep(make_tx, p0, {"gamma": gammas}, num_steps=steps)[0]
elif who == "hand":
  out = jax.jit(hand_run)(x, y, jnp.asarray(10.0))
elif who == "hand_const":
  out = jax.jit(lambda x, y: hand_run(x, y, 10.0))(x, y)
elif who == "hand_sweep":
  out = jax.jit(jax.vmap(hand_run, in_axes=(None, None, 0)))(x, y, gammas)
jax.block_until_ready(out)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds,
                  "peak_rss_mb": resource.getrusage(
                      resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''

_MANY_RUNS = r'''
import json, os, sys
import jax, jax.numpy as jnp, optax
import jaxbilevel as jbl
def rss_mb():
  with open(f"/proc/{os.getpid()}/statm") as fh:
    return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
f = lambda x, y, batch: jnp.sum(x ** 2) + jnp.sum((y - 1.0) ** 2)
g = lambda x, y, batch: jnp.sum((y - x) ** 2)
p0 = jbl.BilevelParams(jnp.ones(8), jnp.zeros(8))
rss = []
for i in range(int(sys.argv[1])):
  tx = jbl.pbgd_free(f, g, gamma=10.0, upper_optimizer=optax.sgd(0.1),
                     lower_optimizer=optax.sgd(0.1))
  jbl.run(tx, p0, num_steps=20)
  rss.append(rss_mb())
print(json.dumps({"rss_mb": rss}))
'''


def _child(code, *args):
  out = subprocess.run([sys.executable, "-c", code, *map(str, args)],
                       check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def write_markdown(result, path):
  """Writes the Markdown table of ``result`` (the JSON's content) to ``path``."""
  rows, rounds = result["rows"], result["rounds"]
  lines = [
      "# Compile time and memory against the number of leaves",
      "",
      f"Machine: {result['machine']}. First call (trace + compile + 50 "
      f"steps) of PBGD-Free in a fresh process, median of {rounds} "
      "interleaved round(s); leaves of shape (4,). Written by "
      "`benchmarks/compile_memory.py`. The hand-written scan takes gamma as "
      "an argument, as `jbl.run`'s program does (one program serves every "
      "gamma value); compiled with gamma as a constant it is the next column. "
      "Wall-clock times on a shared machine (other jobs were running), so "
      "compare the interleaved ratios rather than single numbers.",
      "",
      "| leaves per level | hand scan (s) | jbl.run (s) | run / hand | "
      "hand scan, gamma constant (s) | run / that | hand jit(vmap) (s) | "
      "jbl.sweep (s) | sweep / hand | peak RSS hand / run / sweep (MB) |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['leaves_per_level']} | {r['hand_s']:.2f} | {r['run_s']:.2f} | "
        f"{r['run_over_hand']:.2f} | {r['hand_const_s']:.2f} | "
        f"{r['run_over_hand_const']:.2f} | {r['hand_sweep_s']:.2f} | "
        f"{r['sweep_s']:.2f} | {r['sweep_over_hand']:.2f} | "
        f"{r['hand_peak_mb']:.0f} / {r['run_peak_mb']:.0f} / "
        f"{r['sweep_peak_mb']:.0f} |")
  m = result["many_runs"]
  lines += ["", f"{m['runs']} calls of `jbl.run`, each with a newly built "
            f"(identical) transformation, in one process: resident memory "
            f"{m['rss_first_mb']:.0f} MB after the first, "
            f"{m['rss_last_mb']:.0f} MB after the last "
            f"(growth {m['growth_mb']:+.1f} MB).", ""]
  with open(path, "w") as fh:
    fh.write("\n".join(lines))
  print("\n".join(lines))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(__file__), "results"))
  parser.add_argument("--markdown", metavar="JSON",
                      help="only rewrite the Markdown table of a results file")
  args = parser.parse_args()
  if args.markdown:
    with open(args.markdown) as fh:
      write_markdown(json.load(fh), args.markdown[:-len(".json")] + ".md")
    return
  sizes = (10, 100) if args.quick else (10, 100, 1000)
  rounds = 1 if args.quick else args.rounds
  contenders = ("hand", "run", "hand_const", "hand_sweep", "sweep")
  rows = []
  for n in sizes:
    samples = {c: [] for c in contenders}
    for _ in range(rounds):
      for who in contenders:  # interleaved: hand, run, hand_sweep, sweep
        samples[who].append(_child(_CHILD, n, who))
        print(n, who, samples[who][-1], flush=True)
    row = {"leaves_per_level": n}
    for who in contenders:
      row[f"{who}_s"] = statistics.median(s["seconds"] for s in samples[who])
      row[f"{who}_peak_mb"] = statistics.median(
          s["peak_rss_mb"] for s in samples[who])
    row["run_over_hand"] = row["run_s"] / row["hand_s"]
    row["run_over_hand_const"] = row["run_s"] / row["hand_const_s"]
    row["sweep_over_hand"] = row["sweep_s"] / row["hand_sweep_s"]
    rows.append(row)
  num_runs = 20 if args.quick else 100
  many = _child(_MANY_RUNS, num_runs)["rss_mb"]
  result = {
      "machine": f"{platform.processor() or platform.machine()}, "
                 f"{os.cpu_count()} cores, {platform.system()}",
      "rounds": rounds, "steps": 50, "sweep_points": 8, "rows": rows,
      "many_runs": {"runs": num_runs, "rss_first_mb": many[0],
                    "rss_last_mb": many[-1],
                    "growth_mb": many[-1] - many[0], "rss_mb": many},
  }
  os.makedirs(args.out, exist_ok=True)
  name = "compile_memory_quick" if args.quick else "compile_memory"
  with open(os.path.join(args.out, name + ".json"), "w") as fh:
    json.dump(result, fh, indent=1)
  write_markdown(result, os.path.join(args.out, name + ".md"))



if __name__ == "__main__":
  main()
