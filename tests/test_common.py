"""The common suite every bilevel method must pass.

The suite runs every method of the method table ``jbl.METHODS``, through its
cases in ``METHOD_CASES``: a case named ``<method>`` or ``<method>_<variant>``
is a builder ``(f, g, hyper, upper_optimizer, lower_optimizer) -> tx`` where
``hyper`` is the method's swept penalty-like scalar (gamma, F2SA's initial
gamma, BOME's eta, ALRIGHT's probability, ...), and each case has an entry in
``CONVERGENCE``: the closed-form point it must reach on a small quadratic. A
method of the table without a case is still run, and every check of it fails
and says what to add.

A cross-method suite: it stays one file, beside the files of the modules
(test_<module>.py).
"""

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbilevel as jbl


def _sum_constraint(x, y, batch=None):
  """c(x, y) = sum(y) - 1 - 0.1 sum(x) <= 0: one coupled constraint."""
  del batch
  return jnp.stack([sum(jnp.sum(v) for v in jax.tree.leaves(y)) - 1.0
                    - 0.1 * sum(jnp.sum(v) for v in jax.tree.leaves(x))])


# name -> builder(f, g, hyper, upper_optimizer, lower_optimizer) -> tx
METHOD_CASES = {
    # Penalty methods.
    "pbgd_free": lambda f, g, hyper, uo, lo: jbl.pbgd_free(
        f, g, gamma=hyper, upper_optimizer=uo, lower_optimizer=lo,
        inner_steps=2),
    "alt_pbgd": lambda f, g, hyper, uo, lo: jbl.alt_pbgd(
        f, g, gamma=hyper, upper_optimizer=uo, lower_optimizer=lo,
        inner_steps=2, value_steps=3),
    "alt_pbgd_restart": lambda f, g, hyper, uo, lo: jbl.alt_pbgd(
        f, g, gamma=hyper, upper_optimizer=uo, lower_optimizer=lo,
        inner_steps=2, inner_start="y_g"),
    "v_pbgd": lambda f, g, hyper, uo, lo: jbl.v_pbgd(
        f, g, gamma=hyper, upper_optimizer=uo, lower_optimizer=lo,
        value_steps=2, normalize=True),
    # Hypergradient methods (implicit, unrolled) and other first-order methods.
    "aid_cg": lambda f, g, hyper, uo, lo: jbl.aid(
        f, g, upper_optimizer=uo, lower_optimizer=lo, inner_steps=3,
        linear_steps=4, tol=1e-6 / hyper),
    "aid_neumann": lambda f, g, hyper, uo, lo: jbl.aid(
        f, g, upper_optimizer=uo, lower_optimizer=lo, inner_steps=3,
        solver="neumann", linear_steps=5, neumann_step=2.0 / hyper),
    "itd": lambda f, g, hyper, uo, lo: jbl.itd(
        f, g, upper_optimizer=uo, lower_optimizer=lo, inner_steps=4),
    "itd_checkpoint_truncated": lambda f, g, hyper, uo, lo: jbl.itd(
        f, g, upper_optimizer=uo, lower_optimizer=lo, inner_steps=5,
        truncate=4, checkpoint=True),
    "f2sa": lambda f, g, hyper, uo, lo: jbl.f2sa(
        f, g, gamma=hyper, upper_optimizer=uo, lower_optimizer=lo,
        inner_steps=2, gamma_increment=0.5, gamma_max=2.0 * hyper),
    "bome": lambda f, g, hyper, uo, lo: jbl.bome(
        f, g, eta=hyper / 8.0, upper_optimizer=uo, lower_optimizer=lo,
        value_steps=3),
    "fo_blo": lambda f, g, hyper, uo, lo: jbl.fo_blo(
        f, g, upper_optimizer=uo, lower_optimizer=lo, inner_steps=3,
        inner_start=lambda x, y: y),
    "ufo_blo": lambda f, g, hyper, uo, lo: jbl.ufo_blo(
        f, g, upper_optimizer=uo, lower_optimizer=lo, inner_steps=3,
        key=jax.random.PRNGKey(0), correction_probability=1.0 / hyper,
        inner_start=lambda x, y: y),
    "ufo_blo_telescope": lambda f, g, hyper, uo, lo: jbl.ufo_blo(
        f, g, upper_optimizer=uo, lower_optimizer=lo, inner_steps=3,
        key=jax.random.PRNGKey(0), estimator="telescope",
        inner_start=lambda x, y: y),
    # Coupled-constraint methods (a coupled constraint sum(y) <= 1 on the lower
    # level).
    "pbgd_blocc": lambda f, g, hyper, uo, lo: jbl.pbgd_blocc(
        f, g, _sum_constraint, gamma=hyper, upper_optimizer=uo,
        lower_optimizer=lo, dual_step_size=0.1, dual_steps=3, primal_steps=2),
    "pbgd_free_cc": lambda f, g, hyper, uo, lo: jbl.pbgd_free_cc(
        f, g, _sum_constraint, gamma=hyper, upper_optimizer=uo,
        lower_optimizer=lo, dual_step_size=0.1, dual_steps=3, primal_steps=2),
    # Bi-objective (not bilevel).
    "alright": lambda f, g, hyper, uo, lo: jbl.alright(
        f, g, probability=hyper / (1.0 + hyper), upper_optimizer=uo,
        lower_optimizer=lo, key=jax.random.PRNGKey(1)),
}


def method_of_case(name):
  """The table's method that case ``name`` builds: ``aid_cg`` -> ``aid``.

  The longest method name that is ``name`` or prefixes it before a ``_``
  (``pbgd_free_cc`` is its own method, not a variant of ``pbgd_free``).
  """
  matches = [m for m in jbl.METHODS if name == m or name.startswith(m + "_")]
  return max(matches, key=len) if matches else None


# Every case, grouped by the table's methods in its order; a method without a
# case appears under its own name (its checks fail, see case_builder).
NAMES = [case for method in jbl.METHODS
         for case in (sorted(c for c in METHOD_CASES
                             if method_of_case(c) == method) or [method])]


def case_builder(name):
  """METHOD_CASES[name], or a failure saying that the method needs a case."""
  assert name in METHOD_CASES, (
      f"{name} is in jbl.METHODS but has no case in tests/test_common.py: add "
      "a builder to METHOD_CASES and its closed-form answer to CONVERGENCE.")
  return METHOD_CASES[name]


HYPER = 4.0
LR = 0.05


def _matrix(dtype):
  return jnp.asarray([[1.0, 0.5], [-0.3, 1.0], [0.2, -0.4]], dtype)


def nested_problem(dtype):
  """A strongly convex quadratic bilevel problem over nested-dict pytrees.

  x = {"w": (2,), "b": {"c": ()}}, y = {"u": (3,), "v": (2,)}; f depends on
  both levels, so every method applies.
  """
  m = _matrix(dtype)

  def g(x, y, batch=None):
    del batch
    r_u = y["u"] - m @ x["w"]
    r_v = y["v"] - x["b"]["c"]
    return 0.5 * jnp.sum(r_u ** 2) + 0.5 * jnp.sum(r_v ** 2) + 0.1 * (
        jnp.sum(y["u"] ** 2) + jnp.sum(y["v"] ** 2))

  def f(x, y, batch=None):
    del batch
    return (0.5 * jnp.sum((y["u"] - 1.0) ** 2) + 0.5 * jnp.sum(y["v"] ** 2)
            + 0.05 * (jnp.sum(x["w"] ** 2) + x["b"]["c"] ** 2)
            + 0.1 * jnp.sum(x["w"]))

  params = jbl.BilevelParams(
      x={"w": jnp.asarray([0.3, -0.2], dtype),
         "b": {"c": jnp.asarray(0.5, dtype)}},
      y={"u": jnp.asarray([0.1, 0.0, -0.1], dtype),
         "v": jnp.asarray([0.2, 0.2], dtype)})
  return f, g, params


def _build(name, hyper=HYPER, lr=LR, dtype=jnp.float64, uo=None, lo=None):
  f, g, params = nested_problem(dtype)
  uo = optax.sgd(lr) if uo is None else uo
  lo = optax.sgd(lr) if lo is None else lo
  return case_builder(name)(f, g, hyper, uo, lo), params


def _steps(tx, params, n, update=None, **extra):
  """``n`` updates, eager unless ``update`` (e.g. ``jax.jit(tx.update)``) is given."""
  update = tx.update if update is None else update
  state = tx.init(params)
  for _ in range(n):
    updates, state = update(None, state, params, **extra)
    params = optax.apply_updates(params, updates)
  return params, state


def _compiled_steps(make_tx, params, n):
  """A jitted ``args -> (params, state)`` running ``n`` steps of ``make_tx(*args)``.

  Hyperparameters passed as ``args`` are traced, so one compilation serves
  every value.
  """
  return jax.jit(lambda *args: _steps(make_tx(*args), params, n))


def _assert_trees_close(a, b, rtol=1e-10, atol=1e-12):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol,
                               atol=atol)


def test_every_method_of_the_table_has_a_case():
  missing = [m for m in jbl.METHODS
             if not any(method_of_case(c) == m for c in METHOD_CASES)]
  assert not missing, (
      f"{missing}: in jbl.METHODS without a case in tests/test_common.py; add "
      "a builder to METHOD_CASES and its answer to CONVERGENCE.")
  strays = [c for c in METHOD_CASES if method_of_case(c) is None]
  assert not strays, f"{strays}: cases of no method in jbl.METHODS"
  assert set(CONVERGENCE) == set(METHOD_CASES)


@pytest.mark.parametrize("name", NAMES)
def test_each_case_builds_the_method_its_name_says(name):
  tx, params = _build(name)
  state = tx.init(params)
  assert type(state) is jbl.METHODS[method_of_case(name)].state  # pylint: disable=unidiomatic-typecheck


@pytest.mark.parametrize("name", NAMES)
def test_jit_matches_eager_and_moves(name):
  tx, params = _build(name)
  eager, _ = _steps(tx, params, 2, diagnostics=True)
  jitted, state = _steps(tx, params, 2, update=jax.jit(
      functools.partial(tx.update, diagnostics=True)))
  _assert_trees_close(eager, jitted, rtol=1e-9)
  moved = optax.tree_utils.tree_norm(optax.tree_utils.tree_sub(jitted, params))
  assert float(moved) > 1e-4
  for v in jax.tree.leaves((jitted, state)):
    if jnp.issubdtype(jnp.result_type(v), jnp.floating):
      assert np.all(np.isfinite(np.asarray(v)))


@pytest.mark.parametrize("name", NAMES)
def test_shared_diagnostics_are_taken_at_the_incoming_params(name):
  # f, g and lower_grad_norm mean the same in every method: f(x_t, y_t),
  # g(x_t, y_t) and |grad_y g(x_t, y_t)| at the params the step received
  # (docs/vocabulary.md). Checked at the third step, where y_t has moved away
  # from its start and the method's own trackers from params.y.
  f, g, _ = nested_problem(jnp.float64)
  tx, params = _build(name)
  incoming, state = _steps(tx, params, 2, update=jax.jit(tx.update))
  x, y = incoming
  want = {"f": f(x, y), "g": g(x, y),
          "lower_grad_norm": optax.tree_utils.tree_norm(
              jax.grad(g, argnums=1)(x, y))}
  # Recorded together or one at a time, the values are the same.
  for chosen in [True] + [(key,) for key in want]:
    _, new_state = jax.jit(functools.partial(tx.update, diagnostics=chosen))(
        None, state, incoming)
    for key in want if chosen is True else chosen:
      np.testing.assert_allclose(float(new_state.diagnostics[key]),
                                 float(want[key]), rtol=1e-12,
                                 err_msg=f"{key} (diagnostics={chosen})")


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_hyperparameters_does_not_recompile(name):
  f, g, params = nested_problem(jnp.float64)
  traces = []

  @jax.jit
  @jax.vmap
  def sweep(hyper, lr):
    traces.append(None)
    tx = case_builder(name)(f, g, hyper, optax.sgd(lr), optax.sgd(lr))
    out, _, hist = jbl.scan_run(tx, params, num_steps=4, diagnostics=True)
    return out, hist["f"]

  hypers = jnp.asarray([2.0, 4.0, 8.0])
  lrs = jnp.asarray([0.02, 0.05, 0.1])
  out1, f1 = sweep(hypers, lrs)
  out2, _ = sweep(hypers * 1.5, lrs * 0.5)
  assert len(traces) == 1
  assert sweep._cache_size() == 1  # pylint: disable=protected-access
  # Each lane equals the corresponding single (unbatched) run.
  @jax.jit
  def single_run(hyper, lr):
    tx = case_builder(name)(f, g, hyper, optax.sgd(lr), optax.sgd(lr))
    return jbl.scan_run(tx, params, num_steps=4, diagnostics=True)

  for i in range(3):
    single, _, hist = single_run(hypers[i], lrs[i])
    _assert_trees_close(jax.tree.map(lambda v, i=i: v[i], out1), single,
                        rtol=1e-9)
    np.testing.assert_allclose(f1[i], hist["f"], rtol=1e-9)
  # The hyperparameters are used: different settings give different iterates.
  lane0 = jax.tree.leaves(jax.tree.map(lambda v: v[0], out1))
  lane2 = jax.tree.leaves(jax.tree.map(lambda v: v[2], out1))
  assert any(not np.allclose(a, b) for a, b in zip(lane0, lane2))
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(out1),
                                                   jax.tree.leaves(out2)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", NAMES)
def test_dtype_is_preserved(name, dtype):
  tx, params = _build(name, dtype=dtype)
  state = tx.init(params)
  update = jax.jit(tx.update, static_argnames="diagnostics")
  for _ in range(2):
    updates, state = update(None, state, params, diagnostics=True)
    for u in jax.tree.leaves(updates):
      assert u.dtype == dtype
    params = optax.apply_updates(params, updates)
  for v in jax.tree.leaves(params):
    assert v.dtype == dtype
  for k, v in state.diagnostics.items():
    assert v.dtype == dtype, k
  for v in jax.tree.leaves(state):
    if jnp.issubdtype(v.dtype, jnp.floating):
      assert v.dtype == dtype
  assert np.isfinite(float(state.diagnostics["f"]))


@pytest.mark.parametrize("name", NAMES)
def test_composes_with_optax_chain(name):
  f, g, params = nested_problem(jnp.float64)
  plain = _compiled_steps(
      lambda: case_builder(name)(f, g, HYPER, optax.sgd(LR), optax.sgd(LR)),
      params, 3)
  clipped = _compiled_steps(
      lambda max_norm: case_builder(name)(
          f, g, HYPER,
          optax.chain(optax.clip_by_global_norm(max_norm), optax.sgd(LR)),
          optax.chain(optax.clip_by_global_norm(max_norm), optax.sgd(LR))),
      params, 3)
  p_plain, _ = plain()
  p_loose, _ = clipped(jnp.asarray(1e6))
  p_tight, _ = clipped(jnp.asarray(1e-3))
  _assert_trees_close(p_plain, p_loose)
  # Clipping at 1e-3 bounds each level's step to lr * 1e-3 per optimizer step.
  moved = optax.tree_utils.tree_norm(optax.tree_utils.tree_sub(p_tight.x,
                                                               params.x))
  assert float(moved) <= 3 * LR * 1e-3 * 1.0001
  assert float(moved) > 0.0


@pytest.mark.parametrize("name", NAMES)
def test_nested_and_flax_parameter_trees(name):
  model = nn.Dense(3)
  data = jnp.linspace(-1.0, 1.0, 8).reshape(4, 2)
  x0 = model.init(jax.random.PRNGKey(0), data)

  def g(x, y, batch):
    feats = model.apply(x, batch)
    return 0.5 * jnp.mean((feats @ y["head"] - 1.0) ** 2) + 0.05 * jnp.sum(
        y["head"] ** 2)

  def f(x, y, batch):
    feats = model.apply(x, batch)
    return 0.5 * jnp.mean((feats @ y["head"] + 0.5) ** 2) + 0.01 * sum(
        jnp.sum(v ** 2) for v in jax.tree.leaves(x))

  params = jbl.BilevelParams(x=x0, y={"head": jnp.zeros(3, jnp.float32)})
  tx = case_builder(name)(f, g, HYPER, optax.adam(1e-2), optax.sgd(0.1))
  new, state, hist = jbl.run(tx, params, num_steps=5, batch=data,
                             diagnostics=True)
  assert jax.tree.structure(new) == jax.tree.structure(params)
  assert hist["f"].shape == (5,)
  assert np.all(np.isfinite(hist["f"]))
  assert not np.allclose(new.y["head"], 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_extra_args_are_ignored(name):
  tx, params = _build(name)
  base, _ = _steps(tx, params, 2, update=jax.jit(tx.update))
  with_extra = functools.partial(tx.update, value_fn=lambda p: 0.0, unknown=3,
                                 something_else="ignored")
  extra, _ = _steps(tx, params, 2, update=jax.jit(with_extra))
  _assert_trees_close(base, extra, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_identical_results_for_identical_construction(name):
  # Methods with a PRNG key fix it in their builder: rebuilding from scratch
  # must reproduce the run bit for bit.
  tx1, params = _build(name)
  tx2, _ = _build(name)
  p1, s1, h1 = jbl.run(tx1, params, num_steps=6, diagnostics=True)
  p2, s2, h2 = jbl.run(tx2, params, num_steps=6, diagnostics=True)
  _assert_trees_close(p1, p2, rtol=0, atol=0)
  _assert_trees_close(s1, s2, rtol=0, atol=0)
  np.testing.assert_array_equal(h1["f"], h2["f"])


@pytest.mark.parametrize("name", NAMES)
def test_update_raises_the_count_by_one(name):
  # jbl.run and jbl.sweep rely on it: where every step is accepted they do
  # not carry a method's count through their loops but set it from the
  # number of steps (loop.scan_chunk); the rest of the state must agree too.
  tx, params = _build(name)
  looped, state = _steps(tx, params, 3)
  assert int(state.count) == 3
  for chunk_size in (None, 2):
    ran, run_state, _ = jbl.run(tx, params, num_steps=3, chunk_size=chunk_size)
    assert int(run_state.count) == 3
    assert run_state.count.dtype == jnp.int32
    _assert_trees_close(ran, looped, rtol=1e-9, atol=1e-12)
    _assert_trees_close(run_state._replace(diagnostics={}),
                        state._replace(diagnostics={}), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_state_is_a_pytree_of_arrays(name):
  tx, params = _build(name)
  state = tx.init(params)
  assert hasattr(state, "_fields")  # a NamedTuple
  assert "diagnostics" in state._fields
  for key in jbl.COMMON_DIAGNOSTICS:
    assert key in state.diagnostics
  leaves = jax.tree.leaves(state)
  assert all(isinstance(v, jax.Array) for v in leaves)
  # Round trip through flatten/unflatten (what jit, vmap and checkpoints do).
  flat, treedef = jax.tree.flatten(state)
  again = jax.tree.unflatten(treedef, flat)
  updates, _ = tx.update(None, again, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)


# ---------------------------------------------------------------------------
# Convergence: every method reaches the closed-form answer of the problem it
# solves on a small quadratic.
# ---------------------------------------------------------------------------

_LOWER_CURVATURE = 2.0           # the lower Hessian is A = 2 I
_EXACT_LOWER_LR = 1.0 / _LOWER_CURVATURE   # one SGD step solves min_y g


def _convergence_problem(coupled):
  """A quadratic bilevel problem (``jbl.problems.QuadraticBilevel`` form).

  ``g = 1/2 y^T A y + x^T C y + a^T y`` with ``A = 2 I``, so that SGD with
  step 1/2 solves the lower level in one step and unrolled (ITD, UFO-BLO)
  and implicit (AID: CG, Neumann with step 2/HYPER = 1/2) hypergradients are
  exact; ``f = 1/2 x^T P x + x^T B y + 1/2 ||y - y_t||^2 + q^T x``.

  ``coupled=True``: random B, q, y_t, so that the bilevel solution, the
  penalty minimisers and PBGD-Free's and FO-BLO's fixed points all differ
  (by 2.5e-2 or more). ``coupled=False``: B = 0, q = -P x0 and
  y_t = y_g*(x0), so grad f vanishes at (x0, y_g*(x0)): x* = x0 and f is flat
  there, which makes x0 a fixed point of every method.
  """
  rng = np.random.default_rng(0)
  dim_x, dim_y = 2, 3
  a_mat = _LOWER_CURVATURE * np.eye(dim_y)
  c_mat, a_vec = rng.normal(size=(dim_x, dim_y)), rng.normal(size=dim_y)
  p_mat = np.array([[4.0, 0.5], [0.5, 3.0]])
  if coupled:
    b_mat, q_vec = rng.normal(size=(dim_x, dim_y)), rng.normal(size=dim_x)
    y_t = 3.0 * rng.normal(size=dim_y)
  else:
    x0 = np.array([0.5, -1.0])
    b_mat, q_vec = np.zeros((dim_x, dim_y)), -p_mat @ x0
    y_t = -np.linalg.solve(a_mat, c_mat.T @ x0 + a_vec)
  coeffs = jbl.problems.QuadraticBilevel(A=a_mat, C=c_mat, a=a_vec, P=p_mat,
                                         B=b_mat, q=q_vec, y_t=y_t)
  f, g = coeffs.objectives(jnp.float64)
  params = jbl.BilevelParams(jnp.zeros(dim_x, jnp.float64),
                             jnp.zeros(dim_y, jnp.float64))
  return f, g, params, coeffs


def _mixture_minimiser(coeffs, weight):
  """x of argmin over (x, y) of weight f + (1 - weight) g (ALRIGHT's target)."""
  cross = weight * coeffs.B + (1.0 - weight) * coeffs.C
  hessian = np.block([
      [weight * coeffs.P, cross],
      [cross.T, weight * np.eye(len(coeffs.a)) + (1.0 - weight) * coeffs.A]])
  assert np.linalg.eigvalsh(hessian).min() > 0.1  # a unique minimiser
  grad0 = np.concatenate([weight * coeffs.q,
                          (1.0 - weight) * coeffs.a - weight * coeffs.y_t])
  return np.linalg.solve(hessian, -grad0)[:len(coeffs.q)]


# The closed-form point each kind of method converges to (HYPER as passed
# to the builders of METHOD_CASES).
_ANSWERS = {
    # The bilevel solution: implicit hypergradient zero.
    "x*": lambda c: c.x_star(),
    # Penalty methods: the minimiser of the reduced penalty
    # F_gamma(x) = min_y f + gamma (g - min g), at gamma = HYPER ...
    "argmin F_gamma": lambda c: c.argmin_f_gamma(HYPER),
    # ... and F2SA at its final penalty gamma_max = 2 HYPER.
    "argmin F_2gamma": lambda c: c.argmin_f_gamma(2.0 * HYPER),
    # PBGD-Free (biased when f is not flat): grad_x f(x, y_gamma*(x)) = 0.
    "PBGD-Free point": lambda c: c.pbgd_free_limit(HYPER),
    # FO-BLO, whose start y does not depend on x: grad_x f(x, y_g*(x)) = 0.
    "FO-BLO point": lambda c: c.pbgd_free_limit(),
    # ALRIGHT (bi-objective, lambda = HYPER / (1 + HYPER)).
    "mixture": lambda c: _mixture_minimiser(c, HYPER / (1.0 + HYPER)),
}


class _Convergence(NamedTuple):
  answer: str                 # key of _ANSWERS
  coupled: bool = True        # which _convergence_problem
  lower_lr: float = _EXACT_LOWER_LR
  steps: int = 300
  tol: float = 1e-8           # max-abs error of x
  average: bool = False       # stochastic: mean of the last half of the x's


CONVERGENCE = {
    "pbgd_free": _Convergence("PBGD-Free point"),
    # The coupled constraint sum(y) - 1 - 0.1 sum(x) <= 0 is inactive at the
    # answers (checked below), so the multipliers go to 0 and the CC methods
    # reach the unconstrained methods' points.
    "pbgd_free_cc": _Convergence("PBGD-Free point"),
    "alt_pbgd": _Convergence("argmin F_gamma"),
    # Restarting y at y_g every step: one SGD step with 1/(2 + 1/gamma), the
    # inverse curvature of f/gamma + g, reaches y_gamma exactly.
    "alt_pbgd_restart": _Convergence(
        "argmin F_gamma", lower_lr=1.0 / (_LOWER_CURVATURE + 1.0 / HYPER)),
    "pbgd_blocc": _Convergence("argmin F_gamma"),
    "v_pbgd": _Convergence("argmin F_gamma", steps=500),
    # y steps on f + gamma g (curvature 1 + 2 gamma_max = 17): a small step.
    "f2sa": _Convergence("argmin F_2gamma", lower_lr=0.05, steps=500),
    "aid_cg": _Convergence("x*"),
    "aid_neumann": _Convergence("x*"),
    "itd": _Convergence("x*"),
    "itd_checkpoint_truncated": _Convergence("x*"),
    "fo_blo": _Convergence("FO-BLO point"),
    # Unbiased but random hypergradients: with a constant step the iterates
    # fluctuate around x*; their average converges (at rate 1/sqrt(steps)).
    # x* is 2.5e-2 or more from the other points.
    "ufo_blo": _Convergence("x*", steps=16000, tol=5e-3, average=True),
    "ufo_blo_telescope": _Convergence("x*", steps=16000, tol=5e-3,
                                      average=True),
    # With constant steps BOME stalls in an O(1/lambda) neighbourhood of x*
    # unless grad f vanishes there: the flat problem, where x* = x0.
    "bome": _Convergence("x*", coupled=False, steps=500),
    # Random alternation of f and g steps: in expectation SGD on the mixture
    # (jointly strongly convex on the B = 0 problem); averaged iterates.
    "alright": _Convergence("mixture", coupled=False, lower_lr=0.1,
                            steps=16000, tol=5e-3, average=True),
}


def _trajectory(tx, params, num_steps):
  """The x iterates of ``num_steps`` jitted steps (a ``lax.scan``)."""
  def body(carry, _):
    params, state = carry
    updates, state = tx.update(None, state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), params.x
  return jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), None,
                                        length=num_steps)[1])(params)


@pytest.mark.parametrize("name", NAMES)
def test_converges_to_the_closed_form_answer(name):
  assert name in CONVERGENCE, (
      f"{name}: add its problem, closed-form answer and tolerance to "
      "CONVERGENCE in tests/test_common.py.")
  case = CONVERGENCE[name]
  f, g, params, coeffs = _convergence_problem(case.coupled)
  answer = _ANSWERS[case.answer](coeffs)
  if jbl.METHODS[method_of_case(name)].constraints:
    y = coeffs.y_gamma(answer, HYPER)
    assert float(_sum_constraint(answer, y)[0]) < -1.0   # inactive
  tx = case_builder(name)(f, g, HYPER, optax.sgd(0.1),
                          optax.sgd(case.lower_lr))
  xs = np.asarray(_trajectory(tx, params, case.steps))
  estimate = xs[case.steps // 2:].mean(axis=0) if case.average else xs[-1]
  error = np.max(np.abs(estimate - answer))
  assert error < case.tol, (name, case.answer, error)
  # The answer is specific: the other closed-form points are far away.
  others = [np.max(np.abs(fn(coeffs) - answer)) for key, fn in
            _ANSWERS.items() if case.coupled and key != case.answer and
            key != "mixture"]
  assert all(d > 4 * case.tol for d in others), (name, others)
