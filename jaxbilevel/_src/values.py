"""Built methods as values: a :class:`BilevelTransformation` is a pytree.

A method built by one of the public constructors (``jbl.pbgd_free(f, g,
gamma=10.0, ...)``) remembers the call that built it: the constructor and its
arguments (:class:`MethodArguments`). Flattening the transformation splits
those arguments the way JAX splits a function's arguments:

* **leaves** (traced under ``jit``, mapped by ``vmap``): floating-point
  numbers and arrays — ``gamma``, step sizes, a schedule's values given as
  arrays, a PRNG key;
* **static metadata** (part of the tree structure, compared with ``==``):
  everything else — the objectives, the optax optimizers, projections,
  Python ints (loop lengths), strings and booleans.

So ``jax.jit(fn)(tx, ...)`` compiles once per tree structure: a newly built
method that differs only in its float hyperparameters reuses the program, and
``jax.vmap`` over a stack of methods (``jax.tree.map(jnp.stack, ...)``) maps
over their hyperparameters. Functions and optax optimizers compare by
identity, as ``jax.jit`` compares static arguments: to vary an optimizer's
learning rate without a new program, build the method inside the jitted
function (or use :func:`jaxbilevel.sweep`), or keep one
``optax.inject_hyperparams`` optimizer and change the value in its state.

Unflattening does not call the constructor: the rebuilt transformation builds
its ``init``/``update``/``step`` when they are called, so JAX may unflatten with any
leaves (tracers, ``None``, shape structs) without the constructor's argument
checks seeing them.

Why a hand-registered pytree rather than ``flax.struct``,
``jax.tree_util.register_dataclass`` or equinox: the transformation must stay
an ``optax.GradientTransformationExtraArgs`` (a ``NamedTuple`` of ``init`` and
``update``, unpacked by optax's combinators), and which arguments are leaves
depends on the values a user passes (``gamma=10.0`` is a leaf, a schedule
function is not), not on a field declaration.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbilevel._src import base


class MethodArguments(NamedTuple):
  """The call that built a method: ``constructor(*args, **kwargs)``.

  Attributes:
    constructor: the public method constructor (e.g.
      :func:`jaxbilevel.pbgd_free`).
    args: its positional arguments (usually ``(f, g)``).
    kwargs: its keyword arguments, as given.
  """

  constructor: Callable
  args: tuple
  kwargs: dict

  def build(self) -> base.BilevelTransformation:
    """Calls the constructor with these arguments."""
    with warnings.catch_warnings():
      # A deprecated argument name was reported when the user built the
      # method; building it again (inside a program) is ours.
      warnings.simplefilter("ignore", DeprecationWarning)
      return self.constructor(*self.args, **self.kwargs)


def is_leaf_value(value) -> bool:
  """Whether an argument value is a pytree leaf (traced) rather than static.

  Tracers, floating-point (and complex) numbers, and arrays are leaves; a
  0-d integer or boolean array is static (its Python value), since it may
  be a loop length; everything else (Python ints, booleans, strings,
  functions, optimizers, ``None``) is static.
  """
  if isinstance(value, jax.core.Tracer):
    return True
  if isinstance(value, (bool, np.bool_)):
    return False
  if isinstance(value, (float, complex, np.floating, np.complexfloating)):
    return True
  if isinstance(value, (np.ndarray, jax.Array)):
    return not (value.ndim == 0 and (
        jnp.issubdtype(value.dtype, jnp.integer)
        or jnp.issubdtype(value.dtype, jnp.bool_)))
  return False


class _Static:
  """A static argument value in a tree structure: compared with ``==``.

  Unhashable values (and values whose ``==`` is not a plain bool) compare
  by identity.
  """

  __slots__ = ("value", "_key")

  def __init__(self, value):
    if isinstance(value, (np.ndarray, jax.Array)):  # 0-d int/bool array
      value = value.item()
    self.value = value
    try:
      hash(value)
      self._key = (type(value), value)
    except TypeError:
      self._key = None

  def __hash__(self):
    return hash(self._key) if self._key is not None else id(self.value)

  def __eq__(self, other):
    if not isinstance(other, _Static):
      return False
    if self._key is None or other._key is None:
      return self.value is other.value
    try:
      return bool(self._key == other._key)
    except Exception:  # pylint: disable=broad-except
      # == raised or gave an array: equal only to itself.
      return self.value is other.value

  def __repr__(self):
    return f"static({self.value!r})"


class _Opaque:
  """The tree structure of a transformation built without a constructor.

  It has no leaves; it is equal only to itself.
  """

  __slots__ = ("tx",)

  def __init__(self, tx):
    self.tx = tx

  def __hash__(self):
    return id(self.tx)

  def __eq__(self, other):
    return isinstance(other, _Opaque) and other.tx is self.tx


class _Structure(NamedTuple):
  constructor: Callable
  treedef: Any
  static: tuple   # _Static for a static position, None for a leaf
  keys: tuple     # the key of each leaf


def _flatten_with_keys(tx):
  flat = getattr(tx, "_flat", None)
  if flat is not None:
    # Unflattened from a structure: the same positions are leaves, whatever
    # values JAX put there (it unflattens with stand-in objects too).
    structure, children = flat
    return list(zip(structure.keys, children)), structure
  arguments = getattr(tx, "arguments", None)
  if arguments is None:
    return (), _Opaque(tx)
  keyed, treedef = jax.tree_util.tree_flatten_with_path(
      {"args": tuple(arguments.args), "kwargs": dict(arguments.kwargs)})
  children, static = [], []
  for path, value in keyed:
    if is_leaf_value(value):
      children.append((_readable_key(path), value))
      static.append(None)
    else:
      static.append(_Static(value))
  return children, _Structure(arguments.constructor, treedef, tuple(static),
                              tuple(key for key, _ in children))


def _readable_key(path):
  # {"args": (f, g), "kwargs": {"gamma": ...}} -> .gamma, [1] or
  # .upper_optimizer[0] (one key entry per leaf).
  first, rest = path[1], path[2:]
  if isinstance(first, jax.tree_util.DictKey):
    if not rest:
      return jax.tree_util.GetAttrKey(str(first.key))
    return jax.tree_util.GetAttrKey(
        str(first.key) + jax.tree_util.keystr(tuple(rest)))
  if not rest:
    return first
  return jax.tree_util.GetAttrKey(
      jax.tree_util.keystr((first,) + tuple(rest)).lstrip("."))


def _flatten(tx):
  children, structure = _flatten_with_keys(tx)
  return [value for _, value in children], structure


class OptimizerValue(optax.GradientTransformationExtraArgs):
  """An optax optimizer that is a value: see :func:`as_value`."""

  def __new__(cls, init, update):
    tx = super().__new__(cls, init, update)
    tx.arguments = None
    return tx


def _unflattener(cls):
  def unflatten(structure, children):
    if isinstance(structure, _Opaque):
      return structure.tx
    children_list = list(children)
    leaves, children = [], iter(children_list)
    for static in structure.static:
      leaves.append(next(children) if static is None else static.value)
    tree = jax.tree_util.tree_unflatten(structure.treedef, leaves)
    tx = deferred(cls, MethodArguments(structure.constructor, tree["args"],
                                       tree["kwargs"]))
    tx._flat = (structure, list(children_list))  # pylint: disable=protected-access
    return tx
  return unflatten


def deferred(cls, arguments: MethodArguments):
  """A ``cls`` for ``arguments`` that calls the constructor when used.

  It builds anew at every use, without keeping what it built: a method built
  inside one trace (a ``jit`` or ``scan`` body) may hold values of that trace
  (``optax.sgd(lr)`` computes ``-lr`` when built), which must not reach
  another.
  """
  method = arguments.build

  def init_fn(params):
    return method().init(params)

  def update_fn(updates, state, params=None, **extra_args):
    return method().update(updates, state, params, **extra_args)

  if cls is base.BilevelTransformation:
    def step_fn(params, state, **extra_args):
      return method().step(params, state, **extra_args)
    tx = cls(init_fn, update_fn, step_fn)
  else:
    tx = cls(init_fn, update_fn)
  tx.arguments = arguments
  return tx


for _cls in (base.BilevelTransformation, OptimizerValue):
  jax.tree_util.register_pytree_with_keys(
      _cls, _flatten_with_keys, _unflattener(_cls), _flatten)


def as_value(factory: Callable[..., optax.GradientTransformation]
             ) -> Callable[..., optax.GradientTransformationExtraArgs]:
  """Wraps an optax optimizer factory so that its optimizers are values.

  ``jbl.as_value(optax.adam)(learning_rate=1e-3)`` is the optimizer
  ``optax.adam(learning_rate=1e-3)``, and also a pytree whose leaves are its
  floating-point arguments (the learning rate, ``b1``, ...); its static part
  is the factory and the other arguments. Given to a method as
  ``upper_optimizer=``/``lower_optimizer=``, it makes the learning rate a
  hyperparameter of the method like ``gamma``: a newly built method with
  another learning rate reuses the drivers' compiled program, and
  ``jax.vmap`` maps over it. A plain ``optax.adam(1e-3)`` is a closure,
  compared by identity (as ``jax.jit`` compares a static argument): a new
  one is a new program.

  Args:
    factory: a function returning an optax transformation (``optax.sgd``,
      ``optax.adam``, a function of your own, ...).

  Returns:
    A function with ``factory``'s arguments that returns the optimizer.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> sgd = jbl.as_value(optax.sgd)
    >>> jax.tree.leaves(sgd(learning_rate=0.1))
    [0.1]
    >>> jax.tree.structure(sgd(0.1)) == jax.tree.structure(sgd(0.5))
    True
    >>> updates, _ = sgd(0.5).update(jnp.ones(2), sgd(0.5).init(jnp.ones(2)))
    >>> updates.tolist()
    [-0.5, -0.5]
  """

  try:
    return _AS_VALUE[factory]
  except (KeyError, TypeError):  # new, or not weakly referable
    pass

  @functools.wraps(factory)
  def build(*args, **kwargs):
    opt = optax.with_extra_args_support(factory(*args, **kwargs))
    tx = OptimizerValue(opt.init, opt.update)
    tx.arguments = MethodArguments(build, args, kwargs)
    return tx

  try:
    # One wrapper per factory: the wrapper is the static part of the
    # optimizers it builds, so jbl.as_value(optax.adam) called again must
    # give the same one.
    _AS_VALUE[factory] = build
  except TypeError:
    pass
  return build


_AS_VALUE = weakref.WeakKeyDictionary()


def structure(tx):
  """What a compiled program of ``tx`` is keyed by: its tree structure.

  A transformation that is not a :class:`BilevelTransformation` (an optax
  combinator around a method) is keyed by identity.
  """
  if isinstance(tx, base.BilevelTransformation):
    return jax.tree.structure(tx)
  return _Opaque(tx)


def method_value(constructor: Callable) -> Callable:
  """Decorator for a public method constructor: its methods are values.

  The transformation it returns carries :class:`MethodArguments`
  (``tx.arguments``), which makes it a pytree whose leaves are its
  floating-point hyperparameters (see the module notes).
  """

  @functools.wraps(constructor)
  def build(*args, **kwargs):
    tx = constructor(*args, **kwargs)
    if isinstance(tx, base.BilevelTransformation):
      tx.arguments = MethodArguments(build, args, kwargs)
    return tx

  return build
