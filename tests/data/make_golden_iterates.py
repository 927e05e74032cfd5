"""Writes ``golden_iterates.json``: every common-suite method's iterates in float64.

The values guard refactors of the methods' core: ``tests/test_golden.py``
checks that the current code reaches the same iterates, optimizer states and
diagnostics to 1e-12. They were written by this script at commit 4416dfc
(before ``update`` was derived from ``step`` and the diagnostics became an
argument), with the method cases of ``tests/test_common.py`` on its nested
quadratic problem: 10 outer steps of ``tx.update`` + ``optax.apply_updates``
under ``jax.jit``, once with SGD on both levels and once with Adam on ``x``.

The shared diagnostics ``f``, ``g`` and ``lower_grad_norm`` were since
moved to one point in every method, the incoming :math:`(x_t, y_t)`
(docs/vocabulary.md, "Where the diagnostics are taken"; checked against
direct evaluations by ``test_common``'s
``test_shared_diagnostics_are_taken_at_the_incoming_params``). Their golden
values were rewritten with ``--diagnostics``: that mode recomputes only the
diagnostics, refuses to write unless the params and states still equal the
file's (those of 4416dfc) to 1e-12, and keeps them.

Usage (from the repository root): ``python tests/data/make_golden_iterates.py
[--diagnostics]``.
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


def run_case(name, optimizers):
  uo, lo = OPTIMIZERS[optimizers]()
  tx, params = test_common._build(name, uo=uo, lo=lo)  # pylint: disable=protected-access
  state = tx.init(params)
  # Every diagnostic recorded (at 4416dfc a step computed them all).
  update = jax.jit(lambda s, p: tx.update(None, s, p, diagnostics=True))
  for _ in range(STEPS):
    updates, state = update(state, params)
    params = optax.apply_updates(params, updates)
  return dict(params=leaves(params),
              state=leaves(state._replace(diagnostics={})),
              diagnostics={k: float(v) for k, v in state.diagnostics.items()})


DIAGNOSTICS_NOTE = (
    "diagnostics rewritten by --diagnostics: f, g and lower_grad_norm at the "
    "incoming (x_t, y_t) in every method; params and state from 4416dfc")


def rewrite_diagnostics(out):
  """``out`` with every case's diagnostics recomputed, its iterates checked."""
  for key, golden in out["cases"].items():
    name, optimizers = key.split("/")
    got = run_case(name, optimizers)
    for part in ("params", "state"):
      for a, b in zip(got[part], golden[part], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13,
                                   err_msg=f"{key} {part}")
    golden["diagnostics"] = got["diagnostics"]
  out["diagnostics_note"] = DIAGNOSTICS_NOTE
  return out


def main():
  path = os.path.join(HERE, "golden_iterates.json")
  if sys.argv[1:] == ["--diagnostics"]:
    with open(path) as fh:
      out = rewrite_diagnostics(json.load(fh))
  else:
    out = {"steps": STEPS, "cases": {}}
    for name in test_common.NAMES:
      for optimizers in OPTIMIZERS:
        out["cases"][f"{name}/{optimizers}"] = run_case(name, optimizers)
  with open(path, "w") as fh:
    json.dump(out, fh, indent=1)
  print(f"{len(out['cases'])} cases written")


if __name__ == "__main__":
  main()
