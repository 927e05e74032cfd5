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

This file is the command line; the pieces live in ``benchmarks/apps/``:
``methods`` (the method tables as data, settings text generated from their
arguments), ``config`` (applications, budgets), ``harness`` (timing,
memory), ``peers`` (jaxopt, TorchOpt), ``studies`` (sweep throughput,
sinusoid side studies) and ``report`` (JSON, Markdown, PNG).

Usage::

  python benchmarks/run.py              # full mode (about 13 min on 2 CPUs)
  python benchmarks/run.py --quick      # seconds per application (CI)
  python benchmarks/run.py --only nlsy --data-dir DIR   # DIR holds nlsy79_processed.csv

The full NLSY79 file is read from ``--data-dir``, else from the folder named by
the ``JAXBILEVEL_DATA`` environment variable (see the README); without either
(and always in quick mode, unless ``--data-dir`` is given) the NLSY
application runs on the 200-row sample shipped with jaxbilevel.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback

if __name__ == "__main__" and "--quick" in sys.argv[1:]:
  # Quick mode checks the pipeline, not speed: let XLA compile faster.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()

import jax  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

import jaxbilevel as jbl  # pylint: disable=wrong-import-position
from jaxbilevel.applications import dpo_sft  # pylint: disable=wrong-import-position
from jaxbilevel.applications import regularization  # pylint: disable=wrong-import-position
from jaxbilevel.applications import sinusoid  # pylint: disable=wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # run as a script, sys.path[0] is already HERE
  sys.path.insert(0, HERE)

# pylint: disable=wrong-import-position
from apps import config
from apps import harness
from apps import methods as methods_lib
from apps import peers as peers_lib
from apps import report
from apps import studies
# pylint: enable=wrong-import-position


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny budgets and models (seconds per app)")
  parser.add_argument("--out", default=os.path.join(HERE, "results"),
                      help="output folder (JSON, Markdown, PNG)")
  parser.add_argument("--data-dir", default=None,
                      help="folder with nlsy79_processed.csv (default: "
                      "$JAXBILEVEL_DATA; without it, the shipped 200-row "
                      "sample)")
  parser.add_argument("--only", nargs="+", choices=config.APPS, default=None,
                      help="run only these applications")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-sweep", action="store_true")
  args = parser.parse_args(argv)
  args.data_dir_given = args.data_dir is not None
  if args.data_dir is None:
    args.data_dir = os.environ.get("JAXBILEVEL_DATA") or None
  mode = config.QUICK if args.quick else config.FULL
  apps = args.only or list(config.APPS)
  os.makedirs(args.out, exist_ok=True)

  total_start = time.perf_counter()
  peers, peer_notes = peers_lib.available_peers()
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
      app, notes = config.build_app(name, mode, args)
      methods = methods_lib.METHOD_TABLES[name](app)
      app_peers = peers if name == "regularization" else ()
      after = None
      if name == "dpo_sft":
        transfer = dpo_sft.make_transfer(app, num_steps=mode.stage2_steps)
        after = lambda p: {f"s2_{k}": v for k, v in transfer(p).items()
                           if k != "params"}
      out = harness.run_application(name, app, methods, mode.budgets[name], args.seed,
                            app_peers, mode.repeats, after)
      out.update(description=config.DESCRIPTIONS[name], notes=notes,
                 budget=mode.budgets[name]._asdict(),
                 # A data file by its name: the results carry no paths of
                 # the machine that wrote them.
                 info={k: os.path.basename(v) if k == "path" else v
                       for k, v in app.info.items()
                       if isinstance(v, (int, float, str, bool, tuple))})
      if name == "sinusoid":
        results["sinusoid_scaling"] = studies.sinusoid_scaling(
            lambda r: sinusoid.problem(seed=args.seed, inner_steps=r,
                                       **mode.sinusoid),
            mode.scaling_rs, mode.scaling_steps, 3)
        results["sinusoid_implicit"] = studies.sinusoid_implicit_check(
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
        report.plot(name, out, os.path.join(args.out, f"{name}.png"))
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
    results["sweep"] = studies.sweep_throughput(
        regularization.problem(seed=args.seed), mode.sweep_axis,
        mode.sweep_steps)
  results["total_seconds"] = time.perf_counter() - total_start
  table = report.write(results, args.out)
  print(table)
  return results


if __name__ == "__main__":
  main()
