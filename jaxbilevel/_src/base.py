"""Base types and argument handling shared by every bilevel method.

Conventions (the notation of the methods guide, ``docs/methods.md``):

* ``f(x, y, batch) -> scalar`` is the upper-level (UL) objective and
  ``g(x, y, batch) -> scalar`` the lower-level (LL) objective. ``x`` and ``y``
  are arbitrary pytrees of floating arrays; ``batch`` is any pytree or ``None``
  and is handed unchanged to both ``f`` and ``g`` (put separate upper and lower
  data under separate keys, e.g. ``{"upper": ..., "lower": ...}``).
* A bilevel method is an :class:`optax.GradientTransformationExtraArgs` whose
  params are a :class:`BilevelParams`. ``tx.update(None, state, params,
  batch=batch)`` returns the change of both levels as a ``BilevelParams``;
  ``optax.apply_updates(params, updates)`` applies it.
"""

from __future__ import annotations

import functools
import numbers
import re
import sys
import warnings
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
PyTree = Any
Objective = Callable[[PyTree, PyTree, Any], Array]
Projection = Callable[[PyTree], PyTree]
Schedule = Callable[[Array], Array]
ScalarOrSchedule = Union[float, Array, Schedule]


class BilevelParams(NamedTuple):
  """The variables of both levels.

  Attributes:
    x: upper-level variables (any pytree of floating arrays).
    y: lower-level variables (any pytree of floating arrays).
  """

  x: PyTree
  y: PyTree


class BilevelValidationError(ValueError):
  """Raised at trace time when the inputs of a bilevel method are invalid."""


class NonFiniteError(FloatingPointError):
  """Raised (or reported) when a run produces NaN or infinite values."""


# ---------------------------------------------------------------------------
# Hyperparameters: floats, arrays (possibly traced) or schedules.
# ---------------------------------------------------------------------------


def _is_concrete(value) -> bool:
  """True when ``value`` holds a value known at trace time."""
  if isinstance(value, numbers.Number) or isinstance(value, np.ndarray):
    return True
  if isinstance(value, jax.Array):
    try:
      np.asarray(value)
      return True
    except (jax.errors.TracerArrayConversionError,
            jax.errors.ConcretizationTypeError):
      return False
  return False


def _not_a_number(value, name: str, fix: Optional[str] = None
                  ) -> Optional[str]:
  """The message for a hyperparameter that is not a real number, else None.

  Strings are the common case (``gamma="10"`` read from a config file): JAX
  would parse them silently, so they are rejected before any conversion.
  ``fix`` replaces the suggested conversion ``name=float(value)``.
  """
  if isinstance(value, (str, bytes)):
    fix = fix or f"Convert it first, e.g. {name}=float({value!r})."
    return f"{name} must be a number, got the string {value!r}. {fix}"
  if isinstance(value, (bool, np.bool_)):
    return f"{name} must be a number, got {value!r}."
  if not isinstance(value, (numbers.Number, np.ndarray, np.generic,
                            jax.Array)):
    return (f"{name} must be a number, an array or a schedule step -> value, "
            f"got {value!r} of type {type(value).__name__}.")
  try:
    kind = jnp.result_type(value).kind
  except TypeError:  # e.g. fractions.Fraction: a Number JAX cannot convert
    kind = "O"
  if kind not in "iuf":
    return (f"{name} must be a real number, got a value of dtype "
            f"{jnp.result_type(value)}.")
  return None


_SCHEDULE_FIX = "Return a number or an array, e.g. float(value)."


def _named_schedule(schedule: Schedule, name: str) -> Schedule:
  """Wraps a schedule so that a non-numeric output is reported by name."""
  if getattr(schedule, "_jaxbilevel_name", None) == name:
    return schedule

  def checked(count):
    value = schedule(count)
    message = _not_a_number(value, f"the value of the schedule {name}",
                            _SCHEDULE_FIX)
    if message is not None:
      raise BilevelValidationError(message)
    return value

  checked._jaxbilevel_name = name  # pylint: disable=protected-access
  checked.__wrapped__ = schedule
  return checked


def check_hyperparameter(value: ScalarOrSchedule, name: str, *,
                         positive: bool = True,
                         allow_zero: bool = False) -> ScalarOrSchedule:
  """Validates a scalar hyperparameter or schedule at construction time.

  Concrete values are checked immediately; traced values cannot be checked
  when the transformation is built, so :func:`resolve_hyperparameter` maps an
  invalid traced value to NaN, which :func:`jaxbilevel.run` then reports by
  name instead of returning a silently wrong answer.

  Args:
    value: a Python number, an array, or a callable ``step -> value``.
    name: the argument's name, used in error messages.
    positive: whether the value must be positive.
    allow_zero: whether zero is admissible (e.g. a penalty ramp starting at 0).

  Returns:
    ``value`` unchanged, or a schedule wrapped so that a non-numeric value
    (e.g. a string) it returns is reported by ``name``.
  """
  if callable(value):
    return _named_schedule(value, name)
  if value is None:
    raise BilevelValidationError(f"{name} must be given, got None.")
  message = _not_a_number(value, name)
  if message is not None:
    raise BilevelValidationError(message)
  if _is_concrete(value):
    arr = np.asarray(value)
    if arr.ndim != 0:
      raise BilevelValidationError(
          f"{name} must be a scalar (use jax.vmap to sweep over several "
          f"values), got an array of shape {arr.shape}.")
    if not np.isfinite(arr):
      raise BilevelValidationError(f"{name} must be finite, got {arr}.")
    if positive:
      if allow_zero and arr < 0:
        raise BilevelValidationError(f"{name} must be >= 0, got {arr}.")
      if not allow_zero and arr <= 0:
        raise BilevelValidationError(f"{name} must be > 0, got {arr}.")
  else:
    if jnp.ndim(value) != 0:
      raise BilevelValidationError(
          f"{name} must be a scalar per run; got a traced array of shape "
          f"{jnp.shape(value)}. Use jax.vmap over the runs to sweep values.")
  return value


def dtype_range_error(value, name: str, dtype, *,
                      underflow: bool = True) -> Optional[str]:
  """The message for a finite, nonzero scalar that ``dtype`` cannot hold, else None.

  A value that becomes ``inf`` (overflow) or, with ``underflow``, ``0`` when
  cast to ``dtype`` (the parameters' dtype, in which the methods compute)
  would make the run stop or divide by zero with no mention of the value;
  the message names ``name`` and the fix.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbilevel._src import base
    >>> base.dtype_range_error(1e40, "gamma", jnp.float32)[:40]
    'gamma = 1e+40 overflows to inf in float3'
    >>> base.dtype_range_error(10.0, "gamma", jnp.float32) is None
    True
  """
  arr = np.asarray(value)
  if (arr.ndim != 0 or arr.dtype.kind not in "iuf" or not np.isfinite(arr)
      or arr == 0):
    return None
  with np.errstate(over="ignore", under="ignore"):
    cast = arr.astype(jnp.dtype(dtype))
  if np.isinf(cast):
    what, fix = "overflows to inf", "a smaller value"
  elif underflow and cast == 0:
    what, fix = "underflows to 0", "a larger value"
  else:
    return None
  return (f"{name} = {arr.item()!r} {what} in {jnp.dtype(dtype).name}, the "
          f"dtype of the parameters: use {fix} or float64 parameters "
          "(jax.config.update('jax_enable_x64', True)).")


def resolve_hyperparameter(value: ScalarOrSchedule, count: Array, dtype, *,
                           positive: bool = True,
                           allow_zero: bool = False,
                           name: Optional[str] = None) -> Array:
  """Evaluates a float, array or schedule at step ``count`` in ``dtype``.

  Invalid values that could not be checked at construction (traced arrays,
  schedules) become NaN so that the run reports them rather than producing a
  wrong answer. A concrete value that overflows to ``inf`` (or, when
  ``positive``, underflows to 0) in ``dtype`` is refused, by ``name`` (the
  argument's name) when given.
  """
  v = value(count) if callable(value) else value
  label = getattr(value, "_jaxbilevel_name", None)
  label = (f"the value of the schedule {label}" if label else
           "the value of a hyperparameter schedule" if callable(value) else
           name or "a hyperparameter")
  message = _not_a_number(v, label, _SCHEDULE_FIX)
  if message is not None:
    raise BilevelValidationError(message)
  if _is_concrete(v):
    message = dtype_range_error(
        v, label, dtype, underflow=positive and np.asarray(v) > 0)
    if message is not None:
      raise BilevelValidationError(message)
  v = jnp.asarray(v, dtype=dtype)
  if jnp.ndim(v) != 0:
    raise BilevelValidationError(
        f"a hyperparameter schedule must return a scalar, got shape "
        f"{jnp.shape(v)}.")
  if positive:
    # Also +inf and NaN: a traced value cannot be checked when the method is
    # built, so an invalid one becomes NaN and the run reports it by name.
    ok = (v >= 0 if allow_zero else v > 0) & jnp.isfinite(v)
    v = jnp.where(ok, v, jnp.nan)
  return v


# ---------------------------------------------------------------------------
# Validation of params, objectives and updates.
# ---------------------------------------------------------------------------


def check_static_int(value, name: str, minimum: int = 1) -> int:
  """Checks that a loop length is a Python int >= ``minimum``."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (numbers.Integral,)):
    raise BilevelValidationError(
        f"{name} must be a Python int (loop lengths are static), got "
        f"{value!r} of type {type(value).__name__}.")
  if value < minimum:
    raise BilevelValidationError(f"{name} must be >= {minimum}, got {value}.")
  if value > _INT32_MAX:
    # Loop lengths and step counters are int32 inside the compiled programs.
    raise BilevelValidationError(
        f"{name} must fit in int32 (at most {_INT32_MAX}), got {value}.")
  return int(value)


_INT32_MAX = 2 ** 31 - 1


def check_params(params, method: str) -> BilevelParams:
  """Checks that ``params`` is a BilevelParams of floating arrays."""
  if not isinstance(params, BilevelParams):
    raise BilevelValidationError(
        f"{method}: params must be a jaxbilevel.BilevelParams(x, y), got "
        f"{type(params).__name__}. Wrap your variables as "
        "BilevelParams(x=upper_vars, y=lower_vars).")
  for level in ("x", "y"):
    leaves = jax.tree.leaves(getattr(params, level))
    if not leaves:
      raise BilevelValidationError(
          f"{method}: params.{level} has no array leaves.")
    if all(isinstance(leaf, (jax.Array, np.ndarray))
           and is_floating(leaf.dtype) for leaf in leaves):
      continue  # the common case, without paths (which cost more than a run)
    for path, leaf in jax.tree_util.tree_leaves_with_path(
        getattr(params, level)):
      # jnp.result_type("float32") is float32: a string leaf would pass the
      # dtype test below, so only array-like leaves are accepted.
      if isinstance(leaf, (str, bytes)) or not (
          isinstance(leaf, (numbers.Number, np.ndarray, np.generic,
                            jax.Array))
          or (hasattr(leaf, "shape") and hasattr(leaf, "dtype"))):
        raise BilevelValidationError(
            f"{method}: params.{level}{jax.tree_util.keystr(path)} is "
            f"{leaf!r} of type {type(leaf).__name__}, not an array; bilevel "
            "variables must be floating point arrays, e.g. "
            "jnp.zeros(3, jnp.float32).")
      dtype = jnp.result_type(leaf)
      if not jnp.issubdtype(dtype, jnp.floating):
        raise BilevelValidationError(
            f"{method}: params.{level}{jax.tree_util.keystr(path)} has dtype "
            f"{dtype}; bilevel variables must be floating point arrays.")
  return params


def check_updates_structure(updates, params: BilevelParams, method: str):
  """Checks that incoming ``updates`` are None (see :func:`bilevel_transformation`).

  A non-None value is reported by what is wrong with it: its type, then its
  structure and leaf shapes against ``params``, and, when it matches
  ``params``, the fact that a bilevel method computes its own updates.
  """
  if updates is None:
    return
  if not isinstance(updates, BilevelParams):
    raise BilevelValidationError(
        f"{method}: updates must be None (a bilevel method computes its own "
        f"updates; call tx.update(None, state, params, batch=batch)), got "
        f"{type(updates).__name__}.")
  for level in ("x", "y"):
    su = jax.tree.structure(getattr(updates, level))
    sp = jax.tree.structure(getattr(params, level))
    if su != sp:
      raise BilevelValidationError(
          f"{method}: the structure of updates.{level} does not match "
          f"params.{level}:\n  updates.{level}: {su}\n  params.{level}:  {sp}")
    for u, p in zip(jax.tree.leaves(getattr(updates, level)),
                    jax.tree.leaves(getattr(params, level))):
      if jnp.shape(u) != jnp.shape(p):
        raise BilevelValidationError(
            f"{method}: updates.{level} has a leaf of shape {jnp.shape(u)} "
            f"where params.{level} has shape {jnp.shape(p)}.")
  raise BilevelValidationError(
      f"{method}: updates must be None. A bilevel method computes the "
      "updates of both levels itself from f, g and batch, so incoming "
      "updates (e.g. gradients) would be ignored; call "
      "tx.update(None, state, params, batch=batch). To accumulate gradients "
      "over micro-batches, wrap f and g with "
      "jaxbilevel.objectives.accumulate; to skip non-finite steps, use "
      "jaxbilevel.apply_if_finite.")


def check_same_structure(a, b, what_a: str, what_b: str, method: str):
  """Checks that two pytrees have the same structure and leaf shapes."""
  sa, sb = jax.tree.structure(a), jax.tree.structure(b)
  if sa != sb:
    raise BilevelValidationError(
        f"{method}: the structure of {what_a} does not match {what_b}:\n"
        f"  {what_a}: {sa}\n  {what_b}: {sb}")
  for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jnp.shape(la) != jnp.shape(lb):
      raise BilevelValidationError(
          f"{method}: {what_a} has a leaf of shape {jnp.shape(la)} where "
          f"{what_b} has shape {jnp.shape(lb)}.")


def _non_array_output(out) -> Optional[str]:
  """Describes an output that is not an array (None, a string, a container).

  ``jnp.shape`` would turn a tuple of scalars into a shape and fail with a
  raw error on a dict or a string, so these are named before any shape test.
  """
  if out is None:
    return "None (is a `return` statement missing?)."
  if isinstance(out, (str, bytes)):
    return f"the string {out!r}."
  if isinstance(out, (tuple, list, dict)):
    kind = type(out).__name__
    return (f"a {kind} ({len(out)} element(s)). Return the value alone as an "
            "array: bilevel methods take no auxiliary outputs from f and g.")
  if not (isinstance(out, (numbers.Number, np.ndarray, np.generic, jax.Array))
          or (hasattr(out, "shape") and hasattr(out, "dtype"))):
    return f"an object of type {type(out).__name__}, not an array."
  return None


def checked_output(fn: Callable, name: str, *, expects: str, floating: str,
                   what: str, shape_error: Callable[[tuple], Optional[str]],
                   marker: str) -> Callable:
  """Wraps ``fn(x, y, batch)`` so its output is checked at trace time.

  The shared mechanism of :func:`scalar_objective` and
  ``constrained.check_constraint``: ``shape_error(shape)`` returns the message
  for a wrong output shape (``None`` when it is right), and the output must
  be floating. ``expects`` completes "must be a callable name(x, y, batch) ->
  ..." for a non-callable ``fn`` and ``floating`` completes "must return ..."
  for a non-floating output; ``what`` names the function in messages
  ("the objective"); ``marker`` is the attribute that marks a wrapped
  function so that wrapping twice is a no-op.
  """
  if not callable(fn):
    raise BilevelValidationError(
        f"{name} must be a callable {name}(x, y, batch) -> {expects}, got "
        f"{type(fn).__name__}.")
  if getattr(fn, marker, False):
    return fn

  def wrapped(x, y, batch=None):
    out = fn(x, y, batch)
    got = _non_array_output(out)
    if got is not None:
      raise BilevelValidationError(
          f"{what} {name}(x, y, batch) must return a {expects}, but it "
          f"returned {got}")
    message = shape_error(jnp.shape(out))
    if message is not None:
      raise BilevelValidationError(
          f"{what} {name}(x, y, batch) must return {message}")
    if not jnp.issubdtype(jnp.result_type(out), jnp.floating):
      raise BilevelValidationError(
          f"{what} {name}(x, y, batch) must return {floating}, got dtype "
          f"{jnp.result_type(out)}.")
    return out

  setattr(wrapped, marker, True)
  wrapped.__name__ = getattr(fn, "__name__", name)
  wrapped.__wrapped__ = fn
  return wrapped


def scalar_objective(fn: Objective, name: str) -> Objective:
  """Wraps ``fn`` so that a non-scalar or non-floating output fails clearly."""
  def shape_error(shape):
    if shape == ():
      return None
    return (f"a scalar, but it returned an array of shape {shape}. Reduce it, "
            "e.g. with jnp.mean, before returning.")

  return checked_output(fn, name, expects="scalar",
                        floating="a floating scalar", what="the objective",
                        shape_error=shape_error, marker="_jaxbilevel_checked")


def depends_on(fn: Callable[[PyTree], Array], arg: PyTree) -> bool:
  """Whether ``fn(arg)`` depends structurally on ``arg`` (conservative).

  Traces ``fn`` to a jaxpr and follows data dependencies from its inputs to
  its output. Any primitive with a dependent input is treated as producing
  dependent outputs, so the answer is False only when the output provably
  does not read ``arg`` (e.g. an upper objective that ignores ``x``).
  """
  return _jaxpr_depends(jax.make_jaxpr(fn)(arg).jaxpr)


def _jaxpr_depends(jaxpr) -> bool:
  dependent = set(id(v) for v in jaxpr.invars)
  for eqn in jaxpr.eqns:
    if any(not isinstance(v, jax_core.Literal) and id(v) in dependent
           for v in eqn.invars):
      dependent.update(id(v) for v in eqn.outvars)
  return any(not isinstance(v, jax_core.Literal) and id(v) in dependent
             for v in jaxpr.outvars)


def checked_gradient(fn: Callable[[PyTree], Array], arg: PyTree,
                     on_independent: Callable[[], None]) -> PyTree:
  """``jax.grad(fn)(arg)``, first calling ``on_independent()`` if ``fn`` ignores ``arg``.

  ``fn`` is traced once: the dependence test of :func:`depends_on` and the
  gradient share its jaxpr, so the check costs no second trace of a (possibly
  large) objective.
  """
  closed = jax.make_jaxpr(fn)(arg)
  if not _jaxpr_depends(closed.jaxpr):
    on_independent()
  flat_fn = jax_core.jaxpr_as_fun(closed)
  return jax.grad(lambda a: flat_fn(*jax.tree.leaves(a))[0])(arg)


def check_optimizers(**optimizers) -> None:
  """Checks that each keyword argument is an optax gradient transformation."""
  for name, opt in optimizers.items():
    if not (callable(getattr(opt, "init", None))
            and callable(getattr(opt, "update", None))):
      raise BilevelValidationError(
          f"{name} must be an optax GradientTransformation (e.g. "
          f"optax.sgd(0.1), optax.adam(1e-3) or an optax.chain), got "
          f"{opt!r} of type {type(opt).__name__}.")
    message = _probe_optimizer(opt, name)
    if message is not None:
      raise BilevelValidationError(message)


def optimizer_failure(optimizer, err: Exception, name: str) -> Optional[str]:
  """Explains why ``optimizer.update`` raised ``err``, when the cause is known.

  Two causes are recognised: an optimizer that needs extra arguments (e.g.
  ``optax.lbfgs`` needs ``value``, ``grad`` and ``value_fn``; a bilevel
  method passes none), and a hyperparameter given as a string (e.g.
  ``optax.sgd("0.1")``), found among the values its functions close over.
  Returns the message, or None when the cause is something else.
  """
  missing = re.search(r"missing \d+ required keyword-only arguments?: (.*)",
                      str(err))
  if isinstance(err, TypeError) and missing:
    args = ", ".join(re.findall(r"'(\w+)'", missing.group(1)))
    return (
        f"{name} needs extra arguments ({args}) that a bilevel method does "
        "not pass to its optimizers, so it is not supported (optax.lbfgs "
        "needs value, grad and value_fn; optax.contrib.reduce_on_plateau "
        "needs value). Use a first-order optimizer such as optax.sgd or "
        "optax.adam, with an optax schedule to change the learning rate. "
        f"Original error: {err}")
  strings = _closure_strings(optimizer)
  if isinstance(err, (TypeError, ValueError)) and strings:
    held = ", ".join(f"{k}={v!r}" for k, v in strings)
    empty = (" (optax.sgd(\"0.1\") keeps -1 * \"0.1\", which is '')"
             if any(v == "" for _, v in strings) else "")
    return (
        f"{name} holds a string where optax expects a number ({held}){empty}:"
        " a learning rate or another hyperparameter was given as a string. "
        "Pass numbers, e.g. optax.sgd(0.1) instead of optax.sgd(\"0.1\"). "
        f"Original error: {err}")
  return None


def _closure_strings(obj, depth: int = 0) -> list:
  """``(name, value)`` of the strings that ``obj``'s functions close over.

  Follows optax's transformations (named tuples of closures, chains holding
  tuples of them) a few levels down. Only strings that spell a number are
  reported (see :func:`_numeric_string`), and not inside containers (e.g. the
  labels of ``optax.partition``).

  It reads closures, which nothing else in the library does, and only after
  optax has already raised: an optax optimizer is a pair of closures, and
  its hyperparameters are visible nowhere else. No behaviour depends on it;
  it words the error.
  """
  if depth > 8:
    return []
  found = []
  if isinstance(obj, (tuple, list)):
    for item in obj:
      found += _closure_strings(item, depth + 1)
  elif isinstance(obj, dict):
    for item in obj.values():
      if not isinstance(item, str):
        found += _closure_strings(item, depth + 1)
  elif isinstance(obj, functools.partial):
    found += _closure_strings(obj.func, depth + 1)
  elif callable(obj) and getattr(obj, "__closure__", None):
    for var, cell in zip(obj.__code__.co_freevars, obj.__closure__):
      try:
        value = cell.cell_contents
      except ValueError:  # an empty cell
        continue
      if isinstance(value, str):
        if _numeric_string(value):
          found.append((var, value))
      else:
        found += _closure_strings(value, depth + 1)
  # The same closure is reached through init and update: report it once.
  return list(dict.fromkeys(found))


def _numeric_string(text: str) -> bool:
  """Whether ``text`` is a number written as a string (or ``''``).

  ``''`` is what ``optax.sgd("0.1")`` keeps: it negates the learning rate as
  ``-1 * "0.1"``, which Python evaluates to the empty string. Other strings
  (``mode="hard"``) are legitimate options and are not reported.
  """
  if not text:
    return True
  try:
    float(text)
    return True
  except ValueError:
    return False


def _probe_optimizer(opt, name: str) -> Optional[str]:
  """Tries ``opt`` on a scalar variable (abstractly) at construction time.

  Catches optimizers that can never work in a bilevel method (see
  :func:`optimizer_failure`) before any params are given. Only the
  recognised causes are reported: an optimizer that fails on a scalar for
  other reasons (e.g. ``optax.partition`` with labels for a pytree) is left
  to the check at trace time, where the real params are known.
  """
  def step(p):
    return opt.update(p, opt.init(p), p)

  try:
    jax.eval_shape(step, jax.ShapeDtypeStruct((), jnp.float32))
  except Exception as err:  # pylint: disable=broad-except
    return optimizer_failure(opt, err, name)
  return None


def level_arguments(upper_optimizer, lower_optimizer, value_optimizer, proj_x,
                    proj_y):
  """Validates the per-level arguments every method takes.

  Returns ``(value_optimizer, proj_x, proj_y)``: the value tracker's
  optimizer defaults to ``lower_optimizer`` (with its own state), and missing
  projections become the identity.
  """
  value_optimizer = lower_optimizer if value_optimizer is None else (
      value_optimizer)
  check_optimizers(upper_optimizer=upper_optimizer,
                   lower_optimizer=lower_optimizer,
                   value_optimizer=value_optimizer)
  return (value_optimizer, optional_projection(proj_x, "proj_x"),
          optional_projection(proj_y, "proj_y"))


def inner_start(init, x, y, method: str):
  """``init(x, y)``, checked to have the structure, shapes and dtypes of ``y``."""
  y0 = init(x, y)
  check_same_structure(y0, y, "init(x, y)", "params.y", method)
  return jax.tree.map(lambda a, b: jnp.asarray(a).astype(b.dtype), y0, y)


def optional_projection(proj: Optional[Projection], name: str) -> Projection:
  """Returns ``proj`` or the identity; fails clearly if it is not callable."""
  if proj is None:
    return lambda tree: tree
  if not callable(proj):
    raise BilevelValidationError(
        f"{name} must be a callable pytree -> pytree (see "
        f"jaxbilevel.projections), got {type(proj).__name__}.")
  return checked_projection(proj, name)


def checked_projection(proj: Projection, name: str) -> Projection:
  """Wraps ``proj`` so that its output is checked against its input.

  A projection must return the structure, shapes and dtypes of the variables
  it projects: a scalar returned for a vector would otherwise be broadcast
  silently by the update, and another shape or dtype fails inside
  ``lax.scan`` with an error that does not name the projection. The check
  reads only static shapes, so it costs nothing at run time.
  """
  if getattr(proj, "_jaxbilevel_projection", False):
    return proj

  def wrapped(tree):
    out = proj(tree)
    fix = (f" {name} must return a pytree with the structure, shapes and "
           "dtypes of its input (project each leaf, e.g. jax.tree.map("
           "lambda v: jnp.clip(v, lo, hi).astype(v.dtype), tree)).")
    s_in, s_out = jax.tree.structure(tree), jax.tree.structure(out)
    if s_in != s_out:
      raise BilevelValidationError(
          f"{name} changed the structure of the variables:\n  input:  "
          f"{s_in}\n  output: {s_out}\n" + fix)
    for path, a, b in zip(
        [p for p, _ in jax.tree_util.tree_leaves_with_path(tree)],
        jax.tree.leaves(tree), jax.tree.leaves(out)):
      where = f"the leaf {jax.tree_util.keystr(path)}" if path else "a leaf"
      if jnp.shape(a) != jnp.shape(b):
        raise BilevelValidationError(
            f"{name} returned shape {jnp.shape(b)} for {where} of shape "
            f"{jnp.shape(a)}." + fix)
      if jnp.result_type(a) != jnp.result_type(b):
        raise BilevelValidationError(
            f"{name} returned dtype {jnp.result_type(b)} for {where} of "
            f"dtype {jnp.result_type(a)}." + fix)
    return out

  wrapped._jaxbilevel_projection = True  # pylint: disable=protected-access
  wrapped.__wrapped__ = proj
  return wrapped


# ---------------------------------------------------------------------------
# Pieces of every method's update.
# ---------------------------------------------------------------------------


def init_state_fields(params, method: str, diagnostics_keys, upper_optimizer,
                      lower_optimizer=None, value_optimizer=None) -> dict:
  """Checks ``params`` and returns the fields every method's state starts with.

  ``count`` (0), ``upper_state`` (and ``lower_state`` when a lower optimizer
  is given) initialised on ``params``, and zero ``diagnostics`` with the keys
  the method's update writes; with a ``value_optimizer``, also the lower-level
  value tracker: ``y_g`` (started at ``params.y``) and its ``value_state``.
  Use as ``State(**init_state_fields(...), other_field=...)``.
  """
  refuse_optax_wrappers(method)
  params = check_params(params, method)
  fields = dict(count=jnp.zeros([], jnp.int32),
                upper_state=upper_optimizer.init(params.x))
  if lower_optimizer is not None:
    fields["lower_state"] = lower_optimizer.init(params.y)
  if value_optimizer is not None:
    fields["value_state"] = value_optimizer.init(params.y)
    fields["y_g"] = params.y
  fields["diagnostics"] = empty_diagnostics(diagnostics_keys,
                                            params_dtype(params))
  return fields


def begin_step(params, method: str, **trackers):
  """The checks every ``step`` starts with; returns ``(params, dtype)``.

  Validates ``params`` and checks that each lower-level tracker kept in the
  state (given as ``name=tree``) has the structure of ``params.y``. (The
  ``update`` that :func:`bilevel_transformation` derives from the step also
  refuses incoming updates and the optax wrappers that cannot mean anything
  for a bilevel method: see :func:`check_updates_structure` and
  :func:`refuse_optax_wrappers`.)
  """
  params = check_params(params, method)
  for name, tree in trackers.items():
    check_same_structure(tree, params.y, f"state.{name}", "params.y", method)
  return params, params_dtype(params)


def _optax_wrapper_codes() -> dict:
  """The code objects of the optax wrappers a bilevel method refuses."""
  probe = optax.apply_if_finite(optax.identity(), 1)
  return {
      optax.MultiSteps.init.__code__: "optax.MultiSteps",
      optax.MultiSteps.update.__code__: "optax.MultiSteps",
      probe.init.__code__: "optax.apply_if_finite",
      probe.update.__code__: "optax.apply_if_finite",
  }


_WRAPPER_FIXES = {
    "optax.MultiSteps": (
        "optax.MultiSteps accumulates the incoming updates (gradients) over "
        "k calls, but a bilevel method computes its updates itself, so it "
        "would take k full bilevel steps and apply only the last one. "
        "Accumulate inside one bilevel step instead: wrap the objectives as "
        "jaxbilevel.objectives.accumulate(f, num_microbatches) and "
        "jaxbilevel.objectives.accumulate(g, num_microbatches) and pass the "
        "whole batch, whose leading axis is split into micro-batches."),
    "optax.apply_if_finite": (
        "optax.apply_if_finite checks the incoming updates, which are None "
        "for a bilevel method (it computes them itself), so it can never "
        "see a non-finite bilevel step. Use jaxbilevel.apply_if_finite(tx, "
        "max_consecutive_errors), which checks the updates the method "
        "returns and keeps the previous state when they are not finite."),
    "optax.inject_hyperparams": (
        "optax.inject_hyperparams calls every callable argument not listed "
        "in static_args as a schedule of the step count, so it would call "
        "the objectives as f(step) and fail. Use "
        "jaxbilevel.inject_hyperparams(method)(...), which injects exactly "
        "the float hyperparameters (gamma, eta, step sizes, ...) and keeps "
        "the other arguments static (or list f, g and every other "
        "non-numeric argument in static_args). To sweep hyperparameters, use "
        "jaxbilevel.sweep or build the method inside jax.jit / jax.vmap: "
        "its hyperparameters accept traced values and schedules step -> "
        "value. To inject an optimizer's hyperparameters, wrap the per-level "
        "optimizer instead, e.g. upper_optimizer="
        "optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)."),
}


def refuse_inject_hyperparams(method: str, caller) -> None:
  """Raises when ``caller`` (a frame) is ``optax.inject_hyperparams``' code.

  ``optax.inject_hyperparams(builder)(f, g, ...)`` binds the builder's
  signature, then, unless ``f`` and ``g`` are in its ``static_args``, calls
  them as schedules ``f(step)`` and fails there with a ``TypeError`` from
  the user's function, before any code of ours runs. Binding the signature
  is the one step that reaches us first: the signature of a method builder
  (see ``programs.bilevel_method``) calls this from its ``bind``, and, as
  :func:`refuse_optax_wrappers` does for the wrappers of ``init`` and
  ``update``, recognises the caller by its code object; its ``static_args``
  (a variable of that frame) tell whether the objectives are kept static, as
  :func:`jaxbilevel.inject_hyperparams` and the documented use do.
  """
  global _INJECT_CODE
  if _INJECT_CODE is None:
    _INJECT_CODE = optax.inject_hyperparams(lambda: None).__code__
  if caller is None or caller.f_code is not _INJECT_CODE:
    return
  static = caller.f_locals.get("static_args", ())
  if not {"f", "g"} <= set(static):
    raise BilevelValidationError(
        f"{method} cannot be wrapped in optax.inject_hyperparams: "
        + _WRAPPER_FIXES["optax.inject_hyperparams"])


_INJECT_CODE = None


def refuse_optax_wrappers(method: str, max_depth: int = 24) -> None:
  """Raises when ``init``/``update`` is called from a refused optax wrapper.

  ``optax.MultiSteps`` fails inside its own ``jax.tree.map`` on the ``None``
  updates before it calls the method's ``update``, and
  ``optax.apply_if_finite`` fails in its ``lax.cond``, both with structure
  errors that do not say why. The method's ``init`` and ``update`` are the
  only code of ours they run first, so those look up the Python call stack
  (at trace time, for a few frames) for the wrappers' code and explain what
  to use instead.
  """
  global _WRAPPER_CODES
  if _WRAPPER_CODES is None:
    _WRAPPER_CODES = _optax_wrapper_codes()
  # Why the stack: optax's wrappers pass nothing to the wrapped update that
  # says they are there (no argument, no state of ours), so no explicit
  # channel can tell; the look-up only words an error (nothing else depends
  # on it) and costs a few frames at trace time.
  frame = sys._getframe(1)  # pylint: disable=protected-access
  for _ in range(max_depth):
    if frame is None:
      return
    wrapper = _WRAPPER_CODES.get(frame.f_code)
    if wrapper is not None:
      raise BilevelValidationError(
          f"{method} cannot be wrapped in {wrapper}: "
          + _WRAPPER_FIXES[wrapper])
    frame = frame.f_back


_WRAPPER_CODES = None


class BilevelTransformation(optax.GradientTransformationExtraArgs):
  """A bilevel method: optax's ``init``/``update`` and a ``step`` that returns the new params.

  It *is* an :class:`optax.GradientTransformationExtraArgs` (``tx.init``,
  ``tx.update``, composable with optax's combinators) with one more
  callable::

    new_params, new_state = tx.step(params, state, batch=batch,
                                    diagnostics=False)

  ``step`` does exactly the work of ``update`` followed by
  ``optax.apply_updates`` but hands back the new iterates it computed, instead
  of their difference from ``params`` that optax's contract asks ``update``
  to return (which the caller then adds back: two elementwise passes over
  every variable, at every step). It is what :func:`jaxbilevel.run`,
  :func:`jaxbilevel.scan_run` and :func:`jaxbilevel.sweep` call, and what a
  hand-written loop should call too; :func:`jaxbilevel.step` calls it when it
  exists and ``update`` + ``optax.apply_updates`` otherwise (a transformation
  wrapped by an optax combinator).

  Both ``update`` and ``step`` take the keyword ``diagnostics``: ``False``
  (the default) computes nothing for the record and leaves every diagnostic
  in the state NaN; ``True`` computes them all; a tuple of names computes
  those. It is a static (Python) value.

  ``step`` is not a field of the tuple (``init, update = tx`` still
  unpacks): it lives on the instance. ``tx._replace`` drops it, and
  :func:`jaxbilevel.step` then falls back to ``update``.

  A method built by a public constructor is a **value**: a pytree whose
  leaves are its floating-point hyperparameters (``gamma``, step sizes) and
  whose static part is everything else (objectives, optimizers, loop
  lengths). ``jax.jit`` of a function that takes ``tx`` as an argument
  therefore compiles once for every ``gamma``, and ``jax.vmap`` maps over a
  stack of methods. ``tx.arguments`` holds the call that built it.
  """

  # A NamedTuple subclass without __slots__ has an instance __dict__, which
  # holds ``step``: adding a third field would break optax code and user
  # code that unpacks ``init, update = tx``.

  def __new__(cls, init, update, step=None):
    tx = super().__new__(cls, init, update)
    tx.step = step
    # The call that built it (set by the public constructors): what makes a
    # method a pytree of its hyperparameters (see ``values``).
    tx.arguments = None
    return tx


def check_state_type(state, init_fn: Callable, params, method: str,
                     cache: list) -> None:
  """Refuses a ``state`` that is not of the type ``init_fn(params)`` returns.

  The state of another method (e.g. PBGD-Free's given to ALT-PBGD) would
  otherwise fail inside the step on a missing field, without saying that the
  state is the problem. The expected type is found once, by tracing
  ``init_fn`` on abstract values (nothing is computed), and kept in ``cache``
  (a list owned by the transformation).
  """
  if not cache:
    cache.append(type(jax.eval_shape(init_fn, params)))
  if type(state) is not cache[0]:
    raise BilevelValidationError(
        f"{method}: state is of type {type(state).__name__}, but {method}'s "
        f"state is of type {cache[0].__name__} (what its init returns): the "
        "state comes from another method. Pass the state that this "
        "transformation's init returned, or the state of a run of the same "
        "method.")


def bilevel_transformation(init_fn: Callable, step_fn: Callable,
                           method: str) -> BilevelTransformation:
  """A :class:`BilevelTransformation` from a method's ``init`` and ``step``.

  ``step_fn(params, state, *, batch=None, diagnostics=False, **extra_args)``
  computes one outer iteration and returns ``(new_params, new_state)``; it
  begins with :func:`begin_step`. ``update`` is derived from it: it refuses
  incoming updates (a bilevel method computes both levels' updates itself)
  and returns ``new_params - params``, as optax's contract requires.
  """

  state_type = []  # the type of this method's state, found on first use

  def update_fn(updates, state, params=None, **extra_args):
    refuse_optax_wrappers(method)
    params = check_params(params, method)
    check_updates_structure(updates, params, method)
    check_state_type(state, init_fn, params, method, state_type)
    new_params, new_state = step_fn(params, state, **extra_args)
    return optax.tree_utils.tree_sub(new_params, params), new_state

  def step(params, state, **extra_args):
    check_state_type(state, init_fn, params, method, state_type)
    new_params, new_state = step_fn(params, state, **extra_args)
    # The dtype of each param, as optax.apply_updates would keep it (a
    # no-op in the usual case where the step preserves dtypes).
    new_params = jax.tree.map(
        lambda n, p: n if n.dtype == jnp.asarray(p).dtype
        else n.astype(jnp.asarray(p).dtype), new_params, params)
    return new_params, new_state

  return BilevelTransformation(init_fn, update_fn, step)


def step(tx: optax.GradientTransformation, params, state, *, batch=None,
         diagnostics=False, **extra_args):
  """One step of ``tx``: returns ``(new_params, new_state)``.

  For a bilevel method (a :class:`BilevelTransformation`) this is
  ``tx.step``, which returns the new iterates directly; for any other
  transformation (an optax combinator around a method, such as
  ``optax.chain`` or :func:`jaxbilevel.apply_if_finite`) it is
  ``tx.update(None, state, params, ...)`` followed by
  ``optax.apply_updates``. Use it in a hand-written loop to run at the
  drivers' speed.

  Args:
    tx: a bilevel method, or an optax transformation around one.
    params: the current :class:`BilevelParams`.
    state: ``tx``'s state.
    batch: the batch handed to ``f`` and ``g``.
    diagnostics: ``False`` (nothing computed for the record: the state's
      diagnostics are NaN), ``True`` (all of them) or a tuple of names.
    **extra_args: further keyword arguments for ``tx.update``.

  Returns:
    ``(new_params, new_state)``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> f = lambda x, y, batch: jnp.sum((y - 1.0) ** 2) + 0.1 * jnp.sum(x ** 2)
    >>> g = lambda x, y, batch: jnp.sum((y - x) ** 2)
    >>> tx = jbl.alt_pbgd(f, g, gamma=1000.0, upper_optimizer=optax.sgd(0.1),
    ...                   lower_optimizer=optax.sgd(0.2), inner_steps=5)
    >>> params = jbl.BilevelParams(x=jnp.zeros(3), y=jnp.zeros(3))
    >>> def body(carry, _):
    ...   params, state = carry
    ...   return jbl.step(tx, params, state), None
    >>> (params, state), _ = jax.lax.scan(body, (params, tx.init(params)),
    ...                                   length=500)
    >>> jnp.round(params.x, 3).tolist()
    [0.909, 0.909, 0.909]
  """
  own_step = getattr(tx, "step", None)
  if own_step is not None:
    return own_step(params, state, batch=batch, diagnostics=diagnostics,
                    **extra_args)
  updates, new_state = tx.update(None, state, params, batch=batch,
                                 diagnostics=diagnostics, **extra_args)
  return optax.apply_updates(params, updates), new_state


# Cached: ``jnp.issubdtype`` costs more than the rest of a run's host-side
# checks of a small model.
@functools.lru_cache(maxsize=None)
def is_floating(dtype) -> bool:
  """``jnp.issubdtype(dtype, jnp.floating)``, cached."""
  return jnp.issubdtype(dtype, jnp.floating)


@functools.lru_cache(maxsize=None)
def is_integer(dtype) -> bool:
  """``jnp.issubdtype(dtype, jnp.integer)``, cached."""
  return jnp.issubdtype(dtype, jnp.integer)


def params_dtype(params: BilevelParams):
  """The common floating dtype of all variables (used for diagnostics)."""
  leaves = jax.tree.leaves(params)
  if leaves and all(isinstance(leaf, jax.Array) and not leaf.weak_type
                    and leaf.dtype == leaves[0].dtype for leaf in leaves):
    return leaves[0].dtype  # the common case: no promotion to work out
  return jnp.result_type(*leaves)


def recorded_names(diagnostics, names, method: str) -> frozenset:
  """The diagnostics a step computes, from its ``diagnostics=`` argument.

  Args:
    diagnostics: ``False`` or ``None`` (none), ``True`` (all of ``names``), a
      name or a sequence of names. A static Python value.
    names: the diagnostics the method records.
    method: the method's name, for the error message.

  Returns:
    A frozenset of names.

  Examples:
    >>> from jaxbilevel._src import base
    >>> sorted(base.recorded_names(("f",), ("f", "g"), "alt_pbgd"))
    ['f']
    >>> sorted(base.recorded_names(True, ("f", "g"), "alt_pbgd"))
    ['f', 'g']
  """
  if diagnostics is None or diagnostics is False:
    return frozenset()
  if diagnostics is True:
    return frozenset(names)
  if isinstance(diagnostics, str):
    diagnostics = (diagnostics,)
  try:
    chosen = tuple(diagnostics)
  except TypeError:
    chosen = None
  if chosen is None or not all(isinstance(n, str) for n in chosen):
    raise BilevelValidationError(
        f"{method}: diagnostics must be True, False or a sequence of "
        f"diagnostic names, as a static Python value, got {diagnostics!r} "
        "(under jax.jit, mark it static: jax.jit(tx.update, "
        "static_argnames='diagnostics') or functools.partial(tx.update, "
        f"diagnostics=True)); this method records {list(names)}.")
  unknown = sorted(set(chosen) - set(names))
  if unknown:
    raise BilevelValidationError(
        f"{method}: diagnostics={chosen!r}: {unknown} not recorded by this "
        f"method; it records {list(names)}.")
  return frozenset(chosen)


def diagnostic_norm(tree) -> Array:
  """The norm of ``tree`` for a diagnostic (``optax.tree_utils.tree_norm``)."""
  return optax.tree_utils.tree_norm(tree)


def recorded_lower_value(g, x, y, batch):
  """Two thunks, ``g(x, y)`` and ``‖∇_y g(x, y)‖``, sharing one reverse pass.

  For methods whose step does not evaluate them: the pass serves only the
  record, so it is traced only when :func:`diagnostics` calls a thunk (when
  ``g`` or ``lower_grad_norm`` is recorded).
  """
  cache = []

  def both():
    if not cache:
      value, grad = jax.value_and_grad(g, argnums=1)(x, y, batch)
      cache.append((value, optax.tree_utils.tree_norm(grad)))
    return cache[0]

  return (lambda: both()[0]), (lambda: both()[1])


def incoming_record(f, g, x, y, batch, *, f_value=None, g_value=None,
                    lower_grad_norm=None) -> dict:
  r"""``f``, ``g`` and ``lower_grad_norm`` at the step's incoming point.

  Every method records the shared diagnostics at the same point, the
  :math:`(x_t, y_t)` that the step receives: :math:`f(x_t,y_t)`,
  :math:`g(x_t,y_t)` and :math:`\|\nabla_y g(x_t,y_t)\|` (the lower
  problem's stationarity there). A value the step computes anyway (``f`` and
  ``g`` from the pass of a first inner gradient, :math:`\nabla_y g` of BOME's
  value gap) is passed in; the others are thunks, computed only when recorded
  (:func:`diagnostics`), ``g`` and the norm sharing one reverse pass.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbilevel._src import base
    >>> g = lambda x, y, batch: jnp.sum((y - x) ** 2)
    >>> record = base.incoming_record(None, g, jnp.zeros(2), jnp.ones(2),
    ...                               None, f_value=jnp.asarray(0.5))
    >>> d = base.diagnostics(jnp.float32, {"f", "g", "lower_grad_norm"},
    ...                      **record)
    >>> float(d["f"]), float(d["g"]), round(float(d["lower_grad_norm"]), 4)
    (0.5, 2.0, 2.8284)
  """
  g_thunk, norm_thunk = recorded_lower_value(g, x, y, batch)
  return {"f": (lambda: f(x, y, batch)) if f_value is None else f_value,
          "g": g_thunk if g_value is None else g_value,
          "lower_grad_norm": (norm_thunk if lower_grad_norm is None
                              else lower_grad_norm)}


def diagnostics(dtype, record, **values) -> dict:
  """A diagnostics dict of scalars cast to ``dtype``; NaN where not recorded.

  Each value is an array or a zero-argument callable (a quantity computed
  only for the record, such as a gradient norm or an extra evaluation); it
  is evaluated only when its name is in ``record`` (see
  :func:`recorded_names`). A diagnostic not recorded is NaN, so that it can
  never be mistaken for a computed value.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbilevel._src import base
    >>> d = base.diagnostics(jnp.float32, {"f"}, f=lambda: 1.5, g=2.0)
    >>> float(d["f"]), bool(jnp.isnan(d["g"]))
    (1.5, True)
  """
  nan = jnp.full((), jnp.nan, dtype)
  return {k: jnp.asarray(v() if callable(v) else v, dtype=dtype)
          if k in record else nan for k, v in values.items()}


def empty_diagnostics(keys, dtype) -> dict:
  """Diagnostics before the first step: NaN (nothing computed yet)."""
  return {k: jnp.full((), jnp.nan, dtype=dtype) for k in keys}


COMMON_DIAGNOSTICS = ("f", "g", "upper_grad_norm", "lower_grad_norm")
"""Diagnostics every method records (a penalty method, F2SA included, adds
``gamma``, BOME ``multiplier``, ALRIGHT ``probability``: see
docs/vocabulary.md)."""


# ---------------------------------------------------------------------------
# Deprecated names (one vocabulary across methods; see docs/vocabulary.md).
# ---------------------------------------------------------------------------


def _deprecation_message(method: str, old: str, new: str) -> str:
  return (f"{method}: {old} is deprecated and will be removed in the next "
          f"release; use {new} instead (see the vocabulary table of the "
          "docs, docs/vocabulary.md).")


def renamed_arguments(method: str, renames: dict) -> Callable:
  """Decorator: accepts deprecated keyword names of a method constructor.

  ``renames`` maps an old keyword to its new name, or to ``(new, convert)``
  where ``convert(old_value)`` gives the new argument's value (e.g.
  ``warm_start=False`` becomes ``inner_start="initial"``). An old keyword
  emits a :class:`DeprecationWarning` that names the new one; passed as
  ``None`` (its old default) it is dropped, so the new argument keeps its
  default. Passing an old name together with its new one is an error.

  Put it under :func:`jaxbilevel._src.programs.bilevel_method` (closer to the
  function), so that the public signature is the new one.

  Examples:
    >>> import warnings
    >>> @renamed_arguments("demo", {"omega_steps": "value_steps"})
    ... def demo(*, value_steps=1):
    ...   return value_steps
    >>> with warnings.catch_warnings(record=True) as caught:
    ...   warnings.simplefilter("always")
    ...   demo(omega_steps=3)
    3
    >>> "use value_steps" in str(caught[0].message)
    True
  """
  def decorate(constructor):
    @functools.wraps(constructor)
    def wrapper(*args, **kwargs):
      for old, target in renames.items():
        if old not in kwargs:
          continue
        new, convert = (target if isinstance(target, tuple)
                        else (target, lambda v: v))
        value = kwargs.pop(old)
        hint = new
        if isinstance(target, tuple) and value is not None:
          # Name the new value, e.g. warm_start=False -> inner_start='initial'.
          converted = convert(value)
          hint = (f"{new}={converted!r}" if isinstance(
              converted, (str, numbers.Number)) else new)
        warnings.warn(_deprecation_message(method, f"the argument {old}", hint),
                      DeprecationWarning, stacklevel=_caller_stacklevel())
        if value is None:
          continue
        if new in kwargs:
          raise BilevelValidationError(
              f"{method}: got both {old} (deprecated) and {new}; pass only "
              f"{new}.")
        kwargs[new] = convert(value)
      return constructor(*args, **kwargs)

    return wrapper

  return decorate


def _caller_stacklevel() -> int:
  """The ``stacklevel`` that points a warning at the user's call of a builder.

  Called from :func:`renamed_arguments`' wrapper (stack level 1 is the
  ``warnings.warn`` call there): the frames above it that belong to
  jaxbilevel's own decorators (this wrapper, stacked ones included, and
  :func:`jaxbilevel._src.programs.bilevel_method`) are skipped, whatever the
  order and the number of decorations, so that Python's default filters
  attribute the warning to the line that called the builder.
  """
  global _DECORATOR_CODES
  if _DECORATOR_CODES is None:
    # pylint: disable-next=import-outside-toplevel
    from jaxbilevel._src import programs
    _DECORATOR_CODES = frozenset((
        renamed_arguments("", {})(lambda: None).__code__,
        programs.bilevel_method(lambda: None).__code__))
  # Why the stack: ``warnings.warn`` takes a count of frames, and that count
  # depends on how many of our decorators wrap the builder; it only chooses
  # which line a deprecation warning names.
  frame = sys._getframe(2)  # pylint: disable=protected-access
  level = 2
  while frame is not None and frame.f_code in _DECORATOR_CODES:
    frame, level = frame.f_back, level + 1
  return level


_DECORATOR_CODES = None


def deprecated_field(old: str, new: str) -> property:
  """A read-only state attribute ``old`` that warns and returns ``new``."""
  def get(self):
    warnings.warn(_deprecation_message(
        type(self).__name__, f"the state field {old}", new),
                  DeprecationWarning, stacklevel=2)
    return getattr(self, new)

  return property(get, doc=f"Deprecated alias of ``{new}``.")


def check_start(start, method: str, name: str, choices) -> Any:
  """Checks an inner-start option: one of ``choices`` or ``(x, y) -> y0``."""
  if callable(start) or (isinstance(start, str) and start in choices):
    return start
  raise BilevelValidationError(
      f"{method}: {name} must be one of {tuple(choices)} or a callable "
      f"(x, y) -> y0, got {start!r}.")
