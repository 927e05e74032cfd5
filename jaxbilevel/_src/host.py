"""The host side of a run: the progress bar and the history's chunks."""

from __future__ import annotations

import sys
import time

import jax
import numpy as np



class Progress:
  """A progress bar: tqdm's (notebook-aware through ``tqdm.auto``) or text on stderr."""

  def __init__(self, total, enabled):
    self.total = total
    self.enabled = enabled
    self.start = time.perf_counter()
    self.done = 0
    self.bar = None
    if enabled:
      try:
        from tqdm import auto as tqdm_auto  # pylint: disable=import-outside-toplevel
      except ImportError:
        tqdm_auto = None
      if tqdm_auto is not None:
        self.bar = tqdm_auto.tqdm(total=total, leave=True, smoothing=0)

  def update(self, done, diag_row):
    if not self.enabled:
      return
    shown = {k: f"{float(diag_row[k]):.4g}"
             for k in ("f", "g", "upper_grad_norm") if k in diag_row}
    if self.bar is not None:
      self.bar.update(done - self.done)
      self.bar.set_postfix(shown, refresh=True)
      self.done = done
      return
    width = 30
    frac = done / self.total
    bar = "#" * int(width * frac) + "." * (width - int(width * frac))
    rate = done / max(time.perf_counter() - self.start, 1e-9)
    text = " ".join(f"{k}={v}" for k, v in shown.items())
    sys.stderr.write(f"\r[{bar}] {done}/{self.total} {rate:.0f} it/s {text}")
    sys.stderr.flush()

  def close(self):
    if self.bar is not None:
      self.bar.close()
    elif self.enabled:
      sys.stderr.write("\n")
      sys.stderr.flush()


def interactive() -> bool:
  """Whether a progress bar will be seen: a terminal or a Jupyter kernel."""
  return sys.stderr.isatty() or "ipykernel" in sys.modules


def slice_batches(batches, start, length):
  if batches is None or callable(batches):
    return batches
  return jax.tree.map(lambda b: b[start:start + length], batches)


def concat_history(parts):
  if len(parts) == 1:
    return parts[0]
  return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *parts)


def truncate_history(history, n, record_every):
  """The first ``n`` steps of ``history`` (and the records they completed)."""
  out = {k: v[:n] for k, v in history.items() if k != "record"}
  if "record" in history:
    out["record"] = jax.tree.map(lambda v: v[:n // record_every],
                                 history["record"])
  return out
