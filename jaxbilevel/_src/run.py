"""Driving a bilevel transformation: a pure ``scan_run`` and the host-side ``run``."""

from __future__ import annotations

import math
import sys
import time
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbilevel._src import base
from jaxbilevel._src import tree as tree_lib

_NONFINITE_MODES = ("stop", "skip", "raise", "ignore")


def find_diagnostics(state) -> dict:
  """Returns the ``diagnostics`` dict of a method's state (searching nested states)."""
  if hasattr(state, "diagnostics") and isinstance(state.diagnostics, dict):
    return state.diagnostics
  if isinstance(state, (tuple, list)):
    for sub in state:
      found = _maybe_find(sub)
      if found is not None:
        return found
  raise base.BilevelValidationError(
      "this state has no `diagnostics`: jaxbilevel.run drives the bilevel "
      "methods of jaxbilevel (pbgd_free, alt_pbgd, v_pbgd, ...), whose states "
      f"record them; got a state of type {type(state).__name__}.")


def _maybe_find(state):
  try:
    return find_diagnostics(state)
  except base.BilevelValidationError:
    return None


def _check_batches(batch, batches, num_steps):
  if batch is not None and batches is not None:
    raise base.BilevelValidationError(
        "pass either batch= (the same batch every step) or batches= (one per "
        "step), not both.")
  if batches is None or callable(batches):
    return
  leaves = jax.tree.leaves(batches)
  if not leaves:
    raise base.BilevelValidationError("batches= has no array leaves.")
  for leaf in leaves:
    if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] < num_steps:
      raise base.BilevelValidationError(
          "batches= must be a pytree whose leaves have a leading axis of "
          f"length >= num_steps={num_steps} (one batch per step), or a "
          f"callable step -> batch; got a leaf of shape {jnp.shape(leaf)}.")


def _guarded_step(tx, params, state, batch, on_nonfinite, stopped):
  """One update; non-finite steps are frozen ('stop') or skipped ('skip')."""
  updates, new_state = tx.update(None, state, params, batch=batch)
  new_params = optax.apply_updates(params, updates)
  diag = find_diagnostics(new_state)
  diag_finite = tree_lib.tree_all_finite(diag)
  updates_finite = tree_lib.tree_all_finite(updates)
  finite = jnp.logical_and(diag_finite, updates_finite)
  if on_nonfinite == "ignore":
    return new_params, new_state, finite, updates_finite, stopped, diag
  accept = finite if on_nonfinite == "skip" else jnp.logical_and(
      finite, jnp.logical_not(stopped))
  params = tree_lib.tree_select(accept, new_params, params)
  state = tree_lib.tree_select(accept, new_state, state)
  if on_nonfinite != "skip":
    stopped = jnp.logical_or(stopped, jnp.logical_not(finite))
  # The diagnostics of the step are reported as computed, even when rejected.
  return params, state, finite, updates_finite, stopped, diag


def _scan_chunk(tx, params, state, batch, batches, start, *, length,
                on_nonfinite, record, stopped):
  """``length`` steps of ``tx`` inside one ``lax.scan``."""

  def body(carry, inputs):
    params, state, stopped = carry
    step, batch_t = inputs
    if callable(batches):
      batch_t = batches(step)
    elif batches is None:
      batch_t = batch
    params, state, finite, updates_finite, stopped, diag = _guarded_step(
        tx, params, state, batch_t, on_nonfinite, stopped)
    row = dict(diag)
    row["step"] = step
    row["finite"] = finite
    row["updates_finite"] = updates_finite
    if record is not None:
      row["record"] = record(params, state)
    return (params, state, stopped), row

  steps = start + jnp.arange(length, dtype=jnp.int32)
  xs = (steps, batches if (batches is not None and not callable(batches))
        else None)
  (params, state, stopped), history = jax.lax.scan(
      body, (params, state, stopped), xs, length=length)
  return params, state, stopped, history


def _scan_chunk_static(tx, params, state, batch, batches, start, *,
                       batches_fn, length, on_nonfinite, record, stopped):
  # A callable ``batches`` is a static argument; an array one is traced.
  return _scan_chunk(tx, params, state, batch,
                     batches_fn if batches_fn is not None else batches, start,
                     length=length, on_nonfinite=on_nonfinite, record=record,
                     stopped=stopped)


# Module-level jit: chunks of the same (tx, length, mode) compile once.
_scan_chunk_jit = jax.jit(
    _scan_chunk_static,
    static_argnames=("tx", "batches_fn", "length", "on_nonfinite", "record"))


def _jit_chunk(tx, params, state, batch, batches, start, length, on_nonfinite,
               record, stopped):
  fn = batches if callable(batches) else None
  return _scan_chunk_jit(tx, params, state, batch, None if fn else batches,
                         start, batches_fn=fn, length=length,
                         on_nonfinite=on_nonfinite, record=record,
                         stopped=stopped)


def scan_run(tx: optax.GradientTransformationExtraArgs,
             params: base.BilevelParams,
             *,
             num_steps: int,
             state: Optional[Any] = None,
             batch: Any = None,
             batches: Any = None,
             record: Optional[Callable] = None,
             on_nonfinite: str = "stop"):
  """Runs ``num_steps`` outer iterations as one ``lax.scan`` (pure, traceable).

  Unlike :func:`run`, this function has no host-side logic, so it can be
  called inside ``jax.jit`` and ``jax.vmap``: build the transformation inside
  the traced function to sweep hyperparameters without recompiling (see the
  example).

  Args:
    tx: a bilevel transformation (e.g. :func:`pbgd_free`).
    params: initial :class:`BilevelParams`.
    num_steps: number of outer iterations (static int).
    state: initial state (``tx.init(params)`` if None).
    batch: a batch used at every step (full-batch problems).
    batches: one batch per step, either a pytree with a leading axis of
      length ``num_steps`` or a pure callable ``step -> batch`` (e.g. sampling
      with ``jax.random.fold_in(key, step)``).
    record: optional ``(params, state) -> pytree`` recorded after every step.
    on_nonfinite: ``"stop"`` freezes the iterate at the first non-finite
      step, ``"skip"`` rejects non-finite steps and continues, ``"ignore"``
      applies every step as computed.

  Returns:
    ``(params, state, history)``; ``history`` is a dict of arrays with a
    leading axis of length ``num_steps``: the method's diagnostics, ``step``,
    ``finite`` (whether the step was finite), ``updates_finite`` and, if
    given, ``record``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> f = lambda x, y, batch: jnp.sum((y - 1.0) ** 2) + jnp.sum(x ** 2)
    >>> g = lambda x, y, batch: jnp.sum((y - x) ** 2)
    >>> @jax.jit
    ... @jax.vmap
    ... def sweep(gamma, lr):
    ...   tx = jbl.alt_pbgd(f, g, gamma=gamma, upper_optimizer=optax.sgd(lr),
    ...                     lower_optimizer=optax.sgd(0.2), inner_steps=5)
    ...   p0 = jbl.BilevelParams(x=jnp.zeros(2), y=jnp.zeros(2))
    ...   params, _, _ = jbl.scan_run(tx, p0, num_steps=300)
    ...   return params.x
    >>> xs = sweep(jnp.array([10.0, 100.0]), jnp.array([0.1, 0.2]))
    >>> xs.shape
    (2, 2)
  """
  num_steps = base.check_static_int(num_steps, "num_steps")
  if on_nonfinite not in ("stop", "skip", "ignore"):
    raise base.BilevelValidationError(
        f"scan_run: on_nonfinite must be 'stop', 'skip' or 'ignore', got "
        f"{on_nonfinite!r}.")
  _check_batches(batch, batches, num_steps)
  if state is None:
    state = tx.init(params)
  if batches is not None and not callable(batches):
    batches = jax.tree.map(lambda b: b[:num_steps], batches)
  params, state, _, history = _scan_chunk(
      tx, params, state, batch, batches, jnp.asarray(0, jnp.int32),
      length=num_steps, on_nonfinite=on_nonfinite, record=record,
      stopped=jnp.asarray(False))
  return params, state, history


class _Progress:
  """A minimal text progress bar on stderr."""

  def __init__(self, total, enabled):
    self.total = total
    self.enabled = enabled
    self.start = time.perf_counter()

  def update(self, done, diag_row):
    if not self.enabled:
      return
    width = 30
    frac = done / self.total
    bar = "#" * int(width * frac) + "." * (width - int(width * frac))
    rate = done / max(time.perf_counter() - self.start, 1e-9)
    shown = " ".join(f"{k}={float(diag_row[k]):.4g}"
                     for k in ("f", "g", "upper_grad_norm") if k in diag_row)
    sys.stderr.write(f"\r[{bar}] {done}/{self.total} {rate:.0f} it/s {shown}")
    sys.stderr.flush()

  def close(self):
    if self.enabled:
      sys.stderr.write("\n")
      sys.stderr.flush()


def _strongly_typed(tree):
  """Drops weak types (e.g. ``jnp.asarray(1.0)``) so calls share compilations."""
  return jax.tree.map(lambda v: jnp.asarray(v, dtype=jnp.result_type(v)), tree)


def _slice_batches(batches, start, length):
  if batches is None or callable(batches):
    return batches
  return jax.tree.map(lambda b: b[start:start + length], batches)


def _concat_history(parts):
  return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *parts)


def _truncate_history(history, n):
  return jax.tree.map(lambda v: v[:n], history)


def _nonfinite_report(history, index):
  names = sorted(k for k, v in history.items()
                 if k not in ("step", "finite", "updates_finite", "record")
                 and not np.isfinite(v[index]))
  if not bool(history["updates_finite"][index]):
    names.append("parameter updates")
  step = int(history["step"][index])
  what = ", ".join(names) if names else "values"
  gamma = history.get("gamma")
  hint = ""
  if gamma is not None and not np.isfinite(gamma[index]):
    hint = (" (gamma is NaN: a traced or scheduled gamma was <= 0, or "
            "negative where a positive value is required)")
  return step, what, hint


def run(tx: optax.GradientTransformationExtraArgs,
        params: base.BilevelParams,
        *,
        num_steps: int,
        state: Optional[Any] = None,
        batch: Any = None,
        batches: Any = None,
        record: Optional[Callable] = None,
        chunk_size: Optional[int] = None,
        progress: Optional[bool] = None,
        on_nonfinite: str = "stop"):
  """Runs a bilevel transformation for ``num_steps`` outer iterations.

  The steps run as jitted ``lax.scan`` chunks of ``chunk_size`` steps (so a
  long run compiles at most twice: the chunk and the remainder); between
  chunks the host updates a progress bar and checks the diagnostics. When a
  step produces a NaN or infinite value the run stops, returns the last
  finite iterate and says at which step and in which quantity the problem
  appeared.

  Args:
    tx: a bilevel transformation (e.g. :func:`pbgd_free`).
    params: initial :class:`BilevelParams`.
    num_steps: number of outer iterations.
    state: state to resume from (``tx.init(params)`` if None).
    batch: a batch used at every step (full-batch problems).
    batches: one batch per step: a pytree with a leading axis of length
      ``>= num_steps`` (sliced per chunk) or a pure callable ``step -> batch``.
      Steps are counted from 0 in each call.
    record: optional ``(params, state) -> pytree`` recorded after each step.
    chunk_size: steps per compiled chunk (default ``min(num_steps, 1000)``).
    progress: show a progress bar; default: only when stderr is a terminal
      and the run has more than one chunk.
    on_nonfinite: ``"stop"`` (default: warn and return the last finite
      iterate), ``"raise"`` (raise :class:`NonFiniteError`), ``"skip"``
      (reject non-finite steps, keep going, and warn with their count) or
      ``"ignore"``.

  Returns:
    ``(params, state, history)`` where ``history`` is a dict of NumPy arrays
    with one row per executed step: the method's diagnostics (``f``, ``g``,
    ``upper_grad_norm``, ...), ``step``, ``finite``, ``updates_finite`` and
    ``record`` if given. After a stop, the history ends with the failing step.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> f = lambda x, y, batch: x ** 2 + 10.0 * y
    >>> g = lambda x, y, batch: (y - x + 1.0) ** 2
    >>> tx = jbl.pbgd_free(f, g, gamma=15.0, upper_optimizer=optax.sgd(0.01),
    ...                    lower_optimizer=optax.sgd(0.01))
    >>> p0 = jbl.BilevelParams(x=jnp.array(2.0), y=jnp.array(3.0))
    >>> params, state, history = jbl.run(tx, p0, num_steps=3000)
    >>> history["f"].shape
    (3000,)
  """
  num_steps = base.check_static_int(num_steps, "num_steps")
  if on_nonfinite not in _NONFINITE_MODES:
    raise base.BilevelValidationError(
        f"run: on_nonfinite must be one of {_NONFINITE_MODES}, got "
        f"{on_nonfinite!r}.")
  _check_batches(batch, batches, num_steps)
  chunk_size = base.check_static_int(
      min(num_steps, 1000) if chunk_size is None else chunk_size,
      "chunk_size")
  chunk_size = min(chunk_size, num_steps)
  params = _strongly_typed(params)
  if state is None:
    state = tx.init(params)
  find_diagnostics(state)  # fails clearly for a non-bilevel transformation
  num_chunks = math.ceil(num_steps / chunk_size)
  if progress is None:
    progress = num_chunks > 1 and sys.stderr.isatty()
  bar = _Progress(num_steps, progress)
  scan_mode = "stop" if on_nonfinite == "raise" else on_nonfinite

  parts = []
  stopped = jnp.asarray(False)
  done = 0
  failure = None
  while done < num_steps:
    length = min(chunk_size, num_steps - done)
    params, state, stopped, hist = _jit_chunk(
        tx, params, state, batch, _slice_batches(batches, done, length),
        jnp.asarray(done, jnp.int32), length, scan_mode, record, stopped)
    hist = jax.tree.map(np.asarray, hist)
    parts.append(hist)
    done += length
    bar.update(done, {k: v[-1] for k, v in hist.items()
                      if k not in ("record",)})
    if scan_mode == "stop" and bool(stopped):
      bad = int(np.argmin(hist["finite"]))
      parts[-1] = _truncate_history(hist, bad + 1)
      failure = parts[-1]
      break
  bar.close()
  history = _concat_history(parts)

  if failure is not None:
    index = len(history["step"]) - 1
    step, what, hint = _nonfinite_report(history, index)
    message = (
        f"jaxbilevel.run: non-finite {what} at step {step}{hint}. The run "
        f"stopped; the returned params and state are those after step "
        f"{step - 1} (the last finite iterate), and the history ends with the "
        "failing step.")
    if on_nonfinite == "raise":
      raise base.NonFiniteError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)
  elif on_nonfinite == "skip":
    skipped = int(np.sum(~history["finite"]))
    if skipped:
      first = int(history["step"][np.argmin(history["finite"])])
      warnings.warn(
          f"jaxbilevel.run: skipped {skipped} non-finite step(s), the first "
          f"at step {first}.", RuntimeWarning, stacklevel=2)
  return params, state, history
