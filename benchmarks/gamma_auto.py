"""gamma="auto" (penalty continuation) against a dense grid, and choose_method.

For each held-out problem with a known best upper value, ALT-PBGD and V-PBGD
run ``S`` outer steps with ``gamma="auto"`` (default
``jbl.GammaContinuation()``) and, for comparison, at fixed ``gamma`` = 10,
100 and 1000; each end point ``x`` is scored by the bilevel objective
``F(x) = f(x, y*(x))`` at the exact lower solution, against the best value:

* ridge weight decay (``x = log lambda``, in ``g`` only): ``jbl.problems.ridge``
  and scikit-learn's diabetes data (standardised, even/odd split), closed-form
  ``y*(x)``; the best is the minimum of ``F`` over a grid of 4,001 values
  of ``x`` in [-14, 6];
* logistic weight decay on scikit-learn's breast-cancer data (standardised,
  even/odd split), ``y*(x)`` by 30 Newton steps; the same grid;
* the same data and split with a flax.nnx MLP (30-32-1, tanh) as ``y``, the
  weight decay on all its weights; ``y*(x)`` is the lower solution L-BFGS
  reaches from the initial weights (500 iterations), against a grid of 65
  values of ``x`` in [-14, 2] and 41 around the best of them;
* the closed-form quadratic families ``jbl.problems.random_quadratic`` (seeds
  0, 1) and ``quadratic_a8``: the best is ``F(x*)`` at the exact solution.

The relative gap is ``(F(x) - F_best) / |F_best|``. The cost ratio is the
median over interleaved rounds of the wall time of the ``gamma="auto"`` run
over that of one fixed-gamma run of the same length timed right after it
(``jbl.run``, compiled beforehand; the runs take milliseconds, so the ratio
moves with the machine's load), and the ratio of XLA's static FLOPs of one
compiled step (both branches of each ``lax.cond`` counted, loop bodies once:
an overestimate of the continuation's share).
Also: the ``jbl.gamma_check`` verdict at gamma = 10 and at the auto end point,
and ``jbl.choose_method``'s pick on the flat and non-flat problems of
``jbl.problems``.

Usage: ``python benchmarks/gamma_auto.py [--quick] [--out benchmarks/results]
[--only NAME ...]`` (``--quick``: fewer steps and rounds; writes
``gamma_auto_quick.{json,md}``; ``--only``: re-runs those problems and
replaces their entries in the existing results file, recording the command
per problem).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

import jaxbilevel as jbl  # pylint: disable=g-import-not-at-top

GRID = np.linspace(-14.0, 6.0, 4001)
FIXED_GAMMAS = (10.0, 100.0, 1000.0)


# ---------------------------------------------------------------------------
# Problems: (f, g, params0, F(x) exact, F_best, optimizer settings).
# ---------------------------------------------------------------------------


def _standardised_split(features, targets):
  features = (features - features.mean(0)) / features.std(0)
  return (features[0::2], targets[0::2], features[1::2], targets[1::2])


def _ridge(x_tr, y_tr, x_va, y_va):
  x_tr, y_tr, x_va, y_va = (jnp.asarray(v, jnp.float64)
                            for v in (x_tr, y_tr, x_va, y_va))
  n, d = x_tr.shape

  def g(x, y, batch=None):
    del batch
    return (0.5 * jnp.mean((x_tr @ y - y_tr) ** 2)
            + 0.5 * jnp.exp(x) * jnp.sum(y ** 2))

  def f(x, y, batch=None):
    del x, batch
    return 0.5 * jnp.mean((x_va @ y - y_va) ** 2)

  def y_star(x):
    return jnp.linalg.solve(x_tr.T @ x_tr / n + jnp.exp(x) * jnp.eye(d),
                            x_tr.T @ y_tr / n)

  lower_l = float(np.linalg.eigvalsh(np.asarray(x_tr.T @ x_tr / n)).max())
  return f, g, y_star, d, lower_l


def _logistic(x_tr, y_tr, x_va, y_va):
  x_tr, x_va = (jnp.asarray(v, jnp.float64) for v in (x_tr, x_va))
  s_tr = jnp.asarray(2.0 * y_tr - 1.0, jnp.float64)
  s_va = jnp.asarray(2.0 * y_va - 1.0, jnp.float64)
  d = x_tr.shape[1]

  def g(x, y, batch=None):
    del batch
    return (jnp.mean(jax.nn.softplus(-s_tr * (x_tr @ y)))
            + 0.5 * jnp.exp(x) * jnp.sum(y ** 2))

  def f(x, y, batch=None):
    del x, batch
    return jnp.mean(jax.nn.softplus(-s_va * (x_va @ y)))

  def y_star(x):
    def newton(y, _):
      grad = jax.grad(g, argnums=1)(x, y)
      hess = jax.hessian(g, argnums=1)(x, y)
      return y - jnp.linalg.solve(hess, grad), None
    return jax.lax.scan(newton, jnp.zeros(d), None, length=30)[0]

  lower_l = 0.25 * float(np.linalg.eigvalsh(
      np.asarray(x_tr.T @ x_tr) / x_tr.shape[0]).max())
  return f, g, y_star, d, lower_l


def weight_decay_problem(name):
  """f, g, params0, F, F_best, lower smoothness of a weight-decay problem."""
  if name == "mlp_breast_cancer":
    return _mlp_breast_cancer()
  if name == "ridge_toy":
    prob = jbl.problems.ridge()
    data = {k: np.asarray(v) for k, v in prob.info["data"].items()}
    f, g, y_star, d, lower_l = _ridge(data["X_train"], data["y_train"],
                                      data["X_val"], data["y_val"])
    f, g = prob.f, prob.g  # the library's own objectives (1/2 mean, same)
  else:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    if name == "ridge_diabetes":
      raw = datasets.load_diabetes()
      target = (raw.target - raw.target.mean()) / raw.target.std()
      f, g, y_star, d, lower_l = _ridge(*_standardised_split(raw.data,
                                                             target))
    else:
      raw = datasets.load_breast_cancer()
      f, g, y_star, d, lower_l = _logistic(
          *_standardised_split(raw.data, raw.target.astype(np.float64)))
  big_f = jax.jit(jax.vmap(lambda x: f(x, y_star(x), None)))
  values = np.asarray(big_f(jnp.asarray(GRID)))
  params0 = jbl.BilevelParams(jnp.asarray(0.0, jnp.float64),
                              jnp.zeros(d, jnp.float64))
  return dict(f=f, g=g, params0=params0,
              F=lambda x: float(big_f(jnp.atleast_1d(x))[0]),
              F_best=float(values.min()),
              x_best=float(GRID[int(values.argmin())]),
              F_start=float(big_f(jnp.zeros(1))[0]), lower_l=lower_l,
              best_from=f"grid of {GRID.size} values of x in [-14, 6]")


def _mlp_breast_cancer():
  """A flax.nnx MLP (30-32-1, tanh) on breast cancer, weight decay e^x on all weights.

  ``y*(x)`` is not unique for a network: it is the lower solution that
  L-BFGS (``optax.lbfgs``, 500 iterations, vmapped over the grid) reaches
  from the initial weights, the point every run starts from.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  raw = datasets.load_breast_cancer()
  x_tr, t_tr, x_va, t_va = (jnp.asarray(v, jnp.float64) for v in
                            _standardised_split(raw.data, raw.target))

  class MLP(nnx.Module):

    def __init__(self, rngs):
      self.hidden = nnx.Linear(30, 32, rngs=rngs, param_dtype=jnp.float64)
      self.out = nnx.Linear(32, 1, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, inputs):
      return self.out(jnp.tanh(self.hidden(inputs)))[:, 0]

  graphdef, weights = nnx.split(MLP(nnx.Rngs(0)))

  def loss(w, inputs, labels):
    logits = nnx.merge(graphdef, w)(inputs)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))

  def g(x, w, batch=None):
    del batch
    return loss(w, x_tr, t_tr) + 0.5 * jnp.exp(x) * optax.tree_utils.tree_norm(
        w, squared=True)

  def f(x, w, batch=None):
    del x, batch
    return loss(w, x_va, t_va)

  def y_star(x):
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(lambda w: g(x, w))

    def iteration(carry, _):
      w, state = carry
      value, grad = value_and_grad(w, state=state)
      updates, state = solver.update(grad, state, w, value=value, grad=grad,
                                     value_fn=lambda v: g(x, v))
      return (optax.apply_updates(w, updates), state), None

    return jax.lax.scan(iteration, (weights, solver.init(weights)), None,
                        length=500)[0][0]

  def evaluate(x):
    w = y_star(x)
    return f(x, w), optax.tree_utils.tree_norm(jax.grad(g, 1)(x, w))

  evaluate = jax.jit(jax.vmap(evaluate))
  coarse = np.linspace(-14.0, 2.0, 65)
  values, grad_norms = (np.asarray(v) for v in evaluate(jnp.asarray(coarse)))
  centre = coarse[int(values.argmin())]
  fine = centre + np.linspace(-0.25, 0.25, 41)
  fine_values, fine_norms = (np.asarray(v) for v in evaluate(
      jnp.asarray(fine)))
  grid = np.concatenate([coarse, fine])
  values = np.concatenate([values, fine_values])
  params0 = jbl.BilevelParams(jnp.asarray(0.0, jnp.float64), weights)
  return dict(f=f, g=g, params0=params0,
              F=lambda x: float(evaluate(jnp.atleast_1d(x))[0][0]),
              F_best=float(values.min()), x_best=float(grid[values.argmin()]),
              F_start=float(evaluate(jnp.zeros(1))[0][0]),
              # No global smoothness constant for a network: a step size of
              # 0.5, stable on this problem at every gamma of the table.
              lower_l=2.0,
              refit_grad_norm=float(max(grad_norms.max(), fine_norms.max())),
              best_from="grid of 65 values of x in [-14, 2] and 41 in "
              f"[{fine[0]:.2f}, {fine[-1]:.2f}]; y*(x) by 500 L-BFGS steps "
              "from the initial weights")


def quadratic_problem(name):
  prob = (jbl.problems.quadratic_a8() if name == "quadratic_a8" else
          jbl.problems.random_quadratic(int(name[-1])))
  coeffs = prob.info["coefficients"]

  def big_f(x):
    return float(prob.f(jnp.asarray(x), jnp.asarray(coeffs.y_star(
        np.asarray(x)))))

  x_star = coeffs.x_star()
  return dict(f=prob.f, g=prob.g, params0=prob.params0, F=big_f,
              F_best=big_f(x_star), x_best=x_star.tolist(),
              F_start=big_f(np.asarray(prob.params0.x)),
              lower_l=prob.info["lower_lipschitz"],
              best_from="exact solution x_star()")


WEIGHT_DECAY = ("ridge_toy", "ridge_diabetes", "logistic_breast_cancer",
                "mlp_breast_cancer")
QUADRATICS = ("random_quadratic_0", "random_quadratic_1", "quadratic_a8")


def build(method, problem, gamma, num_steps):
  """The method's transformation with this problem's optimizer settings."""
  weight_decay = problem["params0"].x.ndim == 0
  lower_lr = 1.0 / problem["lower_l"] if weight_decay else (
      0.5 / problem["lower_l"])
  upper = optax.adam(optax.cosine_decay_schedule(0.1, num_steps))
  f, g = problem["f"], problem["g"]
  if method == "alt_pbgd":
    return jbl.alt_pbgd(f, g, gamma=gamma, upper_optimizer=upper,
                        lower_optimizer=optax.sgd(lower_lr), inner_steps=10)
  return jbl.v_pbgd(f, g, gamma=gamma, upper_optimizer=upper,
                    lower_optimizer=optax.sgd(lower_lr), value_steps=10,
                    normalize=True)


def _timed(tx, params0, num_steps):
  start = time.perf_counter()
  params, _, _ = jbl.run(tx, params0, num_steps=num_steps)
  jax.block_until_ready(params)
  return time.perf_counter() - start


def evaluate(problem, method, num_steps, rounds):
  rows = {}
  auto_tx = build(method, problem, "auto", num_steps)
  params, state, history = jbl.run(auto_tx, problem["params0"],
                                   num_steps=num_steps,
                                   diagnostics=("gamma",))
  value = problem["F"](np.asarray(params.x))
  rows["auto"] = dict(F=value, gap=(value - problem["F_best"]) / abs(
      problem["F_best"]), x=np.asarray(params.x).tolist(),
                      gamma_first=float(history["gamma"][0]),
                      gamma_last=float(history["gamma"][-1]),
                      increases=int(np.sum(np.diff(history["gamma"]) > 0)))
  if method == "v_pbgd":
    # The cap V-PBGD's default replaced (10 x the start): 100 x the start,
    # every other method's default.
    cap = 100.0 * rows["auto"]["gamma_first"]
    params, _, _ = jbl.run(build(method, problem, jbl.GammaContinuation(
        max=cap), num_steps), problem["params0"], num_steps=num_steps)
    value = problem["F"](np.asarray(params.x))
    rows["auto_cap100"] = dict(F=value, gap=(value - problem["F_best"])
                               / abs(problem["F_best"]))
  for gamma in FIXED_GAMMAS:
    params, _, _ = jbl.run(build(method, problem, gamma, num_steps),
                           problem["params0"], num_steps=num_steps)
    value = problem["F"](np.asarray(params.x))
    rows[f"gamma={gamma:g}"] = dict(
        F=value, gap=(value - problem["F_best"]) / abs(problem["F_best"]),
        x=np.asarray(params.x).tolist())
  # Cost: interleaved rounds, compilation excluded (one warm-up call each);
  # the ratio is the median over rounds of auto / fixed timed back to back
  # (robust to the load of a shared machine drifting between rounds), and
  # the FLOPs ratio that of one compiled step (XLA's cost analysis).
  fixed_tx = build(method, problem, 10.0, num_steps)
  _timed(auto_tx, problem["params0"], num_steps)
  _timed(fixed_tx, problem["params0"], num_steps)
  auto_t, fixed_t = [], []
  for _ in range(rounds):
    auto_t.append(_timed(auto_tx, problem["params0"], num_steps))
    fixed_t.append(_timed(fixed_tx, problem["params0"], num_steps))
  rows["cost"] = dict(
      auto_s=statistics.median(auto_t), fixed_s=statistics.median(fixed_t),
      ratio=statistics.median(a / b for a, b in zip(auto_t, fixed_t)),
      flops_ratio=_step_flops(auto_tx, problem) / _step_flops(fixed_tx,
                                                               problem))
  return rows


def _step_flops(tx, problem):
  params0 = problem["params0"]
  step = jax.jit(lambda p, s: jbl.step(tx, p, s))
  analysis = step.lower(params0, tx.init(params0)).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis["flops"])


def gamma_check_rows(problem, num_steps):
  """The gamma_check verdict at gamma = 10 and at the auto end point (ALT-PBGD)."""
  out = {}
  for label, gamma in (("gamma=10", 10.0), ("auto", "auto")):
    params, state, _ = jbl.run(build("alt_pbgd", problem, gamma, num_steps),
                               problem["params0"], num_steps=num_steps)
    check = jbl.gamma_check(problem["f"], problem["g"],
                            lower_optimizer=optax.sgd(
                                1.0 / problem["lower_l"]), num_steps=2000)
    numbers = jax.device_get(check(params, state))
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      jbl.warn_if_gamma_small(numbers)
    out[label] = dict(
        f_at_iterate=float(numbers["f_at_iterate"]),
        f_at_lower_solution=float(numbers["f_at_lower_solution"]),
        lower_gap=float(numbers["lower_gap"]),
        disagreement=float(numbers["disagreement"]),
        gamma=float(numbers["gamma"]),
        warned=any(issubclass(w.category, jbl.PenaltyGapWarning)
                   for w in caught))
  return out


CHOICE_PROBLEMS = {
    "dpo_sft_toy": (lambda: jbl.problems.dpo_sft_toy(jnp.float64), 1e-2,
                    "flat"),
    "negative_example": (lambda: jbl.problems.negative_example(jnp.float64),
                         1e-2, "not flat"),
    "quadratic_a8": (jbl.problems.quadratic_a8, 0.1, "not flat"),
    "random_quadratic_0": (lambda: jbl.problems.random_quadratic(0), 0.1,
                           "not flat"),
    "random_quadratic_1": (lambda: jbl.problems.random_quadratic(1), 0.1,
                           "not flat"),
    "ridge": (jbl.problems.ridge, 0.1, "f does not depend on x"),
}


def choice_rows():
  rows = {}
  for name, (make, lr, kind) in CHOICE_PROBLEMS.items():
    prob = make()
    choice = jbl.choose_method(prob.f, prob.g, prob.params0,
                               upper_optimizer=optax.sgd(lr),
                               lower_optimizer=optax.sgd(lr))
    rows[name] = dict(kind=kind, method=choice.method, flat=choice.flat,
                      bias_ratio=choice.bias_ratio,
                      probe_steps=choice.probe_steps,
                      seconds=choice.seconds, reason=choice.reason)
  return rows


def _table(columns, rows):
  """A Markdown table: the header, its rule and one line per row of cells."""
  return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
          + ["| " + " | ".join(str(cell) for cell in row) + " |"
             for row in rows])


def _commands(result):
  """Each command that wrote the results, with the problems it ran."""
  problems = {}
  for name, prob in result["problems"].items():
    command = prob.get("command", "python benchmarks/gamma_auto.py")
    problems.setdefault(command, []).append(name)
  return "; ".join(sorted(f"`{command}` ({', '.join(names)})"
                          for command, names in problems.items()))


def markdown(result):
  lines = [f"# gamma='auto' against the best value ({'quick' if result['quick'] else 'full'} run)",
           "",
           f"{result['num_steps']} outer steps per run; relative gap "
           "(F(x) - F_best) / |F_best| at the lower solution of the best's "
           "column (exact, or a converged re-fit); cost = "
           "median over rounds of the time of the auto run / that of one "
           "fixed-gamma run of the same length, timed back to back with "
           f"jbl.run ({result['rounds']} interleaved rounds"
           + "".join(f"; {r} for {n}" for n, r in sorted({
               (name, prob["alt_pbgd"]["cost"].get("rounds",
                                                    result["rounds"]))
               for name, prob in result["problems"].items()})
                     if r != result["rounds"])
           + "); static FLOPs "
           "ratio = XLA's cost analysis of one compiled step of each, which "
           "counts both branches of every lax.cond (the continuation's "
           "first-step start and its every-10th-step check) and loop bodies "
           "once, so it overstates the continuation's share. Machine: "
           f"{result['machine']['platform']}, {result['machine']['cpu_count']}"
           " CPU cores. Commands: " + _commands(result) + ".", ""]
  runs = []
  for name, prob in result["problems"].items():
    for method in ("alt_pbgd", "v_pbgd"):
      r = prob[method]
      a = r["auto"]
      runs.append((
          name, f"{prob['F_best']:.6g} ({prob['best_from']})", method,
          f"{a['gap']:.2%}",
          f"{a['gamma_first']:.3g} → {a['gamma_last']:.3g} "
          f"({a['increases']})",
          f"{r['auto_cap100']['gap']:.2%}" if "auto_cap100" in r else "—",
          f"{r['gamma=10']['gap']:.2%}",
          f"{r['gamma=100']['gap']:.2%}", f"{r['gamma=1000']['gap']:.2%}",
          f"{r['cost']['ratio']:.2f}", f"{r['cost']['flops_ratio']:.2f}"))
  lines += _table(("problem", "best F (from)", "method", "auto: gap",
                   "gamma first → last (increases)",
                   "auto with cap 100 x start: gap", "gamma=10 gap",
                   "gamma=100 gap", "gamma=1000 gap", "time ratio",
                   "static FLOPs ratio"), runs)
  checks = [(name, label, f"{r['f_at_iterate']:.6g}",
             f"{r['f_at_lower_solution']:.6g}", f"{r['lower_gap']:.3g}",
             f"{r['disagreement']:.3g}", r["warned"])
            for name, rows in result["gamma_check"].items()
            for label, r in rows.items()]
  lines += ["", "## gamma_check (ALT-PBGD end points)", ""]
  lines += _table(("problem", "run", "f at y", "f at y*", "lower gap",
                   "disagreement", "warned"), checks)
  choices = [(name, r["kind"], r["method"], r["flat"],
              "—" if r["bias_ratio"] is None else f"{r['bias_ratio']:.3g}",
              r["probe_steps"], f"{r['seconds']:.2f}")
             for name, r in result["choose_method"].items()]
  lines += ["", "## choose_method", ""]
  lines += _table(("problem", "kind", "pick", "flat", "bias ratio",
                   "probe steps", "seconds"), choices)
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results"))
  parser.add_argument(
      "--only", nargs="+", choices=WEIGHT_DECAY + QUADRATICS,
      help="run these problems only and replace their entries in the "
      "existing results file (its other problems, gamma_check rows and "
      "choose_method table are kept; the command is recorded per problem)")
  args = parser.parse_args()
  num_steps = 1000 if args.quick else 10000
  rounds = 3 if args.quick else 15
  names = (("ridge_toy", "random_quadratic_0") if args.quick else
           WEIGHT_DECAY + QUADRATICS)
  stem = "gamma_auto_quick" if args.quick else "gamma_auto"
  path = os.path.join(args.out, stem + ".json")
  command = " ".join(["python benchmarks/gamma_auto.py"] + sys.argv[1:])
  previous = None
  if args.only:
    names = tuple(args.only)
    with open(path) as fh:
      previous = json.load(fh)
  result = dict(quick=args.quick, num_steps=num_steps, rounds=rounds,
                machine=dict(platform=platform.platform(),
                             cpu_count=os.cpu_count(),
                             jax=jax.__version__),
                settings=jbl.GammaContinuation()._asdict(),
                problems={}, gamma_check={})
  for name in names:
    problem = (weight_decay_problem(name) if name in WEIGHT_DECAY else
               quadratic_problem(name))
    entry = dict(F_best=problem["F_best"], x_best=problem["x_best"],
                 F_start=problem["F_start"], best_from=problem["best_from"])
    if "refit_grad_norm" in problem:
      entry["refit_grad_norm"] = problem["refit_grad_norm"]
    entry["command"] = command
    # The network's runs take tens of seconds each: fewer timing rounds.
    problem_rounds = min(rounds, 5) if name == "mlp_breast_cancer" else rounds
    for method in ("alt_pbgd", "v_pbgd"):
      entry[method] = evaluate(problem, method, num_steps, problem_rounds)
      entry[method]["cost"]["rounds"] = problem_rounds
      print(name, method, json.dumps(entry[method]["auto"]),
            f"cost {entry[method]['cost']['ratio']:.2f}", flush=True)
    result["problems"][name] = entry
    if name in WEIGHT_DECAY:
      result["gamma_check"][name] = gamma_check_rows(problem, num_steps)
  if previous is not None:
    for key in ("problems", "gamma_check"):
      previous[key].update(result[key])
    previous["problems"] = {k: previous["problems"][k]
                            for k in WEIGHT_DECAY + QUADRATICS
                            if k in previous["problems"]}
    result = previous
  else:
    result["choose_method"] = choice_rows()
  os.makedirs(args.out, exist_ok=True)
  with open(path, "w") as fh:
    json.dump(result, fh, indent=1)
  with open(os.path.join(args.out, stem + ".md"), "w") as fh:
    fh.write(markdown(result))
  print(markdown(result))


if __name__ == "__main__":
  main()
