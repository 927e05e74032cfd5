"""Saving, restoring and resuming bilevel runs with orbax-checkpoint."""

from jaxbilevel._src.checkpoint import CheckpointError
from jaxbilevel._src.checkpoint import latest_step
from jaxbilevel._src.checkpoint import restore
from jaxbilevel._src.resumable import resumable_run
from jaxbilevel._src.checkpoint import RunCheckpoint
from jaxbilevel._src.checkpoint import save

__all__ = ("CheckpointError", "RunCheckpoint", "latest_step", "restore",
           "resumable_run", "save")
