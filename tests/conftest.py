"""Test configuration: float64 is enabled so golden values can be checked to 1e-6.

Tests that check float32 behaviour create float32 arrays explicitly; with x64
enabled this also verifies that nothing silently promotes them to float64.
"""

import jax

jax.config.update("jax_enable_x64", True)
