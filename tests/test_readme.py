"""The README's Python examples run as written."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert len(blocks) >= 2
  namespace = {}
  for block in blocks:
    exec(compile(block, str(README), "exec"), namespace)  # pylint: disable=exec-used
  params = namespace["params"]
  # The quickstart's problem: y* = x, and min_x |x - 1|^2 + 0.1 |x|^2 -> 1/1.1.
  # PBGD-Free is biased here (f is not flat in y); it stays finite and moves.
  assert np.all(np.isfinite(np.asarray(params.x)))
  swept = namespace["sweep"](np.logspace(0, 3, 4), np.full(4, 0.1))
  # ALT-PBGD approaches the bilevel solution 1 / 1.1 as gamma grows.
  err = np.abs(np.asarray(swept.x) - 1 / 1.1).max(axis=1)
  assert err[-1] < 2e-3 and err[0] > err[-1]
