"""The README's demo runs and produces a sensible comparison."""

import numpy as np
import pytest

pytest.importorskip("sklearn")

from jaxbilevel import demo  # pylint: disable=wrong-import-position


def test_demo_runs_and_bilevel_methods_lower_the_upper_loss(capsys):
  rows = demo.main(["--steps", "300"])
  out = capsys.readouterr().out
  for name in ("PBGD-Free", "ALT-PBGD", "V-PBGD", "test MSE", "ms/step"):
    assert name in out
  train, val, _ = demo.load_diabetes_splits(0)
  f, _ = demo.make_objectives(train, val)
  upper = {name: float(f(p.x, p.y)) for name, p, _ in rows}
  baseline = upper["train loss only (no bilevel)"]
  for name, value in upper.items():
    assert np.isfinite(value)
    if name != "train loss only (no bilevel)":
      # Every bilevel method improves the validation (upper) loss over
      # training on the lower objective alone.
      assert value < baseline, (name, value, baseline)
