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
import contextlib
import contextvars
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


def resolve_hyperparameter(value: ScalarOrSchedule, count: Array, dtype, *,
                           positive: bool = True,
                           allow_zero: bool = False) -> Array:
  """Evaluates a float, array or schedule at step ``count`` in ``dtype``.

  Invalid values that could not be checked at construction (traced arrays,
  schedules) become NaN so that the run reports them rather than producing a
  wrong answer.
  """
  v = value(count) if callable(value) else value
  label = getattr(value, "_jaxbilevel_name", None)
  label = (f"the value of the schedule {label}" if label else
           "the value of a hyperparameter schedule" if callable(value) else
           "a hyperparameter")
  message = _not_a_number(v, label, _SCHEDULE_FIX)
  if message is not None:
    raise BilevelValidationError(message)
  concrete = v if _is_concrete(v) else None
  v = jnp.asarray(v, dtype=dtype)
  if jnp.ndim(v) != 0:
    raise BilevelValidationError(
        f"a hyperparameter schedule must return a scalar, got shape "
        f"{jnp.shape(v)}.")
  if positive and concrete is not None and np.asarray(concrete) > 0 and (
      np.asarray(concrete).astype(jnp.dtype(dtype)) == 0):
    raise BilevelValidationError(
        f"{label} = {np.asarray(concrete).item()!r} underflows to 0 in "
        f"{jnp.dtype(dtype).name}, the dtype of the parameters: use a larger "
        "value or float64 parameters (jax.config.update('jax_enable_x64', "
        "True)).")
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
  return int(value)


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
  """Checks that incoming ``updates`` are None (see :func:`begin_update`).

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


def begin_update(updates, params, method: str, **trackers):
  """The checks every ``update`` starts with; returns ``(params, dtype)``.

  Validates ``params`` and the incoming ``updates`` and checks that each
  lower-level tracker kept in the state (given as ``name=tree``) has the
  structure of ``params.y``.

  ``updates`` must be None: a bilevel method computes the updates of both
  levels itself, so a value passed there (gradients, or the placeholder that
  ``optax.MultiSteps`` accumulates) would be ignored, and it is rejected
  instead, with a message that points to
  :func:`jaxbilevel.objectives.accumulate` and :func:`jaxbilevel.apply_if_finite`.
  The optax wrappers that cannot mean anything for a bilevel method are
  refused by name (see :func:`refuse_optax_wrappers`).
  """
  refuse_optax_wrappers(method)
  params = check_params(params, method)
  check_updates_structure(updates, params, method)
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
}


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


def level_updates(params: BilevelParams, x_new, y_new) -> BilevelParams:
  """The updates that ``optax.apply_updates`` turns ``params`` into the new ones.

  Inside :func:`capturing_new_params` the new iterates are also handed to
  the driver, which then uses them directly instead of adding the returned
  difference back to ``params`` (two elementwise passes per variable saved).
  """
  sub = optax.tree_utils.tree_sub
  updates = BilevelParams(x=sub(x_new, params.x), y=sub(y_new, params.y))
  captured = _NEW_PARAMS.get()
  if captured is not None:
    captured.append((params, updates, BilevelParams(x=x_new, y=y_new)))
  return updates


_NEW_PARAMS = contextvars.ContextVar("jaxbilevel_new_params", default=None)


@contextlib.contextmanager
def capturing_new_params():
  """Collects ``(params, updates, new_params)`` of each :func:`level_updates`."""
  captured = []
  token = _NEW_PARAMS.set(captured)
  try:
    yield captured
  finally:
    _NEW_PARAMS.reset(token)


def captured_new_params(captured, params, updates):
  """The method's new params if ``updates`` came unchanged from it, else None.

  A driver calls ``tx.update`` inside :func:`capturing_new_params`. When the
  transformation is a bare method, its ``updates`` are exactly the object
  :func:`level_updates` built from the driver's own ``params``; then the new
  iterates it captured equal ``optax.apply_updates(params, updates)`` up to
  rounding and cost nothing extra. A wrapper that changes the updates (an
  optax chain, a skipped step) or the params leaves the driver on
  ``optax.apply_updates``.
  """
  if len(captured) != 1:
    return None
  seen_params, seen_updates, new_params = captured[0]
  if seen_updates is not updates:
    return None
  if jax.tree.structure(seen_params) != jax.tree.structure(params) or any(
      a is not b for a, b in zip(jax.tree.leaves(seen_params),
                                 jax.tree.leaves(params))):
    return None
  # The dtype optax.apply_updates would give: that of each param.
  return jax.tree.map(lambda n, p: jnp.asarray(n).astype(jnp.asarray(p).dtype),
                      new_params, params)


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


_RECORDING = contextvars.ContextVar("jaxbilevel_recording_diagnostics",
                                    default=True)


@contextlib.contextmanager
def recording_diagnostics(enabled: bool):
  """Within this block, methods traced compute their diagnostics or skip them.

  The drivers trace the step with ``enabled=False`` when the diagnostics are
  not recorded, so that quantities computed only for the record (gradient
  norms) are neither traced nor compiled; a direct ``tx.update`` call always
  computes them.
  """
  token = _RECORDING.set(bool(enabled))
  try:
    yield
  finally:
    _RECORDING.reset(token)


def diagnostics_recorded() -> bool:
  """Whether the step being traced records its diagnostics.

  False inside ``recording_diagnostics(False)`` (the drivers without
  ``diagnostics=True``): a method then skips evaluations made only for the
  record (e.g. ``g`` at the new iterate) and reports them as zero.

  Examples:
    >>> from jaxbilevel._src import base
    >>> with base.recording_diagnostics(False):
    ...   base.diagnostics_recorded()
    False
    >>> base.diagnostics_recorded()
    True
  """
  return _RECORDING.get()


def diagnostic_norm(tree) -> Array:
  """The norm of ``tree`` for a diagnostic: zero, uncomputed, when not recorded."""
  if not diagnostics_recorded():
    leaves = jax.tree.leaves(tree)
    return jnp.zeros((), jnp.result_type(*leaves) if leaves else jnp.float32)
  return optax.tree_utils.tree_norm(tree)


def recorded_lower_value(g, x, y, batch, dtype):
  """``(g(x, y), ‖∇_y g(x, y)‖)`` for the record: zeros, uncomputed, when not recorded.

  For methods whose step does not evaluate ``g`` at the new lower iterate,
  so that doing it costs a pass that only the diagnostics use.
  """
  if not diagnostics_recorded():
    return jnp.zeros((), dtype), jnp.zeros((), dtype)
  value, grad = jax.value_and_grad(g, argnums=1)(x, y, batch)
  return value, optax.tree_utils.tree_norm(grad)


def diagnostics(dtype, **values) -> dict:
  """A diagnostics dict of scalars, all cast to ``dtype``."""
  return {k: jnp.asarray(v, dtype=dtype) for k, v in values.items()}


def empty_diagnostics(keys, dtype) -> dict:
  """Diagnostics before the first step (all zero), with the update's keys."""
  return {k: jnp.zeros((), dtype=dtype) for k in keys}


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
        hint = f"{new}=..." if isinstance(target, tuple) else new
        warnings.warn(_deprecation_message(method, f"the argument {old}", hint),
                      DeprecationWarning, stacklevel=3)
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
