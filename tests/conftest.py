"""Test configuration: float64 is enabled so golden values can be checked to 1e-6.

Tests that check float32 behaviour create float32 arrays explicitly; with x64
enabled this also verifies that nothing silently promotes them to float64.

Shared fixtures live here; shared functions in ``_helpers.py``.
"""

import jax
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture(scope="module")
def quad():
  """A random strongly convex quadratic (test_pbgd_free.py, test_alt_pbgd.py,
  test_v_pbgd.py); module scope, so each file builds it once."""
  from jaxbilevel import problems  # pylint: disable=import-outside-toplevel
  return problems.random_quadratic(seed=3, dim_x=3, dim_y=4)
