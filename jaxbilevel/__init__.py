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

__version__ = "0.1.0"

__all__ = (
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
)
