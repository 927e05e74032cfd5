"""Saving and restoring a whole run with orbax-checkpoint, and resuming it exactly.

A run's state is everything a bilevel method's ``update`` needs (see the
method's State NamedTuple: step count, one optax state per level and per
tracker, the trackers themselves) plus the params, the number of steps
taken, the history so far and, optionally, a PRNG key of the caller's.
:func:`save` writes all of it as one orbax checkpoint ``<directory>/<step>``
and :func:`restore` reads it back into the structure of a template, so the
restored NamedTuples, optax states and dtypes are those of the template.

Saves are atomic: orbax writes into a temporary directory and renames it to
``<step>`` only when every item is written, and older checkpoints are
deleted (``max_to_keep``) only after that. A save that is interrupted leaves
at most a temporary directory, which :func:`latest_step` and
:func:`restore` ignore, so the last complete checkpoint stays readable. A
``Ctrl-C`` (SIGINT) during a save is held back until the save is complete and
then raised as ``KeyboardInterrupt`` (a second ``Ctrl-C`` aborts the save at
once); a save stopped by an exception removes its temporary directory.

The metadata of a checkpoint are checked before anything is allocated from
them: they carry a SHA-256 of their own content (so an edited step is
detected), the step must equal the directory's name, and the type name of
the method's state is stored so that resuming with another method says so.

:func:`resumable_run` (in ``resumable.py``) is :func:`jaxbilevel.run` with a
checkpoint every ``save_every`` steps.
"""

from __future__ import annotations

# This module drives jaxbilevel.run's compiled chunks with a global step.
# pylint: disable=protected-access

import contextlib
import glob
import hashlib
import json
import numbers
import os
import shutil
import signal
import threading
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

try:
  import orbax.checkpoint as ocp
except ImportError as _err:  # pragma: no cover - depends on the environment
  raise ImportError(
      "jaxbilevel.checkpoint needs orbax-checkpoint: pip install "
      "orbax-checkpoint (or, in a jaxbilevel checkout, pip install -e "
      "'.[checkpoint]').") from _err

from jaxbilevel._src import base
from jaxbilevel._src import options as options_lib

_FORMAT = "jaxbilevel-run-checkpoint"
_VERSION = 2
# Largest saved PRNG key (elements) that restore allocates.
_MAX_KEY_SIZE = 2 ** 20


class CheckpointError(RuntimeError):
  """A checkpoint is missing, incomplete, corrupt or does not fit the template."""


class RunCheckpoint(NamedTuple):
  """A restored run.

  Attributes:
    params: the :class:`~jaxbilevel.BilevelParams` (structure, dtypes and
      shardings of the template).
    state: the method's state (structure of the template).
    step: the number of outer steps the run had taken when it was saved.
    history: the history dict of NumPy arrays saved with it, or None
      (containers inside ``history["record"]`` come back as dicts and
      lists).
    key: the PRNG key saved with it (typed if it was saved typed), or None.
  """

  params: Any
  state: Any
  step: int
  history: Optional[dict]
  key: Optional[jax.Array]


def checked_directory(directory) -> str:
  if not isinstance(directory, (str, os.PathLike)):
    raise base.BilevelValidationError(
        f"checkpoint directory must be a path (str or os.PathLike), got "
        f"{type(directory).__name__}.")
  return os.path.abspath(os.fspath(directory))


def _is_complete(path: str) -> bool:
  """Whether ``path`` is a finished checkpoint written by :func:`save`.

  Orbax writes ``_CHECKPOINT_METADATA`` when it finalises a step and our
  ``meta`` item holds ``meta/metadata``; a directory that merely has a step
  number as its name (left by a copy, a crash or a user) lacks them.
  """
  return (os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA"))
          and os.path.isfile(os.path.join(path, "meta", "metadata")))


def _steps(directory: str) -> list:
  """The steps of the complete checkpoints (temporary and incomplete excluded)."""
  return sorted(
      step for step in ocp.path.step.checkpoint_steps(directory)
      if _is_complete(os.path.join(directory, str(step))))


def _meta_digest(meta: dict) -> str:
  """SHA-256 of the metadata without its ``checksum`` entry (canonical JSON)."""
  body = {k: v for k, v in meta.items() if k != "checksum"}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def _sigint_deferred():
  """Holds a SIGINT back until the block ends, then raises KeyboardInterrupt.

  Python raises a SIGINT's ``KeyboardInterrupt`` wherever the main thread
  happens to be, and during a save that can be a finalizer (``__del__``),
  where it is printed and dropped, or one of orbax's ``except BaseException``
  blocks, which log it: the run went on. While the block runs, the first
  SIGINT is only recorded; a second one raises at once. Only the main thread
  can own signal handlers, and a handler the caller installed is left alone.
  """
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
    yield
    return
  received = []

  def handler(signum, frame):
    del signum, frame
    if received:
      raise KeyboardInterrupt
    received.append(True)

  signal.signal(signal.SIGINT, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:  # also when the block failed: the user asked to stop
      raise KeyboardInterrupt  # pylint: disable=lost-exception


def _incomplete_steps(directory: str) -> list:
  """Steps of directories named like checkpoints that are not complete."""
  if not os.path.isdir(directory):
    return []
  return sorted(step for step in ocp.path.step.checkpoint_steps(directory)
                if not _is_complete(os.path.join(directory, str(step))))


def _clear_incomplete(directory: str, step: int):
  """Removes empty step directories at or after ``step``; refuses others.

  Orbax counts any directory named like a step as a checkpoint, and would
  not save a step below it.
  """
  for other in _incomplete_steps(directory):
    if other < step:
      continue
    path = os.path.join(directory, str(other))
    try:  # an empty directory named like a step: nothing to lose
      os.rmdir(path)
    except OSError as err:
      raise CheckpointError(
          f"cannot save step {step} in {directory}: {path} is named like a "
          "checkpoint but is not a complete one (left by a copy or an "
          "interrupted tool?); move it away or remove it.") from err


def _remove_temporary(directory: str, step: int):
  """Deletes what an unfinished save of ``step`` left in ``directory``."""
  for path in glob.glob(os.path.join(
      glob.escape(directory), f"{step}.orbax-checkpoint-tmp*")):
    shutil.rmtree(path, ignore_errors=True)


def _leaf_signature(tree) -> list:
  """``[path, shape, dtype]`` of every leaf, to check a template against."""
  return [[jax.tree_util.keystr(path), list(np.shape(leaf)),
           str(jnp.result_type(leaf))]
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def _split_key(key):
  """``(key data array, meta)`` for a typed or raw PRNG key."""
  if key is None:
    return None, None
  if not isinstance(key, (jax.Array, np.ndarray)):
    raise base.BilevelValidationError(
        f"save: key must be a JAX PRNG key (jax.random.key or "
        f"jax.random.PRNGKey), got {type(key).__name__}.")
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    data = jax.random.key_data(key)
    impl = str(jax.random.key_impl(key))
  else:
    data, impl = key, None
  return data, {"impl": impl, "shape": list(np.shape(data)),
                "dtype": str(jnp.result_type(data))}


def latest_step(directory) -> Optional[int]:
  """The step of the newest complete checkpoint in ``directory``, or None.

  Returns None when the directory does not exist or holds no complete
  checkpoint (temporary directories of interrupted saves are ignored).
  """
  directory = checked_directory(directory)
  if not os.path.isdir(directory):
    return None
  steps = _steps(directory)
  return steps[-1] if steps else None


def save(directory, params, state, *, step: int,
         history: Optional[dict] = None, key: Optional[jax.Array] = None,
         max_to_keep: Optional[int] = None,
         settings: Optional[dict] = None) -> str:
  """Saves a run as the checkpoint ``<directory>/<step>`` (atomically).

  Args:
    directory: the run's checkpoint directory (created if needed).
    params: the current :class:`~jaxbilevel.BilevelParams` (any pytree of
      arrays).
    state: the method's state (all optimizer states and trackers).
    step: the number of outer steps taken; it names the checkpoint and must
      exceed every step already saved in ``directory``.
    history: optional history dict (e.g. from :func:`jaxbilevel.run`); it is
      stored as NumPy arrays.
    key: optional PRNG key of the caller (typed or raw), e.g. the key that
      the next steps' batches are drawn from.
    max_to_keep: keep only this many newest checkpoints (older ones are
      deleted after the new one is complete); None keeps all.
    settings: optional dict of JSON values (numbers, strings, booleans,
      lists) stored in the metadata: :func:`resumable_run` stores the
      method's hyperparameters and its ``diagnostics=`` and ``record=``
      options there, and refuses to resume a run with other values.

  Returns:
    The path of the checkpoint directory.

  Raises:
    CheckpointError: if ``step`` does not exceed the newest saved step or the
      write fails.
  """
  directory = checked_directory(directory)
  step = base.check_static_int(step, "step", minimum=0)
  if max_to_keep is not None:
    max_to_keep = base.check_static_int(max_to_keep, "max_to_keep")
  if history is not None and not isinstance(history, dict):
    raise base.BilevelValidationError(
        f"save: history must be a dict of arrays (as returned by "
        f"jaxbilevel.run) or None, got {type(history).__name__}.")
  if history is not None:
    history = dict(history)  # run's History is a dict subclass, not a pytree
  if settings is not None and not isinstance(settings, dict):
    raise base.BilevelValidationError(
        f"save: settings must be a dict of JSON values or None, got "
        f"{type(settings).__name__}.")
  key_data, key_meta = _split_key(key)
  arrays = {"params": params, "state": state}
  if key_data is not None:
    arrays["key"] = key_data
  meta = {"format": _FORMAT, "version": _VERSION, "step": step,
          "has_history": history is not None, "key": key_meta,
          "state_type": type(state).__name__,
          "params": _leaf_signature(params), "state": _leaf_signature(state)}
  if settings is not None:
    meta["settings"] = settings
  meta["checksum"] = _meta_digest(meta)
  items = {"arrays": ocp.args.StandardSave(arrays),
           "meta": ocp.args.JsonSave(meta)}
  if history is not None:
    items["history"] = ocp.args.PyTreeSave(jax.tree.map(np.asarray, history))

  latest = latest_step(directory)
  if latest is not None and step <= latest:
    raise CheckpointError(
        f"cannot save step {step} in {directory}: it already holds a "
        f"checkpoint for step {latest}, and steps must increase. Use a new "
        "directory for a new run.")
  target = os.path.join(directory, str(step))
  _clear_incomplete(directory, step)

  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                         enable_async_checkpointing=False)
  with _sigint_deferred():
    manager = ocp.CheckpointManager(directory, options=options)
    try:
      try:
        saved = manager.save(step, args=ocp.args.Composite(**items))
        manager.wait_until_finished()
      except BaseException as err:  # pylint: disable=broad-except
        _remove_temporary(directory, step)
        if not isinstance(err, Exception):
          raise  # KeyboardInterrupt, SystemExit: cleaned up, passed on
        raise CheckpointError(
            f"saving step {step} in {directory} failed ({short_error(err)}); the "
            "checkpoints saved before are untouched.") from err
      if not saved:
        raise CheckpointError(
            f"orbax declined to save step {step} in {directory}.")
    finally:
      manager.close()
  return target


def short_error(err: Exception, limit: int = 400) -> str:
  text = f"{type(err).__name__}: {err}"
  return text if len(text) <= limit else text[:limit] + " ..."


def _abstract(template):
  """ShapeDtypeStructs with shardings (the default device where none is known)."""
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def leaf(value):
    sharding = getattr(value, "sharding", None)
    if not isinstance(sharding, jax.sharding.Sharding):
      sharding = default
    return jax.ShapeDtypeStruct(np.shape(value), jnp.result_type(value),
                                sharding=sharding)

  return jax.tree.map(leaf, template)


def _check_template(saved: list, template, what: str, path: str):
  """Raises a CheckpointError naming the first leaf where they differ."""
  expected = _leaf_signature(template)
  if saved == expected:
    return
  saved_paths = [s[0] for s in saved]
  expected_paths = [e[0] for e in expected]
  if saved_paths != expected_paths:
    missing = [p for p in saved_paths if p not in expected_paths]
    extra = [p for p in expected_paths if p not in saved_paths]
    raise CheckpointError(
        f"the {what} in {path} do not have the structure of the template: "
        f"the checkpoint has {len(saved_paths)} leaves, the template "
        f"{len(expected_paths)}; only in the checkpoint: {missing[:5]}, only "
        f"in the template: {extra[:5]}. Restore with the same method, "
        "optimizers and parameter tree that the run was saved with.")
  for (p, shape, dtype), (_, shape_t, dtype_t) in zip(saved, expected):
    if (shape, dtype) != (shape_t, dtype_t):
      raise CheckpointError(
          f"the {what} in {path} do not fit the template: {what}{p} was "
          f"saved with shape {tuple(shape)} and dtype {dtype}, the template "
          f"has shape {tuple(shape_t)} and dtype {dtype_t}.")


def _is_signature(value) -> bool:
  """Whether ``value`` looks like :func:`_leaf_signature`'s output."""
  return isinstance(value, list) and all(
      isinstance(leaf, list) and len(leaf) == 3 and isinstance(leaf[0], str)
      and isinstance(leaf[2], str) and isinstance(leaf[1], list)
      and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
              for d in leaf[1]) for leaf in value)


def check_meta(meta, path: str, step: int):
  """Checks the metadata's fields before anything is built from them."""
  if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
    raise CheckpointError(
        f"{path} is not a jaxbilevel run checkpoint (its metadata is "
        f"{str(meta)[:200]}).")
  if meta.get("version") != _VERSION:
    raise CheckpointError(
        f"{path} has checkpoint format version {meta.get('version')}; this "
        f"jaxbilevel reads version {_VERSION}.")
  meta_file = os.path.join(path, "meta", "metadata")

  def invalid(why):
    return CheckpointError(
        f"the checkpoint {path} has invalid metadata ({meta_file}): {why}. "
        "The file was edited or damaged; restore another step.")

  if meta.get("checksum") != _meta_digest(meta):
    raise invalid("its checksum does not match its content")
  saved_step = meta.get("step")
  if (not isinstance(saved_step, int) or isinstance(saved_step, bool)
      or saved_step != step):
    raise invalid(f"it records step {saved_step!r} but is stored as step "
                  f"{step}")
  if not isinstance(meta.get("has_history"), bool):
    raise invalid(f"has_history is {meta.get('has_history')!r}")
  if not isinstance(meta.get("state_type"), str):
    raise invalid(f"state_type is {meta.get('state_type')!r}")
  for part in ("params", "state"):
    if not _is_signature(meta.get(part)):
      raise invalid(f"the {part} entry is missing or malformed")
  if not isinstance(meta.get("settings", {}), dict):
    raise invalid(f"settings is {str(meta.get('settings'))[:100]!r}")
  key = meta.get("key")
  if key is None:
    return
  if not isinstance(key, dict) or set(key) != {"impl", "shape", "dtype"}:
    raise invalid(f"the key entry is malformed ({str(key)[:100]})")
  shape = key["shape"]
  if not _is_signature([["key", shape, "?"]]) or not shape:
    raise invalid(f"the key shape {str(shape)[:100]} is malformed")
  if int(np.prod(shape, dtype=np.float64)) > _MAX_KEY_SIZE:
    raise invalid(f"the key shape {shape} is larger than any PRNG key "
                  f"({_MAX_KEY_SIZE} elements at most)")
  if key["dtype"] not in ("uint32", "uint64", "int32", "int64"):
    raise invalid(f"the key dtype {str(key['dtype'])[:50]!r} is not an "
                  "integer dtype of PRNG key data")
  if key["impl"] is not None:
    try:
      sample = jax.random.key_data(jax.random.key(0, impl=key["impl"]))
    except Exception as err:  # pylint: disable=broad-except
      raise invalid(f"the PRNG implementation {str(key['impl'])[:50]!r} is "
                    f"unknown ({short_error(err, 200)})") from err
    if (tuple(shape[len(shape) - sample.ndim:]) != sample.shape
        or key["dtype"] != str(sample.dtype)):
      raise invalid(f"key data of shape {shape} and dtype {key['dtype']} do "
                    f"not fit the PRNG implementation {key['impl']!r} (keys "
                    f"of shape {sample.shape}, dtype {sample.dtype})")


def restore(directory, params, state, *,
            step: Optional[int] = None) -> RunCheckpoint:
  """Restores a run saved by :func:`save` into the structure of a template.

  Args:
    directory: the run's checkpoint directory.
    params: template of the params: the initial
      :class:`~jaxbilevel.BilevelParams` of the run, or
      ``jax.ShapeDtypeStruct`` leaves. The restored arrays take the
      template's dtypes and, where it has them, its shardings (so a run
      saved on one device can be restored sharded, and vice versa).
    state: template of the state, e.g. ``tx.init(params)`` or
      ``jax.eval_shape(tx.init, params)``.
    step: the step to restore (default: the newest complete checkpoint).

  Returns:
    A :class:`RunCheckpoint` ``(params, state, step, history, key)``.

  Raises:
    CheckpointError: if there is no such checkpoint, if it is incomplete or
      corrupt, or if it does not fit the template.
  """
  directory = checked_directory(directory)
  if not os.path.isdir(directory):
    raise CheckpointError(
        f"no checkpoint directory {directory}: nothing was saved there.")
  if step is not None and (isinstance(step, (bool, np.bool_))
                           or not isinstance(step, numbers.Integral)):
    raise base.BilevelValidationError(
        f"restore: step must be an int (the step of a checkpoint, e.g. "
        f"step=5) or None for the newest, got {step!r} of type "
        f"{type(step).__name__}.")
  steps = _steps(directory)
  if step is None:
    if not steps:
      raise CheckpointError(
          f"no complete checkpoint in {directory} (it holds "
          f"{sorted(os.listdir(directory))[:10]}).")
    step = steps[-1]
  elif step not in steps:
    incomplete = _incomplete_steps(directory)
    raise CheckpointError(
        f"no checkpoint for step {step} in {directory}; the complete "
        f"checkpoints are for steps {steps}"
        + (f" (incomplete ones, ignored: {incomplete})" if incomplete else "")
        + ".")
  path = os.path.join(directory, str(step))
  reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    try:
      meta = reader.restore(path, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore())).meta
    except Exception as err:  # pylint: disable=broad-except
      raise CheckpointError(
          f"the checkpoint {path} is corrupt or incomplete: its metadata "
          f"cannot be read ({short_error(err)}).") from err
    check_meta(meta, path, step)
    if meta["state_type"] != type(state).__name__:
      raise CheckpointError(
          f"the checkpoint {path} holds the state of another method: it was "
          f"saved with a {meta['state_type']}, the template state is a "
          f"{type(state).__name__}. Restore (or resume) with the method the "
          "run was saved with, or use a new directory for a new run.")
    _check_template(meta["params"], params, "params", path)
    _check_template(meta["state"], state, "state", path)
    arrays = {"params": params, "state": state}
    key_meta = meta.get("key")
    if key_meta is not None:
      arrays["key"] = np.zeros(key_meta["shape"], key_meta["dtype"])
    items = {"arrays": ocp.args.StandardRestore(_abstract(arrays))}
    if meta.get("has_history"):
      items["history"] = ocp.args.PyTreeRestore()
    try:
      restored = reader.restore(path, args=ocp.args.Composite(**items))
    except Exception as err:  # pylint: disable=broad-except
      raise CheckpointError(
          f"the checkpoint {path} is corrupt or incomplete: its arrays cannot "
          f"be read ({short_error(err)}).") from err
  finally:
    reader.close()

  arrays = restored.arrays
  key = None
  if key_meta is not None:
    key = arrays["key"]
    if key_meta["impl"] is not None:
      key = jax.random.wrap_key_data(key, impl=key_meta["impl"])
  history = None
  if meta.get("has_history"):
    history = options_lib.History(jax.tree.map(np.asarray, restored.history))
  return RunCheckpoint(params=arrays["params"], state=arrays["state"],
                       step=int(meta["step"]), history=history, key=key)


def saved_settings(directory: str, step: int) -> Optional[dict]:
  """The settings saved with the checkpoint of ``step`` (None: none saved)."""
  path = os.path.join(directory, str(step))
  reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    meta = reader.restore(path, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta
  except Exception as err:  # pylint: disable=broad-except
    raise CheckpointError(
        f"the checkpoint {path} is corrupt or incomplete: its metadata "
        f"cannot be read ({short_error(err)}).") from err
  finally:
    reader.close()
  check_meta(meta, path, step)
  return meta.get("settings")
