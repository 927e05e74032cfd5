"""The SVM problem with coupled constraints (jaxbilevel.svm).

The authors' start drawn as torch draws it, the updates of PBGD-Free-CC and
PBGD-BLOCC against the authors' closed forms, the validation stopping rule,
and the authors' notebook accuracies (on the LIBSVM diabetes file when it is
present).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbilevel as jbl
from jaxbilevel import datasets
from jaxbilevel import svm

from _helpers import full_data


# ---------------------------------------------------------------------------
# The authors' start, drawn as torch draws it.
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


# ---------------------------------------------------------------------------
# The methods' updates and the fit (on the shipped sample)
# ---------------------------------------------------------------------------


def _svm_sample():
  z, labels = datasets.load_fourclass(datasets.sample_path("fourclass"))
  split = datasets.train_val_test_split(z, labels, seed=0, n_train=16,
                                        n_val=8)
  data = svm.SVMData.from_split(split, jnp.float64)
  return data, svm.initial_params(16, 2, seed=0, dtype=jnp.float64)


def _svm_method(method, **kw):
  return method(svm.upper_objective, svm.lower_objective, svm.constraint,
                gamma=15.0, upper_optimizer=optax.sgd(0.005),
                lower_optimizer=optax.sgd(0.005), dual_step_size=0.001,
                dual_steps=4, primal_steps=3,
                multiplier_floor=svm.MULTIPLIER_FLOOR, num_constraints=16,
                proj_x=svm.project_margins, **kw)


def test_svm_updates_match_the_authors_closed_forms():
  data, params = _svm_sample()
  # PBGD-Free-CC: the upper step is the shrinkage C <- max((1 - eta) C, 1e-4).
  tx = _svm_method(jbl.pbgd_free_cc)
  updates, state = tx.update(None, tx.init(params), params, batch=data)
  np.testing.assert_allclose(params.x + updates.x, 0.995 * params.x,
                             rtol=1e-12)
  assert float(jnp.min(state.mu_F)) >= svm.MULTIPLIER_FLOOR
  # PBGD-BLOCC: grad_C c = -I, so the direction is C + gamma (mu_g - mu_F).
  tx = _svm_method(jbl.pbgd_blocc)
  updates, state = tx.update(None, tx.init(params), params, batch=data)
  direction = params.x + 15.0 * (state.mu_g - state.mu_F)
  np.testing.assert_allclose(
      params.x + updates.x,
      jnp.maximum(params.x - 0.005 * direction, svm.C_FLOOR), rtol=1e-12)


def test_svm_fit_stops_by_the_validation_rule():
  data, params = _svm_sample()
  result = jax.jit(lambda p, d: svm.fit(_svm_method(jbl.pbgd_free_cc), p, d,
                                        max_epochs=30, tol=1e-5))(params, data)
  assert 1 <= int(result.epochs) <= 30
  assert 0.0 <= float(result.test_accuracy) <= 1.0
  np.testing.assert_allclose(result.val_loss,
                             svm.validation_loss(result.params.y, data))
  # A huge tolerance stops after one epoch.
  one = svm.fit(_svm_method(jbl.pbgd_free_cc), params, data, tol=1e9)
  assert int(one.epochs) == 1


# ---------------------------------------------------------------------------
# The authors' notebook accuracies
# ---------------------------------------------------------------------------


# The full LIBSVM diabetes file, in the folder $JAXBILEVEL_DATA.
DATA_DIR, needs_diabetes = full_data("diabetes_libsvm_scaled.txt")


@needs_diabetes
def test_svm_reproduces_the_authors_notebook_accuracies():
  """SVM_Tests.ipynb: PBGD-Free 0.7627 ± 0.0120, BLOCC 0.7740 ± 0.0144 (~20 s)."""
  features, labels = datasets.load_diabetes(DATA_DIR)
  # The notebook's protocol: 3 seeds, splits shuffled in place one after the
  # other, metrics of the "last epoch" = after 49 outer iterations.
  protocol = dict(seeds=3, chained=True, outer_iterations=49)
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
