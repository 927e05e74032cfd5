"""jbl.hypergradient_descent and its adjoints (jbl.adjoints).

AID, ITD, FO-BLO and UFO-BLO are presets of one method: each equals
``hypergradient_descent`` with its adjoint, step by step. The direct solve
is checked against the closed-form hypergradient of a quadratic, and the
three linear solvers against each other. (float64: conftest enables x64.)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbilevel as jbl
from jaxbilevel import adjoints
from jaxbilevel import hypergradient

# A strongly convex quadratic bilevel problem, x and y of the same shape (so
# that FO-BLO's inner_start="x" applies):
#   g(x, y) = 1/2 y^T A y - y^T B x,   y*(x) = A^{-1} B x,
#   f(x, y) = 1/2 |y - c|^2 + rho/2 |x|^2 + d^T x,
#   grad F(x) = rho x + d + B^T A^{-1} (y*(x) - c).
_RNG = np.random.default_rng(0)
_Q, _ = np.linalg.qr(_RNG.normal(size=(3, 3)))
A = jnp.asarray(_Q @ np.diag([1.0, 1.5, 2.0]) @ _Q.T)   # eigenvalues [1, 2]
B = jnp.asarray(_RNG.normal(size=(3, 3)))
C = jnp.asarray([1.0, -0.5, 0.25])
D = jnp.asarray([0.1, 0.0, -0.2])
RHO = 0.3


def g(x, y, batch=None):
  del batch
  return 0.5 * y @ A @ y - y @ (B @ x)


def f(x, y, batch=None):
  del batch
  return 0.5 * jnp.sum((y - C) ** 2) + 0.5 * RHO * x @ x + D @ x


def y_star(x):
  return jnp.linalg.solve(A, B @ x)


def hypergradient_closed_form(x):
  return RHO * x + D + B.T @ jnp.linalg.solve(A, y_star(x) - C)


P0 = jbl.BilevelParams(x=jnp.asarray([0.3, -0.2, 0.5]),
                       y=jnp.asarray([0.1, 0.0, -0.1]))
_KEY = jax.random.PRNGKey(3)
_START = lambda x, y: 0.5 * y


def _optimizers():
  return dict(upper_optimizer=optax.sgd(0.1), lower_optimizer=optax.sgd(0.3))


# (preset, its keyword arguments, the adjoint and keywords of the same method)
PRESETS = {
    "aid_cg": (jbl.aid, dict(inner_steps=3, linear_steps=2, tol=1e-6),
               adjoints.Implicit("cg", 2, 1e-6), dict(inner_steps=3)),
    "aid_default": (jbl.aid, {}, adjoints.Implicit(), {}),
    "aid_neumann": (jbl.aid, dict(inner_steps=3, solver="neumann",
                                  linear_steps=5, neumann_step=0.4),
                    adjoints.Implicit("neumann", 5, neumann_step=0.4),
                    dict(inner_steps=3)),
    "aid_direct_restart": (
        jbl.aid, dict(inner_steps=2, solver="direct", inner_start=_START),
        adjoints.Implicit(solver="direct"),
        dict(inner_steps=2, inner_start=_START)),
    "itd": (jbl.itd, dict(inner_steps=4), adjoints.Unrolled(),
            dict(inner_steps=4)),
    "itd_truncated_checkpointed": (
        jbl.itd, dict(inner_steps=5, truncate=3, checkpoint=True,
                      inner_start="initial"),
        adjoints.Unrolled(truncate=3, checkpoint=True),
        dict(inner_steps=5, inner_start="initial")),
    "itd_maml_start": (jbl.itd, dict(inner_steps=3, inner_start=_START),
                       adjoints.Unrolled(),
                       dict(inner_steps=3, inner_start=_START)),
    "fo_blo": (jbl.fo_blo, {}, adjoints.FirstOrder(),
               dict(inner_steps=5, inner_start="x")),
    "fo_blo_previous": (jbl.fo_blo, dict(inner_steps=3,
                                         inner_start="previous"),
                        adjoints.FirstOrder(), dict(inner_steps=3)),
    "ufo_blo": (jbl.ufo_blo, dict(key=_KEY),
                adjoints.FirstOrder(correction="bernoulli"),
                dict(inner_steps=5, inner_start="x", key=_KEY)),
    "ufo_blo_q": (jbl.ufo_blo, dict(key=_KEY, inner_steps=3,
                                    correction_probability=0.5,
                                    inner_start="previous"),
                  adjoints.FirstOrder("bernoulli", 0.5),
                  dict(inner_steps=3, key=_KEY)),
    "ufo_blo_telescope": (jbl.ufo_blo, dict(key=_KEY, inner_steps=3,
                                            estimator="telescope"),
                          adjoints.FirstOrder("telescope"),
                          dict(inner_steps=3, inner_start="x", key=_KEY)),
}


def _steps(tx, n=10):
  step = jax.jit(functools.partial(jbl.step, tx, diagnostics=True))
  params, state = P0, tx.init(P0)
  for _ in range(n):
    params, state = step(params, state)
  return params, state


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_equals_hypergradient_descent_with_its_adjoint(name):
  preset, preset_kw, adjoint, kw = PRESETS[name]
  tx_preset = preset(f, g, **_optimizers(), **preset_kw)
  tx = jbl.hypergradient_descent(f, g, adjoint=adjoint, **_optimizers(), **kw)
  p_a, s_a = _steps(tx_preset)
  p_b, s_b = _steps(tx)
  assert type(s_a) is type(s_b)
  assert set(s_a.diagnostics) == set(s_b.diagnostics)
  for a, b in zip(jax.tree.leaves((p_a, s_a)), jax.tree.leaves((p_b, s_b))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12,
                               atol=1e-13)
  # The run moved: x changed and every recorded diagnostic is finite.
  assert float(jnp.max(jnp.abs(p_a.x - P0.x))) > 1e-3
  for key, value in s_a.diagnostics.items():
    assert np.isfinite(float(value)), key


def test_adjoints_fix_the_state_and_diagnostics_of_their_preset():
  expected = {
      adjoints.Implicit(): (jbl.AIDState, jbl.COMMON_DIAGNOSTICS
                            + ("linear_residual", "tol")),
      adjoints.Unrolled(): (jbl.ITDState, jbl.COMMON_DIAGNOSTICS),
      adjoints.FirstOrder(): (jbl.FOBLOState, jbl.COMMON_DIAGNOSTICS),
      adjoints.FirstOrder("telescope"): (
          jbl.UFOBLOState,
          jbl.COMMON_DIAGNOSTICS + ("correction_norm", "correction_draw")),
  }
  for adjoint, (state_type, names) in expected.items():
    key = _KEY if adjoint.__class__ is adjoints.FirstOrder and (
        adjoint.correction) else None
    tx = jbl.hypergradient_descent(f, g, adjoint=adjoint, key=key,
                                   **_optimizers())
    state = tx.init(P0)
    assert type(state) is state_type
    assert tuple(state.diagnostics) == names


def _hypergradient_of_step(adjoint, x):
  """The direction of one step from (x, y*(x)) with SGD(1): -updates.x."""
  tx = jbl.hypergradient_descent(f, g, adjoint=adjoint,
                                 upper_optimizer=optax.sgd(1.0),
                                 lower_optimizer=optax.sgd(0.3),
                                 inner_steps=1)
  params = jbl.BilevelParams(x, y_star(x))
  updates, state = jax.jit(functools.partial(
      tx.update, diagnostics=True))(None, tx.init(params), params)
  return -updates.x, state.diagnostics


def test_direct_adjoint_is_the_closed_form_hypergradient():
  for x in (P0.x, jnp.asarray([-1.0, 2.0, 0.5])):
    direction, diag = _hypergradient_of_step(adjoints.Implicit("direct"), x)
    np.testing.assert_allclose(direction, hypergradient_closed_form(x),
                               rtol=1e-12, atol=1e-13)
    assert float(diag["linear_residual"]) < 1e-14
  # The dense solve alone: A itself from its matvec, and the exact solution.
  b = jnp.asarray([1.0, -2.0, 0.5])
  res = hypergradient.direct_solve(lambda v: A @ v, b)
  np.testing.assert_allclose(res.solution, jnp.linalg.solve(A, b),
                             rtol=1e-12)
  # On pytrees, with the lower Hessian of a nested y.
  tree_b = {"u": b[:2], "v": b[2]}
  tree_matvec = lambda t: {"u": (A @ jnp.append(t["u"], t["v"]))[:2],
                           "v": (A @ jnp.append(t["u"], t["v"]))[2]}
  tree = hypergradient.direct_solve(tree_matvec, tree_b).solution
  np.testing.assert_allclose(jnp.append(tree["u"], tree["v"]),
                             jnp.linalg.solve(A, b), rtol=1e-12)


def test_direct_solve_is_differentiable():
  # d/db of the solution of A v = b is A^{-1}; reverse mode through LU.
  jac = jax.jacrev(lambda b: hypergradient.direct_solve(
      lambda v: A @ v, b).solution)(jnp.ones(3))
  np.testing.assert_allclose(jac, jnp.linalg.inv(A), rtol=1e-10, atol=1e-12)
  # implicit_solution with the direct solve: jax.grad of F(x) = f(x, y*(x))
  # is the closed-form hypergradient.
  def upper(x):
    y = hypergradient.implicit_solution(g, x, y_star(x), solver="direct")
    return f(x, y)
  np.testing.assert_allclose(jax.grad(upper)(P0.x),
                             hypergradient_closed_form(P0.x), rtol=1e-12)


def test_cg_direct_and_neumann_agree_on_a_well_conditioned_quadratic():
  x = jnp.asarray([-1.0, 2.0, 0.5])
  exact = hypergradient_closed_form(x)
  directions = {
      "cg": _hypergradient_of_step(
          adjoints.Implicit("cg", linear_steps=3, tol=0.0), x)[0],
      "direct": _hypergradient_of_step(adjoints.Implicit("direct"), x)[0],
      # 1/L = 0.5: the error of K terms is at most (1 - 0.5)^K.
      "neumann": _hypergradient_of_step(
          adjoints.Implicit("neumann", linear_steps=60, neumann_step=0.5),
          x)[0],
  }
  for name, direction in directions.items():
    np.testing.assert_allclose(direction, exact, rtol=1e-10, atol=1e-12,
                               err_msg=name)
  # Fewer Neumann terms: visibly inexact, so the agreement above is earned.
  few = _hypergradient_of_step(
      adjoints.Implicit("neumann", linear_steps=3, neumann_step=0.5), x)[0]
  assert float(jnp.max(jnp.abs(few - exact))) > 1e-2
  # Whole runs reach the same x* = argmin F (F is quadratic in x; the
  # eigenvalues of its Hessian h lie in [0.34, 5.3], so SGD(0.3) contracts).
  h = RHO * jnp.eye(3) + B.T @ jnp.linalg.solve(A, jnp.linalg.solve(A, B))
  x_opt = jnp.linalg.solve(h, B.T @ jnp.linalg.solve(A, C) - D)
  for adjoint in (adjoints.Implicit("cg", 3, 0.0),
                  adjoints.Implicit("direct"),
                  adjoints.Implicit("neumann", 60, neumann_step=0.5)):
    tx = jbl.hypergradient_descent(f, g, adjoint=adjoint,
                                   upper_optimizer=optax.sgd(0.3),
                                   lower_optimizer=optax.sgd(0.5),
                                   inner_steps=20)
    params, _, _ = jbl.run(tx, P0, num_steps=300)
    np.testing.assert_allclose(params.x, x_opt, atol=1e-8, err_msg=str(adjoint))


def test_the_stopping_cg_of_the_methods_takes_the_scan_cg_iterates():
  # The non-differentiated CG of the methods (a lax.while_loop that stops
  # at tol) and the differentiable scan take the same iterates.
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
  h = jnp.asarray(q @ np.diag(np.linspace(1.0, 5.0, 8)) @ q.T)
  b = jnp.asarray(rng.normal(size=8))
  for num_steps, tol in ((3, 0.0), (6, 1e-3), (30, 1e-12)):
    ours = hypergradient.conjugate_gradient(lambda v: h @ v, b,
                                            num_steps=num_steps, tol=tol)
    gx = lambda x, y, batch: 0.5 * y @ h @ y - b @ y + 0.0 * jnp.sum(x)
    fx = lambda x, y, batch: b @ y
    # With g = y^T h y / 2, H = h; f = b^T y: v solves h v = b, and the
    # hypergradient is -J_xy v = 0 (x does not enter): read v from the info.
    _, info = hypergradient.implicit_hypergradient(
        fx, gx, jnp.zeros(2), jnp.zeros(8), solver="cg", linear_steps=num_steps,
        tol=tol, has_aux=True, differentiable=False)
    np.testing.assert_allclose(info.v, ours.solution, rtol=1e-12,
                               atol=1e-14)
    np.testing.assert_allclose(info.residual_norm, ours.residual_norm,
                               rtol=1e-6, atol=1e-14)
  # A NaN tolerance (an invalid traced tol) gives a NaN solution, by name.
  _, info = hypergradient.implicit_hypergradient(
      fx, gx, jnp.zeros(2), jnp.zeros(8), linear_steps=4, tol=jnp.nan,
      has_aux=True, differentiable=False)
  assert np.isnan(info.v).all() and np.isnan(info.residual_norm)


def test_adjoint_hyperparameters_are_traced_by_the_drivers():
  # An adjoint is a NamedTuple: its float fields are leaves of the method,
  # like gamma, traced by the drivers' programs; the result is that of the
  # eager steps, for two values.
  for step in (0.3, 0.45):
    tx = jbl.hypergradient_descent(
        f, g, adjoint=adjoints.Implicit("neumann", 8, neumann_step=step),
        **_optimizers(), inner_steps=3)
    assert step in jax.tree.leaves(tx)
    params, state, _ = jbl.run(tx, P0, num_steps=5)
    expected, expected_state = _steps(tx, n=5)
    np.testing.assert_allclose(params.x, expected.x, rtol=1e-12)
    np.testing.assert_allclose(params.y, expected.y, rtol=1e-12)
    assert int(state.count) == int(expected_state.count) == 5


@pytest.mark.parametrize("adjoint, kw, match", [
    ("cg", {}, r"hypergradient_descent: adjoint must be "
               r"jaxbilevel\.adjoints\.Implicit\(\.\.\.\), Unrolled"),
    (None, {}, r"adjoint must be jaxbilevel\.adjoints\.Implicit"),
    (adjoints.Implicit(solver="lu"), {},
     r"adjoint\.solver must be one of \('cg', 'neumann', 'direct'\), got "
     r"'lu'"),
    (adjoints.Implicit(linear_steps=0), {},
     r"adjoint\.linear_steps must be >= 1, got 0"),
    (adjoints.Implicit(linear_steps=2.5), {},
     r"adjoint\.linear_steps must be a Python int"),
    (adjoints.Implicit(tol=-1.0), {}, r"adjoint\.tol must be >= 0"),
    (adjoints.Implicit(solver="neumann"), {},
     r"adjoint\.solver='neumann' needs adjoint\.neumann_step"),
    (adjoints.Implicit(solver="neumann", neumann_step=0.0), {},
     r"adjoint\.neumann_step must be > 0"),
    (adjoints.Unrolled(truncate=11), {},
     r"adjoint\.truncate=11 exceeds inner_steps=10"),
    (adjoints.Unrolled(truncate=-1), {}, r"adjoint\.truncate must be >= 0"),
    (adjoints.Unrolled(checkpoint="yes"), {},
     r"adjoint\.checkpoint must be a Python int"),
    (adjoints.FirstOrder(correction="gauss"), {},
     r"adjoint\.correction must be None or one of \('bernoulli', "
     r"'telescope'\)"),
    (adjoints.FirstOrder("bernoulli", 1.5), dict(key=_KEY),
     r"adjoint\.correction_probability must be in \(0, 1\], got 1\.5"),
    (adjoints.FirstOrder("bernoulli", -0.5), dict(key=_KEY),
     r"adjoint\.correction_probability must be > 0"),
    (adjoints.FirstOrder("bernoulli"), {},
     r"hypergradient_descent: key must be a jax\.random key"),
    (adjoints.Implicit(), dict(key=_KEY),
     r"key is used only by a randomized adjoint"),
    (adjoints.Implicit(), dict(inner_start="x"),
     r"inner_start must be one of \('previous',\) or a callable"),
    (adjoints.Unrolled(), dict(inner_start="y_g"),
     r"inner_start must be one of \('previous', 'initial'\)"),
])
def test_bad_adjoint_input_is_named(adjoint, kw, match):
  with pytest.raises(jbl.BilevelValidationError, match=match):
    jbl.hypergradient_descent(f, g, adjoint=adjoint, **_optimizers(), **kw)


def test_preset_messages_name_the_preset_arguments():
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"aid: solver must be one of"):
    jbl.aid(f, g, **_optimizers(), solver="lu")
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"aid: solver='neumann' needs neumann_step"):
    jbl.aid(f, g, **_optimizers(), solver="neumann")
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"itd: truncate=5 exceeds inner_steps=4"):
    jbl.itd(f, g, **_optimizers(), inner_steps=4, truncate=5)
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"ufo_blo: estimator must be one of"):
    jbl.ufo_blo(f, g, **_optimizers(), key=_KEY, estimator="gauss")
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"ufo_blo: key must be a jax\.random key"):
    jbl.ufo_blo(f, g, **_optimizers(), key=None)
