"""Pure builders of penalized bilevel objectives (see ``jaxbilevel._src.objectives``)."""

from jaxbilevel._src.objectives import accumulate
from jaxbilevel._src.objectives import flatness_residual
from jaxbilevel._src.objectives import grad_norm_penalty
from jaxbilevel._src.objectives import lower_penalized
from jaxbilevel._src.objectives import value_gap_penalty

__all__ = ("accumulate", "flatness_residual", "grad_norm_penalty",
           "lower_penalized", "value_gap_penalty")
