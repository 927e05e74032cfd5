"""The applications of jaxbilevel.applications: data, objectives, hypergradients,
and untrusted NLSY CSV files (refused with file, line and column)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbilevel as jbl
from jaxbilevel.applications import dpo_sft
from jaxbilevel.applications import hyper_cleaning
from jaxbilevel.applications import nlsy
from jaxbilevel.applications import regularization
from jaxbilevel.applications import sinusoid


def _f64(tree):
  return jax.tree.map(
      lambda v: jnp.asarray(v, jnp.float64)
      if jnp.issubdtype(jnp.result_type(v), jnp.floating) else v, tree)


def _newton_solution(g, x, y, batch, steps=20):
  """The exact lower solution of a smooth strongly convex g (float64 Newton)."""
  flat, unravel = jax.flatten_util.ravel_pytree(y)
  obj = lambda v: g(x, unravel(v), batch)

  def newton(_, v):
    return v - jnp.linalg.solve(jax.hessian(obj)(v), jax.grad(obj)(v))

  return unravel(jax.lax.fori_loop(0, steps, newton, flat))


def _check_implicit_hypergradient_against_finite_differences(app, x):
  batch = _f64(app.batch)
  y0 = _f64(app.params.y)
  solve = lambda x_: _newton_solution(app.g, x_, y0, batch)
  h = jax.jit(lambda x_: app.f(x_, solve(x_), batch))
  y_star = jax.jit(solve)(x)
  hyper = jax.jit(lambda x_, y_: jbl.hypergradient.implicit_hypergradient(
      app.f, app.g, x_, y_, batch, linear_steps=80, tol=1e-14))(x, y_star)
  direction = jax.random.normal(jax.random.PRNGKey(3), x.shape, jnp.float64)
  eps = 1e-5
  fd = (h(x + eps * direction) - h(x - eps * direction)) / (2 * eps)
  np.testing.assert_allclose(float(jnp.vdot(hyper, direction)), float(fd),
                             rtol=1e-5)


# ---------------------------------------------------------------------------
# Hyper-cleaning.
# ---------------------------------------------------------------------------


def test_hyper_cleaning_corrupts_exactly_half_to_a_different_class():
  data = hyper_cleaning.load_digits(seed=3, num_train=400, num_val=100)
  changed = data["train_labels"] != data["clean_labels"]
  assert changed.sum() == 200
  np.testing.assert_array_equal(changed, ~data["clean_mask"])
  assert data["train_x"].shape == (400, 64)
  assert len(data["test_labels"]) == 1797 - 500
  np.testing.assert_allclose(data["train_x"].mean(axis=0), 0.0, atol=1e-10)
  again = hyper_cleaning.load_digits(seed=3, num_train=400, num_val=100)
  np.testing.assert_array_equal(again["train_labels"], data["train_labels"])


def test_hyper_cleaning_objectives_at_the_start():
  app = hyper_cleaning.problem(num_train=100, num_val=50)
  # sigma(0) = 1/2 and every class has probability 1/10 at W = 0.
  np.testing.assert_allclose(
      app.g(app.params.x, app.params.y, app.batch), 0.5 * np.log(10),
      rtol=1e-6)
  metrics = app.evaluate(app.params)
  np.testing.assert_allclose(metrics["upper_loss"], np.log(10), rtol=1e-6)
  assert app.params.x.dtype == jnp.float32
  assert not jbl._src.base.depends_on(  # pylint: disable=protected-access
      lambda x: app.f(x, app.params.y, app.batch), app.params.x)


def test_hyper_cleaning_f1():
  x = jnp.array([1.0, 1.0, -1.0, -1.0, 2.0])
  clean = jnp.array([True, False, True, False, True])
  # kept {0, 1, 4}, clean {0, 2, 4}: precision 2/3, recall 2/3.
  np.testing.assert_allclose(hyper_cleaning.f1_score(x, clean), 2 / 3,
                             rtol=1e-6)


def test_hyper_cleaning_implicit_hypergradient_matches_finite_differences():
  app = hyper_cleaning.problem(num_train=40, num_val=30)
  x = 0.3 * jax.random.normal(jax.random.PRNGKey(0), (40,), jnp.float64)
  _check_implicit_hypergradient_against_finite_differences(app, x)


# ---------------------------------------------------------------------------
# Regularisation selection.
# ---------------------------------------------------------------------------


def test_regularization_objectives_and_split():
  app = regularization.problem()
  assert app.info["num_train"] + app.info["num_val"] + app.info[
      "num_test"] == 569
  np.testing.assert_allclose(app.g(app.params.x, app.params.y, app.batch),
                             np.log(2), rtol=1e-6)
  y = {"w": jnp.ones(30, jnp.float32), "c": jnp.zeros((), jnp.float32)}
  x = jnp.full(30, np.log(2.0), jnp.float32)
  data = app.info["numpy_data"]
  margins = data["train_labels"] * data["train_x"].sum(axis=1)
  expected = np.mean(np.log1p(np.exp(-margins))) + 0.5 * 2.0 * 30
  np.testing.assert_allclose(app.g(x, y, app.batch), expected, rtol=1e-5)


def test_regularization_implicit_hypergradient_matches_finite_differences():
  app = regularization.problem()
  x = -1.0 + 0.5 * jax.random.normal(jax.random.PRNGKey(1), (30,),
                                     jnp.float64)
  _check_implicit_hypergradient_against_finite_differences(app, x)


# ---------------------------------------------------------------------------
# NLSY.
# ---------------------------------------------------------------------------


def test_nlsy_sample_loads_and_splits():
  data = nlsy.load_csv(nlsy.sample_path())
  assert data["features"].shape == (200, 21)
  assert (np.sum(data["gender"] == 0), np.sum(data["gender"] == 1)) == (94,
                                                                         106)
  parts = nlsy.split(data, seed=0)
  sizes = [len(parts[f"{p}_t{g}"]) for p in ("train", "test") for g in (0, 1)]
  assert sum(sizes) == 200 and sizes[2] + sizes[3] == 40
  # Rows are kept whole: each (features, income) pair is one of the file's.
  rows = {tuple(r) + (t,) for r, t in zip(data["features"], data["income"])}
  for a, t in zip(parts["train_a0"], parts["train_t0"]):
    assert tuple(a) + (t,) in rows


def test_nlsy_objectives_match_numpy_and_batches_are_without_replacement():
  app = nlsy.problem(nlsy.sample_path(), batch_size=1000, hidden=8)
  assert app.info["batch_size"] == min(app.info["train_rows"])
  batch = app.sample(jax.random.PRNGKey(0))
  assert len(np.unique(np.asarray(batch["a0"]), axis=0)) == len(np.unique(
      np.asarray(nlsy.split(nlsy.load_csv(nlsy.sample_path()))["train_a0"]),
      axis=0))
  x, y = jax.tree.map(np.asarray, app.params)
  h = np.maximum(np.asarray(batch["a1"]) @ x["fc1"]["kernel"]
                 + x["fc1"]["bias"], 0)
  h = np.maximum(h @ x["fc2"]["kernel"] + x["fc2"]["bias"], 0)
  pred = h @ y["kernel"] + y["bias"]
  np.testing.assert_allclose(
      app.g(app.params.x, app.params.y, batch),
      np.mean((pred - np.asarray(batch["t1"])) ** 2), rtol=1e-4)
  metrics = app.evaluate(app.params)
  np.testing.assert_allclose(metrics["test_mse"], 0.5 * (
      metrics["upper_loss"] + metrics["lower_loss"]), rtol=1e-6)


def _parity_gap_loop(p0, t0, p1, t1, num=33):
  """The gap written as a plain loop over percentiles with numpy."""
  curves = []
  for pred, target in ((p0, t0), (p1, t1)):
    curve = []
    for level in np.linspace(0, 100, num):
      q = np.percentile(pred, level)
      curve.append(sum(1 for t in target if t <= q) / len(target))
    curves.append(np.array(curve))
  return float(np.mean(np.abs(curves[0] - curves[1])))


def test_nlsy_predictive_parity_gap():
  # Hand-computed: predictions 0..4, targets 2.5 each; the curve steps from
  # 0 to 1 once the percentile of the predictions passes 2.5.
  levels = np.linspace(0, 100, 33)
  expected = np.mean(np.percentile(np.arange(5.0), levels) >= 2.5)
  curve = nlsy.calibration_curve(jnp.arange(5.0), jnp.full(7, 2.5))
  np.testing.assert_allclose(curve, (np.percentile(np.arange(5.0), levels)
                                     >= 2.5).astype(float))
  np.testing.assert_allclose(
      nlsy.predictive_parity_gap(jnp.arange(5.0), jnp.full(7, 2.5),
                                 jnp.arange(5.0), jnp.full(3, 10.0)),
      expected)  # the second curve is all zeros
  # Identical groups have no gap; a random pair matches the numpy loop.
  rng = np.random.default_rng(0)
  p0, t0 = rng.normal(size=40), rng.normal(size=40)
  p1, t1 = rng.normal(1.0, 2.0, size=57), rng.normal(size=57)
  assert float(nlsy.predictive_parity_gap(p0, t0, p0, t0)) == 0.0
  np.testing.assert_allclose(nlsy.predictive_parity_gap(p0, t0, p1, t1),
                             _parity_gap_loop(p0, t0, p1, t1), rtol=1e-12)
  # The application reports it for the test split.
  app = nlsy.problem(nlsy.sample_path(), batch_size=20, hidden=8)
  x, y = app.params
  parts = nlsy.split(nlsy.load_csv(nlsy.sample_path()))
  pred = [np.asarray(nlsy.predict(x, y, jnp.asarray(parts[f"test_a{k}"],
                                                    jnp.float32)))
          for k in (0, 1)]
  np.testing.assert_allclose(
      app.evaluate(app.params)["parity_gap"],
      _parity_gap_loop(pred[0], parts["test_t0"], pred[1], parts["test_t1"]),
      atol=1e-6)


def test_nlsy_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nlsy79_processed.csv"):
    nlsy.load_csv(tmp_path / "missing.csv")
  bad = tmp_path / "bad.csv"
  bad.write_text("gender,income\n0,1.0\n")
  with pytest.raises(jbl.BilevelValidationError, match="lacks the columns"):
    nlsy.load_csv(bad)


# ---------------------------------------------------------------------------
# Sinusoid.
# ---------------------------------------------------------------------------


def test_sinusoid_tasks():
  tasks = sinusoid.sample_tasks(jax.random.PRNGKey(0), 64, 10)
  amp, phase = tasks["amplitude"], tasks["phase"]
  assert float(amp.min()) >= 0.1 and float(amp.max()) <= 5.0
  assert float(phase.min()) >= 0.0 and float(phase.max()) <= np.pi
  assert float(jnp.abs(tasks["query_t"]).max()) <= 5.0
  np.testing.assert_allclose(
      tasks["support_y"],
      amp[:, None] * jnp.sin(tasks["support_t"] - phase[:, None]), rtol=1e-6)


def _maml_reference(app, x, batch, first_order):
  """MAML's meta-gradient written directly on theta_0 (no offsets)."""
  r, alpha, lam = (app.info["inner_steps"], app.info["inner_lr"],
                   app.info["proximal"])

  def adapt(theta0, t, y):
    def support(theta):
      return (jnp.mean((sinusoid.mlp(theta, t) - y) ** 2) + 0.5 * lam * sum(
          jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(theta),
                                                jax.tree.leaves(theta0))))
    theta = theta0
    for _ in range(r):
      theta = jax.tree.map(lambda p, d: p - alpha * d, theta,
                           jax.grad(support)(theta))
    return theta

  def meta_loss(theta0):
    def one(st, sy, qt, qy):
      theta = adapt(theta0, st, sy)
      if first_order:
        theta = jax.tree.map(lambda p, p0: jax.lax.stop_gradient(p - p0) + p0,
                             theta, theta0)
      return jnp.mean((sinusoid.mlp(theta, qt) - qy) ** 2)
    return jnp.mean(jax.vmap(one)(batch["support_t"], batch["support_y"],
                                  batch["query_t"], batch["query_y"]))

  return jax.grad(meta_loss)(x)


@pytest.mark.slow  # run by .ci/run (step 1b)
@pytest.mark.parametrize("method", ["itd", "fo_blo"])
def test_sinusoid_meta_gradients_are_maml_and_fomaml(method):
  app = sinusoid.problem(meta_batch=3, hidden=8, num_eval_tasks=10)
  batch = app.sample(jax.random.PRNGKey(4))
  r, alpha = app.info["inner_steps"], app.info["inner_lr"]
  if method == "itd":
    tx = jbl.itd(app.f, app.g, upper_optimizer=optax.sgd(1.0),
                 lower_optimizer=optax.sgd(alpha), inner_steps=r,
                 inner_start="initial")
  else:
    tx = jbl.fo_blo(app.f, app.g, upper_optimizer=optax.sgd(1.0),
                    lower_optimizer=optax.sgd(alpha), inner_steps=r,
                    inner_start=app.info["init"])
  updates, _ = jax.jit(lambda p: tx.update(None, tx.init(p), p, batch=batch))(
      app.params)
  expected = jax.jit(lambda x: _maml_reference(
      app, x, batch, first_order=method == "fo_blo"))(app.params.x)
  for got, want in zip(jax.tree.leaves(updates.x), jax.tree.leaves(expected)):
    np.testing.assert_allclose(-got, want, rtol=2e-4, atol=1e-6)


def test_sinusoid_lower_objective_separates_tasks():
  app = sinusoid.problem(meta_batch=2, hidden=8, num_eval_tasks=10)
  batch = app.sample(jax.random.PRNGKey(1))
  delta = jax.tree.map(lambda v: 0.1 * jnp.ones_like(v), app.params.y)
  grads = jax.jit(jax.grad(app.g, argnums=1))(app.params.x, delta, batch)
  theta1 = jax.tree.map(lambda a, d: a + d[1], app.params.x, delta)
  own = jax.grad(lambda th: jnp.mean((sinusoid.mlp(
      th, batch["support_t"][1]) - batch["support_y"][1]) ** 2))(theta1)
  for g_leaf, own_leaf, d_leaf in zip(jax.tree.leaves(grads),
                                      jax.tree.leaves(own),
                                      jax.tree.leaves(delta)):
    np.testing.assert_allclose(g_leaf[1], own_leaf + app.info["proximal"]
                               * d_leaf[1], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# DPO / SFT.
# ---------------------------------------------------------------------------


def test_synthetic_language_layout():
  prompts = jnp.array([[4, 5, 6, 7, 8, 9]])
  chosen = dpo_sft.sequences(prompts, dpo_sft.render(prompts, [True], [1]))
  np.testing.assert_array_equal(
      chosen[0], [1, 4, 5, 6, 7, 8, 9, 2, 39, 38, 37, 36, 35, 34, 3, 0])
  copied = dpo_sft.render(prompts, [False], [0])
  np.testing.assert_array_equal(copied[0], prompts[0])
  # The response mask covers the targets r1..r6 and EOS only.
  targets = chosen[0, 1:]
  np.testing.assert_array_equal(targets[dpo_sft.RESPONSE_MASK],
                                [39, 38, 37, 36, 35, 34, 3])
  data = dpo_sft.make_data(jax.random.PRNGKey(0), 8, 8)
  np.testing.assert_array_equal(data["chosen"][:, :8], data["rejected"][:, :8])
  np.testing.assert_array_equal(data["chosen"][:, 8:14] % 30,
                                data["rejected"][:, 6:0:-1] % 30)
  np.testing.assert_array_equal(data["sft"][:, 8:14], data["sft"][:, 6:0:-1])


def test_dpo_and_sft_losses():
  loss, acc, margin = dpo_sft.dpo_loss(
      jnp.array([-1.0, -2.0]), jnp.array([-3.0, -1.0]),
      jnp.array([-2.0, -2.0]), jnp.array([-2.0, -2.0]), 0.1)
  expected = np.mean([np.log1p(np.exp(-0.2)), np.log1p(np.exp(0.1))])
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert float(acc) == 0.5
  np.testing.assert_allclose(margin, 0.05, rtol=1e-5)
  tokens = dpo_sft.make_data(jax.random.PRNGKey(1), 3, 1)["sft"]
  logits = jax.random.normal(jax.random.PRNGKey(2),
                             (3, dpo_sft.SEQ_LEN - 1, dpo_sft.VOCAB))
  logp = np.asarray(jax.nn.log_softmax(logits))
  picked = np.take_along_axis(logp, np.asarray(tokens)[:, 1:, None], -1)[..., 0]
  mask = dpo_sft.RESPONSE_MASK
  np.testing.assert_allclose(dpo_sft.response_logprob(logits, tokens),
                             picked[:, mask].sum(axis=1), rtol=1e-5)
  np.testing.assert_allclose(dpo_sft.sft_loss(logits, tokens),
                             -picked[:, mask].mean(), rtol=1e-5)


def _tiny_app():
  config = dpo_sft.LMConfig(d_model=16, num_layers=1, num_heads=2)
  model = dpo_sft.CausalLM(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(5),
                               jnp.zeros((1, config.max_len),
                                         jnp.int32))["params"]
  return dpo_sft.problem(config=config, pretrained=params, num_train=16,
                         num_eval=8, batch_size=4, lora_rank=2), model


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_dpo_sft_problem_starts_at_the_reference():
  app, model = _tiny_app()
  flat_x = jax.tree_util.tree_leaves_with_path(app.params.x)
  assert all("lora" in jax.tree_util.keystr(p) for p, _ in flat_x)
  assert sorted(app.params.y) == ["head"]
  metrics = jax.jit(app.evaluate)(app.params)
  np.testing.assert_allclose(metrics["upper_loss"], np.log(2), rtol=1e-6)
  assert abs(float(metrics["reward_margin"])) < 1e-5
  assert metrics["upper_loss"].dtype == jnp.float32
  batch = app.sample(jax.random.PRNGKey(0))
  reference = app.info["reference_params"]
  sft_reference = jax.jit(lambda p, t: dpo_sft.sft_loss(
      model.apply({"params": p}, t[:, :-1]), t))(reference, batch["sft"])
  np.testing.assert_allclose(jax.jit(app.g)(app.params.x, app.params.y, batch),
                             sft_reference, rtol=1e-5)
  grads = jax.jit(jax.grad(app.f))(app.params.x, app.params.y, batch)
  for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
    if "lora_a" in jax.tree_util.keystr(path):
      np.testing.assert_array_equal(leaf, 0.0)   # B = 0 at the start
    else:
      assert float(jnp.abs(leaf).max()) > 0


@pytest.mark.slow  # run by .ci/run (step 1b)
def test_pretraining_lowers_the_language_model_loss():
  config = dpo_sft.LMConfig(d_model=16, num_layers=1, num_heads=2)
  _, info = dpo_sft.pretrain(jax.random.PRNGKey(0), config, steps=60,
                             chunk=20)
  assert len(info["losses"]) == 3
  assert info["losses"][0] > info["losses"][-1] + 0.3
  assert info["losses"][0] < np.log(dpo_sft.VOCAB) + 0.3


def test_applications_are_exported():
  import jaxbilevel.applications as apps  # pylint: disable=import-outside-toplevel
  assert set(apps.__all__) >= {"dpo_sft", "hyper_cleaning", "nlsy",
                               "regularization", "sinusoid", "Application"}
  assert os.path.isfile(nlsy.sample_path())


# ---------------------------------------------------------------------------
# NLSY CSV files: refused with file, line and column.
# ---------------------------------------------------------------------------


def _nlsy_lines():
  with open(nlsy.sample_path(), encoding="utf-8") as fh:
    return fh.read().splitlines()


def _edit(lines, line, column, value):
  """Sets a cell (1-based line number, column name)."""
  header = lines[0].split(",")
  cells = lines[line - 1].split(",")
  cells[header.index(column)] = value
  out = list(lines)
  out[line - 1] = ",".join(cells)
  return out


def _bad_nlsy():
  lines = _nlsy_lines()
  header = lines[0]
  short = list(lines)
  short[4] = short[4].rsplit(",", 2)[0]
  # (id, line, column, value, message): one cell set to a bad value.
  cells = [
      ("gender 0.7", 5, "gender", "0.7",
       "line 5: column 'gender' holds '0.7'; it must be 0 or 1"),
      ("gender 2", 3, "gender", "2", "line 3: column 'gender' holds '2'"),
      ("income nan", 7, "income", "nan",
       "line 7: column 'income' holds 'nan', not a finite"),
      ("income inf", 7, "income", "-inf",
       "line 7: column 'income' holds '-inf'"),
      ("income 1e400", 8, "income", "1e400",
       "line 8: column 'income' holds '1e400'"),
      ("word in a cell", 9, "afqt89", "n/a",
       "line 9: column 'afqt89' holds 'n/a'"),
      ("underscore", 9, "age", "1_4", "line 9: column 'age' holds '1_4'"),
  ]
  return [(name, _edit(lines, line, column, value), message)
          for name, line, column, value, message in cells] + [
      ("short row", short, "line 5: the row has 21 cells, the header 23"),
      ("duplicated column", [header + ",income"] + [
          line + ",1" for line in lines[1:]],
       r"line 1: the header names the columns \['income'\] more than once"),
      ("header only", [header], "the file has a header but no data rows"),
      ("empty", [], "the file is empty"),
  ]


@pytest.mark.parametrize("name,lines,message", _bad_nlsy(),
                         ids=[b[0] for b in _bad_nlsy()])
def test_bad_nlsy_csv_names_file_line_and_column(tmp_path, name, lines,
                                                 message):
  del name
  path = tmp_path / "nlsy.csv"
  path.write_text("\n".join(lines) + ("\n" if lines else ""),
                  encoding="utf-8")
  with pytest.raises(jbl.BilevelValidationError,
                     match=f"nlsy.load_csv: '.*nlsy.csv'.*{message}"):
    nlsy.load_csv(path)


def test_nlsy_csv_encodings(tmp_path):
  expected = nlsy.load_csv(nlsy.sample_path())
  text = "\n".join(_nlsy_lines()) + "\n"
  # Excel's "CSV UTF-8" starts with a byte-order mark and ends lines in CRLF.
  path = tmp_path / "excel.csv"
  path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
  got = nlsy.load_csv(path)
  for key, value in expected.items():
    np.testing.assert_array_equal(got[key], value)
    assert got[key].dtype == value.dtype
  path = tmp_path / "latin1.csv"
  path.write_bytes(text.encode() + b"1,2.0,caf\xe9\n")
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"latin1.csv', line 202: not UTF-8 text"):
    nlsy.load_csv(path)
