"""Numerics that must match their references: F2SA schedules, the SVM start."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbilevel as jbl
from jaxbilevel import datasets
from jaxbilevel import svm

# ---------------------------------------------------------------------------
# F2SA schedules: computed in the default float dtype.
# ---------------------------------------------------------------------------


def test_f2sa_schedules_are_float64_under_x64_and_equal_the_formulas():
  assert jax.config.jax_enable_x64  # tests/conftest.py
  b = jbl.f2sa_schedules("benchopt", inner_steps=10, lower_step=0.1,
                         value_step=0.2, outer_ratio=2.0, lambda0=3.0,
                         lambda_delta=0.5, offset=1.0)
  for k in (0, 3, 4, 123):
    values = {"lower": (b.lower(10 * k + 7), 0.1 * (k + 1.0) ** (-5 / 7)),
              "value": (b.value(10 * k), 0.2 * (k + 1.0) ** (-4 / 7)),
              "upper": (b.upper(k), 0.05 * (k + 1.0) ** (-4 / 7)),
              "lambda_increment": (b.lambda_increment(k),
                                   0.5 * (k + 1.0) ** (-1 / 7))}
    for name, (got, want) in values.items():
      assert got.dtype == jnp.float64, name
      np.testing.assert_allclose(float(got), want, rtol=4e-16, err_msg=name)
  p = jbl.f2sa_schedules("paper", inner_steps=10, lower_step=0.1,
                         value_step=0.2)
  lam = lambda k: 0.2 * (k + 1.0) ** (-4 / 7) / (2 * 0.1 * (k + 1.0) ** (
      -5 / 7))
  np.testing.assert_allclose(p.lambda0, lam(0), rtol=4e-16)
  for k in (0, 4, 99):
    got = p.lambda_increment(k)
    assert got.dtype == jnp.float64
    # A difference of two nearby values: relative rounding of lambda itself.
    np.testing.assert_allclose(float(got), lam(k + 1) - lam(k),
                               atol=4e-16 * lam(k + 1))
    np.testing.assert_allclose(float(p.upper(k)), 0.1 * (k + 1.0) ** (-5 / 7),
                               rtol=4e-16)


def test_f2sa_schedules_are_float32_without_x64():
  with jax.enable_x64(False):
    s = jbl.f2sa_schedules("benchopt", inner_steps=10, lower_step=0.1)
    assert s.lower(47).dtype == jnp.float32
    np.testing.assert_allclose(float(s.lower(47)), 0.1 * 5 ** (-5 / 7),
                               rtol=1e-6)


# ---------------------------------------------------------------------------
# SVM: the authors' start, drawn as torch draws it.
# ---------------------------------------------------------------------------

# torch==2.13.0 (CPU): torch.manual_seed(seed); torch.Tensor(500).uniform_(1, 5)
# (twice for seed 0), printed as Python floats.
TORCH_GOLDEN = {
    (0, 0): [2.9850263595581055, 4.072887420654297, 1.3539097309112549],
    (0, 499): [4.829054355621338],
    (0, 500): [1.1474406719207764, 4.41059684753418],
    (19, 0): [4.874411582946777, 1.7994647026062012, 4.519711494445801],
}


def test_torch_cpu_uniform_matches_torch_golden_values():
  for (seed, start), values in TORCH_GOLDEN.items():
    got = svm.torch_cpu_uniform(seed, len(values), 1.0, 5.0, skip=start)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.asarray(values, np.float32))


def test_torch_cpu_uniform_matches_torch_when_installed():
  torch = pytest.importorskip("torch")
  for seed in range(20):
    torch.manual_seed(seed)
    first = torch.Tensor(500).uniform_(1.0, 5.0).numpy()
    second = torch.Tensor(500).uniform_(1.0, 5.0).numpy()
    np.testing.assert_array_equal(svm.torch_cpu_uniform(seed, 500, 1.0, 5.0),
                                  first)
    np.testing.assert_array_equal(
        svm.torch_cpu_uniform(seed, 500, 1.0, 5.0, skip=500), second)


def test_initial_params_take_the_method_s_draw():
  free = svm.initial_params(500, 45, 3, draw=svm.AUTHORS_DRAW["pbgd_free_cc"])
  blocc = svm.initial_params(500, 45, 3, draw=svm.AUTHORS_DRAW["pbgd_blocc"])
  both = svm.torch_cpu_uniform(3, 1000, 1.0, 5.0)
  np.testing.assert_array_equal(free.x, both[:500])
  np.testing.assert_array_equal(blocc.x, both[500:])
  assert float(free.y["b"]) == 1.0 and not np.any(np.asarray(free.y["w"]))
  with pytest.raises(ValueError, match="seed"):
    svm.torch_cpu_uniform(-1, 3)


DATA_DIR = os.environ.get("JAXBILEVEL_DATA", "/work/shared/data")
HAS_DIABETES = os.path.isfile(
    os.path.join(DATA_DIR, "diabetes_libsvm_scaled.txt"))


@pytest.mark.skipif(not HAS_DIABETES, reason=f"the LIBSVM diabetes file is "
                    f"not in {DATA_DIR} (set JAXBILEVEL_DATA)")
def test_svm_reproduces_the_authors_notebook_accuracies():
  """SVM_Tests.ipynb: PBGD-Free 0.7627 ± 0.0120, BLOCC 0.7740 ± 0.0144 (~20 s)."""
  features, labels = datasets.load_diabetes(DATA_DIR)
  protocol = svm.AUTHORS_NOTEBOOK
  splits = datasets.random_splits(features, labels, range(protocol["seeds"]),
                                  500, 150, chained=protocol["chained"])
  published = {"pbgd_free_cc": ([0.7627, 0.0120], jbl.pbgd_free_cc),
               "pbgd_blocc": ([0.7740, 0.0144], jbl.pbgd_blocc)}
  for name, (authors, method) in published.items():
    hp = svm.AUTHORS_HPARAMS[name]
    assert hp["gamma"] == 15.0
    tx = method(svm.upper_objective, svm.lower_objective, svm.constraint,
                gamma=hp["gamma"], upper_optimizer=optax.sgd(hp["upper_lr"]),
                lower_optimizer=optax.sgd(hp["lower_lr"]),
                dual_step_size=hp["dual_step_size"],
                dual_steps=hp["dual_steps"], primal_steps=hp["primal_steps"],
                multiplier_floor=svm.MULTIPLIER_FLOOR, num_constraints=500,
                proj_x=svm.project_margins)
    fit = jax.jit(lambda p, d, tx=tx: svm.fit(
        tx, p, d, max_epochs=protocol["outer_iterations"], tol=0.0))
    acc = [float(fit(svm.initial_params(500, features.shape[1], seed,
                                        draw=svm.AUTHORS_DRAW[name]),
                     svm.SVMData.from_split(split)).test_accuracy)
           for seed, split in enumerate(splits)]
    np.testing.assert_allclose([np.mean(acc), np.std(acc)], authors,
                               atol=5e-5, err_msg=name)
