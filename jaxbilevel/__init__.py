"""jaxbilevel: bilevel optimization in JAX, as optax gradient transformations.

Upper objective ``f(x, y, batch)``, lower objective ``g(x, y, batch)``;
``min_x f(x, y*(x))`` with ``y*(x) in argmin_y g(x, y)``. Each method is a
function returning an ``optax.GradientTransformationExtraArgs`` over
:class:`BilevelParams`.
"""

from jaxbilevel import objectives
from jaxbilevel import problems
from jaxbilevel import projections
from jaxbilevel._src.alt_pbgd import alt_pbgd
from jaxbilevel._src.alt_pbgd import ALTPBGDState
from jaxbilevel._src.base import BilevelParams
from jaxbilevel._src.base import BilevelValidationError
from jaxbilevel._src.base import COMMON_DIAGNOSTICS
from jaxbilevel._src.base import NonFiniteError
from jaxbilevel._src.inner import inner_solve
from jaxbilevel._src.inner import InnerTrace
from jaxbilevel._src.inner import projected_step
from jaxbilevel._src.pbgd_free import pbgd_free
from jaxbilevel._src.pbgd_free import PBGDFreeState
from jaxbilevel._src.run import run
from jaxbilevel._src.run import scan_run
from jaxbilevel._src.v_pbgd import v_pbgd
from jaxbilevel._src.v_pbgd import VPBGDState
# --- issue 6 exports ---
# jaxbilevel.checkpoint (orbax-checkpoint, an optional dependency) is not
# imported here: use `from jaxbilevel import checkpoint`.
from jaxbilevel import flax_utils
from jaxbilevel._src.sharding import replicate
from jaxbilevel._src.sharding import shard_batch
from jaxbilevel._src.sweep import product_grid
from jaxbilevel._src.sweep import sweep

# --- issue 4 exports ---
from jaxbilevel import constrained
from jaxbilevel import datasets
from jaxbilevel import flatness
from jaxbilevel import svm
from jaxbilevel._src.pbgd_blocc import pbgd_blocc
from jaxbilevel._src.pbgd_blocc import pbgd_free_cc
from jaxbilevel._src.pbgd_blocc import PBGDBLOCCState
from jaxbilevel._src.pbgd_blocc import PBGDFreeCCState

# --- issue 3 exports ---
from jaxbilevel import hypergradient
from jaxbilevel._src.aid import aid
from jaxbilevel._src.aid import AIDState
from jaxbilevel._src.alright import alright
from jaxbilevel._src.alright import ALRIGHTState
from jaxbilevel._src.bome import bome
from jaxbilevel._src.bome import BOMEState
from jaxbilevel._src.f2sa import f2sa
from jaxbilevel._src.f2sa import f2sa_schedules
from jaxbilevel._src.f2sa import F2SASchedules
from jaxbilevel._src.f2sa import F2SAState
from jaxbilevel._src.fo_blo import fo_blo
from jaxbilevel._src.fo_blo import FOBLOState
from jaxbilevel._src.fo_blo import ufo_blo
from jaxbilevel._src.fo_blo import UFOBLOState
from jaxbilevel._src.itd import itd
from jaxbilevel._src.itd import ITDState

# --- issue 5 exports ---
from jaxbilevel import applications
from jaxbilevel import lora

__version__ = "0.1.0"

__all__ = (
    # --- issue 4 exports ---
    "PBGDBLOCCState",
    "PBGDFreeCCState",
    "constrained",
    "datasets",
    "flatness",
    "pbgd_blocc",
    "pbgd_free_cc",
    "svm",
    "ALTPBGDState",
    "BilevelParams",
    "BilevelValidationError",
    "COMMON_DIAGNOSTICS",
    "InnerTrace",
    "NonFiniteError",
    "PBGDFreeState",
    "VPBGDState",
    "alt_pbgd",
    "inner_solve",
    "objectives",
    "pbgd_free",
    "problems",
    "projected_step",
    "projections",
    "run",
    "scan_run",
    "v_pbgd",
    # --- issue 3 exports ---
    "AIDState",
    "ALRIGHTState",
    "BOMEState",
    "F2SASchedules",
    "F2SAState",
    "FOBLOState",
    "ITDState",
    "UFOBLOState",
    "aid",
    "alright",
    "bome",
    "f2sa",
    "f2sa_schedules",
    "fo_blo",
    "hypergradient",
    "itd",
    "ufo_blo",
    # --- issue 5 exports ---
    "applications",
    "lora",
    # --- issue 6 exports ---
    "flax_utils",
    "product_grid",
    "replicate",
    "shard_batch",
    "sweep",
)
