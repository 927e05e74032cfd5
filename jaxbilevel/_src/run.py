"""Driving a bilevel transformation: a pure ``scan_run`` and the host-side ``run``.

How a run guards against NaN and infinity without slowing every step
--------------------------------------------------------------------

A guard that rejects a non-finite step must choose, at every step, between the
new and the previous parameters and optimizer state. Inside a compiled loop
that choice costs a select per leaf (or one conditional over all of them),
which XLA compiles in time that grows steeply with the number of leaves (113 s
for 150 + 150 leaves, against 1 s for the plain loop) and which runs at every
step. :func:`run` and :func:`jaxbilevel.sweep` therefore run each chunk of
steps *unguarded* and check at the end of the chunk (outside the loop) that
the parameters, the optimizer state and every step's diagnostics are finite.
Only when that check fails is the chunk replayed from its start with the
guarded loop (compiled then, on the failing path only), which stops at the
first non-finite step exactly as a guarded run would. Steps are deterministic
(the batches and the random keys in the state are the same), so the replay
reaches the same iterates. :func:`scan_run`, which must stay a pure function,
uses the guarded loop directly.

What an unguarded step costs
----------------------------

The loop of an unguarded chunk does what the same algorithm written by hand
does, and nothing else:

* A bilevel method's ``update`` returns ``new - old`` (optax's contract);
  the drivers take a bare method's new parameters directly (captured in
  ``base.level_updates``) instead of adding that difference back, which
  would cost two elementwise passes over every variable. A transformation
  that changes the updates (an optax chain, :func:`jaxbilevel.apply_if_finite`)
  is applied with ``optax.apply_updates`` as usual.
* Diagnostics not recorded are neither traced nor carried. Recorded ones
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
import sys
import time
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbilevel._src import base
from jaxbilevel._src import programs
from jaxbilevel._src import tree as tree_lib

_NONFINITE_MODES = ("stop", "skip", "raise", "ignore")
_STATE_TYPES_WITH_PENALTY = ("PBGDFreeState", "ALTPBGDState", "VPBGDState",
                             "PBGDBLOCCState", "PBGDFreeCCState")


def find_diagnostics(state) -> dict:
  """Returns the ``diagnostics`` dict of a method's state (searching nested states)."""
  found = _maybe_find(state)
  if found is None:
    raise base.BilevelValidationError(
        "this state has no `diagnostics`: jaxbilevel.run drives the bilevel "
        "methods of jaxbilevel (pbgd_free, alt_pbgd, v_pbgd, ...), whose states "
        f"record them; got a state of type {type(state).__name__}.")
  return found


def _maybe_find(state):
  if hasattr(state, "diagnostics") and isinstance(state.diagnostics, dict):
    return state.diagnostics
  if isinstance(state, (tuple, list)):
    for sub in state:
      found = _maybe_find(sub)
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
      if not done and _maybe_find(sub) is not None:
        sub, done = with_diagnostics(sub, diag), True
      replaced.append(sub)
    return type(state)(*replaced) if hasattr(state, "_fields") else type(
        state)(replaced)
  return state


class History(dict):
  """The history that :func:`run` and :func:`jaxbilevel.sweep` return: a dict of arrays.

  Looking up a diagnostic that was not recorded says how to record it. It is
  a pytree node like a dict (keys sorted), so ``jax.tree.map`` works on it.
  """

  def __missing__(self, key):
    raise KeyError(
        f"{key!r}: this history has {sorted(self)}. The method's diagnostics "
        "(f, g, upper_grad_norm, gamma, ...) are recorded only when asked "
        "for: run(..., diagnostics=True) (the same for scan_run and sweep); "
        "f at the lower solution comes from record="
        "jaxbilevel.lower_level_evaluation(...).")


jax.tree_util.register_pytree_with_keys(
    History,
    lambda h: (tuple((jax.tree_util.DictKey(k), h[k]) for k in sorted(h)),
               tuple(sorted(h))),
    lambda keys, values: History(zip(keys, values)),
    flatten_func=lambda h: (tuple(h[k] for k in sorted(h)), tuple(sorted(h))))


def _check_batches(batch, batches, num_steps):
  if batch is not None and batches is not None and not (
      isinstance(batch, dict) and isinstance(batches, dict)
      and not set(batch) & set(batches)):
    raise base.BilevelValidationError(
        "pass either batch= (the same batch every step) or batches= (one per "
        "step), or both as dicts with different keys (batch= then holds what "
        "every step shares, e.g. frozen model weights, and each step's batch "
        "is {**batch, **batches[step]}).")
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


def _check_record_every(record, record_every, num_steps, where):
  record_every = base.check_static_int(record_every, "record_every")
  if record_every > 1 and record is None:
    raise base.BilevelValidationError(
        f"{where}: record_every={record_every} needs a record= function.")
  if num_steps % record_every:
    raise base.BilevelValidationError(
        f"{where}: num_steps={num_steps} must be a multiple of "
        f"record_every={record_every} (record is taken after every "
        f"record_every-th step).")
  return record_every


def diagnostics_option(diagnostics, where: str):
  """``diagnostics=`` of the drivers as ``True``, ``False`` or a tuple of names."""
  if isinstance(diagnostics, (bool, np.bool_)):
    return bool(diagnostics)
  if isinstance(diagnostics, str):
    diagnostics = (diagnostics,)
  try:
    names = tuple(diagnostics)
  except TypeError:
    names = None
  if names is None or not names or not all(isinstance(n, str) for n in names):
    raise base.BilevelValidationError(
        f"{where}: diagnostics must be True, False or a non-empty sequence of "
        f"diagnostic names (e.g. ('f',)), got {diagnostics!r}.")
  return names


def _step(tx, params, state, batch, mode, stopped, diagnostics,
          keep_diagnostics=False):
  """One update of ``tx`` with the checks of ``mode`` (see the module doc).

  With ``keep_diagnostics`` the returned state keeps the incoming
  diagnostics: the caller records the new ones and puts the last of them in
  the final state (so the loop does not carry them).
  """
  with base.recording_diagnostics(bool(diagnostics)), \
      base.capturing_new_params() as captured:
    updates, new_state = tx.update(None, state, params, batch=batch)
  new_params = base.captured_new_params(captured, params, updates)
  if new_params is None:
    new_params = optax.apply_updates(params, updates)
  diag = find_diagnostics(new_state)
  if diagnostics is not True:
    # Keep the incoming (unchanged) values of the diagnostics not recorded in
    # the carry: nothing reads the new ones, so XLA removes their computation.
    names = diagnostics or ()
    unknown = sorted(set(names) - set(diag))
    if unknown:
      raise base.BilevelValidationError(
          f"diagnostics={tuple(names)!r}: {unknown} not recorded by this "
          f"method; it records {sorted(diag)}.")
    old = find_diagnostics(state)
    new_state = with_diagnostics(
        new_state, {k: diag[k] if k in names else old[k] for k in old})
    diag = {k: diag[k] for k in names}
  if keep_diagnostics:
    new_state = with_diagnostics(new_state, find_diagnostics(state))
  if mode == "fast":
    # Unchecked: the caller derives "finite" from the recorded diagnostics.
    true = jnp.asarray(True)
    return new_params, new_state, stopped, diag, true, true, true
  diag_finite = tree_lib.tree_all_finite(diag)
  updates_finite = tree_lib.tree_all_finite(updates)
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


def _scan_chunk(tx, params, state, batch, batches, start, stopped, *, length,
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
  count0 = state.count if keep_diagnostics and _counts_steps(state) else None

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
      return carry, (rows, record(carry[0], carry[1]))

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


def _counts_steps(state) -> bool:
  """Whether ``state`` is a jaxbilevel method's, whose ``count`` counts updates."""
  return (type(state).__module__.startswith("jaxbilevel.")
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
  # (The state's diagnostics are the incoming ones: see _scan_chunk.)
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


def _chunk_program(build):
  """The jitted chunk of one program (see :mod:`programs`)."""

  def chunk(hyperparameters, params, state, batch, batches, start, stopped, *,
            batches_fn, length, mode, record, record_every, diagnostics):
    tx = build(hyperparameters)
    if state is None:
      # A run's first chunk starts the state itself: XLA fuses the zeros
      # into the loop's set-up, where a separate ``init`` costs a dispatch
      # (and, eagerly, one per state leaf).
      state = tx.init(params)
    params, state, stopped, history = _scan_chunk(
        tx, params, state, batch, batches_fn if batches_fn is not None else
        batches, start, stopped, length=length, mode=mode, record=record,
        record_every=record_every, diagnostics=diagnostics)
    if mode == "fast":
      history["finite"] = unchecked_finite(history, params, state)
    return params, state, stopped, history

  return jax.jit(chunk, static_argnames=(
      "batches_fn", "length", "mode", "record", "record_every",
      "diagnostics"))


_PROGRAMS = programs.ProgramCache(_chunk_program)
_NEEDS_STATIC = set()
_TRACER_ERRORS = (jax.errors.ConcretizationTypeError,
                  jax.errors.TracerBoolConversionError,
                  jax.errors.TracerIntegerConversionError)


def _call_program(cache, tx, *args, **kwargs):
  """Calls the jitted program of ``tx`` in ``cache`` (see :mod:`programs`)."""
  program = programs.program_of(tx)
  if program.key in _NEEDS_STATIC:
    program = programs.static_program(program)
  try:
    return cache.get(program)(program.hyperparameters, *args, **kwargs)
  except _TRACER_ERRORS:
    if not program.hyperparameters:
      raise
    # The method needs its hyperparameters as Python values (e.g. it
    # branches on one): key the program by value instead.
    _NEEDS_STATIC.add(program.key)
    program = programs.static_program(program)
    return cache.get(program)(program.hyperparameters, *args, **kwargs)


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


def _run_chunk(tx, params, state, batch, batches, start, stopped, *, length,
               mode, record, record_every, diagnostics):
  """Runs one chunk through the shared, bounded program cache."""
  fn = batches if callable(batches) else None
  return _call_program(
      _PROGRAMS, tx, params, state, batch, None if fn else batches,
      np.int32(start), stopped, batches_fn=fn, length=length, mode=mode,
      record=record, record_every=record_every, diagnostics=diagnostics)


_INITS = programs.ProgramCache(
    lambda build: jax.jit(lambda hyperparameters, params:
                          build(hyperparameters).init(params)))


def init_state(tx, params):
  """``tx.init(params)``, compiled once the same program has run before.

  Eager initialisation dispatches one small operation per state leaf, which
  costs more than a whole short run of a small problem when runs repeat (a
  loop over hyperparameters); compiling it costs more than that once, so a
  program's first run initialises eagerly. An ``init`` that needs concrete
  values (a user's optimizer) always runs eagerly.
  """
  if programs.program_of(tx) not in _PROGRAMS:
    return tx.init(params)
  try:
    return _call_program(_INITS, tx, params)
  except _TRACER_ERRORS:
    return tx.init(params)


def scan_run(tx: optax.GradientTransformationExtraArgs,
             params: base.BilevelParams,
             *,
             num_steps: int,
             state: Optional[Any] = None,
             batch: Any = None,
             batches: Any = None,
             record: Optional[Callable] = None,
             record_every: int = 1,
             diagnostics: Union[bool, Sequence[str]] = False,
             on_nonfinite: str = "stop"):
  """Runs ``num_steps`` outer iterations as one ``lax.scan`` (pure, traceable).

  Unlike :func:`run`, this function has no host-side logic, so it can be
  called inside ``jax.jit`` and ``jax.vmap``: build the transformation inside
  the traced function to sweep hyperparameters without recompiling (see the
  example).

  With ``on_nonfinite="stop"`` or ``"skip"`` every step chooses between the
  new and the previous iterate (one ``lax.cond``; a select per leaf under
  ``vmap``), which costs compile time that grows with the number of leaves;
  :func:`run` and :func:`jaxbilevel.sweep` avoid it (see the module notes).
  ``"ignore"`` compiles the plain loop.

  Args:
    tx: a bilevel transformation (e.g. :func:`pbgd_free`).
    params: initial :class:`BilevelParams`.
    num_steps: number of outer iterations (static int).
    state: initial state (``tx.init(params)`` if None).
    batch: a batch used at every step (full-batch problems).
    batches: one batch per step, either a pytree with a leading axis of
      length ``num_steps`` or a pure callable ``step -> batch`` (e.g. sampling
      with ``jax.random.fold_in(key, step)``).
    record: optional ``(params, state) -> pytree`` recorded after every
      ``record_every``-th step (e.g. :func:`jaxbilevel.lower_level_evaluation`).
    record_every: record after steps ``record_every - 1, 2 * record_every - 1,
      ...``; ``num_steps`` must be a multiple of it.
    diagnostics: also record the method's diagnostics (``f``, ``g``,
      ``upper_grad_norm``, ...) every step: ``True`` for all of them, or a
      sequence of names (e.g. ``("f",)``) for those only. Off by default:
      they are then not computed at all, so a step costs what the method's
      algorithm costs; diagnostics not named are not computed either. Note
      that ``f`` is taken at the iterate ``params.y``, not at the lower
      solution; record :func:`jaxbilevel.lower_level_evaluation` to compare
      settings honestly.
    on_nonfinite: ``"stop"`` freezes the iterate at the first non-finite
      step, ``"skip"`` rejects non-finite steps and continues, ``"ignore"``
      applies every step as computed.

  Returns:
    ``(params, state, history)``; ``history`` is a dict of arrays with a
    leading axis of length ``num_steps``: the method's diagnostics, ``step``,
    ``finite`` (whether the step's diagnostics, updates and new state were
    finite), ``updates_finite``, ``state_finite`` and, if given, ``record``
    (``num_steps / record_every`` rows).

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
  record_every = _check_record_every(record, record_every, num_steps,
                                     "scan_run")
  return scan_steps(
      tx, params, num_steps=num_steps, state=state, batch=batch,
      batches=batches, record=record, record_every=record_every,
      diagnostics=diagnostics, mode=on_nonfinite)


def scan_steps(tx, params, *, num_steps, state, batch, batches, record,
               record_every, diagnostics, mode):
  """:func:`scan_run` in a given loop mode (``"fast"`` too), checked arguments.

  """
  if state is None:
    state = tx.init(params)
  if batches is not None and not callable(batches):
    batches = jax.tree.map(lambda b: b[:num_steps], batches)
  params, state, _, history = _scan_chunk(
      tx, params, state, batch, batches, jnp.asarray(0, jnp.int32),
      jnp.asarray(False), length=num_steps, mode=mode, record=record,
      record_every=record_every,
      diagnostics=diagnostics_option(diagnostics, "scan_run"))
  return params, state, history


class _Progress:
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


def _interactive() -> bool:
  """Whether a progress bar will be seen: a terminal or a Jupyter kernel."""
  return sys.stderr.isatty() or "ipykernel" in sys.modules


def _strongly_typed(tree):
  """Drops weak types (e.g. ``jnp.asarray(1.0)``) so calls share compilations."""
  return jax.tree.map(
      lambda v: v if isinstance(v, jax.Array) and not v.weak_type else
      jnp.asarray(v, dtype=jnp.result_type(v)), tree)


def _slice_batches(batches, start, length):
  if batches is None or callable(batches):
    return batches
  return jax.tree.map(lambda b: b[start:start + length], batches)


def _concat_history(parts):
  if len(parts) == 1:
    return parts[0]
  return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *parts)


def _truncate_history(history, n, record_every):
  """The first ``n`` steps of ``history`` (and the records they completed)."""
  out = {k: v[:n] for k, v in history.items() if k != "record"}
  if "record" in history:
    out["record"] = jax.tree.map(lambda v: v[:n // record_every],
                                 history["record"])
  return out


_device_all_finite = jax.jit(tree_lib.tree_all_finite)


def all_finite(tree) -> bool:
  """Whether every floating leaf of ``tree`` is finite (checked after a chunk).

  On the CPU backend the arrays live in host memory, so NumPy reads them in
  place and no reduction has to be compiled (compiling one per leaf costs as
  much as a large part of the step for models with many small leaves); on
  accelerators, and for arrays spread over processes, a compiled reduction
  runs where the arrays are.
  """
  leaves = [leaf for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(_dtype(leaf), jnp.inexact)]
  if all(isinstance(leaf, np.ndarray) or (
      isinstance(leaf, jax.Array) and on_host(leaf.sharding))
         for leaf in leaves):
    return all(bool(np.isfinite(np.asarray(leaf)).all()) for leaf in leaves)
  return bool(_device_all_finite(leaves))


def _dtype(leaf):
  dtype = getattr(leaf, "dtype", None)
  return jnp.result_type(leaf) if dtype is None else dtype


@functools.lru_cache(maxsize=64)
def on_host(sharding) -> bool:
  """Whether arrays with ``sharding`` are all in this process's host memory."""
  return sharding.is_fully_addressable and all(
      d.platform == "cpu" for d in sharding.device_set)


def _check_host_call(params, where):
  if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(params)):
    raise base.BilevelValidationError(
        f"{where} drives the run from Python (compiled chunks, progress, "
        "non-finite checks between chunks), so it cannot be called inside "
        "jax.jit, jax.vmap or jax.grad. Inside traced code use "
        "jaxbilevel.scan_run, its pure counterpart (same arguments), or "
        "jaxbilevel.sweep to vmap runs over hyperparameters.")


def drive(tx, params, state, *, batch, batches, first_step, num_steps,
          chunk_size, on_nonfinite, record, record_every, diagnostics,
          progress, after_chunk=None):
  """The chunk loop shared by :func:`run` and ``checkpoint.resumable_run``.

  Runs steps ``first_step .. num_steps - 1`` in chunks of ``chunk_size``
  (unguarded, replayed guarded on failure; see the module notes) and calls
  ``after_chunk(done, params, state, history_parts)`` after each chunk.
  Returns ``(params, state, history_parts, failure)``: ``failure`` is the
  history (with diagnostics) of the chunk that stopped, ending with the
  failing step, or None.
  """
  mode = "stop" if on_nonfinite == "raise" else on_nonfinite
  loop_mode = {"stop": "fast", "skip": "skip", "ignore": "ignore"}[mode]
  bar = _Progress(num_steps - first_step, progress)
  parts, done, failure = [], first_step, None
  no_stop = np.bool_(False)
  options = dict(record=record, record_every=record_every,
                 diagnostics=diagnostics)
  try:
    while done < num_steps:
      length = min(chunk_size, num_steps - done)
      chunk_batches = _slice_batches(batches, done, length)
      new_params, new_state, _, hist = _run_chunk(
          tx, params, state, batch, chunk_batches, done, no_stop,
          length=length, mode=loop_mode, **options)
      checked = loop_mode == "fast" and checked_in_program(new_params,
                                                           new_state)
      hist = jax.tree.map(np.asarray, hist)
      if loop_mode == "fast" and bool(hist["finite"]) and (
          checked or all_finite((new_params, new_state))):
        hist = unchecked_rows(hist, done, length)
        new_state = with_last_diagnostics(new_state, hist)
      elif loop_mode == "fast":
        # Replay the chunk guarded: it stops at the first non-finite step.
        # It records the diagnostics, so the report can name the quantity.
        new_params, new_state, stopped, replay = _run_chunk(
            tx, params, state, batch, chunk_batches, done, no_stop,
            length=length, mode="stop", **dict(options, diagnostics=True))
        replay = jax.tree.map(np.asarray, replay)
        hist = {k: replay[k] for k in set(hist) | set(UNCHECKED_ROWS)}
        if bool(stopped):
          bad = int(np.argmin(replay["finite"]))
          hist = _truncate_history(hist, bad + 1, record_every)
          failure = _truncate_history(replay, bad + 1, record_every)
      params, state = new_params, new_state
      parts.append(hist)
      done += len(hist["step"])
      bar.update(done - first_step,
                 {k: v[-1] for k, v in hist.items() if k != "record"})
      if failure is not None:
        break
      if after_chunk is not None:
        after_chunk(done, params, state, parts)
  finally:
    bar.close()
  return params, state, parts, failure


def _nonfinite_report(history, index, state=None):
  """``(step, what, hint)`` describing the non-finite step at ``index``."""
  skip = ("step", "finite", "updates_finite", "state_finite", "record")
  names = sorted(k for k, v in history.items()
                 if k not in skip and not np.isfinite(v[index]))
  if "updates_finite" in history and not bool(history["updates_finite"][index]):
    names.append("parameter updates")
  if "state_finite" in history and not bool(history["state_finite"][index]):
    names.append("optimizer state")
  step = int(history["step"][index])
  what = ", ".join(names) if names else "values"
  hint = ""
  gamma = history.get("gamma")
  has_penalty = state is None or any(
      type(s).__name__ in _STATE_TYPES_WITH_PENALTY for s in _states(state))
  if gamma is not None and has_penalty and not np.isfinite(gamma[index]):
    hint = (" (gamma is not a finite positive number at this step: a traced "
            "or scheduled gamma was <= 0, infinite or NaN, or a positive "
            "value too small for the parameters' dtype)")
  return step, what, hint


def _states(state):
  yield state
  if isinstance(state, (tuple, list)) and not hasattr(state, "diagnostics"):
    for sub in state:
      yield from _states(sub)


def nonfinite_message(where, history, state):
  """The message of a stopped run: the step, the quantities, what is returned."""
  step, what, hint = _nonfinite_report(history, len(history["step"]) - 1,
                                       state)
  returned = ("the initial params and state (the first step already failed)"
              if step == 0 else
              f"those after step {step - 1} (the last finite iterate)")
  return (f"{where}: non-finite {what} at step {step}{hint}. The run stopped; "
          f"the returned params and state are {returned}, and the history "
          "ends with the failing step.")


def run(tx: optax.GradientTransformationExtraArgs,
        params: base.BilevelParams,
        *,
        num_steps: int,
        state: Optional[Any] = None,
        batch: Any = None,
        batches: Any = None,
        record: Optional[Callable] = None,
        record_every: int = 1,
        diagnostics: Union[bool, Sequence[str]] = False,
        chunk_size: Optional[int] = None,
        progress: Optional[bool] = None,
        on_nonfinite: str = "stop"):
  """Runs a bilevel transformation for ``num_steps`` outer iterations.

  The steps run as jitted ``lax.scan`` chunks of ``chunk_size`` steps (so a
  long run compiles at most twice: the chunk and the remainder); between
  chunks the host updates the progress bar and checks that the parameters,
  the optimizer state and the diagnostics are finite. Without a progress bar
  the run is one chunk by default: every chunk ends in a wait for the device
  and a check on the host, which on small problems costs as much as many
  steps. When a step produces a NaN
  or infinite value the run stops, returns the last finite iterate and says
  at which step and in which quantity the problem appeared (the failing chunk
  is replayed with a per-step guard; see the module notes).

  Compiled programs are shared: a newly built transformation of the same
  method, objectives and optimizers reuses the program of an earlier run, its
  floating-point hyperparameters (``gamma``, ...) being arguments of the
  program, so a Python loop over hyperparameter values compiles once. At most
  :data:`jaxbilevel.programs.MAX_PROGRAMS` programs are kept.

  Args:
    tx: a bilevel transformation (e.g. :func:`pbgd_free`).
    params: initial :class:`BilevelParams`.
    num_steps: number of outer iterations.
    state: state to resume from (``tx.init(params)`` if None).
    batch: a batch used at every step (full-batch problems). With
      ``batches`` too (both dicts, with different keys), what every step
      shares: each step gets ``{**batch, **batches[step]}``. Arrays are
      arguments of the compiled program, so large ones (e.g. a model's frozen
      weights) belong here rather than in a closure of ``f`` or ``g``, which
      ``jax.jit`` would compile in as constants.
    batches: one batch per step: a pytree with a leading axis of length
      ``>= num_steps`` (sliced per chunk) or a pure callable ``step -> batch``.
      Steps are counted from 0 in each call.
    record: optional ``(params, state) -> pytree`` recorded after every
      ``record_every``-th step (e.g. :func:`jaxbilevel.lower_level_evaluation`
      to record f at the lower solution).
    record_every: record after steps ``record_every - 1, 2 * record_every -
      1, ...``; ``num_steps`` must be a multiple of it.
    diagnostics: also record the method's diagnostics (``f``, ``g``,
      ``upper_grad_norm``, ...) every step: ``True`` for all, or a sequence
      of names (e.g. ``("f",)``); off by default, when they are not
      computed at all (see :func:`scan_run`). A non-finite step is named by
      quantity either way.
    chunk_size: steps per compiled chunk, rounded to a multiple of
      ``record_every`` (default: ``min(num_steps, 1000)`` with a progress
      bar, otherwise ``num_steps``).
    progress: show a progress bar (``tqdm.auto`` when installed, so it draws
      in Jupyter and Colab); default: when the run is longer than one chunk
      of the given ``chunk_size`` (or 1,000 steps) and stderr is a terminal
      or the code runs in a Jupyter kernel.
    on_nonfinite: ``"stop"`` (default: warn and return the last finite
      iterate), ``"raise"`` (raise :class:`NonFiniteError`), ``"skip"``
      (reject non-finite steps, keep going, and warn with their count; this
      guards every step inside the compiled loop) or ``"ignore"``.

  Returns:
    ``(params, state, history)`` where ``history`` is a dict of NumPy arrays
    with one row per executed step: the method's diagnostics (``f``, ``g``,
    ``upper_grad_norm``, ...), ``step``, ``finite``, ``updates_finite``,
    ``state_finite`` and ``record`` if given (one row per ``record_every``
    steps), possibly read-only views (copy one to modify it). After a stop,
    the history ends with the failing step. The final state's recorded
    diagnostics are the last row of the history (NumPy values).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> f = lambda x, y, batch: x ** 2 + 10.0 * y
    >>> g = lambda x, y, batch: (y - x + 1.0) ** 2
    >>> tx = jbl.pbgd_free(f, g, gamma=15.0, upper_optimizer=optax.sgd(0.01),
    ...                    lower_optimizer=optax.sgd(0.01))
    >>> p0 = jbl.BilevelParams(x=jnp.array(2.0), y=jnp.array(3.0))
    >>> params, state, history = jbl.run(tx, p0, num_steps=3000,
    ...                                  diagnostics=True)
    >>> history["f"].shape
    (3000,)
  """
  _check_host_call(params, "jaxbilevel.run")
  num_steps = base.check_static_int(num_steps, "num_steps")
  if on_nonfinite not in _NONFINITE_MODES:
    raise base.BilevelValidationError(
        f"run: on_nonfinite must be one of {_NONFINITE_MODES}, got "
        f"{on_nonfinite!r}.")
  _check_batches(batch, batches, num_steps)
  record_every = _check_record_every(record, record_every, num_steps, "run")
  if chunk_size is not None:
    chunk_size = base.check_static_int(chunk_size, "chunk_size")
  if progress is None:
    progress = num_steps > (chunk_size or 1000) and _interactive()
  if chunk_size is None:
    chunk_size = min(num_steps, 1000) if progress else num_steps
  chunk_size = min(max(chunk_size - chunk_size % record_every, record_every),
                   num_steps)
  params = _strongly_typed(params)
  if state is None and chunk_size < num_steps:
    state = init_state(tx, params)
  if state is not None:
    find_diagnostics(state)  # fails clearly for a non-bilevel transformation
  elif programs.program_of(tx) not in _PROGRAMS:
    # A one-chunk run initialises the state in its program; the first run of
    # a program checks the state's structure without computing it.
    find_diagnostics(jax.eval_shape(tx.init, params))
  params, state, parts, failure = drive(
      tx, params, state, batch=batch, batches=batches, first_step=0,
      num_steps=num_steps, chunk_size=chunk_size, on_nonfinite=on_nonfinite,
      record=record, record_every=record_every,
      diagnostics=diagnostics_option(diagnostics, "run"),
      progress=progress)
  history = History(_concat_history(parts))
  if failure is not None:
    message = nonfinite_message("jaxbilevel.run", failure, state)
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
