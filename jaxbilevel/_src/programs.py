"""Compiled programs of the drivers, shared between equivalent transformations.

``jax.jit`` keys its cache on a static argument's identity, so every newly
built transformation used to compile (and keep) a program of its own: a loop
that rebuilds ``pbgd_free(f, g, gamma=gamma, ...)`` for each ``gamma`` compiled
once per value and held every program and every transformation alive.

Here a transformation is reduced to a *recipe*: the method that built it (the
public constructors are wrapped with :func:`bilevel_method`) and its
arguments. Floating-point hyperparameters (``gamma``, ``eta``, ...) become
traced arguments of the program; everything else (objectives, optimizers,
loop lengths) forms the cache key, compared by content (a function by its code,
the values it closes over and the globals it reads; numbers by value; arrays by
identity). Equivalent transformations therefore share one compiled program,
whatever their hyperparameter values, and the cache holds at most
:data:`MAX_PROGRAMS` programs (least recently used are dropped).
"""

from __future__ import annotations

import collections
import functools
import inspect
import numbers
import sys
import types
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxbilevel._src import base
from jaxbilevel._src import loop as loop_lib
from jaxbilevel._src import options as options_lib

MAX_PROGRAMS = 16
"""The most compiled driver programs kept alive at once (least recently used dropped)."""

_RECIPE = "_jaxbilevel_recipe"
_PROGRAM = "_jaxbilevel_program"


def bilevel_method(constructor: Callable) -> Callable:
  """Marks a public method constructor so that its transformations carry a recipe.

  The recipe ``(constructor, args, kwargs)`` lets :func:`jaxbilevel.run`
  rebuild the transformation inside its compiled program with traced
  floating-point hyperparameters, so that a new transformation that differs
  only in those values reuses the program.
  """

  @functools.wraps(constructor)
  def build(*args, **kwargs):
    tx = constructor(*args, **kwargs)
    try:
      setattr(tx.update, _RECIPE, (constructor, args, kwargs))
    except AttributeError:  # not a plain function: no recipe, keyed by content
      pass
    return tx

  signature = inspect.signature(constructor)
  build.__signature__ = _BuilderSignature(
      list(signature.parameters.values()),
      return_annotation=signature.return_annotation)
  build.__signature__.method = constructor.__name__
  return build


def check_hyperparameters_fit(tx, dtype, where: str) -> None:
  """Refuses a constant hyperparameter of ``tx`` that ``dtype`` cannot hold.

  A driver passes the floating-point hyperparameters to its program as
  traced arguments (see the module notes), which the method casts to the
  parameters' dtype, so a constant ``gamma=1e40`` becomes ``inf`` and
  ``gamma=1e-50`` becomes 0 in float32, and the run can only stop on a
  non-finite step. Called before the loop, this
  names the argument and the cause, as a direct ``tx.update`` does (see
  ``base.resolve_hyperparameter``). Checked once per transformation and dtype.
  """
  update = getattr(tx, "update", None)
  recipe = getattr(update, _RECIPE, None)
  if recipe is None:
    return
  checked = getattr(update, _FITS, ())
  if dtype in checked:
    return
  _, args, kwargs = recipe
  for path, leaf in jax.tree_util.tree_leaves_with_path(
      {**{f"argument {i}": a for i, a in enumerate(args)}, **kwargs}):
    if not _is_hyperparameter(leaf):
      continue
    name = str(path[0].key) + jax.tree_util.keystr(path[1:])
    message = base.dtype_range_error(leaf, name, dtype,
                                     underflow=np.asarray(leaf) > 0)
    if message is not None:
      raise base.BilevelValidationError(f"{where}: {message}")
  try:
    setattr(update, _FITS, checked + (dtype,))
  except AttributeError:
    pass


_FITS = "_jaxbilevel_fits_dtypes"


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
    # pylint: disable-next=protected-access
    base.refuse_inject_hyperparams(getattr(self, "method", "this method"),
                                   sys._getframe(1))
    return super().bind(*args, **kwargs)


class _Identity:
  """A key part equal only to the same object (kept alive, so ids stay unique)."""

  __slots__ = ("obj",)

  def __init__(self, obj):
    self.obj = obj

  def __hash__(self):
    return id(self.obj)

  def __eq__(self, other):
    return isinstance(other, _Identity) and other.obj is self.obj


def _is_hyperparameter(leaf) -> bool:
  """A concrete floating scalar: becomes a traced argument of the program."""
  if isinstance(leaf, bool) or isinstance(leaf, np.bool_):
    return False
  if isinstance(leaf, (float, np.floating)):
    return True
  if isinstance(leaf, (np.ndarray, jax.Array)) and not isinstance(
      leaf, jax.core.Tracer):
    return leaf.ndim == 0 and jnp.issubdtype(leaf.dtype, jnp.floating)
  return False


def fingerprint(obj, _depth: int = 0, _seen=None):
  """A hashable summary of ``obj`` that equal-behaving objects share."""
  if _seen is None:
    _seen = set()
  if obj is None or isinstance(obj, (str, bytes, bool, numbers.Number,
                                     np.generic, type, types.ModuleType)):
    return (type(obj), obj) if not isinstance(obj, (type, types.ModuleType)) \
        else _Identity(obj)
  if _depth > 12 or id(obj) in _seen:
    return _Identity(obj)
  _seen = _seen | {id(obj)}
  deeper = functools.partial(fingerprint, _depth=_depth + 1, _seen=_seen)
  if isinstance(obj, (tuple, list)):
    return (type(obj), tuple(deeper(v) for v in obj))
  if isinstance(obj, dict):
    try:
      items = sorted(obj.items())
    except TypeError:
      return _Identity(obj)
    return (dict, tuple((k, deeper(v)) for k, v in items))
  if isinstance(obj, functools.partial):
    return (functools.partial, deeper(obj.func), deeper(obj.args),
            deeper(obj.keywords))
  if isinstance(obj, types.FunctionType):
    cells = tuple(deeper(c.cell_contents) if _filled(c) else None
                  for c in (obj.__closure__ or ()))
    names = tuple(n for n in obj.__code__.co_names if n in obj.__globals__)
    globals_read = tuple((n, deeper(obj.__globals__[n])) for n in names)
    return (types.FunctionType, obj.__code__, cells, deeper(obj.__defaults__),
            deeper(obj.__kwdefaults__), globals_read)
  if isinstance(obj, types.MethodType):
    return (types.MethodType, deeper(obj.__func__), _Identity(obj.__self__))
  if isinstance(obj, np.ndarray) and obj.size <= 16:
    return (np.ndarray, obj.dtype.str, obj.shape, obj.tobytes())
  return _Identity(obj)


def _filled(cell) -> bool:
  try:
    cell.cell_contents  # pylint: disable=pointless-statement
    return True
  except ValueError:
    return False


class Program(collections.namedtuple("Program", "key build hyperparameters")):
  """How to rebuild a transformation: ``build(hyperparameters) -> tx``."""


class _Key:
  """A program key whose (deep, tuple) hash is computed once."""

  __slots__ = ("parts", "_hash")

  def __init__(self, parts):
    self.parts = parts
    self._hash = hash(parts)

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return self is other or (isinstance(other, _Key)
                             and self._hash == other._hash
                             and self.parts == other.parts)


def program_of(tx) -> Program:
  """The cache key of ``tx``, a builder and its traced hyperparameters.

  Computed once per transformation (kept on its ``update`` function), so a
  run that reuses ``tx`` pays for the fingerprint only on its first call.
  """
  update = getattr(tx, "update", None)
  cached = getattr(update, _PROGRAM, None)
  if cached is not None:
    return cached
  program = _program_of(tx)
  try:
    setattr(update, _PROGRAM, program)
  except AttributeError:
    pass
  return program


def _program_of(tx) -> Program:
  recipe = getattr(getattr(tx, "update", None), _RECIPE, None)
  if recipe is None:
    return Program(_Key(("tx", fingerprint(tx))), lambda values: tx, ())
  constructor, args, kwargs = recipe
  leaves, treedef = jax.tree.flatten((args, kwargs))
  where = [i for i, leaf in enumerate(leaves) if _is_hyperparameter(leaf)]
  values = tuple(jnp.asarray(leaves[i]) for i in where)
  key = _Key(("recipe", constructor, treedef, tuple(where),
              tuple(("hp", v.dtype, v.weak_type) if i in where else
                    fingerprint(leaf) for i, (leaf, v) in enumerate(
                        zip(leaves, _aligned(leaves, where, values))))))

  def build(traced):
    filled = list(leaves)
    for i, v in zip(where, traced):
      filled[i] = v
    b_args, b_kwargs = jax.tree.unflatten(treedef, filled)
    with warnings.catch_warnings():
      # A deprecated argument name was already reported when the user built
      # the transformation; rebuilding it inside the program is ours.
      warnings.simplefilter("ignore", DeprecationWarning)
      return constructor(*b_args, **b_kwargs)

  return Program(key, build, values)


def _aligned(leaves, where, values):
  out = [None] * len(leaves)
  for i, v in zip(where, values):
    out[i] = v
  return out


def static_program(program: Program) -> Program:
  """The same program with the hyperparameters baked in (keyed by value)."""
  values = tuple(np.asarray(v).item() for v in program.hyperparameters)
  build = program.build
  return Program(_Key(("static", program.key, values)),
                 lambda traced: build(values), ())


class ProgramCache:
  """A bounded LRU of jitted functions, one per program key."""

  def __init__(self, make_jitted: Callable[[Callable], Callable],
               maxsize: int = MAX_PROGRAMS):
    self._make = make_jitted
    self._maxsize = maxsize
    self._entries = collections.OrderedDict()

  def get(self, program: Program) -> Callable:
    key = program.key
    if key in self._entries:
      self._entries.move_to_end(key)
      return self._entries[key]
    fn = self._make(program.build)
    self._entries[key] = fn
    while len(self._entries) > self._maxsize:
      self._entries.popitem(last=False)
    return fn

  def __contains__(self, program: Program) -> bool:
    return program.key in self._entries

  def __len__(self):
    return len(self._entries)

  def clear(self):
    self._entries.clear()


# ---------------------------------------------------------------------------
# The drivers' programs: a chunk of steps, and init.
# ---------------------------------------------------------------------------


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
      "batches_fn", "length", "mode", "record", "record_every",
      "diagnostics"))


PROGRAMS = ProgramCache(_chunk_program)


_NEEDS_STATIC = set()


_TRACER_ERRORS = (jax.errors.ConcretizationTypeError,
                  jax.errors.TracerBoolConversionError,
                  jax.errors.TracerIntegerConversionError)


def _call_program(cache, tx, *args, **kwargs):
  """Calls the jitted program of ``tx`` in ``cache`` (see :mod:`programs`)."""
  program = program_of(tx)
  if program.key in _NEEDS_STATIC:
    program = static_program(program)
  try:
    return cache.get(program)(program.hyperparameters, *args, **kwargs)
  except _TRACER_ERRORS:
    if not program.hyperparameters:
      raise
    # The method needs its hyperparameters as Python values (e.g. it
    # branches on one): key the program by value instead.
    _NEEDS_STATIC.add(program.key)
    program = static_program(program)
    return cache.get(program)(program.hyperparameters, *args, **kwargs)


def run_chunk(tx, params, state, batch, batches, start, stopped, *, length,
               mode, record, record_every, diagnostics):
  """Runs one chunk through the shared, bounded program cache."""
  fn = batches if callable(batches) else None
  return _call_program(
      PROGRAMS, tx, params, state, batch, None if fn else batches,
      np.int32(start), stopped, batches_fn=fn, length=length, mode=mode,
      record=record, record_every=record_every, diagnostics=diagnostics)


INITS = ProgramCache(
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
  if program_of(tx) not in PROGRAMS:
    return tx.init(params)
  try:
    return _call_program(INITS, tx, params)
  except _TRACER_ERRORS:
    return tx.init(params)
