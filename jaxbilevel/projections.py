"""Projections onto simple sets, for the ``proj_x`` / ``proj_y`` arguments."""

from jaxbilevel._src.projections import box
from jaxbilevel._src.projections import identity
from jaxbilevel._src.projections import nonnegative

__all__ = ("box", "identity", "nonnegative")
