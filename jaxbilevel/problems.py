"""Closed-form bilevel test problems with golden values (``PROBLEMS.md`` Part A)."""

from jaxbilevel._src.problems import BilevelProblem
from jaxbilevel._src.problems import dpo_sft_toy
from jaxbilevel._src.problems import negative_example
from jaxbilevel._src.problems import quadratic_a8
from jaxbilevel._src.problems import QuadraticBilevel
from jaxbilevel._src.problems import random_quadratic
from jaxbilevel._src.problems import smoothness_toy

__all__ = ("BilevelProblem", "QuadraticBilevel", "dpo_sft_toy",
           "negative_example", "quadratic_a8", "random_quadratic",
           "smoothness_toy")

# --- issue 4 exports ---
from jaxbilevel._src.problems import blocc_toy  # pylint: disable=g-import-not-at-top,g-bad-import-order
from jaxbilevel._src.problems import multiplier_identity  # pylint: disable=g-import-not-at-top,g-bad-import-order

__all__ = __all__ + ("blocc_toy", "multiplier_identity")

# --- issue 3 exports ---
from jaxbilevel._src.problems import coreset  # pylint: disable=g-import-not-at-top
from jaxbilevel._src.problems import maml_counterexample  # pylint: disable=g-import-not-at-top
from jaxbilevel._src.problems import ridge  # pylint: disable=g-import-not-at-top

__all__ = __all__ + ("coreset", "maml_counterexample", "ridge")
