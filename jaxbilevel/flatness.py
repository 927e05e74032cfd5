"""Flatness diagnostics for PBGD-Free (see :doc:`/methods` and :doc:`/choosing`)."""

from jaxbilevel._src.flatness import flatness_report
from jaxbilevel._src.flatness import FlatnessReport
from jaxbilevel._src.flatness import record_trackers
from jaxbilevel._src.flatness import trajectory_from_history
from jaxbilevel._src.objectives import flatness_residual

__all__ = ("FlatnessReport", "flatness_report", "flatness_residual",
           "record_trackers", "trajectory_from_history")
