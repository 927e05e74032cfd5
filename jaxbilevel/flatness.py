"""Flatness diagnostics for PBGD-Free (``ALGORITHMS.md`` §1.3-1.4)."""

from jaxbilevel._src.flatness import flatness_report
from jaxbilevel._src.flatness import FlatnessReport
from jaxbilevel._src.flatness import record_trackers
from jaxbilevel._src.flatness import trajectory_from_history
from jaxbilevel._src.objectives import flatness_residual

__all__ = ("FlatnessReport", "flatness_report", "flatness_residual",
           "record_trackers", "trajectory_from_history")
