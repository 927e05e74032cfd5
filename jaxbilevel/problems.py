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
