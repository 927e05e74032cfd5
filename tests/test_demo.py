"""The README's demo runs and produces a sensible comparison."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("sklearn")

from jaxbilevel import demo  # pylint: disable=wrong-import-position


def test_demo_runs_and_bilevel_methods_lower_the_upper_loss(capsys):
  rows = demo.main(["--steps", "300"])
  out = capsys.readouterr().out
  for name in ("PBGD-Free", "ALT-PBGD", "V-PBGD", "val MSE at y*(x)",
               "test MSE at y*(x)", "ms/step"):
    assert name in out
  train, val, _ = demo.load_diabetes_splits(0)
  f, g = demo.make_objectives(train, val)
  # The closed-form head is the lower solution: grad_y g vanishes there.
  x = rows[1][1].x
  grad = jax.grad(lambda y: g(x, y))(demo.ridge_head(x, train))
  assert max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(grad)) < 1e-4
  # Methods are scored at the lower solution y*(x), not at params.y.
  upper = {name: float(f(p.x, demo.ridge_head(p.x, train)))
           for name, p, _ in rows}
  baseline = upper["train loss only (no bilevel)"]
  for name, value in upper.items():
    assert np.isfinite(value)
    if name != "train loss only (no bilevel)":
      # Every bilevel method improves the validation (upper) loss over
      # training on the lower objective alone.
      assert value < baseline, (name, value, baseline)
