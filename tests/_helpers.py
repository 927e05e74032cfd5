"""Set-up shared by several test files, written once.

The test files import it as ``_helpers`` (pytest puts ``tests/`` on
``sys.path``, next to ``conftest.py``). Each section names the files that use
it. Nothing here is a test.
"""

import importlib.util
import itertools
import json
import os
import pathlib
import subprocess
import sys

from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbilevel as jbl
from jaxbilevel import problems

try:  # flax is an extra: only nested_layout needs it (the llm files skip).
  from flax import traverse_util
except ImportError:  # pragma: no cover
  traverse_util = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------
# Small problems for the drivers (test_run.py, test_programs.py,
# test_sweep.py).
# ---------------------------------------------------------------------------


def dpo_toy(dtype=jnp.float64):
  """The DPO / SFT toy (A2 in docs/problems.md)."""
  return problems.dpo_sft_toy(dtype)


def dpo_free(prob, **kw):
  """PBGD-Free on ``prob`` (gamma 16 unless given, SGD 1e-2, 2 inner steps)."""
  kw.setdefault("gamma", 16.0)
  return jbl.pbgd_free(prob.f, prob.g, upper_optimizer=optax.sgd(1e-2),
                       lower_optimizer=optax.sgd(1e-2), inner_steps=2, **kw)


def separable_quadratic(n):
  """n leaves per level; f, g separable so the solution is known per leaf."""
  x = {f"x{i}": jnp.full((3,), 0.5 + i) for i in range(n)}
  y = {f"y{i}": jnp.zeros(3) for i in range(n)}

  def f(x, y, batch):
    return sum(jnp.sum((v - 1.0) ** 2) for v in y.values()) + sum(
        jnp.sum(v ** 2) for v in x.values())

  def g(x, y, batch):
    return sum(jnp.sum((y[f"y{i}"] - x[f"x{i}"]) ** 2) for i in range(n))

  return f, g, jbl.BilevelParams(x, y)


def quadratic_free(f, g, gamma=10.0, lr=0.1):
  """PBGD-Free with upper SGD ``lr`` and lower SGD 0.1."""
  return jbl.pbgd_free(f, g, gamma=gamma, upper_optimizer=optax.sgd(lr),
                       lower_optimizer=optax.sgd(0.1))


# ---------------------------------------------------------------------------
# Random strongly convex quadratics (test_pbgd_free.py, test_alt_pbgd.py,
# test_v_pbgd.py; the fixture ``quad`` is in conftest.py).
# ---------------------------------------------------------------------------


def lower_lr(prob, gamma):
  """The inverse curvature of f / gamma + g in y: one lower step solves it."""
  return 1.0 / (prob.info["lower_lipschitz"] + 1.0 / gamma)


def random_quadratic_x(method, quad, gamma):
  """x after 1500 steps of ``method`` on ``quad`` (upper SGD 0.3, K = 20)."""
  tx = method(quad.f, quad.g, gamma=gamma, upper_optimizer=optax.sgd(0.3),
              lower_optimizer=optax.sgd(lower_lr(quad, gamma)),
              inner_steps=20)
  params, _, _ = jbl.run(tx, quad.params0, num_steps=1500)
  return params.x


# ---------------------------------------------------------------------------
# Property-based: random quadratic problems with random nested-dict variables
# (test_pbgd_free.py, test_alt_pbgd.py).
# ---------------------------------------------------------------------------


@st.composite
def nested_layout(draw, size):
  """A nested dict of 1-D float64 zeros whose leaves hold ``size`` numbers."""
  cuts = sorted(draw(st.sets(st.integers(1, size - 1), max_size=size - 1))
                if size > 1 else [])
  lengths = np.diff([0] + list(cuts) + [size])
  flat = {}
  for i, n in enumerate(lengths):
    depth = draw(st.integers(0, 2))
    groups = tuple(f"g{draw(st.integers(0, 1))}" for _ in range(depth))
    flat[groups + (f"k{i}",)] = jnp.zeros(int(n))
  return traverse_util.unflatten_dict(flat)


def tree_problem(seed, dim_x, dim_y, x_tree, y_tree):
  """random_quadratic with x and y given as nested dicts (raveled inside)."""
  prob = jbl.problems.random_quadratic(seed, dim_x, dim_y)
  _, unravel_x = ravel_pytree(x_tree)
  _, unravel_y = ravel_pytree(y_tree)

  def f(x, y, batch):
    return prob.f(ravel_pytree(x)[0], ravel_pytree(y)[0], batch)

  def g(x, y, batch):
    return prob.g(ravel_pytree(x)[0], ravel_pytree(y)[0], batch)

  p0 = jbl.BilevelParams(x_tree, y_tree)
  return f, g, p0, prob.info["coefficients"], unravel_x


def jacobian(affine_fn, dim):
  """The matrix M of an affine map x -> M x + m."""
  m = affine_fn(np.zeros(dim))
  return np.stack([affine_fn(e) - m for e in np.eye(dim)], axis=1)


PROPERTY_SETTINGS = settings(
    max_examples=4, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
PROPERTY_GAMMA = 10.0


def draw_coefficients(data):
  """A random problem size and seed, and its closed-form coefficients."""
  seed = data.draw(st.integers(0, 10_000))
  dim_x, dim_y = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
  coeffs = jbl.problems.random_quadratic(seed, dim_x, dim_y).info[
      "coefficients"]
  return seed, dim_x, dim_y, coeffs


def draw_tree_problem(data, seed, dim_x, dim_y):
  """The problem with x and y drawn as random nested dicts; the lower step."""
  x_tree = data.draw(nested_layout(dim_x))
  y_tree = data.draw(nested_layout(dim_y))
  f, g, p0, coeffs, unravel_x = tree_problem(seed, dim_x, dim_y, x_tree,
                                             y_tree)
  lower_lr_ = 1.0 / (np.linalg.eigvalsh(coeffs.A)[-1] + 1.0 / PROPERTY_GAMMA)
  return f, g, p0, unravel_x, lower_lr_


# ---------------------------------------------------------------------------
# Every method on one ridge problem, for the optax compositions
# (test_combinators.py, test_objectives.py).
# ---------------------------------------------------------------------------

N, D = 8, 3  # examples per batch, features


def ridge_data(dtype=jnp.float64):
  a = jnp.asarray(np.random.default_rng(0).normal(size=(N, D)), dtype)
  b = jnp.asarray(np.linspace(-1.0, 1.0, N), dtype)
  return {"a": a, "b": b}


def ridge_g(x, y, batch):
  """Ridge regression with regularisation exp(x): a mean over examples."""
  r = batch["a"] @ y - batch["b"]
  return 0.5 * jnp.mean(r ** 2) + 0.5 * jnp.exp(x) * jnp.sum(y ** 2)


def ridge_f(x, y, batch):
  """Validation loss on shifted targets (a mean over examples), plus x^2."""
  r = batch["a"] @ y - 0.5 * batch["b"] - 0.1
  return jnp.mean(r ** 2) + 0.01 * x ** 2


def ridge_c(x, y, batch=None):
  """One coupled constraint sum(y) - 1 - 0.1 x <= 0."""
  del batch
  return jnp.stack([jnp.sum(y) - 1.0 - 0.1 * x])


RIDGE_PARAMS = jbl.BilevelParams(x=jnp.asarray(0.2, jnp.float64),
                                 y=jnp.asarray([0.1, -0.2, 0.3], jnp.float64))
UO, LO = optax.sgd(0.05), optax.sgd(0.1)

# Every method of the table jbl.METHODS on the ridge problem:
# name -> (fixed keyword arguments, {float hyperparameter: (v1, v2)}).
_SETTINGS = {
    "pbgd_free": (dict(inner_steps=2), {"gamma": (4.0, 9.0)}),
    "alt_pbgd": (dict(inner_steps=2, value_steps=3), {"gamma": (4.0, 9.0)}),
    "v_pbgd": (dict(value_steps=2), {"gamma": (4.0, 9.0)}),
    "pbgd_blocc": (dict(c=ridge_c, dual_step_size=0.1, dual_steps=3,
                        primal_steps=2), {"gamma": (4.0, 9.0)}),
    "pbgd_free_cc": (dict(c=ridge_c, dual_step_size=0.1, dual_steps=3,
                          primal_steps=2), {"gamma": (4.0, 9.0)}),
    "bome": (dict(value_steps=3), {"eta": (0.5, 2.0)}),
    # gamma only sets the initial penalty in init; the increment acts each
    # step.
    "f2sa": (dict(inner_steps=2, gamma=4.0), {"gamma_increment": (0.5, 2.0)}),
    "alright": (dict(key=jax.random.PRNGKey(1)), {"probability": (0.3, 0.8)}),
    "fo_blo": (dict(inner_steps=3, inner_start="previous"), {}),
    "ufo_blo": (dict(inner_steps=3, key=jax.random.PRNGKey(0),
                     inner_start="previous"),
                {"correction_probability": (0.3, 0.8)}),
    "aid": (dict(inner_steps=3, solver="neumann", linear_steps=4),
            {"neumann_step": (0.2, 0.6)}),
    "itd": (dict(inner_steps=4), {}),
}
# name -> (method, fixed keyword arguments, {float hyperparameter: (v1, v2)}),
# in the table's order. A method of the table without settings fails
# loudly: tests/test_registry.py's test_every_method_has_ridge_settings, and
# every test of it here.
CASES = {name: (info.constructor,) + _SETTINGS[name]
         for name, info in jbl.METHODS.items() if name in _SETTINGS}
NAMES = tuple(jbl.METHODS)


def case_kwargs(name, **hyper):
  assert name in CASES, (
      f"{name} is in jbl.METHODS but has no ridge settings: add them to "
      "_SETTINGS in tests/_helpers.py")
  method, fixed, hypers = CASES[name]
  values = {k: v[0] for k, v in hypers.items()}
  values.update(hyper)
  return method, dict(f=ridge_f, g=ridge_g, upper_optimizer=UO,
                      lower_optimizer=LO, **fixed, **values)


def plain(name, **hyper):
  method, kw = case_kwargs(name, **hyper)
  return method(**kw)


def steps_from_params(tx, n, batch, state=None, step=None):
  """``n`` steps from RIDGE_PARAMS; returns (params, state)."""
  step = step or jax.jit(lambda s, p, b: tx.update(None, s, p, batch=b))
  params = RIDGE_PARAMS
  state = tx.init(params) if state is None else state
  for _ in range(n):
    updates, state = step(state, params, batch)
    params = optax.apply_updates(params, updates)
  return params, state


def assert_trees_close(a, b, rtol=1e-10, atol=1e-12):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol,
                               atol=atol)


def tree_distance(a, b):
  return float(optax.tree_utils.tree_norm(optax.tree_utils.tree_sub(a, b)))


# ---------------------------------------------------------------------------
# A method's step against a hand-written one: the benchmark's MLP problem and
# XLA's cost analysis of the compiled step (a loop body counted once, the
# same loops in both programs). test_base.py, test_bome.py, test_f2sa.py,
# test_aid.py.
# ---------------------------------------------------------------------------


def overhead_benchmark():
  """``benchmarks/overhead.py`` as a module."""
  path = pathlib.Path(ROOT) / "benchmarks" / "overhead.py"
  spec = importlib.util.spec_from_file_location("_overhead_benchmark", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def mlp_problem(features=5, hidden=8, batch=16, seed=0):
  """The benchmark's NLSY-shaped problem (``benchmarks/overhead.py``), small."""
  p = overhead_benchmark().mlp_problem(features, hidden, batch, seed)
  return p["f"], p["g"], p["params"], p["batch"]


def compiled_flops(fn, *args):
  """``(flops, compiled)`` of ``fn`` compiled."""
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled.cost_analysis()["flops"], compiled


def sgd_step(tree, grads, lr):
  return jax.tree.map(lambda p, d: p - lr * d, tree, grads)


def inner_sgd(objective, y, lr, steps):
  return jax.lax.scan(lambda y_, _: (sgd_step(y_, jax.grad(objective)(y_),
                                               lr), None),
                      y, None, length=steps)[0]


def tx_step(tx, diagnostics=False):
  """A bilevel step as a user's loop takes it (jbl.run's step)."""
  def step(params, state, batch):
    return jbl.step(tx, params, state, batch=batch, diagnostics=diagnostics)
  return step


# ---------------------------------------------------------------------------
# Coupled constraints (test_constrained.py, test_pbgd_blocc.py).
#
# A polyhedral problem with a non-trivial active set and exact answers.
#   g(x, y) = 1/2 |y - (M x + m)|^2   s.t.   c(x, y) = A y - (B x + b) <= 0,
#   f(x, y) = 1/2 |y - y_t|^2 + rho/2 |x|^2,   x in R^2, y in R^3, 4 constraints.
# y_g is the projection of p = Mx + m onto {A y <= B x + b}; y_F (the saddle of
# f / gamma + g + mu^T c) is the projection of q = (p + y_t / gamma) / (1 +
# 1 / gamma), with scaled multipliers (1 + 1 / gamma) times those of q's
# projection. Exact solutions by enumerating active sets.
# ---------------------------------------------------------------------------

M = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
M_OFF = np.array([0.5, -0.2, 0.3])
A = np.array([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 1.0], [-1.0, 0, 1.0]])
B = np.array([[0.5, 0], [0, 0.5], [0.3, 0.3], [0, -0.2]])
B_OFF = np.array([0.2, 0.4, 0.5, 0.3])
Y_T = np.array([1.0, 1.5, 1.0])
RHO = 0.5


def poly_g(x, y, batch=None):
  del batch
  return 0.5 * jnp.sum((y - (M @ x + M_OFF)) ** 2)


def poly_f(x, y, batch=None):
  del batch
  return 0.5 * jnp.sum((y - Y_T) ** 2) + 0.5 * RHO * jnp.sum(x ** 2)


def poly_c(x, y, batch=None):
  del batch
  return A @ y - (B @ x + B_OFF)


def _project(p, r):
  """Projection of p onto {A y <= r} and its multipliers (active-set enumeration)."""
  for size in range(4):
    for active in itertools.combinations(range(4), size):
      mu = np.zeros(4)
      if active:
        rows = A[list(active)]
        mu_a = np.linalg.solve(rows @ rows.T, rows @ p - r[list(active)])
        if np.any(mu_a < -1e-12):
          continue
        mu[list(active)] = mu_a
      y = p - A.T @ mu
      if np.all(A @ y <= r + 1e-10):
        return y, mu
  raise AssertionError("no KKT point found")


def exact_lower(x):
  p, r = M @ x + M_OFF, B @ x + B_OFF
  y, mu = _project(p, r)
  return y, mu, 0.5 * np.sum((y - p) ** 2)


def exact_penalized(x, gamma):
  p, r = M @ x + M_OFF, B @ x + B_OFF
  scale = 1.0 + 1.0 / gamma
  y, mu = _project((p + Y_T / gamma) / scale, r)
  return y, scale * mu


def exact_f_gamma(x, gamma):
  y_f, _ = exact_penalized(x, gamma)
  _, _, v = exact_lower(x)
  p = M @ x + M_OFF
  return (0.5 * np.sum((y_f - Y_T) ** 2) + 0.5 * RHO * x @ x
          + gamma * (0.5 * np.sum((y_f - p) ** 2) - v))


def central_difference(fun, x, h=1e-6):
  return np.array([(fun(x + h * e) - fun(x - h * e)) / (2 * h)
                   for e in np.eye(len(x))])


X_MIXED = np.array([0.3, 0.2])  # constraints 0 and 2 active, 1 and 3 not.
F_GAMMA_ARGMIN = np.array([-0.0914221, 0.89729121])  # gamma = 10


def blocc_toy_method(method, prob, *, dual_steps, proj_x):
  """PBGD-BLOCC or PBGD-Free-CC on a BLOCC toy (A4): gamma 5, one primal step.

  test_pbgd_blocc.py and test_flatness.py.
  """
  return method(prob.f, prob.g, prob.info["c"], gamma=5.0,
                upper_optimizer=optax.sgd(0.01),
                lower_optimizer=optax.sgd(0.1), dual_step_size=0.1,
                dual_steps=dual_steps, primal_steps=1, proj_x=proj_x)


# ---------------------------------------------------------------------------
# Subprocesses: several host devices, several processes, the benchmarks
# (test_sharding.py, test_llm_sharding.py, test_distributed.py,
# test_benchmarks_quick.py, test_overhead_benchmark.py).
# ---------------------------------------------------------------------------


def subprocess_env(host_devices=None):
  """The environment of a Python subprocess running this checkout on CPU.

  Args:
    host_devices: the number of host devices to force (appended to the
      caller's ``XLA_FLAGS``), or None to drop ``XLA_FLAGS``.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  if host_devices is None:
    env.pop("XLA_FLAGS", None)
  else:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count="
                        f"{host_devices}").strip()
  return env


def run_python(script, *args, host_devices=None, timeout):
  """Runs ``python -c script *args`` (:func:`subprocess_env`); its stdout."""
  proc = subprocess.run([sys.executable, "-c", script, *args],
                        env=subprocess_env(host_devices), capture_output=True,
                        text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout


def result_json(stdout, prefix="RESULT"):
  """The JSON after ``prefix`` on the last ``stdout`` line that starts so."""
  line = [l for l in stdout.splitlines() if l.startswith(prefix)][-1]
  return json.loads(line[len(prefix):])


# The subprocess scripts carry the source of the next three functions
# (``inspect.getsource``) instead of importing this module, which would set
# up JAX before the script configures it. They use the script's ``np`` and
# ``jax``.


def tiny_preference_pairs(vocab_size, n, t=12, seed=0):
  """Random preference pairs of ``n`` sequences of ``t`` tokens."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((n, t), np.int32)
  mask[:, 5:10] = 1
  att = np.zeros((n, t), np.int32)
  att[:, :10] = 1
  return dict(chosen_ids=rng.integers(1, vocab_size, (n, t)),
              chosen_attention_mask=att, chosen_loss_mask=mask,
              rejected_ids=rng.integers(1, vocab_size, (n, t)),
              rejected_attention_mask=att, rejected_loss_mask=mask)


def maxdiff(a, b):
  """The largest absolute difference between two pytrees of arrays."""
  return max(float(np.max(np.abs(np.asarray(u, np.float64)
                                  - np.asarray(v, np.float64))))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def spec(a):
  """The PartitionSpec as a list (None: not sharded along that axis)."""
  return [None if s is None else str(s) for s in a.sharding.spec]


def run_benchmark_quick(script, tmp_path_factory, result):
  """Runs ``benchmarks/<script> --quick`` as CI runs it: ``(out, result JSON)``.

  ``JAX_ENABLE_X64`` is dropped: the benchmarks run in float32. ``out`` is a
  new folder; ``result`` the name of the JSON file written there.
  """
  out = tmp_path_factory.mktemp(os.path.splitext(script)[0])
  env = dict(os.environ)
  env.pop("JAX_ENABLE_X64", None)
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick",
       "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out / result) as fh:
    return out, json.load(fh)


# ---------------------------------------------------------------------------
# Tokenizers (test_llm_data.py, test_llm_problem.py).
# ---------------------------------------------------------------------------


def byte_level_bpe(texts, vocab_size, *, decoder=False):
  """A byte-level BPE (``<pad>`` special token) trained on ``texts``."""
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
      add_prefix_space=False)
  if decoder:
    tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<pad>"], show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer)
  return tok


# ---------------------------------------------------------------------------
# The full data sets (test_datasets.py, test_svm.py).
# ---------------------------------------------------------------------------

# The one environment variable the project reads for data (see the README):
# a folder holding the full data files (LIBSVM diabetes and fourclass, NLSY79,
# HH-RLHF). The package and tests/data ship only small samples.
DATA_ENV = "JAXBILEVEL_DATA"


def full_data(*file_names):
  """``(folder, skip_marker)`` for tests that need the full data files.

  ``folder`` is ``$JAXBILEVEL_DATA`` (None when unset); the marker skips the
  test, saying why, when the variable is unset or a file is not in the folder.
  """
  folder = os.environ.get(DATA_ENV) or None
  names = ", ".join(file_names)
  if folder is None:
    reason = (f"needs the full data files ({names}): set {DATA_ENV} to the "
              "folder that holds them")
  else:
    missing = [n for n in file_names
               if not os.path.isfile(os.path.join(folder, n))]
    reason = (f"{', '.join(missing)} not in {DATA_ENV}={folder}"
              if missing else "")
  return folder, pytest.mark.skipif(bool(reason), reason=reason or "found")
