"""Coupled-constraint lower levels: primal-dual solver and multiplier-aware gradients.

See ``jaxbilevel._src.constrained``; the methods are
:func:`jaxbilevel.pbgd_blocc` and :func:`jaxbilevel.pbgd_free_cc`.
"""

from jaxbilevel._src.constrained import check_constraint
from jaxbilevel._src.constrained import coupled_value_gap_penalty
from jaxbilevel._src.constrained import primal_dual_solve
from jaxbilevel._src.constrained import PrimalDualTrace
from jaxbilevel._src.constrained import value_function_grad

__all__ = ("PrimalDualTrace", "check_constraint", "coupled_value_gap_penalty",
           "primal_dual_solve", "value_function_grad")
