"""jaxbilevel against the same algorithms written by hand in plain JAX.

For each method (PBGD-Free, ALT-PBGD, V-PBGD, BOME, F2SA, AID, ITD) and each
problem, two contenders run the same number of outer steps with the same
optax optimizers:

* ``jbl.run(tx, params, num_steps=S, batch=batch)`` (diagnostics off, the
  default), timed end to end as a user calls it;
* the same algorithm written by hand: one ``jax.jit`` -ed ``lax.scan`` of
  ``S`` steps (the hand versions are below, one short function each).

plus the floor: one fused optax step on the gradient of ``f + g`` with respect
to both levels. The contenders are timed in one process, interleaved
(floor, A, A', B, B', ... in every round), and each time is the median over
the rounds; compilation is measured separately (first call minus the median)
and excluded. FLOPs and bytes are XLA's cost analysis
(``compiled.cost_analysis()``) of one compiled outer step: the step that
``jbl.run``'s loop repeats (its once-per-chunk finiteness check is reported
apart) and the hand-written step. XLA counts a loop body once, so every inner
loop's body counts once -- the same loops in both, so the ratio compares the
work per step.

Problems: an MLP feature extractor ``x`` (21 -> 200 -> 200, ReLU) with a
linear head ``y`` and 500 samples per group (the shape of the NLSY
application, on synthetic data so that the script needs no files), and a
separable quadratic with ``d = 10^4`` and ``10^6`` variables per level.

Also measured: ``jbl.run``'s fixed cost per call (a one-step run against a
one-step hand-written call); ``jbl.sweep`` against a hand-written
``jit(vmap(scan))`` of PBGD-Free on a ``d = 32`` quadratic, 500 steps, at
N = 16, 256 and 4,096 settings, with three histories, each recorded by both
(none; ``f``; every diagnostic); and the number of
compilations when a Python loop over 5 values of ``gamma`` builds a new
transformation and calls ``jbl.run`` for each (0 after the first).

Usage: ``python benchmarks/overhead.py [--quick] [--out benchmarks/results]``
(``--markdown benchmarks/results/overhead.json`` rewrites the table only)
(``--quick``: small problems, a few rounds, under a minute; it writes
``overhead_quick.json`` / ``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import tree_utils as otu

import jaxbilevel as jbl
from jaxbilevel._src import loop as loop_lib
from jaxbilevel._src import programs
from jaxbilevel._src import tree as tree_lib

METHODS = ("PBGD-Free", "ALT-PBGD", "V-PBGD", "BOME", "F2SA", "AID", "ITD")
GAMMA, INNER, LINEAR = 10.0, 5, 10


# ---------------------------------------------------------------------------
# Problems.
# ---------------------------------------------------------------------------


def mlp_problem(features=21, hidden=200, batch=500, seed=0):
  """The NLSY shape: MLP features ``x``, linear head ``y``, MSE per group."""
  k = jax.random.split(jax.random.PRNGKey(seed), 6)
  x = {"w1": jax.random.normal(k[0], (features, hidden)) / np.sqrt(features),
       "b1": jnp.zeros(hidden),
       "w2": jax.random.normal(k[1], (hidden, hidden)) / np.sqrt(hidden),
       "b2": jnp.zeros(hidden)}
  y = {"w": jax.random.normal(k[2], (hidden,)) / np.sqrt(hidden),
       "b": jnp.zeros(())}
  w = jax.random.normal(k[3], (features,))
  a0 = jax.random.normal(k[4], (batch, features))
  a1 = jax.random.normal(k[5], (batch, features)) + 0.5
  data = {"a0": a0, "t0": jnp.tanh(a0 @ w), "a1": a1,
          "t1": jnp.tanh(a1 @ w) + 0.3}

  def net(x, y, a):
    h = jax.nn.relu(a @ x["w1"] + x["b1"])
    h = jax.nn.relu(h @ x["w2"] + x["b2"])
    return h @ y["w"] + y["b"]

  def f(x, y, batch):
    return jnp.mean((net(x, y, batch["a0"]) - batch["t0"]) ** 2)

  def g(x, y, batch):  # + a small ridge: a positive definite lower Hessian
    return jnp.mean((net(x, y, batch["a1"]) - batch["t1"]) ** 2) + (
        1e-2 * otu.tree_vdot(y, y))

  desc = (f"MLP {features}->{hidden}->{hidden} + linear head, {batch} "
          "samples per group")
  return dict(f=f, g=g, params=jbl.BilevelParams(x, y), batch=data,
              desc=desc, lr_x=1e-3, lr_y=5e-3)


def quadratic_problem(d, seed=0):
  """``f = |y - t|^2/2 + 0.05|x|^2``, ``g = sum_i h_i (y_i - x_i)^2 / 2``."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  data = {"t": jax.random.normal(k1, (d,)),
          "h": 1.0 + jax.random.uniform(k2, (d,))}

  def f(x, y, batch):
    return 0.5 * jnp.sum((y - batch["t"]) ** 2) + 0.05 * jnp.sum(x ** 2)

  def g(x, y, batch):
    return 0.5 * jnp.sum(batch["h"] * (y - x) ** 2)

  params = jbl.BilevelParams(jnp.zeros(d), jnp.zeros(d))
  return dict(f=f, g=g, params=params, batch=data,
              desc=f"separable quadratic, d = {d:,} per level", lr_x=1e-2,
              lr_y=0.2)


# ---------------------------------------------------------------------------
# The library's contenders.
# ---------------------------------------------------------------------------


def library_tx(method, prob):
  f, g = prob["f"], prob["g"]
  up = lambda: optax.adam(prob["lr_x"])
  low = lambda: optax.sgd(prob["lr_y"])
  common = dict(upper_optimizer=up(), lower_optimizer=low())
  if method == "PBGD-Free":
    return jbl.pbgd_free(f, g, gamma=GAMMA, **common)
  if method == "ALT-PBGD":
    return jbl.alt_pbgd(f, g, gamma=GAMMA, inner_steps=INNER,
                        value_optimizer=low(), **common)
  if method == "V-PBGD":  # the y step is on f + gamma g: a smaller step
    return jbl.v_pbgd(f, g, gamma=GAMMA, upper_optimizer=up(),
                      lower_optimizer=optax.sgd(prob["lr_y"] / (1 + GAMMA)),
                      value_optimizer=low())
  if method == "BOME":
    return jbl.bome(f, g, eta=0.5, value_steps=INNER, value_optimizer=low(),
                    **common)
  if method == "F2SA":  # the y loop is on f + lambda g: a smaller step
    return jbl.f2sa(f, g, gamma=GAMMA, inner_steps=INNER,
                    upper_optimizer=up(),
                    lower_optimizer=optax.sgd(prob["lr_y"] / (1 + GAMMA)),
                    value_optimizer=low())
  if method == "AID":
    return jbl.aid(f, g, inner_steps=INNER, linear_steps=LINEAR, tol=1e-10,
                   **common)
  if method == "ITD":
    return jbl.itd(f, g, inner_steps=INNER, **common)
  raise ValueError(method)


def library_runner(tx, prob, steps):
  def call():
    return jbl.run(tx, prob["params"], num_steps=steps,
                   batch=prob["batch"])[0]
  return call


def user_loops(tx, prob, steps):
  """The loops a user writes around ``tx``, each one ``jax.jit`` -ed program.

  * ``update``: ``lax.scan`` of ``tx.update`` + ``optax.apply_updates``, the
    optax loop every optax user knows;
  * ``step``: ``lax.scan`` of :func:`jaxbilevel.step` (the method's new
    iterates, no difference added back);
  * ``scan_run``: ``jax.jit(jbl.scan_run)``.

  ``tx`` is built outside with Python-float hyperparameters, so they are
  compiled in: the fair baseline is the hand-written version with constants.
  """
  def update_body(carry, _):
    params, state = carry
    updates, state = tx.update(None, state, params, batch=prob["batch"])
    return (optax.apply_updates(params, updates), state), None

  def step_body(carry, _):
    params, state = carry
    return jbl.step(tx, params, state, batch=prob["batch"]), None

  def loop(body):
    @jax.jit
    def run(params):
      return jax.lax.scan(body, (params, tx.init(params)), None,
                          length=steps)[0][0]
    return lambda: run(prob["params"])

  scan_run = jax.jit(lambda p, b: jbl.scan_run(tx, p, num_steps=steps,
                                               batch=b)[0])
  return {"update": loop(update_body), "step": loop(step_body),
          "scan_run": lambda: scan_run(prob["params"], prob["batch"])}


USER_LOOPS = ("update", "step", "scan_run")


def library_flops(tx, prob):
  """FLOPs of the step that ``jbl.run``'s loop repeats (no guard, no record).

  The loop body of the run program: ``tx.update`` traced as the driver
  traces it (diagnostics off) and the parameter update. The once-per-chunk
  finiteness check outside the loop is left out (see ``chunk_check_flops``).
  """
  def step(tx, params, state, batch):
    out = loop_lib._step(  # pylint: disable=protected-access
        tx, params, state, batch, "fast", jnp.asarray(False), False)
    return out[0], out[1]

  params = prob["params"]
  return _flops(step, tx, params, tx.init(params), prob["batch"])


def chunk_check_flops(tx, prob):
  """FLOPs of the finiteness check that ``jbl.run`` makes once per chunk."""
  params = prob["params"]
  return _flops(lambda p, s: tree_lib.tree_all_finite((p, s)), params,
                tx.init(params))


def _flops(fn, *args):
  """``(flops, bytes accessed)`` of ``fn`` compiled by XLA."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return cost["flops"], cost["bytes accessed"]


# ---------------------------------------------------------------------------
# The same algorithms by hand: init(params) -> carry, step(carry, batch).
# ---------------------------------------------------------------------------


def _opt_step(opt, grads, state, params):
  updates, state = opt.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def _descend(objective, opt, y, state, steps):
  """``steps`` optax steps on ``objective(y)`` in a scan."""
  def body(carry, _):
    y_, s = carry
    return _opt_step(opt, jax.grad(objective)(y_), s, y_), None
  return jax.lax.scan(body, (y, state), None, length=steps)[0]


# The hyperparameters that jbl.run's program takes as arguments (so that a
# loop over their values compiles once): the hand-written twin takes the same.
TRACED = {"PBGD-Free": "lam", "ALT-PBGD": "lam", "V-PBGD": "lam",
          "BOME": "eta", "F2SA": "lam", "AID": "atol", "ITD": None}


def hand_method(method, prob, lam=GAMMA, eta=0.5, atol=1e-10):
  """``(init, step)`` of ``method`` by hand; ``lam``, ``eta``, ``atol`` may be traced."""
  f, g = prob["f"], prob["g"]
  ox, oy, oz = (optax.adam(prob["lr_x"]), optax.sgd(prob["lr_y"]),
                optax.sgd(prob["lr_y"]))
  # Steps on f + lam g (a constant step size, as the library's contender).
  oy_lam = optax.sgd(prob["lr_y"] / (1 + GAMMA))

  def init(p):
    carry = dict(x=p.x, y=p.y, sx=ox.init(p.x), sy=oy.init(p.y))
    if method in ("ALT-PBGD", "V-PBGD", "F2SA"):
      carry.update(z=p.y, sz=oz.init(p.y))
    return carry

  def step(c, b):
    x, y = c["x"], c["y"]
    c = dict(c)
    if method == "PBGD-Free":
      y, c["sy"] = _descend(lambda v: f(x, v, b) / lam + g(x, v, b), oy, y,
                            c["sy"], 1)
      dx = jax.grad(f)(x, y, b)
    elif method == "ALT-PBGD":
      c["z"], c["sz"] = _descend(lambda v: g(x, v, b), oz, c["z"], c["sz"],
                                 INNER)
      y, c["sy"] = _descend(lambda v: f(x, v, b) / lam + g(x, v, b), oy, y,
                            c["sy"], INNER)
      z = c["z"]
      dx = jax.grad(lambda u: f(u, y, b) + lam * (g(u, y, b) - g(u, z, b)))(x)
    elif method == "V-PBGD":
      c["z"], c["sz"] = _descend(lambda v: g(x, v, b), oz, c["z"], c["sz"], 1)
      z = c["z"]
      dx, dy = jax.grad(lambda u, v: f(u, v, b) + lam * (
          g(u, v, b) - g(u, z, b)), argnums=(0, 1))(x, y)
      y, c["sy"] = _opt_step(oy_lam, dy, c["sy"], y)
    elif method == "BOME":  # benchopt's three gradients
      y_hat, _ = _descend(lambda v: g(x, v, b), oz, y, oz.init(y), INNER)
      fx, fy = jax.grad(f, argnums=(0, 1))(x, y, b)
      gx, gy = jax.grad(g, argnums=(0, 1))(x, y, b)
      qx = otu.tree_sub(gx, jax.grad(g)(x, y_hat, b))
      q_sq = otu.tree_vdot((qx, gy), (qx, gy))
      mult = jnp.maximum(eta * q_sq - otu.tree_vdot((fx, fy), (qx, gy)),
                         0.0) / (q_sq + 1e-8)
      dx, dy = otu.tree_add_scale((fx, fy), mult, (qx, gy))
      y, c["sy"] = _opt_step(oy, dy, c["sy"], y)
    elif method == "F2SA":
      c["z"], c["sz"] = _descend(lambda v: g(x, v, b), oz, c["z"], c["sz"],
                                 INNER)
      y, c["sy"] = _descend(lambda v: f(x, v, b) + lam * g(x, v, b), oy_lam,
                            y, c["sy"], INNER)
      z = c["z"]
      dx = jax.tree.map(lambda a, e, h: a + lam * (e - h), jax.grad(f)(x, y, b),
                        jax.grad(g)(x, y, b), jax.grad(g)(x, z, b))
    elif method == "AID":  # CG stopped at the tolerance, as jaxopt does
      y, c["sy"] = _descend(lambda v: g(x, v, b), oy, y, c["sy"], INNER)
      fx, fy = jax.grad(f, argnums=(0, 1))(x, y, b)
      grad_y = lambda u, v: jax.grad(g, argnums=1)(u, v, b)
      hvp = lambda v: jax.jvp(lambda w: grad_y(x, w), (y,), (v,))[1]
      v, _ = jax.scipy.sparse.linalg.cg(hvp, fy, tol=0.0, atol=atol,
                                        maxiter=LINEAR)
      cross = jax.vjp(lambda u: grad_y(u, y), x)[1](v)[0]
      dx = otu.tree_sub(fx, cross)
    elif method == "ITD":  # reverse mode through the warm-started unroll
      def upper(u):
        y_t, s = _descend(lambda v: g(u, v, b), oy, y, c["sy"], INNER)
        return f(u, y_t, b), (y_t, s)
      dx, (y, c["sy"]) = jax.grad(upper, has_aux=True)(x)
    else:
      raise ValueError(method)
    c["x"], c["sx"] = _opt_step(ox, dx, c["sx"], x)
    c["y"] = y
    return c

  return init, step


def floor_method(prob):
  f, g = prob["f"], prob["g"]
  opt = optax.adam(prob["lr_x"])

  def init(p):
    return (p, opt.init(p))

  def step(c, b):
    p, s = c
    grads = jax.grad(lambda q: f(q.x, q.y, b) + g(q.x, q.y, b))(p)
    return _opt_step(opt, grads, s, p)

  return init, step


def hand_program(init, step, steps, record=None):
  """The jitted scan of ``step``; ``record(carry, new_carry, batch)`` per step."""
  @jax.jit
  def run(params, batch):
    def body(carry, _):
      new = step(carry, batch)
      return new, (None if record is None else record(carry, new, batch))
    return jax.lax.scan(body, init(params), None, length=steps)
  return run


def hand_record(prob):
  """What a hand-written loop records for ``diagnostics=True``'s common four.

  ``f`` and ``g`` at the step's incoming ``(x, y)``, the norm of the upper
  step and that of the lower gradient there: the record's own evaluations
  (two values, one gradient of ``g`` in ``y``, two norms), against which
  ``jbl.run(..., diagnostics=True)`` is compared.
  """
  f, g = prob["f"], prob["g"]

  def record(carry, new, batch):
    x, y = carry["x"], carry["y"]
    return dict(f=f(x, y, batch), g=g(x, y, batch),
                upper_grad_norm=otu.tree_norm(otu.tree_sub(new["x"], x)),
                lower_grad_norm=otu.tree_norm(
                    jax.grad(g, argnums=1)(x, y, batch)))
  return record


def hand_runner(program, prob):
  return lambda: program(prob["params"], prob["batch"])


def hand_twin(method, prob, steps):
  """The hand-written run with the library program's arguments.

  ``jbl.run``'s program takes the method's float hyperparameters (``TRACED``)
  as arguments, so that one compilation serves every value; this twin takes
  the same ones, where ``hand_program`` compiles them in as constants (which
  XLA may fold into the step, e.g. ``gamma * h`` computed once).
  """
  name = TRACED[method]
  value = {"lam": GAMMA, "eta": 0.5, "atol": 1e-10}.get(name)

  @jax.jit
  def run(params, batch, hyper):
    init, step = hand_method(method, prob, **hyper)
    return jax.lax.scan(lambda c, _: (step(c, batch), None), init(params),
                        None, length=steps)[0]

  hyper = {} if name is None else {name: jnp.asarray(value, jnp.float32)}
  return lambda: run(prob["params"], prob["batch"], hyper), hyper


def hand_twin_flops(method, prob, hyper):
  """FLOPs of one step of :func:`hand_twin` (its hyperparameters traced)."""
  params = prob["params"]

  def step(carry, batch, hyper):
    return hand_method(method, prob, **hyper)[1](carry, batch)

  init = hand_method(method, prob)[0]
  return _flops(step, jax.jit(init)(params), prob["batch"], hyper)


def hand_flops(init, step, prob):
  """FLOPs of one hand-written step (the body of its scan)."""
  params = prob["params"]
  return _flops(step, jax.jit(init)(params), prob["batch"])


# ---------------------------------------------------------------------------
# Interleaved timing.
# ---------------------------------------------------------------------------


def interleaved(contenders, rounds, groups=(), raw=None):
  """``{name: (median seconds, compile seconds)}``, one call each per round.

  ``groups`` lists the names compared with each other, the library's first
  (``(library, hand)``, or ``(library, hand, hand with constants)``). Within
  a round the groups run one after the other; group ``i`` runs in its order
  when ``i + round`` is even and reversed otherwise, and contenders in no
  group run first. A call runs faster right after a compiled program than
  after Python work (XLA's worker threads are still awake, the caches warm):
  in a fixed order A B A B the library's call would always follow a
  hand-written program and the hand's a library call, which costs the
  library up to 8% of a millisecond-long sweep here. With the alternation,
  the library's call and its hand-written twin each follow a library call in
  about half of the rounds and a hand-written program in the others.
  """
  first = {}
  for name, call in contenders.items():
    start = time.perf_counter()
    jax.block_until_ready(call())
    first[name] = time.perf_counter() - start
  times = {name: [] for name in contenders}
  grouped = {name for group in groups for name in group}
  singles = [name for name in contenders if name not in grouped]
  for r in range(rounds):
    order = list(singles)
    for i, group in enumerate(groups):
      order.extend(group if (i + r) % 2 == 0 else group[::-1])
    for name in order:
      call = contenders[name]
      start = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - start)
  if raw is not None:  # every round's time, for spreads of per-round ratios
    raw.update(times)
  out = {}
  for name, ts in times.items():
    median = statistics.median(ts)
    out[name] = (median, max(first[name] - median, 0.0))
  return out


def _quartiles(times, baseline):
  """The first and third quartiles of the per-round ratios ``times / baseline``."""
  ratios = sorted(a / b for a, b in zip(times, baseline))
  q = (statistics.quantiles(ratios, n=4, method="inclusive")
       if len(ratios) > 1 else ratios * 3)
  return [q[0], q[2]]


def run_benchmark(prob, methods, steps, rounds):
  contenders, flops, kinds = {}, {}, {}
  init, step = floor_method(prob)
  floor = hand_program(init, step, steps)
  contenders["floor"] = hand_runner(floor, prob)
  flops["floor"] = hand_flops(init, step, prob)
  for method in methods:
    tx = library_tx(method, prob)
    contenders[method] = library_runner(tx, prob, steps)
    contenders[method + " (hand)"], hyper = hand_twin(method, prob, steps)
    init, step = hand_method(method, prob)
    program = hand_program(init, step, steps)
    contenders[method + " (hand, constants)"] = hand_runner(program, prob)
    contenders[method + " (hand, record)"] = hand_runner(
        hand_program(init, step, steps, record=hand_record(prob)), prob)
    for loop, call in user_loops(tx, prob, steps).items():
      contenders[f"{method} (user {loop})"] = call
    contenders[method + " (diagnostics)"] = lambda tx=tx: jbl.run(
        tx, prob["params"], num_steps=steps, batch=prob["batch"],
        diagnostics=True)[0]
    flops[method] = library_flops(tx, prob)
    flops[method + " (hand)"] = hand_twin_flops(method, prob, hyper)
    flops[method + " (check)"] = chunk_check_flops(tx, prob)
    kinds[method] = tx
  # The fixed cost of a call: one-step runs of the first method.
  contenders["one step"] = library_runner(kinds[methods[0]], prob, 1)
  contenders["one step (hand)"], _ = hand_twin(methods[0], prob, 1)
  groups = [(m, m + " (hand)", m + " (hand, constants)",
             *(f"{m} (user {loop})" for loop in USER_LOOPS),
             m + " (diagnostics)", m + " (hand, record)") for m in methods]
  raw = {}
  timing = interleaved(contenders, rounds,
                       groups + [("one step", "one step (hand)")], raw=raw)
  floor_s = timing["floor"][0]
  rows = []
  for method in methods:
    lib_s, lib_c = timing[method]
    hand_s, hand_c = timing[method + " (hand)"]
    const_s = timing[method + " (hand, constants)"][0]
    user = {loop: timing[f"{method} (user {loop})"][0] for loop in USER_LOOPS}
    rows.append(dict(
        user_update_ms_per_step=1e3 * user["update"] / steps,
        # Spread: the quartiles of the per-round ratios (same round, so the
        # machine's load at the time cancels).
        user_update_ratio_iqr=_quartiles(
            raw[f"{method} (user update)"],
            raw[method + " (hand, constants)"]),
        user_step_ratio_iqr=_quartiles(
            raw[f"{method} (user step)"], raw[method + " (hand, constants)"]),
        time_ratio_iqr=_quartiles(raw[method], raw[method + " (hand)"]),
        user_update_ratio=user["update"] / const_s,
        user_step_ratio=user["step"] / const_s,
        scan_run_ratio=user["scan_run"] / const_s,
        diagnostics_ratio=timing[method + " (diagnostics)"][0] / lib_s,
        # The same for the hand-written loop recording the common four
        # diagnostics itself: the record's own cost.
        hand_record_ratio=timing[method + " (hand, record)"][0] / const_s,
        method=method, ms_per_step=1e3 * lib_s / steps,
        hand_ms_per_step=1e3 * hand_s / steps, time_ratio=lib_s / hand_s,
        hand_constants_ms_per_step=1e3 * const_s / steps,
        time_ratio_constants=lib_s / const_s,
        mflops_per_step=flops[method][0] / 1e6,
        hand_mflops_per_step=flops[method + " (hand)"][0] / 1e6,
        flops_ratio=flops[method][0] / flops[method + " (hand)"][0],
        mbytes_per_step=flops[method][1] / 1e6,
        bytes_ratio=flops[method][1] / flops[method + " (hand)"][1],
        chunk_check_mflops=flops[method + " (check)"][0] / 1e6,
        floor_ratio=lib_s / floor_s, compile_s=lib_c, hand_compile_s=hand_c))
  num_variables = sum(np.size(v) for v in jax.tree.leaves(prob["params"]))
  return dict(description=prob["desc"], steps=steps, rounds=rounds,
              num_variables=int(num_variables),
              per_call_ms=1e3 * (timing["one step"][0]
                                 - timing["one step (hand)"][0]),
              floor=dict(ms_per_step=1e3 * floor_s / steps,
                         mflops_per_step=flops["floor"][0] / 1e6,
                         compile_s=timing["floor"][1]),
              rows=rows)


# ---------------------------------------------------------------------------
# Sweep against jit(vmap(scan)), and compilations in a loop over gamma.
# ---------------------------------------------------------------------------


HISTORIES = {"none": False, "f": ("f",), "all": True}
"""The histories compared: none, f alone, every diagnostic."""


def hand_sweep(prob, steps, history):
  """PBGD-Free by hand, ``jit(vmap(scan))`` over (gamma, lr), with a history."""
  f, g = prob["f"], prob["g"]

  @jax.jit
  def hand(gammas, lrs, params, batch):
    def one(gamma, lr):
      ox, oy = optax.adam(lr), optax.sgd(prob["lr_y"])

      def body(c, _):
        x, y, sx, sy = c
        def lower(v):  # f / gamma + g; f and g at the iterate as aux
          fv, gv = f(x, v, batch), g(x, v, batch)
          return fv / gamma + gv, (fv, gv)

        (_, (fv, gv)), gy = jax.value_and_grad(lower, has_aux=True)(y)
        y, sy = _opt_step(oy, gy, sy, y)
        dx = jax.grad(f)(x, y, batch)
        x, sx = _opt_step(ox, dx, sx, x)
        row = {"none": {}, "f": {"f": fv},
               "all": {"f": fv, "g": gv, "upper_grad_norm": otu.tree_norm(dx),
                       # |grad_y g| at the incoming y, as the library records
                       "lower_grad_norm": otu.tree_norm(
                           jax.grad(g, argnums=1)(x, c[1], batch)),
                       "gamma": gamma}}[history]
        return (x, y, sx, sy), row

      (x, y, _, _), rows = jax.lax.scan(
          body, (params.x, params.y, ox.init(params.x), oy.init(params.y)),
          None, length=steps)
      return jbl.BilevelParams(x, y), rows
    return jax.vmap(one)(gammas, lrs)

  return hand


def sweep_benchmark(num_points, steps, rounds, d=32):
  """``jbl.sweep`` against a hand-written ``jit(vmap(scan))`` recording the same.

  Three histories, each against a hand version that records the same values
  per point and step: none; ``f`` alone (``diagnostics=("f",)``: f at the
  iterate, from the pass that computes the lower gradient); and every
  diagnostic (``diagnostics=True``: f, g and the norm of the lower gradient of
  g at the incoming iterate, the norm of the upper step, gamma).
  """
  prob = quadratic_problem(d)
  f, g, p0, batch = prob["f"], prob["g"], prob["params"], prob["batch"]
  rng = np.random.default_rng(0)
  gammas = jnp.asarray(10.0 ** rng.uniform(0, 2, num_points))
  lrs = jnp.asarray(10.0 ** rng.uniform(-3, -1, num_points))

  def make_tx(gamma, lr):
    return jbl.pbgd_free(f, g, gamma=gamma, upper_optimizer=optax.adam(lr),
                         lower_optimizer=optax.sgd(prob["lr_y"]))

  grid = {"gamma": gammas, "lr": lrs}

  def library(history):
    def call():
      out = jbl.sweep(make_tx, p0, grid, num_steps=steps, batch=batch,
                      diagnostics=HISTORIES[history])
      return out[0], {k: v for k, v in out[2].items()
                      if k in ("f", "g", "upper_grad_norm", "lower_grad_norm",
                               "gamma")}
    return call

  def hand_program(history):
    hand = hand_sweep(prob, steps, history)
    return lambda: hand(gammas, lrs, p0, batch)

  contenders = {}
  for history in HISTORIES:
    contenders["hand " + history] = hand_program(history)
    contenders["sweep " + history] = library(history)
  # Small grids take about a millisecond a call: more rounds there, so that
  # the medians are not a handful of samples of a noisy machine.
  rounds *= max(1, 256 // num_points)
  timing = interleaved(contenders, rounds, [
      ("sweep " + history, "hand " + history) for history in HISTORIES])
  row = dict(points=num_points, steps=steps, d=d, rounds=rounds)
  for history in HISTORIES:
    lib_params, lib_rows = contenders["sweep " + history]()
    hand_params, hand_rows = contenders["hand " + history]()
    diff = max([float(jnp.max(jnp.abs(lib_params.x - hand_params.x)))] + [
        float(np.max(np.abs(np.asarray(lib_rows[k]) - np.asarray(v))))
        for k, v in hand_rows.items()])
    row[history] = dict(
        sweep_s=timing["sweep " + history][0],
        hand_s=timing["hand " + history][0],
        ratio=timing["sweep " + history][0] / timing["hand " + history][0],
        sweep_compile_s=timing["sweep " + history][1],
        hand_compile_s=timing["hand " + history][1],
        recorded=sorted(hand_rows), max_abs_difference=diff)
  return row


def compile_count(prob, steps, gammas=(1.0, 3.0, 10.0, 30.0, 100.0)):
  """Compilations when a Python loop builds a new method (and optimizers) per gamma."""
  events = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if "backend_compile" in event:
      events.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  f, g = prob["f"], prob["g"]

  def programs_compiled():
    return sum(fn._cache_size()  # pylint: disable=protected-access
               for fn in programs.PROGRAMS._entries.values())  # pylint: disable=protected-access

  counts, backend, seconds = [], [], []
  for gamma in gammas:
    before, before_events = programs_compiled(), len(events)
    # Everything built anew, optimizers included (as values: their
    # learning rates are leaves of the method, like gamma).
    tx = jbl.pbgd_free(f, g, gamma=gamma,
                       upper_optimizer=jbl.as_value(optax.adam)(prob["lr_x"]),
                       lower_optimizer=jbl.as_value(optax.sgd)(prob["lr_y"]))
    start = time.perf_counter()
    jax.block_until_ready(jbl.run(tx, prob["params"], num_steps=steps,
                                  batch=prob["batch"])[0])
    seconds.append(time.perf_counter() - start)
    counts.append(programs_compiled() - before)
    backend.append(len(events) - before_events)
  try:
    jax.monitoring.unregister_event_duration_listener(listener)
  except (AttributeError, ValueError):  # older jax: listeners stay
    pass
  return dict(gammas=list(gammas), programs_compiled=counts,
              backend_compiles=backend, seconds=seconds,
              compilations_after_first=sum(counts[1:]))


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------


def machine():
  return dict(platform=platform.platform(), processor=platform.machine(),
              cpu_count=os.cpu_count(),
              device=str(jax.devices()[0].device_kind),
              backend=jax.default_backend(), jax=jax.__version__,
              optax=optax.__version__, jaxbilevel=jbl.__version__)


def markdown(result):
  m = result["machine"]
  lines = [
      "# jaxbilevel against hand-written JAX", "",
      f"Machine: {m['platform']}, {m['cpu_count']} CPUs ({m['backend']}); "
      f"jax {m['jax']}, optax {m['optax']}. "
      + ("Timings are from a shared 2-core CPU that other jobs were using, "
         "so they are noisy; the contenders are interleaved (every round "
         "runs each once, each group's order alternating between rounds; "
         "see Notes) and each time is the median over rounds, compilation "
         "excluded. "
         if m["cpu_count"] <= 2 else
         "Contenders interleaved (each group's order alternating between "
         "rounds), medians over rounds, compilation excluded. ")
      + "FLOPs and bytes: XLA cost analysis of one compiled outer step (the "
      "step that `jbl.run` repeats against the hand-written step; every "
      "inner loop body counted once, the same loops in both). Written by "
      "`benchmarks/overhead.py`"
      + (" --quick." if result["quick"] else ".")
      + (f" Command: `{result['command']}`." if "command" in result else ""),
      "", "Targets: `jbl.run` ≤ 1.05× the hand-written time and FLOPs; a "
      "user's own `lax.scan` of `tx.update` (and `jax.jit(jbl.scan_run)`) "
      "≤ 1.05× on the MLP and ≤ 1.10× on the quadratics; "
      "`diagnostics=True` ≤ 1.5× at d = 10⁴; "
      "`jbl.sweep` ≤ 1.2× a hand-written `jit(vmap(scan))`; 0 compilations "
      "after the first in a loop over gamma.", ""]
  for key, bench in result["problems"].items():
    fl = bench["floor"]
    lines += [
        f"## {key}: {bench['description']}", "",
        f"{bench['steps']} outer steps per call, median of {bench['rounds']} "
        f"rounds. Floor (fused optax step on ∇(f+g)): "
        f"{fl['ms_per_step']:.3f} ms/step, {fl['mflops_per_step']:.2f} "
        "MFLOP/step."
        + (f" Fixed cost of a `jbl.run` call (included in the times): "
           f"{bench['per_call_ms']:.2f} ms." if "per_call_ms" in bench
           else "")
        + " Hand: the same algorithm with the program's arguments (the "
        "hyperparameters that `jbl.run` traces, so that one compilation "
        "serves every value: gamma, BOME's eta, AID's tolerance); hand, "
        "constants: the same with them compiled in.", "",
        "| method | jbl.run ms/step | hand ms/step | time ratio | "
        "hand, constants ms/step | ratio to it | "
        "MFLOP/step | hand MFLOP/step | FLOP ratio | MB accessed/step | "
        "bytes ratio | vs floor | compile s (jbl / hand) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in bench["rows"]:
      constants = (f"{r['hand_constants_ms_per_step']:.3f} | "
                   f"{r['time_ratio_constants']:.3f} | "
                   if "time_ratio_constants" in r else "| | ")
      lines.append(
          f"| {r['method']} | {r['ms_per_step']:.3f} | "
          f"{r['hand_ms_per_step']:.3f} | {r['time_ratio']:.3f} | "
          + constants +
          f"{r['mflops_per_step']:.2f} | {r['hand_mflops_per_step']:.2f} | "
          f"{r['flops_ratio']:.3f} | {r['mbytes_per_step']:.2f} | "
          f"{r['bytes_ratio']:.3f} | {r['floor_ratio']:.2f} | "
          f"{r['compile_s']:.2f} / {r['hand_compile_s']:.2f} |")
    lines.append("")
    if "user_update_ratio" in bench["rows"][0]:
      lines += [
          "A user's own loop around the same `tx` (built with Python-float "
          "hyperparameters, so the baseline is the hand-written version with "
          "constants), each one `jax.jit`-ed program: `lax.scan` of "
          "`tx.update` + `optax.apply_updates`; `lax.scan` of `jbl.step`; "
          "`jax.jit(jbl.scan_run)`. Ratios are of medians; [q1, q3] are the "
          "quartiles of the per-round ratios. Last columns: `jbl.run(..., "
          "diagnostics=True)` over `jbl.run` without; the hand-written loop "
          "recording f and g at the incoming (x, y), the norm of the upper "
          "step and that of the lower gradient there (the common four "
          "diagnostics: the record's own evaluations) over the same loop "
          "without.", "",
          "| method | update loop ms/step | update loop / hand | [q1, q3] | "
          "jbl.step loop / hand | [q1, q3] | jit(scan_run) / hand | "
          "jbl.run / hand [q1, q3] | diagnostics=True cost | "
          "hand record cost |",
          "|---|---|---|---|---|---|---|---|---|---|"]
      for r in bench["rows"]:
        q = lambda k: f"[{r[k][0]:.3f}, {r[k][1]:.3f}]"
        lines.append(
            f"| {r['method']} | {r['user_update_ms_per_step']:.3f} | "
            f"{r['user_update_ratio']:.3f} | {q('user_update_ratio_iqr')} | "
            f"{r['user_step_ratio']:.3f} | {q('user_step_ratio_iqr')} | "
            f"{r['scan_run_ratio']:.3f} | {q('time_ratio_iqr')} | "
            f"{r['diagnostics_ratio']:.2f}× | "
            + (f"{r['hand_record_ratio']:.2f}× |" if "hand_record_ratio" in r
               else "— |"))
      lines.append("")
  lines += [
      "## jbl.sweep vs hand-written jit(vmap(scan))", "",
      "PBGD-Free on a d = 32 quadratic, (gamma, lr) per point. Each history "
      "is timed against a hand version that records the same values per "
      "point and step: none; f alone (`diagnostics=(\"f\",)`: f at the "
      "iterate, from the pass that computes the lower gradient); every "
      "diagnostic (`diagnostics=True`: f, g and the norm of the gradient of g "
      "in y at the incoming iterate, the norm of the upper step, gamma).",
      "",
      "| points | steps | rounds | history | hand s | jbl.sweep s | ratio | "
      "compile s (sweep / hand) | max abs difference |",
      "|---|---|---|---|---|---|---|---|---|"]
  for s in result["sweep"]:
    for history in HISTORIES:
      h = s[history]
      lines.append(
          f"| {s['points']:,} | {s['steps']} | {s.get('rounds', '')} | "
          f"{history} | {h['hand_s']:.4f} "
          f"| {h['sweep_s']:.4f} | {h['ratio']:.3f} | "
          f"{h['sweep_compile_s']:.2f} / {h['hand_compile_s']:.2f} | "
          f"{h['max_abs_difference']:.1e} |")
  lines += ["", "## Notes", ""] + notes(result)
  c = result["compile_count"]
  lines += [
      "", "## Compilations in a Python loop over gamma", "",
      f"A new `jbl.pbgd_free(..., gamma=gamma)` and `jbl.run` for gamma in "
      f"{c['gammas']}: programs compiled per call {c['programs_compiled']} "
      f"(backend compilations {c['backend_compiles']}), seconds per call "
      f"{[round(s, 3) for s in c['seconds']]}; compilations after the first: "
      f"**{c['compilations_after_first']}**.", ""]
  return "\n".join(lines)


def notes(result):
  """What the numbers say, computed from them."""
  out = []
  extra = {}
  for key, bench in result["problems"].items():
    per_var = [(r["mflops_per_step"] - r["hand_mflops_per_step"]) * 1e6
               / bench["num_variables"] for r in bench["rows"]]
    extra[key] = (min(per_var), max(per_var))
  off = sorted({r["method"] for bench in result["problems"].values()
                for r in bench["rows"] if abs(r["flops_ratio"] - 1) > 0.005})
  out.append(
      "* FLOPs beyond the hand-written step, per variable and step: "
      + "; ".join(f"{k}: {lo:.1f} to {hi:.1f}" for k, (lo, hi) in
                  extra.items())
      + ". No method evaluates anything more than its hand-written twin "
      "(BOME takes benchopt's two reverse passes; F2SA, AID, ITD and "
      "FO-BLO skip values used only for the record), and the driver takes a "
      "method's new parameters directly instead of adding the returned "
      "`new - old` back. Methods more than 0.5% off the hand FLOPs: "
      + (", ".join(off) if off else "none")
      + (" (AID's conjugate gradient is the library's own, stopped at its "
         "tolerance, against `jax.scipy.sparse.linalg.cg` in the hand "
         "version, and XLA counts its loop body as smaller)"
         if "AID" in off else "") + ".")
  per_call = {k: b["per_call_ms"] for k, b in result["problems"].items()
              if "per_call_ms" in b}
  out.append(
      "* Time ratios include `jbl.run`'s fixed cost per call (validation, "
      "the program look-up, one flag read back; a one-chunk run starts the "
      "state inside its program and, for models of up to 64 leaves, checks "
      "the final params and state there too)"
      + (": " + "; ".join(f"{k}: {v:.2f} ms" for k, v in per_call.items())
         + " (one-step `jbl.run` minus a one-step hand-written call)"
         if per_call else "")
      + ", amortised over the steps of a call. A method's step counter is "
      "not carried through the loop (with every step accepted it is the "
      "incoming count plus the step's index; it is set after the loop). The "
      "FLOP and byte ratios are exact; times on a shared machine move by a "
      "few percent between runs.")
  constant = [r["time_ratio_constants"] for b in result["problems"].values()
              for r in b["rows"] if "time_ratio_constants" in r]
  compiles = [r["hand_compile_s"] for b in result["problems"].values()
              for r in b["rows"]]
  if constant:
    out.append(
        "* Against the hand-written runs with the hyperparameters compiled "
        f"in as constants, the time ratios are {min(constant):.3f}–"
        f"{max(constant):.3f}. XLA may fold a constant gamma into the step "
        "(e.g. gamma times the lower Hessian's diagonal, computed once), "
        "which a program that serves every gamma cannot; but a user who "
        "loops over gamma with such a program compiles it once per value "
        f"({min(compiles):.2f}–{max(compiles):.2f} s here).")
  if result["sweep"]:
    worst = {h: max(s[h]["ratio"] for s in result["sweep"])
             for h in HISTORIES}
    out.append(
        "* Sweeps: the largest ratio over the grid sizes is "
        + ", ".join(f"{worst[h]:.2f} with history {h}" for h in HISTORIES)
        + ". The smallest grid takes about a millisecond, and there the "
        "sweep's fixed costs weigh most: in the program, the one finiteness "
        "flag (a reduction per recorded row and per leaf of the params and "
        "state); on the host, the checks of the grid and params, the flag "
        "read back and the final state's last diagnostics.")
  out.append(
      "* Order: within a round each library/hand group runs in alternating "
      "order (see `interleaved`), because a call right after a compiled "
      "program runs faster than one after Python work; with the library "
      "always second, the smallest sweep paid up to 8% for its position.")
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--markdown", default=None, metavar="JSON",
                      help="only rewrite the .md next to this results file")
  parser.add_argument("--only", default=None,
                      help="comma-separated problem names (for a partial run)")
  parser.add_argument("--name", default=None,
                      help="base name of the results files (default: "
                      "overhead, or overhead_quick with --quick)")
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results"))
  args = parser.parse_args(argv)
  if args.markdown:
    with open(args.markdown) as fh:
      result = json.load(fh)
    with open(os.path.splitext(args.markdown)[0] + ".md", "w") as fh:
      fh.write(markdown(result))
    return result
  if args.quick:
    problems = {"quadratic d=1e3": (lambda: quadratic_problem(1000), 20)}
    sweeps, sweep_steps, rounds = (16,), 50, args.rounds or 2
    loop_prob = quadratic_problem(1000)
  else:
    problems = {
        "NLSY MLP": (mlp_problem, 100),
        "quadratic d=1e4": (lambda: quadratic_problem(10_000), 5000),
        "quadratic d=1e6": (lambda: quadratic_problem(1_000_000), 200)}
    sweeps, sweep_steps, rounds = (16, 256, 4096), 500, args.rounds or 9
    loop_prob = quadratic_problem(10_000)

  if args.only:
    problems = {k: v for k, v in problems.items()
                if k in args.only.split(",")}
  result = dict(benchmark="overhead", quick=args.quick, machine=machine(),
                # shlex.join: quoted as a shell needs it ("quadratic d=1e4")
                command=shlex.join(["python", "benchmarks/overhead.py"] + list(
                    sys.argv[1:] if argv is None else argv)),
                settings=dict(gamma=GAMMA, inner_steps=INNER,
                              linear_steps=LINEAR),
                problems={})
  for key, (make, steps) in problems.items():
    result["problems"][key] = run_benchmark(make(), METHODS, steps, rounds)
    print(key, "done", flush=True)
  result["sweep"] = [sweep_benchmark(n, sweep_steps, rounds) for n in sweeps]
  # A run length used nowhere above, so that the first call compiles.
  result["compile_count"] = compile_count(loop_prob, 30)
  table = markdown(result)
  print(table)
  os.makedirs(args.out, exist_ok=True)
  name = args.name or ("overhead_quick" if args.quick else "overhead")
  with open(os.path.join(args.out, name + ".json"), "w") as fh:
    json.dump(result, fh, indent=2)
  with open(os.path.join(args.out, name + ".md"), "w") as fh:
    fh.write(table)
  return result


if __name__ == "__main__":
  main()
