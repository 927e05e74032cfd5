"""Writes ``golden_iterates.json``: every common-suite method's iterates in float64.

The values guard refactors of the methods' core: ``tests/test_golden.py``
checks that the current code reaches the same iterates, optimizer states and
diagnostics to 1e-12. They were written by this script at commit 4416dfc
(before ``update`` was derived from ``step`` and the diagnostics became an
argument), with the method cases of ``tests/test_common.py`` on its nested
quadratic problem: 10 outer steps of ``tx.update`` + ``optax.apply_updates``
under ``jax.jit``, once with SGD on both levels and once with Adam on ``x``.

Usage (from the repository root): ``python tests/data/make_golden_iterates.py``.
"""

import json
import os
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for test_common

import test_common  # pylint: disable=g-import-not-at-top

STEPS = 10
OPTIMIZERS = {
    "sgd": lambda: (optax.sgd(test_common.LR), optax.sgd(test_common.LR)),
    "adam": lambda: (optax.adam(0.02), optax.sgd(test_common.LR)),
}


def leaves(tree):
  return [np.asarray(v).tolist() for v in jax.tree.leaves(tree)]


def run_case(name, optimizers, update_kwargs=None):
  uo, lo = OPTIMIZERS[optimizers]()
  tx, params = test_common._build(name, uo=uo, lo=lo)  # pylint: disable=protected-access
  state = tx.init(params)
  update = jax.jit(lambda s, p: tx.update(None, s, p, **(update_kwargs or {})))
  for _ in range(STEPS):
    updates, state = update(state, params)
    params = optax.apply_updates(params, updates)
  return dict(params=leaves(params),
              state=leaves(state._replace(diagnostics={})),
              diagnostics={k: float(v) for k, v in state.diagnostics.items()})


def main():
  out = {"steps": STEPS, "cases": {}}
  for name in test_common.NAMES:
    for optimizers in OPTIMIZERS:
      out["cases"][f"{name}/{optimizers}"] = run_case(name, optimizers)
  with open(os.path.join(HERE, "golden_iterates.json"), "w") as fh:
    json.dump(out, fh, indent=1)
  print(f"{len(out['cases'])} cases written")


if __name__ == "__main__":
  main()
