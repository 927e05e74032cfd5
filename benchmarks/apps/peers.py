"""Peers from other libraries on the regularisation problem (optional).

The same problem, data and optimizers in jaxopt (implicit differentiation of
an ``OptaxSolver``) and TorchOpt (``torchopt.diff.implicit`` on eager CPU
PyTorch); each runs only where it imports.
"""

from __future__ import annotations

import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbilevel as jbl
from jaxbilevel.applications import regularization

from . import harness


def peer_row(name, settings, curve, times, chunk, compile_s, final,
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

  curve, times = harness.budget_loop(run_chunk, lambda: loss(box["carry"]), budget)
  carry = box["carry"]
  final = harness.floats(evaluate(jbl.BilevelParams(carry[0], carry[1])))
  return peer_row(f"jaxopt {_version('jaxopt')} (implicit diff)",
                   f"OptaxSolver adam(0.05) T={k} (restarts its Adam state), "
                   "implicit diff with CG 10, outer adam(0.05)", curve, times,
                   budget.chunk, compile_s, final, harness.compiled_memory(compiled))


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
    return harness.floats(metrics)

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

  curve, times = harness.budget_loop(
      run_chunk, lambda: evaluate(box["params"])["upper_loss"], budget)
  params = box["params"]
  return peer_row(
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

