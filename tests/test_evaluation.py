"""jbl.lower_level_evaluation: f at the lower-level solution y*(x)."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbilevel as jbl

# A quadratic lower level with a known solution: g = 0.5 y'Qy - x'By,
# y*(x) = Q^{-1} B'x; f = |y - 1|^2 + 0.5 |x|^2.
Q = jnp.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.5]])
B = jnp.array([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]])


def g(x, y, batch):
  del batch
  return 0.5 * y @ Q @ y - x @ B @ y


def f(x, y, batch):
  del batch
  return jnp.sum((y - 1.0) ** 2) + 0.5 * jnp.sum(x ** 2)


def y_star(x, batch):
  del batch
  return jnp.linalg.solve(Q, B.T @ x)


def bilevel_objective(x):
  """F(x) = f(x, y*(x)) written out by hand."""
  ys = np.linalg.solve(np.asarray(Q), np.asarray(B).T @ np.asarray(x))
  return float(np.sum((ys - 1.0) ** 2) + 0.5 * np.sum(np.asarray(x) ** 2))


PARAMS = jbl.BilevelParams(x=jnp.array([0.3, -0.7]),
                           y=jnp.array([1.0, 0.5, -0.2]))


def test_closed_form_gives_f_at_y_star_exactly():
  out = jbl.lower_level_evaluation(f, g, y_star=y_star)(PARAMS)
  np.testing.assert_allclose(out["f_at_lower_solution"],
                             bilevel_objective(PARAMS.x), rtol=1e-14)
  np.testing.assert_allclose(out["f_at_iterate"],
                             f(PARAMS.x, PARAMS.y, None), rtol=1e-14)
  ys = y_star(PARAMS.x, None)
  # g(x, y) - g(x, y*) = 0.5 (y - y*)'Q(y - y*) for this quadratic.
  np.testing.assert_allclose(out["lower_gap"],
                             0.5 * (PARAMS.y - ys) @ Q @ (PARAMS.y - ys),
                             rtol=1e-12)
  np.testing.assert_allclose(out["lower_value"], g(PARAMS.x, ys, None),
                             rtol=1e-14)
  assert float(out["lower_grad_norm"]) < 1e-14
  assert set(out) == set(jbl.evaluation.EVALUATION_KEYS)


def test_iterative_refit_converges_to_the_closed_form():
  exact = jbl.lower_level_evaluation(f, g, y_star=y_star,
                                     return_solution=True)(PARAMS)
  errors = []
  for steps in (10, 40, 400):
    out = jbl.lower_level_evaluation(
        f, g, lower_optimizer=optax.sgd(0.4), num_steps=steps,
        return_solution=True)(PARAMS)
    errors.append(abs(float(out["f_at_lower_solution"]
                            - exact["f_at_lower_solution"])))
  assert errors[0] > errors[1] > errors[2]
  assert errors[2] < 1e-12
  np.testing.assert_allclose(out["lower_solution"], exact["lower_solution"],
                             atol=1e-12)
  np.testing.assert_allclose(out["lower_gap"], exact["lower_gap"], atol=1e-12)
  assert float(out["lower_grad_norm"]) < 1e-11


def test_refit_is_warm_started_from_params_y():
  # Zero steps are not allowed; one step of sgd(0) returns params.y itself.
  out = jbl.lower_level_evaluation(f, g, lower_optimizer=optax.sgd(0.0),
                                   num_steps=1, return_solution=True)(PARAMS)
  np.testing.assert_array_equal(out["lower_solution"], PARAMS.y)
  assert float(out["lower_gap"]) == 0.0


def test_jit_and_vmap_match_single_calls():
  evaluate = jbl.lower_level_evaluation(f, g, lower_optimizer=optax.sgd(0.4),
                                        num_steps=50)
  xs = jnp.array([[0.3, -0.7], [1.0, 2.0], [-0.5, 0.0]])
  stacked = jbl.BilevelParams(x=xs, y=jnp.zeros((3, 3)))
  batched = jax.jit(jax.vmap(evaluate))(stacked)
  for i in range(3):
    single = evaluate(jbl.BilevelParams(x=xs[i], y=jnp.zeros(3)))
    for key in jbl.evaluation.EVALUATION_KEYS:
      np.testing.assert_allclose(batched[key][i], single[key], rtol=1e-12,
                                 atol=1e-14)


def test_as_record_of_run_gives_the_bilevel_objective_per_step():
  tx = jbl.pbgd_free(f, g, gamma=10.0, upper_optimizer=optax.sgd(0.1),
                     lower_optimizer=optax.sgd(0.2), inner_steps=2)
  evaluate = jbl.lower_level_evaluation(f, g, y_star=y_star)
  _, _, history = jbl.run(tx, PARAMS, num_steps=4, record=evaluate)
  iterates = []
  params, state = PARAMS, tx.init(PARAMS)
  for _ in range(4):
    updates, state = tx.update(None, state, params, batch=None)
    params = optax.apply_updates(params, updates)
    iterates.append(params)
  np.testing.assert_allclose(history["record"]["f_at_lower_solution"],
                             [bilevel_objective(p.x) for p in iterates],
                             rtol=1e-12)
  np.testing.assert_allclose(history["record"]["f_at_iterate"],
                             [f(p.x, p.y, None) for p in iterates],
                             rtol=1e-12)


def test_batch_argument_replaces_the_default():
  fb = lambda x, y, batch: jnp.sum((y - batch) ** 2) + jnp.sum(x ** 2)
  gb = lambda x, y, batch: jnp.sum((y - batch * x) ** 2)
  evaluate = jbl.lower_level_evaluation(
      fb, gb, y_star=lambda x, batch: batch * x, batch=2.0)
  p = jbl.BilevelParams(x=jnp.array([1.0]), y=jnp.array([0.0]))
  assert float(evaluate(p)["f_at_lower_solution"]) == 1.0  # (2 - 2)^2 + 1
  assert float(evaluate(p, batch=3.0)["f_at_lower_solution"]) == 1.0
  assert float(evaluate(p, batch=1.0)["f_at_iterate"]) == 2.0  # 1 + 1


def test_bad_arguments_fail_clearly():
  with pytest.raises(jbl.BilevelValidationError, match="lower_optimizer="):
    jbl.lower_level_evaluation(f, g, num_steps=5)
  with pytest.raises(jbl.BilevelValidationError, match="num_steps"):
    jbl.lower_level_evaluation(f, g, lower_optimizer=optax.sgd(0.1),
                               num_steps=0)
  with pytest.raises(jbl.BilevelValidationError, match="y_star must be"):
    jbl.lower_level_evaluation(f, g, y_star=3.0)
  bad = jbl.lower_level_evaluation(f, g, y_star=lambda x, batch: x)
  with pytest.raises(jbl.BilevelValidationError, match="y_star"):
    bad(PARAMS)


DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                   "docs", "scaling.md")


def test_scaling_doc_recipe_picks_the_best_gamma_at_y_star():
  """docs/scaling.md, section 3, picks the point best at y*(x) (~10 s)."""
  blocks = re.findall(r"```python\n(.*?)```", open(DOC).read(), re.S)
  sweep_block = [b for b in blocks if "jbl.sweep(make_tx" in b][0]
  namespace = {}
  exec(compile(blocks[0], "docs/scaling.md block 0", "exec"), namespace)  # pylint: disable=exec-used
  exec(compile(sweep_block, "docs/scaling.md section 3", "exec"), namespace)  # pylint: disable=exec-used
  data, params, grid = (namespace[k] for k in ("data", "params", "grid"))
  doc_f, doc_g = namespace["f"], namespace["g"]

  def ridge(x, batch):  # closed-form y*(x) of the doc's ridge lower level
    w, a = 1 - batch["val"], batch["a"]
    hess = (a.T * w) @ a / 48 + jnp.exp(x) * jnp.eye(a.shape[1])
    return jnp.linalg.solve(hess, (a.T * w) @ batch["b"] / 48)

  exact = jax.vmap(jbl.lower_level_evaluation(doc_f, doc_g, y_star=ridge,
                                              batch=data))(params)
  best_at_y_star = int(np.argmin(exact["f_at_lower_solution"]))
  assert namespace["best"] == best_at_y_star
  assert float(grid["gamma"][best_at_y_star]) == 80.0
  # The refit of the recipe agrees with the closed form.
  np.testing.assert_allclose(namespace["scores"]["f_at_lower_solution"],
                             exact["f_at_lower_solution"], atol=1e-6)
  # The old recipe (argmin of the recorded f) picks gamma = 5 instead: the
  # recorded f is taken at the penalised y and is biased low.
  naive = int(np.argmin(namespace["history"]["f"][:, -1]))
  assert float(grid["gamma"][naive]) == 5.0
  np.testing.assert_allclose(namespace["history"]["f"][naive, -1], 0.0973,
                             atol=5e-5)
  np.testing.assert_allclose(exact["f_at_lower_solution"][naive], 0.12245,
                             atol=5e-6)
  assert (exact["f_at_lower_solution"][naive]
          > exact["f_at_lower_solution"][best_at_y_star])
