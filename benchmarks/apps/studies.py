"""Side studies: sweep throughput, and sinusoid scaling and implicit check."""

from __future__ import annotations

import statistics
import time

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax

import jaxbilevel as jbl
from jaxbilevel.applications import one_batch

from . import harness


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
                       peak_bytes=harness.compiled_memory(compiled).get("peak")))
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
                                   batch=batch,
                                   diagnostics=name == "aid" and (
                                       "linear_residual",))
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

