"""The options of the drivers, checked once for ``run``, ``scan_run``, ``sweep`` and ``resumable_run``.

Batches, ``record``/``record_every``, ``diagnostics=``, the non-finite mode,
the transformation and a given state are validated here, at trace time or
before it, with messages that name the argument and the fix; the drivers
call these checks rather than each its own.
"""

from __future__ import annotations


from typing import NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbilevel._src import base


NONFINITE_MODES = ("stop", "skip", "raise", "ignore")


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


def check_batches(batch, batches, num_steps):
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


def check_record_every(record, record_every, num_steps, where):
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


def check_transformation(tx, where: str) -> None:
  """Refuses a ``tx`` that is not an optax transformation (e.g. None)."""
  if not isinstance(tx, optax.GradientTransformation):
    raise base.BilevelValidationError(
        f"{where}: tx must be a jaxbilevel method (e.g. jaxbilevel.pbgd_free"
        "(f, g, ...)) or an optax GradientTransformation around one (e.g. "
        f"jaxbilevel.apply_if_finite(method, 3)), got {tx!r:.80} of type "
        f"{type(tx).__name__}.")


def check_given_state(tx, params, state, where: str) -> None:
  """Refuses a given ``state`` of another type than ``tx.init``'s (at trace time).

  A state from another method (or a method without the wrapper ``tx`` has)
  would otherwise fail deep in the step, on a missing field or in the loop's
  carry, without saying that the state is the problem.
  """
  expected = jax.eval_shape(tx.init, params)
  if type(expected) is not type(state):
    raise base.BilevelValidationError(
        f"{where}: state is of type {type(state).__name__}, but this "
        f"transformation's state is of type {type(expected).__name__} (what "
        "tx.init(params) returns): it comes from another method or another "
        "wrapping. Pass the state returned by a run of this same "
        "transformation, or state=None to start from tx.init(params).")


def strongly_typed(tree):
  """Drops weak types (e.g. ``jnp.asarray(1.0)``) so calls share compilations."""
  return jax.tree.map(
      lambda v: v if isinstance(v, jax.Array) and not v.weak_type else
      jnp.asarray(v, dtype=jnp.result_type(v)), tree)


def check_host_call(params, where):
  if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(params)):
    raise base.BilevelValidationError(
        f"{where} drives the run from Python (compiled chunks, progress, "
        "non-finite checks between chunks), so it cannot be called inside "
        "jax.jit, jax.vmap or jax.grad. Inside traced code use "
        "jaxbilevel.scan_run, its pure counterpart (same arguments), or "
        "jaxbilevel.sweep to vmap runs over hyperparameters.")


class DriverOptions(NamedTuple):
  """The options every driver takes, checked (see :func:`check_options`)."""

  num_steps: int
  record_every: int
  diagnostics: Union[bool, tuple]
  on_nonfinite: str


def check_options(where: str, *, num_steps, batch, batches, record,
                  record_every, diagnostics, on_nonfinite,
                  modes=NONFINITE_MODES, why_not: str = "") -> DriverOptions:
  """Checks the options shared by ``run``, ``scan_run``, ``sweep`` and ``resumable_run``.

  Args:
    where: the driver's name, for the messages.
    num_steps, batch, batches, record, record_every, diagnostics,
      on_nonfinite: the driver's arguments of these names.
    modes: the ``on_nonfinite`` values this driver accepts.
    why_not: said after the accepted modes when another one is given (e.g.
      why a compiled driver cannot raise).

  Returns:
    The checked :class:`DriverOptions` (``diagnostics`` as ``True``,
    ``False`` or a tuple of names).
  """
  num_steps = base.check_static_int(num_steps, "num_steps")
  if on_nonfinite not in modes:
    raise base.BilevelValidationError(
        f"{where}: on_nonfinite must be one of {tuple(modes)}{why_not}, got "
        f"{on_nonfinite!r}.")
  check_batches(batch, batches, num_steps)
  record_every = check_record_every(record, record_every, num_steps, where)
  return DriverOptions(num_steps, record_every,
                       diagnostics_option(diagnostics, where), on_nonfinite)
