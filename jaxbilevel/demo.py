"""Demo: bilevel representation learning on the diabetes data, method by method.

Run ``python -m jaxbilevel.demo`` (needs scikit-learn, which ships the data:
``pip install -e ".[examples]"`` in a jaxbilevel checkout, or ``pip install
scikit-learn``).

The problem: 442 patients, 10 standardized features, a disease-progression
target. The upper variables ``x`` are a feature extractor (10 -> 8, tanh); the
lower variables ``y`` are a ridge-regression head fitted on the training split
(the lower objective ``g``); the extractor is chosen to minimise the error of
that fitted head on a separate validation split (the upper objective ``f``).
Every method runs the same number of outer steps from the same start. The
table scores each final extractor ``x`` at the lower solution ``y*(x)`` (the
ridge head in closed form, through :func:`jaxbilevel.lower_level_evaluation`):
the validation error ``f(x, y*(x))`` that the bilevel problem minimises and the
held-out test error of that head. It also shows ``f`` at the method's own head
``params.y`` (a penalised iterate for the penalty methods, so not the number to
compare methods by) and the time per outer step (compile time excluded).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbilevel as jbl

HIDDEN = 8
RIDGE = 1e-2


def load_diabetes_splits(seed: int = 0):
  """Standardized train / validation / test splits of scikit-learn's diabetes data."""
  try:
    from sklearn.datasets import load_diabetes  # pylint: disable=import-outside-toplevel
  except ImportError as err:  # pragma: no cover - exercised only without sklearn
    raise SystemExit(
        "The demo uses scikit-learn's bundled diabetes data: pip install "
        "scikit-learn (or, in a jaxbilevel checkout, pip install -e "
        "'.[examples]').") from err
  data = load_diabetes()
  features, target = data.data.astype(np.float32), data.target.astype(
      np.float32)
  order = np.random.default_rng(seed).permutation(len(target))
  parts = np.split(order, [200, 320])
  mean, std = features[parts[0]].mean(0), features[parts[0]].std(0)
  t_mean, t_std = target[parts[0]].mean(), target[parts[0]].std()
  split = lambda idx: {"a": jnp.asarray((features[idx] - mean) / std),
                       "b": jnp.asarray((target[idx] - t_mean) / t_std)}
  return split(parts[0]), split(parts[1]), split(parts[2])


def features(x, a):
  return jnp.tanh(a @ x["w"] + x["c"])


def mse(x, y, data):
  pred = features(x, data["a"]) @ y["w"] + y["b"]
  return jnp.mean((pred - data["b"]) ** 2)


def ridge_head(x, data):
  """The lower solution y*(x): the ridge head on ``data``'s features, exactly."""
  phi = features(x, data["a"])
  n = phi.shape[0]
  design = jnp.concatenate([phi, jnp.ones((n, 1), phi.dtype)], axis=1)
  penalty = jnp.diag(jnp.append(jnp.full(HIDDEN, RIDGE), 0.0)).astype(phi.dtype)
  theta = jnp.linalg.solve(design.T @ design / n + penalty,
                           design.T @ data["b"] / n)
  return {"w": theta[:HIDDEN], "b": theta[HIDDEN]}


def make_objectives(train, val):
  def f(x, y, batch=None):  # upper: validation error of the fitted head
    del batch
    return mse(x, y, val)

  def g(x, y, batch=None):  # lower: ridge regression on the training split
    del batch
    return mse(x, y, train) + RIDGE * jnp.sum(y["w"] ** 2)

  return f, g


def initial_params(seed: int = 0):
  key_w, key_y = jax.random.split(jax.random.PRNGKey(seed))
  x = {"w": 0.3 * jax.random.normal(key_w, (10, HIDDEN), jnp.float32),
       "c": jnp.zeros(HIDDEN, jnp.float32)}
  y = {"w": 0.1 * jax.random.normal(key_y, (HIDDEN,), jnp.float32),
       "b": jnp.zeros((), jnp.float32)}
  return jbl.BilevelParams(x, y)


def methods(f, g, gamma):
  """The methods compared, with the same optimizers per level."""
  upper = lambda: optax.adam(3e-3)
  lower = lambda: optax.sgd(0.1)
  return {
      "PBGD-Free (K=1)": jbl.pbgd_free(
          f, g, gamma=gamma, upper_optimizer=upper(), lower_optimizer=lower(),
          inner_steps=1),
      "ALT-PBGD (K=3)": jbl.alt_pbgd(
          f, g, gamma=gamma, upper_optimizer=upper(), lower_optimizer=lower(),
          inner_steps=3),
      "V-PBGD (T=1)": jbl.v_pbgd(
          f, g, gamma=gamma, upper_optimizer=upper(),
          lower_optimizer=optax.sgd(0.1 / gamma), value_optimizer=lower(),
          value_steps=1),
  }


def time_run(tx, params, num_steps):
  """Runs ``tx``; returns the result and (compile seconds, run seconds)."""
  start = time.perf_counter()
  jbl.run(tx, params, num_steps=num_steps, progress=False)  # compiles
  first = time.perf_counter() - start
  start = time.perf_counter()
  out = jbl.run(tx, params, num_steps=num_steps, progress=False)
  jax.block_until_ready(out[0])
  seconds = time.perf_counter() - start
  return out, max(first - seconds, 0.0), seconds


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--gamma", type=float, default=10.0)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  train, val, test = load_diabetes_splits(args.seed)
  f, g = make_objectives(train, val)
  params0 = initial_params(args.seed)
  print(f"jaxbilevel {jbl.__version__} demo on {jax.devices()[0].platform}: "
        f"diabetes data, {len(train['b'])} train / {len(val['b'])} validation "
        f"/ {len(test['b'])} test patients; x = 10->{HIDDEN} tanh extractor, "
        f"y = ridge head; gamma = {args.gamma}, {args.steps} outer steps.\n")

  rows = []
  # Reference: fit everything on the training loss alone (single level).
  single = jbl.BilevelParams(params0.x, params0.y)
  opt = optax.adam(3e-3)
  loss = lambda p: g(p.x, p.y)

  @jax.jit
  def fit(p):
    def body(carry, _):
      p, s = carry
      grads = jax.grad(loss)(p)
      upd, s = opt.update(grads, s, p)
      return (optax.apply_updates(p, upd), s), None
    return jax.lax.scan(body, (p, opt.init(p)), None, length=args.steps)[0][0]

  jax.block_until_ready(fit(single))
  start = time.perf_counter()
  single = jax.block_until_ready(fit(single))
  rows.append(("train loss only (no bilevel)", single,
               (time.perf_counter() - start) / args.steps))

  for name, tx in methods(f, g, args.gamma).items():
    (params, _, hist), _, seconds = time_run(tx, params0, args.steps)
    if not np.all(hist["finite"]):
      raise SystemExit(f"{name} produced non-finite values")
    rows.append((name, params, seconds / args.steps))

  evaluate = jbl.lower_level_evaluation(
      f, g, y_star=lambda x, batch: ridge_head(x, train))
  header = (f"{'method':<30} {'val MSE at y*(x)':>16} {'test MSE at y*(x)':>17} "
            f"{'f at params.y':>13} {'ms/step':>8}")
  print(header)
  print("-" * len(header))
  for name, params, per_step in rows:
    at_solution = evaluate(params)
    print(f"{name:<30} {float(at_solution['f_at_lower_solution']):>16.4f} "
          f"{float(mse(params.x, ridge_head(params.x, train), test)):>17.4f} "
          f"{float(f(params.x, params.y)):>13.4f} "
          f"{1e3 * per_step:>8.3f}")
  print("\nPBGD-Free needs no second lower-level copy and no grad_x g; "
        "ALT-PBGD and V-PBGD track the value function y_g as well.")
  return rows


if __name__ == "__main__":
  main()
