"""Hypergradient building blocks: closed forms (A10 in docs/problems.md), finite
differences, jaxopt as a cross-library oracle, and the numerical guards (CG
masking and its stop at the tolerance, eps_root, checkpoint memory)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbilevel as jbl
from jaxbilevel import hypergradient as hg
from jaxbilevel import problems


def _fd_grad(fun, x, h=1e-5):
  """Central finite differences of a scalar function of a 1-D array."""
  x = np.asarray(x, np.float64)
  out = np.zeros_like(x)
  for i in range(x.size):
    e = np.zeros_like(x)
    e[i] = h
    out[i] = (float(fun(jnp.asarray(x + e))) - float(fun(jnp.asarray(x - e)))
              ) / (2 * h)
  return out


# A smooth, non-quadratic problem with a strongly convex lower level.
_A = jnp.asarray([[2.0, 0.3, 0.0], [0.3, 1.5, 0.2], [0.0, 0.2, 1.0]])
_C = jnp.asarray([[1.0, -0.5, 0.2], [0.3, 0.8, -1.0]])


def _g(x, y, batch=None):
  del batch
  return (0.5 * y @ _A @ y + jnp.sum(jax.nn.softplus(y - x @ _C))
          + 0.3 * jnp.sin(x[0]) * y[1])


def _f(x, y, batch=None):
  del batch
  return (jnp.sum(jnp.cos(y)) + 0.5 * jnp.sum((y - 1.0) ** 2)
          + 0.2 * x[0] ** 2 * y[2] + 0.1 * jnp.sum(x ** 3))


@jax.jit
def _newton(x):
  hess = jax.hessian(_g, argnums=1)
  grad = jax.grad(_g, argnums=1)
  step = lambda y, _: (y - jnp.linalg.solve(hess(x, y), grad(x, y)), None)
  return jax.lax.scan(step, jnp.zeros(3), None, length=30)[0]


@jax.jit
def _phi(x):
  return _f(x, _newton(x))


_X0 = jnp.asarray([0.4, -0.7])


# ---------------------------------------------------------------------------
# A10: ridge regression, closed-form hypergradient.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_ridge_aid_cg_matches_closed_form(lam):
  prob = problems.ridge(log_lambda=False)
  w = jnp.asarray(prob.info["w"](lam))
  grad = hg.implicit_hypergradient(prob.f, prob.g, jnp.asarray(lam), w,
                                   solver="cg", linear_steps=10)
  exact = prob.info["F_prime"](lam)
  assert abs(float(grad) - exact) <= 1e-5 * abs(exact)
  np.testing.assert_allclose(float(grad), prob.info["F_prime_golden"][lam],
                             rtol=0, atol=1e-9)


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_ridge_log_parametrisation_golden(lam):
  prob = problems.ridge()  # x = log(lambda)
  w = jnp.asarray(prob.info["w"](lam))
  grad = hg.implicit_hypergradient(prob.f, prob.g, jnp.log(lam), w)
  np.testing.assert_allclose(
      float(grad), prob.info["dF_dlog_lambda_golden"][lam], atol=1e-9)


def test_ridge_neumann_error_decreases_with_terms():
  prob = problems.ridge(log_lambda=False)
  lam = 0.1
  w = jnp.asarray(prob.info["w"](lam))
  xtr = np.asarray(prob.info["data"]["X_train"])
  lipschitz = np.linalg.eigvalsh(xtr.T @ xtr / 5 + lam * np.eye(2)).max()
  exact = prob.info["F_prime"](lam)
  errors = []
  for terms in (5, 10, 20, 40):
    grad = hg.implicit_hypergradient(prob.f, prob.g, jnp.asarray(lam), w,
                                     solver="neumann", linear_steps=terms,
                                     neumann_step=1.0 / lipschitz)
    errors.append(abs(float(grad) - exact))
  assert all(b < a for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] <= 1e-9


def test_ridge_itd_error_decreases_as_unroll_grows():
  prob = problems.ridge()
  x = jnp.log(0.1)
  exact = prob.info["dF_dlog_lambda_golden"][0.1]

  def unrolled_objective(x, steps):
    y, _ = hg.unrolled_solve(prob.g, x, jnp.zeros(2),
                             optimizer=optax.sgd(0.5), num_steps=steps)
    return prob.f(x, y)

  errors = [abs(float(jax.grad(unrolled_objective)(x, t)) - exact)
            for t in (5, 10, 20, 40, 200)]
  assert all(b < a for a, b in zip(errors[:4], errors[1:4])), errors
  assert errors[0] > 1e-3
  assert errors[-1] < 1e-5  # A10 golden: 200 GD steps at lr 0.5


def test_implicit_solution_inside_user_grad_jit_vmap_no_recompile():
  prob = problems.ridge()
  data = prob.info["data"]
  traces = []

  def validation_loss(log_lam):
    traces.append(None)
    lam = jnp.exp(log_lam)
    a = data["X_train"].T @ data["X_train"] / 5 + lam * jnp.eye(2)
    w = jnp.linalg.solve(a, data["X_train"].T @ data["y_train"] / 5)
    w = hg.implicit_solution(prob.g, log_lam, w)
    return prob.f(log_lam, w)

  grads = jax.jit(jax.vmap(jax.grad(validation_loss)))
  lams = jnp.logspace(-3, 1, 1024)
  out = grads(jnp.log(lams))
  grads(jnp.log(lams * 1.1))
  assert len(traces) == 1
  for i in (0, 300, 700, 1023):
    lam = float(lams[i])
    np.testing.assert_allclose(float(out[i]), prob.info["hypergradient"](
        np.log(lam)), rtol=1e-9, atol=1e-14)


def test_implicit_solution_closure_over_traced_value():
  """The closure contract: g may close over the value being differentiated."""
  prob = problems.ridge(log_lambda=False)
  data = prob.info["data"]

  def validation_loss(lam):
    def g_closed(unused_x, w, batch):  # lam enters only through the closure
      del batch
      return (0.5 * jnp.sum((data["X_train"] @ w - data["y_train"]) ** 2) / 5
              + 0.5 * lam * jnp.sum(w ** 2))
    w, _, _ = jbl.inner_solve(lambda w_: g_closed(None, w_, None),
                              jnp.zeros(2), optax.sgd(0.5).init(jnp.zeros(2)),
                              optimizer=optax.sgd(0.5), num_steps=400)
    w = hg.implicit_solution(g_closed, jnp.zeros(()), w)
    return prob.f(None, w)

  for lam in (0.1, 1.0):
    np.testing.assert_allclose(float(jax.grad(validation_loss)(lam)),
                               prob.info["F_prime_golden"][lam], atol=1e-9)


def test_implicit_solution_gives_data_gradients_through_batch():
  prob = problems.ridge(log_lambda=False)
  data = prob.info["data"]

  def validation_loss(y_train):
    batch = dict(data, y_train=y_train)
    a = data["X_train"].T @ data["X_train"] / 5 + 0.1 * jnp.eye(2)
    w = jnp.linalg.solve(a, data["X_train"].T @ y_train / 5)
    w = hg.implicit_solution(prob.g, jnp.asarray(0.1), w, batch)
    return prob.f(None, w, batch)

  def closed_form(y_train):
    a = data["X_train"].T @ data["X_train"] / 5 + 0.1 * jnp.eye(2)
    w = jnp.linalg.solve(a, data["X_train"].T @ y_train / 5)
    return prob.f(None, w, data)

  grad = jax.grad(validation_loss)(data["y_train"])
  np.testing.assert_allclose(np.asarray(grad),
                             _fd_grad(closed_form, data["y_train"]),
                             atol=1e-9)


def test_jaxopt_cross_library_oracle():
  jaxopt = pytest.importorskip("jaxopt")
  prob = problems.ridge()
  data = prob.info["data"]

  def solve(init, log_lam):
    del init
    a = data["X_train"].T @ data["X_train"] / 5 + jnp.exp(log_lam) * jnp.eye(2)
    return jnp.linalg.solve(a, data["X_train"].T @ data["y_train"] / 5)

  optimality = lambda w, log_lam: jax.grad(prob.g, argnums=1)(log_lam, w)
  solver = jaxopt.implicit_diff.custom_root(optimality)(solve)
  for lam in (0.1, 1.0, 0.006841):
    x = jnp.log(lam)
    theirs = jax.grad(lambda x: prob.f(x, solver(None, x)))(x)
    ours = hg.implicit_hypergradient(prob.f, prob.g, x, solve(None, x))
    np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-10,
                               atol=1e-14)
    np.testing.assert_allclose(float(ours), prob.info["hypergradient"](
        float(x)), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------
# Finite-difference checks of every exact hypergradient path.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_fd_implicit_hypergradient(solver):
  y = _newton(_X0)
  grad = hg.implicit_hypergradient(_f, _g, _X0, y, solver=solver,
                                   linear_steps=3 if solver == "cg" else 400,
                                   neumann_step=0.3)
  np.testing.assert_allclose(np.asarray(grad), _fd_grad(_phi, _X0),
                             atol=1e-8)


def test_fd_implicit_solution_custom_vjp():
  grad = jax.grad(lambda x: _f(x, hg.implicit_solution(
      _g, x, jax.lax.stop_gradient(_newton(x)))))(_X0)
  np.testing.assert_allclose(np.asarray(grad), _fd_grad(_phi, _X0),
                             atol=1e-8)


def _unrolled_objective(x, **kwargs):
  # The start depends on x, so the y0-path of the unroll is exercised too.
  y, _ = hg.unrolled_solve(_g, x, 0.5 * x @ _C, optimizer=optax.sgd(0.3),
                           num_steps=12, **kwargs)
  return _f(x, y)


@pytest.mark.parametrize("checkpoint", [False, True, 5])
def test_fd_unrolled_solve(checkpoint):
  grad = jax.grad(_unrolled_objective)(_X0, checkpoint=checkpoint)
  np.testing.assert_allclose(
      np.asarray(grad), _fd_grad(lambda x: _unrolled_objective(x), _X0),
      atol=1e-8)
  np.testing.assert_allclose(np.asarray(grad),
                             np.asarray(jax.grad(_unrolled_objective)(_X0)),
                             rtol=1e-12)


def test_fd_unrolled_adam_with_eps_root():
  def objective(x):
    y, _ = hg.unrolled_solve(_g, x, jnp.zeros(3),
                             optimizer=hg.unrollable_adam(0.05), num_steps=8)
    return _f(x, y)
  np.testing.assert_allclose(np.asarray(jax.grad(objective)(_X0)),
                             _fd_grad(objective, _X0), atol=1e-7)


def test_truncation_static_and_traced_agree():
  for k in (0, 5):
    for jac in ("zero", "identity"):
      static = jax.value_and_grad(_unrolled_objective)(
          _X0, truncate=k, truncated_jacobian=jac)
      traced = jax.value_and_grad(_unrolled_objective)(
          _X0, truncate=jnp.asarray(k), truncated_jacobian=jac)
      np.testing.assert_allclose(float(static[0]), float(traced[0]),
                                 rtol=1e-13)
      np.testing.assert_allclose(np.asarray(static[1]),
                                 np.asarray(traced[1]), rtol=1e-10,
                                 atol=1e-13)
  # K = T is the full unroll; K = 0 with the identity is FO-MAML's formula.
  full = jax.grad(_unrolled_objective)(_X0)
  np.testing.assert_allclose(
      np.asarray(jax.grad(_unrolled_objective)(_X0, truncate=12)),
      np.asarray(full), rtol=1e-13)
  y_t, _ = hg.unrolled_solve(_g, _X0, 0.5 * _X0 @ _C,
                             optimizer=optax.sgd(0.3), num_steps=12)
  fx, fy = jax.grad(_f, argnums=(0, 1))(_X0, y_t)
  np.testing.assert_allclose(
      np.asarray(jax.grad(_unrolled_objective)(
          _X0, truncate=0, truncated_jacobian="identity")),
      np.asarray(fx + 0.5 * _C @ fy), rtol=1e-12)
  np.testing.assert_allclose(
      np.asarray(jax.grad(_unrolled_objective)(_X0, truncate=0)),
      np.asarray(fx), rtol=1e-12)


def test_second_order_products_match_dense_derivatives():
  y = _newton(_X0)
  v = jnp.asarray([0.3, -1.0, 2.0])
  hess_yy = jax.hessian(_g, argnums=1)(_X0, y)
  hess_xy = jax.jacfwd(jax.grad(_g, argnums=1), argnums=0)(_X0, y)  # (dy, dx)
  np.testing.assert_allclose(np.asarray(hg.hvp(_g, _X0, y, v)),
                             np.asarray(hess_yy @ v), rtol=1e-12)
  np.testing.assert_allclose(np.asarray(hg.cross_vjp(_g, _X0, y, v)),
                             np.asarray(hess_xy.T @ v), rtol=1e-12)


# ---------------------------------------------------------------------------
# Linear solvers and numerical guards.
# ---------------------------------------------------------------------------


def test_cg_is_exact_in_n_iterations_and_masks_after_convergence():
  rng = np.random.default_rng(0)
  m = rng.normal(size=(5, 5))
  h = jnp.asarray(m @ m.T + 0.5 * np.eye(5))
  b = jnp.asarray(rng.normal(size=5))
  exact = np.linalg.solve(np.asarray(h), np.asarray(b))
  res5 = hg.conjugate_gradient(lambda v: h @ v, b, num_steps=5)
  res50 = hg.conjugate_gradient(lambda v: h @ v, b, num_steps=50, tol=1e-9)
  np.testing.assert_allclose(np.asarray(res5.solution), exact, rtol=1e-9)
  np.testing.assert_allclose(np.asarray(res50.solution), exact, rtol=1e-9)
  assert float(res50.residual_norm) <= 1e-9
  # A loose tolerance stops early: the masked iterations change nothing.
  loose = [hg.conjugate_gradient(lambda v: h @ v, b, num_steps=n, tol=0.5)
           for n in (5, 50)]
  assert float(loose[0].residual_norm) <= 0.5
  np.testing.assert_array_equal(np.asarray(loose[0].solution),
                                np.asarray(loose[1].solution))
  assert np.linalg.norm(np.asarray(loose[0].solution) - exact) > 1e-3


def test_cg_zero_rhs_and_its_gradient_are_finite():
  def solve_sum(scale, b):
    res = hg.conjugate_gradient(lambda v: scale * v, b, num_steps=4)
    return jnp.sum(res.solution)
  assert float(solve_sum(2.0, jnp.zeros(3))) == 0.0
  grads = jax.grad(solve_sum, argnums=(0, 1))(2.0, jnp.zeros(3))
  assert all(np.all(np.isfinite(np.asarray(v))) for v in grads)
  grads = jax.grad(solve_sum, argnums=(0, 1))(2.0, jnp.ones(3))
  np.testing.assert_allclose(float(grads[0]), -3.0 / 4.0, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(grads[1]), 0.5, rtol=1e-12)


def test_unrolled_adam_meta_gradient_nan_free_only_with_eps_root():
  """Unrolled Adam with eps_root > 0: y[1] keeps a zero gradient that depends on x."""
  g = lambda x, y, batch: 0.5 * (y[0] - x) ** 2 + x * y[1] ** 2
  f = lambda x, y, batch: (y[0] - 2.0) ** 2 + y[1] ** 2

  def meta_gradient(optimizer):
    def objective(x):
      y, _ = hg.unrolled_solve(g, x, jnp.zeros(2), optimizer=optimizer,
                               num_steps=5)
      return f(x, y, None)
    return float(jax.grad(objective)(jnp.asarray(1.0)))

  assert np.isnan(meta_gradient(optax.adam(0.1)))  # the pitfall is real
  assert np.isfinite(meta_gradient(hg.unrollable_adam(0.1)))
  prob_f, prob_g = f, g
  tx = jbl.itd(prob_f, prob_g, upper_optimizer=optax.sgd(0.1),
               lower_optimizer=hg.unrollable_adam(0.1), inner_steps=5)
  params = jbl.BilevelParams(x=jnp.asarray(1.0), y=jnp.zeros(2))
  _, state, hist = jbl.run(tx, params, num_steps=3, on_nonfinite="raise",
                           diagnostics=True)
  assert np.all(np.isfinite(hist["upper_grad_norm"]))
  assert hist["upper_grad_norm"][0] > 0


def test_checkpointed_unroll_memory_grows_sublinearly():
  g = lambda x, y, batch: 0.5 * jnp.sum((y - x) ** 2) + 0.1 * jnp.sum(
      jnp.sin(y))
  f = lambda x, y, batch: jnp.sum(y ** 2)
  x = jnp.ones(256)

  def temp_bytes(steps, checkpoint):
    fn = jax.jit(jax.grad(lambda x: f(x, hg.unrolled_solve(
        g, x, jnp.zeros(256), optimizer=optax.sgd(0.1), num_steps=steps,
        checkpoint=checkpoint)[0], None)))
    stats = fn.lower(x).compile().memory_analysis()
    if stats is None:
      pytest.skip("this backend reports no memory analysis")
    return stats.temp_size_in_bytes

  plain = temp_bytes(400, False) / temp_bytes(100, False)
  remat = temp_bytes(400, True) / temp_bytes(100, True)
  assert plain > 3.0  # the trajectory is stored: linear in T
  assert remat < 2.5  # about sqrt(4) = 2 with sqrt(T) chunks
  assert temp_bytes(400, True) < temp_bytes(400, False) / 4


def test_validation_errors():
  with pytest.raises(jbl.BilevelValidationError, match="neumann_step"):
    hg.implicit_hypergradient(_f, _g, _X0, jnp.zeros(3), solver="neumann")
  with pytest.raises(jbl.BilevelValidationError, match="solver"):
    hg.implicit_hypergradient(_f, _g, _X0, jnp.zeros(3), solver="lu")
  with pytest.raises(jbl.BilevelValidationError, match="truncate"):
    hg.unrolled_solve(_g, _X0, jnp.zeros(3), optimizer=optax.sgd(0.1),
                      num_steps=3, truncate=4)
  with pytest.raises(jbl.BilevelValidationError, match="checkpoint"):
    hg.unrolled_solve(_g, _X0, jnp.zeros(3), optimizer=optax.sgd(0.1),
                      num_steps=3, truncate=jnp.asarray(2), checkpoint=True)
  with pytest.raises(jbl.BilevelValidationError, match="eps_root"):
    hg.unrollable_adam(0.1, eps_root=0.0)


# ---------------------------------------------------------------------------
# CG stops at its tolerance when it is not differentiated through
# ---------------------------------------------------------------------------


def _counting_matvec(h):
  count = []

  def matvec(v):
    jax.debug.callback(lambda: count.append(1))
    return h @ v

  return matvec, count


def test_cg_stops_at_tolerance_when_not_differentiated():
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(40, 40)))
  h = jnp.asarray(q @ np.diag(np.linspace(1.0, 3.0, 40)) @ q.T)
  b = jnp.asarray(rng.normal(size=40))
  solves = {}
  for differentiable in (True, False):
    matvec, count = _counting_matvec(h)
    res = jax.jit(lambda b_, m=matvec, d=differentiable:
                  hg.conjugate_gradient(m, b_, num_steps=60, tol=1e-8,
                                        differentiable=d))(b)
    jax.block_until_ready(res)
    solves[differentiable] = (res, len(count))
  (scan, scan_products), (loop, loop_products) = solves[True], solves[False]
  assert scan_products == 60
  assert 5 < loop_products < 30     # condition number 3: converges early
  np.testing.assert_allclose(loop.solution, scan.solution, rtol=1e-12)
  np.testing.assert_allclose(loop.residual_norm, scan.residual_norm,
                             rtol=1e-12)
  assert float(loop.residual_norm) <= 1e-8
  np.testing.assert_allclose(h @ loop.solution, b, atol=1e-7)
  # vmapped (a sweep over tolerances) and forward-differentiated.
  tols = jnp.array([1e-2, 1e-8])
  batched = jax.vmap(lambda t: hg.conjugate_gradient(
      lambda v: h @ v, b, num_steps=60, tol=t, differentiable=False))(tols)
  assert float(batched.residual_norm[0]) <= 1e-2
  assert float(batched.residual_norm[1]) <= 1e-8
  tangent = jax.jvp(lambda b_: hg.conjugate_gradient(
      lambda v: h @ v, b_, num_steps=60, tol=1e-12,
      differentiable=False).solution, (b,), (b,))[1]
  np.testing.assert_allclose(h @ tangent, b, atol=1e-6)
