"""The compiled loop of the drivers: one step with its checks, and a chunk of steps.

A chunk is a ``lax.scan`` of :func:`_step` in one of four modes: ``"fast"``
(unguarded, checked once after the chunk), ``"stop"`` and ``"skip"`` (a
guard at every step) and ``"ignore"``; :mod:`nonfinite` decides which runs
when. The rows it records (diagnostics, ``record``) form the history.

What an unguarded step costs
----------------------------

The loop of an unguarded chunk does what the same algorithm written by hand
does, and nothing else:

* A bilevel method's ``update`` returns ``new - old`` (optax's contract);
  the drivers call its ``step`` instead (:func:`jaxbilevel.step`), which
  returns the new parameters directly, so that they are not added back
  (two elementwise passes over every variable). A transformation that
  changes the updates (an optax chain, :func:`jaxbilevel.apply_if_finite`)
  has no ``step`` and is applied with ``optax.apply_updates`` as usual. A
  hand-written loop that calls :func:`jaxbilevel.step` does the same.
* Diagnostics not recorded are not computed (the method is called with
  ``diagnostics=`` the names recorded) and not carried. Recorded ones
  are written once per step. After the loop, one reduction per recorded row
  and (for models of up to :data:`MAX_LEAVES_CHECKED_IN_PROGRAM` leaves) per
  leaf of the params and state gives the chunk's one finiteness flag
  (:func:`unchecked_finite`); the host fills in the step numbers and the
  per-step flags as read-only views and sets the final state's diagnostics
  to NumPy views of the last rows (:func:`unchecked_rows`,
  :func:`with_last_diagnostics`).
* Nothing is checked per step (see above).
* A run of one chunk (the default without a progress bar) starts the state
  inside its program (``tx.init`` fused into the loop's set-up).

Around the loop a call of :func:`run` costs a fixed amount (arguments
checked, the program looked up, one flag read back, the history wrapped):
``benchmarks/results/overhead.md`` reports it.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jaxbilevel._src import base
from jaxbilevel._src import tree as tree_lib


def find_diagnostics(state) -> dict:
  """Returns the ``diagnostics`` dict of a method's state (searching nested states)."""
  found = maybe_find_diagnostics(state)
  if found is None:
    raise base.BilevelValidationError(
        "this state has no `diagnostics`: jaxbilevel.run drives the bilevel "
        "methods of jaxbilevel (pbgd_free, alt_pbgd, v_pbgd, ...), whose states "
        f"record them; got a state of type {type(state).__name__}.")
  return found


def maybe_find_diagnostics(state):
  """The ``diagnostics`` dict of a method's state (nested states searched), or None."""
  if hasattr(state, "diagnostics") and isinstance(state.diagnostics, dict):
    return state.diagnostics
  if isinstance(state, (tuple, list)):
    for sub in state:
      found = maybe_find_diagnostics(sub)
      if found is not None:
        return found
  return None


def with_diagnostics(state, diag):
  """``state`` with its (possibly nested) ``diagnostics`` replaced by ``diag``."""
  if hasattr(state, "diagnostics") and isinstance(state.diagnostics, dict):
    return state._replace(diagnostics=diag)
  if isinstance(state, (tuple, list)):
    replaced, done = [], False
    for sub in state:
      if not done and maybe_find_diagnostics(sub) is not None:
        sub, done = with_diagnostics(sub, diag), True
      replaced.append(sub)
    return type(state)(*replaced) if hasattr(state, "_fields") else type(
        state)(replaced)
  return state


def _step(tx, params, state, batch, mode, stopped, diagnostics,
          keep_diagnostics=False):
  """One step of ``tx`` with the checks of ``mode`` (see this module and :mod:`nonfinite`).

  With ``keep_diagnostics`` the returned state keeps the incoming
  diagnostics: the caller records the new ones and puts the last of them in
  the final state (so the loop does not carry them).
  """
  # The method computes only the diagnostics asked for (the others are NaN
  # in its state) and returns its new iterates directly (base.step).
  new_params, new_state = base.step(tx, params, state, batch=batch,
                                    diagnostics=diagnostics)
  diag = find_diagnostics(new_state)
  if diagnostics is not True:
    diag = {k: diag[k] for k in diagnostics or ()}
  if keep_diagnostics:
    new_state = with_diagnostics(new_state, find_diagnostics(state))
  if mode == "fast":
    # Unchecked: the caller derives "finite" from the recorded diagnostics.
    true = jnp.asarray(True)
    return new_params, new_state, stopped, diag, true, true, true
  diag_finite = tree_lib.tree_all_finite(diag)
  # Finite new params from finite ones: the updates were finite.
  updates_finite = tree_lib.tree_all_finite(new_params)
  # The optimizer state without the diagnostics (reported by name above).
  state_finite = tree_lib.tree_all_finite(with_diagnostics(new_state, {}))
  finite = diag_finite & updates_finite & state_finite
  if mode == "ignore":
    return (new_params, new_state, stopped, diag, finite, updates_finite,
            state_finite)
  accept = finite if mode == "skip" else finite & ~stopped
  params, state = tree_lib.tree_select(accept, (new_params, new_state),
                                       (params, state))
  if mode == "stop":
    stopped = stopped | ~finite
  # The diagnostics of a rejected step are reported as computed.
  return params, state, stopped, diag, finite, updates_finite, state_finite


def scan_chunk(tx, params, state, batch, batches, start, stopped, *, length,
                mode, record, record_every, diagnostics):
  """``length`` steps of ``tx`` in ``lax.scan``; returns the history too."""

  # Where every step is accepted, the loop does not carry the diagnostics
  # in the state: the final state gets the last recorded row (from the host
  # after an unchecked chunk, see with_last_diagnostics; here otherwise),
  # and an unchecked chunk checks the rows after the loop. (With a record
  # function, which may read the state, the state stays current.)
  keep_diagnostics = mode in ("fast", "ignore") and record is None
  find_diagnostics(state)  # fails clearly for a non-bilevel transformation
  # Likewise a jaxbilevel method's step counter, which its update raises by
  # one: with every step accepted it is the incoming count plus the step's
  # index, so the loop does not carry it. A method that reads it (a
  # schedule) gets that sum; one that does not is spared a scalar kernel per
  # step (4% of a 10-microsecond step), and the count is set after the loop.
  count0 = (state.count if keep_diagnostics and _counts_steps(tx, state)
            else None)

  def body(carry, inputs):
    params, state, stopped = carry
    step, batch_t = inputs
    if callable(batches):
      batch_t = batches(step)
    elif batches is None:
      batch_t = batch
    if batches is not None and batch is not None:
      batch_t = {**batch, **batch_t}
    if count0 is not None:
      state = state._replace(count=_add_steps(count0, step - start))
    params, state, stopped, diag, finite, updates_finite, state_finite = _step(
        tx, params, state, batch_t, mode, stopped, diagnostics,
        keep_diagnostics)
    if count0 is not None:
      state = state._replace(count=count0)
    if mode == "fast":
      # Unchecked steps: the step numbers, the finiteness flags and the
      # (true) update and state flags are filled in after the loop, so that
      # the loop writes no per-step rows it does not need.
      row = dict(diag)
    else:
      row = dict(diag, finite=finite, updates_finite=updates_finite,
                 state_finite=state_finite)
    return (params, state, stopped), row

  steps = start + jnp.arange(length, dtype=jnp.int32)
  xs = (steps, batches if (batches is not None and not callable(batches))
        else None)
  carry = (params, state, stopped)
  if record is None:
    carry, history = jax.lax.scan(body, carry, xs, length=length)
  else:
    # Steps in blocks of record_every; record after each block, so record
    # is traced once and evaluated length / record_every times.
    blocks = length // record_every
    xs = jax.tree.map(
        lambda v: v.reshape((blocks, record_every) + v.shape[1:]), xs)

    def block(carry, xs_block):
      carry, rows = jax.lax.scan(body, carry, xs_block, length=record_every)
      return carry, (rows, _record_row(record, carry[0], carry[1]))

    carry, (history, recorded) = jax.lax.scan(block, carry, xs, length=blocks)
    history = jax.tree.map(lambda v: v.reshape((length,) + v.shape[2:]),
                           history)
    history["record"] = recorded
  params, state, stopped = carry
  if count0 is not None:
    state = state._replace(count=_add_steps(count0, length))
  if mode != "fast":
    # (An unchecked chunk's caller checks it as a whole: unchecked_finite.)
    history["step"] = steps
  if keep_diagnostics and mode != "fast":
    state = with_last_diagnostics(state, history)
  return params, state, stopped, history


def _record_row(record, params, state):
  """``record(params, state)``, checked at trace time to be a pytree of arrays."""
  out = record(params, state)
  for path, leaf in jax.tree_util.tree_leaves_with_path(out):
    if isinstance(leaf, (str, bytes)) or not (
        isinstance(leaf, (numbers.Number, np.ndarray, np.generic, jax.Array))
        or (hasattr(leaf, "shape") and hasattr(leaf, "dtype"))):
      raise base.BilevelValidationError(
          f"record must return a pytree of arrays or numbers (recorded after "
          f"every record_every-th step), but record(params, state)"
          f"{jax.tree_util.keystr(path)} is {leaf!r:.80} of type "
          f"{type(leaf).__name__}. Return arrays only (e.g. jnp.asarray("
          "value)); keep labels such as strings outside the record.")
  return out


def _counts_steps(tx, state) -> bool:
  """Whether ``tx`` is a bilevel method whose ``state.count`` counts its steps."""
  return (isinstance(tx, base.BilevelTransformation)
          and "count" in getattr(state, "_fields", ())
          and jnp.shape(state.count) == ()
          and jnp.result_type(state.count) == jnp.int32)


def _add_steps(count, n):
  """``count`` raised ``n`` times by ``optax.safe_increment`` (saturating)."""
  top = jnp.iinfo(jnp.int32).max
  return jnp.where(count <= top - n, count + n, top).astype(jnp.int32)


def unchecked_finite(history, params, state) -> jax.Array:
  """The one flag of an unchecked (``"fast"``) chunk: whether all is finite.

  It covers every recorded diagnostic and, for models of up to
  :data:`MAX_LEAVES_CHECKED_IN_PROGRAM` leaves, the final params and state
  (the host checks larger ones: ``all_finite``).
  Where it is true the host fills in the step numbers and the (true)
  finiteness flags (:func:`unchecked_rows`); where it is false the chunk is
  replayed with the per-step checks.
  """
  rows = {k: v for k, v in history.items() if k in find_diagnostics(state)}
  # (The state's diagnostics are the incoming ones: see scan_chunk.)
  checked = ((rows, params, with_diagnostics(state, {}))
             if checked_in_program(params, state) else rows)
  # One reduction per leaf (at most MAX_LEAVES_CHECKED_IN_PROGRAM and the
  # recorded rows): XLA reads each array where it lies, where concatenating
  # them first (tree_all_finite's grouping, which bounds compile time for
  # hundreds of leaves) copies them, costing up to 8% of a small sweep.
  return functools.reduce(jnp.logical_and, [
      jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(checked)
      if jnp.issubdtype(leaf.dtype, jnp.inexact)], jnp.ones((), bool))


def with_last_diagnostics(state, history, names=None):
  """``state`` with the recorded diagnostics set to their last rows.

  An unchecked chunk returns the state with the diagnostics it started
  with (carrying them through the loop, or slicing them from the history
  inside the program, costs more than the step on small problems); the host
  calls this on the result. Rows have the step as their last axis. With a
  NumPy history (on the host) the values are NumPy views of its last row:
  copying them to the device would cost more than a short run. ``names``:
  the recorded diagnostics, when the state lacks them (default: the
  state's diagnostics that the history has).
  """
  old = find_diagnostics(state)
  names = [k for k in (old if names is None else names) if k in history]
  if not names:
    return state
  last = lambda v: v[..., -1] if isinstance(v, np.ndarray) else jnp.asarray(
      v[..., -1])
  return with_diagnostics(state, {**old,
                                   **{k: last(history[k]) for k in names}})


# Up to this many leaves of params and state, a compiled unchecked chunk
# (of run or sweep) checks them itself, in the flag that the host reads with
# the diagnostics'. Its compile time grows with the number of leaves, so
# larger models are checked on the host (all_finite).
MAX_LEAVES_CHECKED_IN_PROGRAM = 64


def checked_in_program(params, state) -> bool:
  """Whether an unchecked chunk checks its final ``params`` and ``state`` itself.

  The state's diagnostics do not count (they are checked as recorded rows),
  so the answer is the same before and after the host sets them.
  """
  return len(jax.tree.leaves((params, with_diagnostics(state, {})))) <= (
      MAX_LEAVES_CHECKED_IN_PROGRAM)


UNCHECKED_ROWS = ("step", "finite", "updates_finite", "state_finite")
"""The rows that the host adds to the history of an unchecked chunk."""


def unchecked_rows(history, start: int, length: int, points=()) -> dict:
  """``history`` of a finite unchecked (``"fast"``) chunk with the host-side rows.

  An unchecked chunk that passed its check (:func:`unchecked_finite`) had
  only finite steps; this adds ``step`` (from ``start``) and the
  ``finite``, ``updates_finite`` and ``state_finite`` flags (all true) that
  a checked chunk records per step, ``points`` (the leading shape of a
  sweep's rows) by ``length``. They are read-only NumPy views of one row,
  like the rest of a history (NumPy views of device arrays), so they cost
  no copy.
  """
  shape = tuple(points) + (length,)
  out = {k: v for k, v in history.items() if k != "finite"}
  out["step"] = _steps(start, shape)
  out["finite"] = out["updates_finite"] = out["state_finite"] = _all_true(
      shape)
  return out


# Read-only views, shared by the histories of the same shape.
@functools.lru_cache(maxsize=16)
def _steps(start, shape):
  return np.broadcast_to(
      np.arange(start, start + shape[-1], dtype=np.int32), shape)


@functools.lru_cache(maxsize=16)
def _all_true(shape):
  return np.broadcast_to(True, shape)
