"""The non-finite policy of the drivers: guard, replay, skip, and the report of a stop.

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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxbilevel._src import host as host_lib
from jaxbilevel._src import loop as loop_lib
from jaxbilevel._src import programs
from jaxbilevel._src import tree as tree_lib


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


def drive(tx, params, state, *, batch, batches, first_step, num_steps,
          chunk_size, on_nonfinite, record, record_every, diagnostics,
          progress, after_chunk=None):
  """The chunk loop shared by :func:`run` and ``checkpoint.resumable_run``.

  Runs steps ``first_step .. num_steps - 1`` in chunks of ``chunk_size``
  (unguarded, replayed guarded on failure; see above) and calls
  ``after_chunk(done, params, state, history_parts)`` after each chunk.
  Returns ``(params, state, history_parts, failure)``: ``failure`` is the
  history (with diagnostics) of the chunk that stopped, ending with the
  failing step, or None.
  """
  mode = "stop" if on_nonfinite == "raise" else on_nonfinite
  loop_mode = {"stop": "fast", "skip": "skip", "ignore": "ignore"}[mode]
  bar = host_lib.Progress(num_steps - first_step, progress)
  parts, done, failure = [], first_step, None
  no_stop = np.bool_(False)
  options = dict(record=record, record_every=record_every,
                 diagnostics=diagnostics)
  try:
    while done < num_steps:
      length = min(chunk_size, num_steps - done)
      chunk_batches = host_lib.slice_batches(batches, done, length)
      new_params, new_state, _, hist = programs.run_chunk(
          tx, params, state, batch, chunk_batches, done, no_stop,
          length=length, mode=loop_mode, **options)
      checked = loop_mode == "fast" and loop_lib.checked_in_program(new_params,
                                                           new_state)
      hist = jax.tree.map(np.asarray, hist)
      if loop_mode == "fast" and bool(hist["finite"]) and (
          checked or all_finite((new_params,
                                 loop_lib.with_diagnostics(new_state, {})))):
        hist = loop_lib.unchecked_rows(hist, done, length)
        new_state = loop_lib.with_last_diagnostics(new_state, hist)
      elif loop_mode == "fast":
        # Replay the chunk guarded: it stops at the first non-finite step.
        # It records the diagnostics, so the report can name the quantity.
        new_params, new_state, stopped, replay = programs.run_chunk(
            tx, params, state, batch, chunk_batches, done, no_stop,
            length=length, mode="stop", **dict(options, diagnostics=True))
        replay = jax.tree.map(np.asarray, replay)
        hist = {k: replay[k] for k in set(hist) | set(loop_lib.UNCHECKED_ROWS)}
        if bool(stopped):
          bad = int(np.argmin(replay["finite"]))
          hist = host_lib.truncate_history(hist, bad + 1, record_every)
          failure = host_lib.truncate_history(replay, bad + 1, record_every)
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


def nonfinite_report(history, index, state=None):
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
  # Whether the method has a penalty constant: its diagnostics name one.
  has_penalty = state is None or "gamma" in (
      loop_lib.maybe_find_diagnostics(state) or {})
  if gamma is not None and has_penalty and not np.isfinite(gamma[index]):
    hint = (" (gamma is not a finite positive number at this step: a traced "
            "or scheduled gamma was <= 0, infinite or NaN, or a positive "
            "value too small for the parameters' dtype)")
  return step, what, hint


def nonfinite_message(where, history, state):
  """The message of a stopped run: the step, the quantities, what is returned."""
  step, what, hint = nonfinite_report(history, len(history["step"]) - 1,
                                       state)
  returned = ("the initial params and state (the first step already failed)"
              if step == 0 else
              f"those after step {step - 1} (the last finite iterate)")
  return (f"{where}: non-finite {what} at step {step}{hint}. The run stopped; "
          f"the returned params and state are {returned}, and the history "
          "ends with the failing step.")
