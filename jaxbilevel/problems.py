"""Closed-form bilevel test problems with golden values.

Each problem, its closed-form answers and the numbers the tests assert are
described in :doc:`/problems` (labels A1 to A10 there).
"""

from jaxbilevel._src.problems import BilevelProblem
from jaxbilevel._src.problems import blocc_toy
from jaxbilevel._src.problems import coreset
from jaxbilevel._src.problems import dpo_sft_toy
from jaxbilevel._src.problems import maml_counterexample
from jaxbilevel._src.problems import multiplier_identity
from jaxbilevel._src.problems import negative_example
from jaxbilevel._src.problems import quadratic_a8
from jaxbilevel._src.problems import QuadraticBilevel
from jaxbilevel._src.problems import random_quadratic
from jaxbilevel._src.problems import ridge
from jaxbilevel._src.problems import smoothness_toy

__all__ = (
    # Containers.
    "BilevelProblem", "QuadraticBilevel",
    # Penalty methods and flatness: PBGD-Free's failure and success cases,
    # smoothness of the reduced penalty.
    "negative_example", "dpo_sft_toy", "smoothness_toy",
    # Strongly convex quadratics with exact hypergradients.
    "quadratic_a8", "random_quadratic",
    # Coupled constraints.
    "blocc_toy", "multiplier_identity",
    # Hypergradients, meta-learning and BOME.
    "ridge", "maml_counterexample", "coreset",
)
