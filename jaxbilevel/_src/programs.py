"""Compiled programs of the drivers, shared between equivalent transformations.

A method built by a public constructor is a pytree (see :mod:`values`): its
floating-point hyperparameters are leaves and everything else is its tree
structure. The drivers' programs take the transformation as an argument, so
``jax.jit`` itself keys them: a newly built method that differs only in
``gamma`` (or any other float hyperparameter) reuses the compiled program,
and one with other objectives, optimizers or loop lengths compiles its own.
Each tree structure gets its own jitted function in a bounded cache (at most
:data:`MAX_PROGRAMS`, least recently used dropped), so that programs, and the
objectives their structures hold, are released.
"""

from __future__ import annotations

import collections
import inspect
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxbilevel._src import base
from jaxbilevel._src import loop as loop_lib
from jaxbilevel._src import options as options_lib
from jaxbilevel._src import values

MAX_PROGRAMS = 16
"""The most compiled driver programs kept alive at once (least recently used dropped)."""


def bilevel_method(constructor: Callable) -> Callable:
  """Marks a public method constructor: its methods are values (pytrees).

  See :func:`values.method_value`; the signature's ``bind`` also refuses
  ``optax.inject_hyperparams`` (see :class:`_BuilderSignature`).
  """
  build = values.method_value(constructor)
  signature = inspect.signature(constructor)
  build.__signature__ = _BuilderSignature(
      list(signature.parameters.values()),
      return_annotation=signature.return_annotation)
  build.__signature__.method = constructor.__name__
  return build


def check_hyperparameters_fit(tx, dtype, where: str) -> None:
  """Refuses a constant hyperparameter of ``tx`` that ``dtype`` cannot hold.

  A driver passes the floating-point hyperparameters to its program as
  traced arguments (the leaves of the method), which the method casts to the
  parameters' dtype, so a constant ``gamma=1e40`` becomes ``inf`` and
  ``gamma=1e-50`` becomes 0 in float32, and the run can only stop on a
  non-finite step. Called before the loop, this names the argument and the
  cause, as a direct ``tx.update`` does (see
  ``base.resolve_hyperparameter``).
  """
  if not isinstance(tx, base.BilevelTransformation):
    return
  for path, leaf in jax.tree_util.tree_leaves_with_path(tx):
    # (jnp: a typed PRNG key is a leaf whose dtype NumPy cannot read.)
    if isinstance(leaf, jax.core.Tracer) or jnp.ndim(leaf) != 0 or not (
        jnp.issubdtype(jnp.result_type(leaf), jnp.floating)):
      continue
    name = jax.tree_util.keystr(path).lstrip(".")
    message = base.dtype_range_error(leaf, name, dtype,
                                     underflow=np.asarray(leaf) > 0)
    if message is not None:
      raise base.BilevelValidationError(f"{where}: {message}")


class _BuilderSignature(inspect.Signature):
  """The signature of a method builder, whose ``bind`` refuses ``optax.inject_hyperparams``.

  ``optax.inject_hyperparams(builder)(f, g, ...)`` binds this signature and
  then calls the objectives as schedules ``f(step)``, which fails inside the
  user's function with a bare ``TypeError``; binding is the one step of it
  that reaches our code, so ``bind`` explains what to use instead (see
  ``base.refuse_inject_hyperparams``). Everything else is
  ``inspect.Signature``'s.
  """

  __slots__ = ("method",)

  def bind(self, *args, **kwargs):
    # Why the stack: optax.inject_hyperparams calls bind with nothing that
    # names it; its frame is the only sign, and it only words an error.
    # pylint: disable-next=protected-access
    base.refuse_inject_hyperparams(getattr(self, "method", "this method"),
                                   sys._getframe(1))
    return super().bind(*args, **kwargs)


class ProgramCache:
  """A bounded LRU of jitted functions, one per tree structure of ``tx``."""

  def __init__(self, make_jitted: Callable[[], Callable],
               maxsize: int = MAX_PROGRAMS):
    self._make = make_jitted
    self._maxsize = maxsize
    self._entries = collections.OrderedDict()

  def get(self, tx) -> Callable:
    key = values.structure(tx)
    if key in self._entries:
      self._entries.move_to_end(key)
      return self._entries[key]
    fn = self._make()
    self._entries[key] = fn
    while len(self._entries) > self._maxsize:
      self._entries.popitem(last=False)
    return fn

  def __contains__(self, tx) -> bool:
    return values.structure(tx) in self._entries

  def __len__(self):
    return len(self._entries)

  def clear(self):
    self._entries.clear()


def _arguments(tx):
  """``(tx as a traced argument, tx as a static argument)``: one is None.

  A method is passed as a pytree; any other transformation (an optax
  combinator around a method: a tuple of functions) as a static argument,
  hashed by identity.
  """
  if isinstance(tx, base.BilevelTransformation):
    return tx, None
  return None, tx


# ---------------------------------------------------------------------------
# The drivers' programs: a chunk of steps, and init.
# ---------------------------------------------------------------------------


def _chunk_program():
  """A jitted chunk of steps (one per tree structure of ``tx``)."""

  def chunk(tx, params, state, batch, batches, start, stopped, *, static_tx,
            batches_fn, length, mode, record, record_every, diagnostics):
    tx = static_tx if tx is None else tx
    if state is None:
      # A run's first chunk starts the state itself: XLA fuses the zeros
      # into the loop's set-up, where a separate ``init`` costs a dispatch
      # (and, eagerly, one per state leaf).
      state = tx.init(params)
    else:
      options_lib.check_given_state(tx, params, state, "jaxbilevel.run")
    params, state, stopped, history = loop_lib.scan_chunk(
        tx, params, state, batch, batches_fn if batches_fn is not None else
        batches, start, stopped, length=length, mode=mode, record=record,
        record_every=record_every, diagnostics=diagnostics)
    if mode == "fast":
      history["finite"] = loop_lib.unchecked_finite(history, params, state)
    return params, state, stopped, history

  return jax.jit(chunk, static_argnames=(
      "static_tx", "batches_fn", "length", "mode", "record", "record_every",
      "diagnostics"))


PROGRAMS = ProgramCache(_chunk_program)


def run_chunk(tx, params, state, batch, batches, start, stopped, *, length,
               mode, record, record_every, diagnostics):
  """Runs one chunk through the shared, bounded program cache."""
  fn = batches if callable(batches) else None
  traced_tx, static_tx = _arguments(tx)
  return PROGRAMS.get(tx)(
      traced_tx, params, state, batch, None if fn else batches,
      np.int32(start), stopped, static_tx=static_tx, batches_fn=fn,
      length=length, mode=mode, record=record, record_every=record_every,
      diagnostics=diagnostics)


def _init_program():
  return jax.jit(
      lambda tx, params, *, static_tx: (
          static_tx if tx is None else tx).init(params),
      static_argnames=("static_tx",))


INITS = ProgramCache(_init_program)

_TRACER_ERRORS = (jax.errors.ConcretizationTypeError,
                  jax.errors.TracerBoolConversionError,
                  jax.errors.TracerIntegerConversionError)


def init_state(tx, params):
  """``tx.init(params)``, compiled once the same program has run before.

  Eager initialisation dispatches one small operation per state leaf, which
  costs more than a whole short run of a small problem when runs repeat (a
  loop over hyperparameters); compiling it costs more than that once, so a
  program's first run initialises eagerly. An ``init`` that needs concrete
  values (a user's optimizer) always runs eagerly.
  """
  if tx not in PROGRAMS:
    return tx.init(params)
  traced_tx, static_tx = _arguments(tx)
  try:
    return INITS.get(tx)(traced_tx, params, static_tx=static_tx)
  except _TRACER_ERRORS:
    return tx.init(params)
