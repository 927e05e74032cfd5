"""jaxbilevel: bilevel optimization in JAX, as optax gradient transformations.

Upper objective ``f(x, y, batch)``, lower objective ``g(x, y, batch)``;
``min_x f(x, y*(x))`` with ``y*(x) in argmin_y g(x, y)``. Each method is a
function returning an :class:`optax.GradientTransformationExtraArgs` over
:class:`BilevelParams`.

``import jaxbilevel`` loads jax, optax and numpy only. The modules that need
optional dependencies load on first use: ``jaxbilevel.checkpoint``
(orbax-checkpoint, extra ``checkpoint``), ``jaxbilevel.flax_utils`` and
``jaxbilevel.lora`` (flax, extra ``flax``), ``jaxbilevel.applications``,
``jaxbilevel.datasets``, ``jaxbilevel.svm`` and ``jaxbilevel.demo`` (the
application and benchmark material; extras ``flax`` and ``examples``).
"""

# pylint: disable=g-importing-member
# pylint: disable=g-bad-import-order

import importlib as _importlib

# Public sub-modules without optional dependencies.
from jaxbilevel import adjoints
from jaxbilevel import constrained
from jaxbilevel import evaluation
from jaxbilevel import flatness
from jaxbilevel import hypergradient
from jaxbilevel import objectives
from jaxbilevel import problems
from jaxbilevel import projections

# Parameters, validation errors and shared diagnostics.
from jaxbilevel._src.base import BilevelParams
from jaxbilevel._src.base import BilevelTransformation
from jaxbilevel._src.base import BilevelValidationError
from jaxbilevel._src.base import COMMON_DIAGNOSTICS
from jaxbilevel._src.base import NonFiniteError

# One step of a method, as the drivers take it.
from jaxbilevel._src.base import step
from jaxbilevel._src.values import as_value

# Inner loops.
from jaxbilevel._src.inner import inner_solve
from jaxbilevel._src.inner import InnerTrace
from jaxbilevel._src.inner import projected_step

# Penalty-based methods.
from jaxbilevel._src.pbgd_free import pbgd_free
from jaxbilevel._src.pbgd_free import PBGDFreeState
from jaxbilevel._src.alt_pbgd import alt_pbgd
from jaxbilevel._src.alt_pbgd import ALTPBGDState
from jaxbilevel._src.v_pbgd import v_pbgd
from jaxbilevel._src.v_pbgd import VPBGDState

# Choosing the penalty constant and the method.
from jaxbilevel._src.continuation import ContinuationState
from jaxbilevel._src.continuation import GammaContinuation
from jaxbilevel._src.choosing import choose_method
from jaxbilevel._src.choosing import gamma_check
from jaxbilevel._src.choosing import MethodChoice
from jaxbilevel._src.choosing import PenaltyGapWarning
from jaxbilevel._src.choosing import warn_if_gamma_small

# Penalty-based methods for coupled lower-level constraints.
from jaxbilevel._src.pbgd_blocc import pbgd_blocc
from jaxbilevel._src.pbgd_blocc import pbgd_free_cc
from jaxbilevel._src.pbgd_blocc import PBGDBLOCCState
from jaxbilevel._src.pbgd_blocc import PBGDFreeCCState

# Value-function and first-order methods.
from jaxbilevel._src.bome import bome
from jaxbilevel._src.bome import BOMEState
from jaxbilevel._src.f2sa import f2sa
from jaxbilevel._src.f2sa import f2sa_schedules
from jaxbilevel._src.f2sa import F2SASchedules
from jaxbilevel._src.f2sa import F2SAState
from jaxbilevel._src.alright import alright
from jaxbilevel._src.alright import ALRIGHTState
from jaxbilevel._src.fo_blo import fo_blo
from jaxbilevel._src.fo_blo import FOBLOState
from jaxbilevel._src.fo_blo import ufo_blo
from jaxbilevel._src.fo_blo import UFOBLOState

# Hypergradient (implicit and unrolled) methods: one method whose adjoint says
# how the lower solve is differentiated, and its presets.
from jaxbilevel._src.hypergradient_descent import hypergradient_descent
from jaxbilevel._src.aid import aid
from jaxbilevel._src.aid import AIDState
from jaxbilevel._src.itd import itd
from jaxbilevel._src.itd import ITDState

# The table of the methods above: one entry each, read by the tests, the
# benchmarks and the documentation's tables.
from jaxbilevel._src.registry import METHODS
from jaxbilevel._src.registry import MethodInfo

# optax combinators adapted to bilevel methods.
from jaxbilevel._src.combinators import apply_if_finite
from jaxbilevel._src.combinators import inject_hyperparams

# Drivers.
from jaxbilevel._src.run import run
from jaxbilevel._src.run import scan_run

# Evaluation at the lower-level solution.
from jaxbilevel._src.evaluation import lower_level_evaluation

# Sweeps and sharding.
from jaxbilevel._src.sweep import product_grid
from jaxbilevel._src.sweep import sweep
from jaxbilevel._src.sharding import fsdp_shardings
from jaxbilevel._src.sharding import replicate
from jaxbilevel._src.sharding import shard_batch
from jaxbilevel._src.sharding import shard_fsdp

# The one place the version is written: pyproject.toml reads it from here
# ([tool.setuptools.dynamic]), and so does the documentation's conf.py.
__version__ = "0.1.0"

# Sub-modules that need optional dependencies (or hold application and
# benchmark material): imported on first attribute access, so that
# `import jaxbilevel` loads jax, optax and numpy only, while
# `jaxbilevel.flax_utils` etc. keep working. They are not in __all__, so that
# `from jaxbilevel import *` does not import them either.
_LAZY_SUBMODULES = (
    "applications",  # flax, scikit-learn (extras `flax`, `examples`)
    "checkpoint",  # orbax-checkpoint (extra `checkpoint`)
    "datasets",  # LIBSVM readers and downloader; samples in jaxbilevel/data
    "demo",  # scikit-learn (extra `examples`)
    "flax_utils",  # flax (extra `flax`)
    "lora",  # flax (extra `flax`)
    "svm",  # the SVM benchmark with the authors' settings
)


def __getattr__(name):
  if name in _LAZY_SUBMODULES:
    module = _importlib.import_module(f"{__name__}.{name}")
    globals()[name] = module
    return module
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY_SUBMODULES))


__all__ = (
    # Sub-modules.
    "adjoints",
    "constrained",
    "evaluation",
    "flatness",
    "hypergradient",
    "objectives",
    "problems",
    "projections",
    # base
    "BilevelParams",
    "BilevelTransformation",
    "BilevelValidationError",
    "COMMON_DIAGNOSTICS",
    "NonFiniteError",
    "step",
    "as_value",
    # inner
    "InnerTrace",
    "inner_solve",
    "projected_step",
    # pbgd_free
    "PBGDFreeState",
    "pbgd_free",
    # alt_pbgd
    "ALTPBGDState",
    "alt_pbgd",
    # v_pbgd
    "VPBGDState",
    "v_pbgd",
    # continuation, choosing
    "ContinuationState",
    "GammaContinuation",
    "MethodChoice",
    "PenaltyGapWarning",
    "choose_method",
    "gamma_check",
    "warn_if_gamma_small",
    # pbgd_blocc
    "PBGDBLOCCState",
    "PBGDFreeCCState",
    "pbgd_blocc",
    "pbgd_free_cc",
    # bome
    "BOMEState",
    "bome",
    # f2sa
    "F2SASchedules",
    "F2SAState",
    "f2sa",
    "f2sa_schedules",
    # alright
    "ALRIGHTState",
    "alright",
    # fo_blo
    "FOBLOState",
    "UFOBLOState",
    "fo_blo",
    "ufo_blo",
    # hypergradient_descent
    "hypergradient_descent",
    # aid
    "AIDState",
    "aid",
    # itd
    "ITDState",
    "itd",
    # registry
    "METHODS",
    "MethodInfo",
    # combinators
    "apply_if_finite",
    "inject_hyperparams",
    # run
    "run",
    "scan_run",
    # evaluation
    "lower_level_evaluation",
    # sweep
    "product_grid",
    "sweep",
    # sharding
    "fsdp_shardings",
    "replicate",
    "shard_batch",
    "shard_fsdp",
)
