"""Resuming a run exactly: :func:`jaxbilevel.run` with a checkpoint every ``save_every`` steps.

Started again with the same directory, :func:`resumable_run` continues from
the latest complete checkpoint (written by :func:`jaxbilevel.checkpoint.save`)
and the result equals the uninterrupted run. The settings of the run (the
method's hyperparameters, ``diagnostics=``, whether ``record=`` is given) are
stored with each checkpoint, and resuming with other settings is refused by
name rather than returning one run made with two settings.
"""

from __future__ import annotations

import inspect
import numbers
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import jax
import numpy as np
import optax

from jaxbilevel._src import base
from jaxbilevel._src import checkpoint as checkpoint_lib
from jaxbilevel._src import nonfinite as nonfinite_lib
from jaxbilevel._src import options as options_lib
from jaxbilevel._src import programs


def resumable_run(tx: optax.GradientTransformationExtraArgs,
                  params: base.BilevelParams,
                  *,
                  num_steps: int,
                  directory,
                  save_every: int,
                  batch: Any = None,
                  batches: Any = None,
                  record: Optional[Callable] = None,
                  diagnostics: Union[bool, Sequence[str]] = False,
                  on_nonfinite: str = "stop",
                  max_to_keep: Optional[int] = 2):
  """:func:`jaxbilevel.run` with a checkpoint every ``save_every`` steps, resuming from the latest.

  If ``directory`` holds a checkpoint, the run continues from the newest one
  (params, state, history and the step counter); otherwise it starts from
  ``params``. Every ``save_every`` steps (and at ``num_steps``) the run is
  saved with :func:`save`. Stopped at any point (a crash, a pre-empted job,
  ``Ctrl-C``) and called again with the same arguments, it returns exactly
  what the uninterrupted call returns: steps are numbered globally, so
  ``batches`` given as an array is indexed by the global step and a callable
  ``batches(step)`` receives the global step (e.g. draw batch ``t`` with
  ``jax.random.fold_in(key, t)``). The global step is the number of executed
  outer iterations; with ``on_nonfinite="skip"`` it can exceed
  ``state.count``, which counts accepted steps only.

  To extend a finished run, call again with a larger ``num_steps``. A run that
  stops on a non-finite step saves nothing after its last finite checkpoint.

  Args:
    tx: a bilevel transformation.
    params: initial :class:`~jaxbilevel.BilevelParams` (also the template
      for restoring).
    num_steps: total number of outer iterations of the run.
    directory: the run's checkpoint directory.
    save_every: steps between checkpoints (each segment is one compiled
      ``lax.scan``, as a chunk of :func:`jaxbilevel.run`).
    batch: a batch used at every step.
    batches: per-step batches indexed by the global step: a pytree with a
      leading axis of length ``>= num_steps`` or a callable ``step -> batch``.
    record: optional ``(params, state) -> pytree`` recorded after each step.
    diagnostics: as in :func:`jaxbilevel.run`; a resumed run must use the
      same value as the run that wrote the checkpoints.
    on_nonfinite: as in :func:`jaxbilevel.run`.
    max_to_keep: number of newest checkpoints kept (None: all).

  Returns:
    ``(params, state, history)`` as from :func:`jaxbilevel.run`, for the
    whole run (``history`` includes the steps before the resume).

  Examples:
    >>> import tempfile, optax
    >>> import jaxbilevel as jbl
    >>> from jaxbilevel import checkpoint
    >>> prob = jbl.problems.negative_example()
    >>> tx = jbl.alt_pbgd(prob.f, prob.g, gamma=15.0,
    ...                   upper_optimizer=optax.adam(0.01),
    ...                   lower_optimizer=optax.sgd(0.1))
    >>> p0 = prob.params0
    >>> ckpt_dir = tempfile.mkdtemp()
    >>> _ = checkpoint.resumable_run(tx, p0, num_steps=200,
    ...                             directory=ckpt_dir, save_every=100)
    >>> checkpoint.latest_step(ckpt_dir)
    200
    >>> # Later (or after a crash): continue the same run to 300 steps.
    >>> params, state, history = checkpoint.resumable_run(
    ...     tx, p0, num_steps=300, directory=ckpt_dir, save_every=100)
    >>> history["step"][[0, -1]].tolist(), int(state.count)
    ([0, 299], 300)
  """
  num_steps, _, diagnostics, _ = options_lib.check_options(
      "resumable_run", num_steps=num_steps, batch=batch, batches=batches,
      record=record, record_every=1, diagnostics=diagnostics,
      on_nonfinite=on_nonfinite)
  save_every = base.check_static_int(save_every, "save_every")
  options_lib.check_transformation(tx, "resumable_run")
  base.check_params(params, "resumable_run")
  programs.check_hyperparameters_fit(tx, base.params_dtype(params),
                                     "resumable_run")
  settings = _run_settings(tx, diagnostics, record)
  state = tx.init(params)
  done, parts = 0, []
  start = checkpoint_lib.latest_step(directory)
  if start is not None:
    ckpt = checkpoint_lib.restore(directory, params, state, step=start)
    _check_settings(checkpoint_lib.saved_settings(checkpoint_lib.checked_directory(directory), start), settings,
                    checkpoint_lib.checked_directory(directory))
    if ckpt.step > num_steps:
      raise checkpoint_lib.CheckpointError(
          f"resumable_run: the checkpoint in {checkpoint_lib.checked_directory(directory)} is at "
          f"step {ckpt.step}, beyond num_steps={num_steps}.")
    if ckpt.history is None and ckpt.step > 0:
      raise checkpoint_lib.CheckpointError(
          f"resumable_run: the checkpoint for step {ckpt.step} in "
          f"{checkpoint_lib.checked_directory(directory)} has no history, so the returned history "
          "could not cover the whole run; resume from checkpoints written by "
          "resumable_run or by save(..., history=history).")
    params, state, done = ckpt.params, ckpt.state, ckpt.step
    if ckpt.history is not None:
      parts.append(ckpt.history)

  def whole_history(new_parts):
    # The restored history (orbax gives dicts and lists) in this run's form.
    if parts and new_parts and jax.tree.structure(
        parts[0]) != jax.tree.structure(new_parts[0]):
      parts[0] = _conform_history(parts[0], new_parts[0], directory)
    return jax.tree.map(lambda *v: np.concatenate(v), *(parts + new_parts))

  def after_chunk(done, params, state, new_parts):
    checkpoint_lib.save(directory, params, state, step=done,
         history=whole_history(new_parts), max_to_keep=max_to_keep,
         settings=settings)

  params, state, new_parts, failure = nonfinite_lib.drive(
      tx, params, state, batch=batch, batches=batches, first_step=done,
      num_steps=num_steps, chunk_size=save_every, on_nonfinite=on_nonfinite,
      record=record, record_every=1, diagnostics=diagnostics,
      progress=False,
      after_chunk=after_chunk)
  history = options_lib.History(whole_history(new_parts))
  _report_nonfinite(history, on_nonfinite, failure, state)
  return params, state, history


def _hyperparameters(tx) -> Optional[dict]:
  """The arguments of the method that built ``tx`` that are JSON values.

  Numbers (concrete scalars included), strings, booleans and None, by name,
  defaults included; objectives, optimizers, schedules and arrays are left
  out (a changed method or optimizer is caught by the state's type and
  structure). None for a transformation that no method built directly
  (e.g. an optax wrapper around one).
  """
  arguments = getattr(tx, "arguments", None)
  if arguments is None:
    return None
  constructor, args, kwargs = arguments
  try:
    bound = inspect.signature(constructor).bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
  except TypeError:  # a deprecated argument name: the names as given
    arguments = dict(kwargs)
  out = {}
  for name, value in arguments.items():
    if value is None or isinstance(value, (bool, str)):
      out[name] = value
    elif isinstance(value, (numbers.Number, np.ndarray, np.generic,
                            jax.Array)) and np.ndim(value) == 0 and (
                                base._is_concrete(value)):
      item = np.asarray(value).item()
      if isinstance(item, (int, float)):
        out[name] = item
  return out


def _run_settings(tx, diagnostics, record) -> dict:
  """What :func:`resumable_run` stores with each checkpoint and checks on resume."""
  settings = {"diagnostics": (diagnostics if isinstance(diagnostics, bool)
                              else list(diagnostics)),
              "record": record is not None}
  hyperparameters = _hyperparameters(tx)
  if hyperparameters is not None:
    settings["hyperparameters"] = hyperparameters
  return settings


def _check_settings(saved: Optional[dict], current: dict, directory: str):
  """Refuses to resume a run with other hyperparameters or options."""
  if saved is None:  # written by save() alone, or by an older jaxbilevel
    return
  where = f"resumable_run: the run in {directory} was saved with"
  fix = ("to continue that run, or use a new directory for a new run with "
         "the new value")
  if "diagnostics" in saved and saved["diagnostics"] != current["diagnostics"]:
    old, new = saved["diagnostics"], current["diagnostics"]
    old = old if isinstance(old, bool) else tuple(old)
    new = new if isinstance(new, bool) else tuple(new)
    raise checkpoint_lib.CheckpointError(
        f"{where} diagnostics={old!r}, and this call has diagnostics="
        f"{new!r}; one run's history records the same diagnostics at every "
        f"step. Pass diagnostics={old!r} {fix}.")
  if "record" in saved and saved["record"] != current["record"]:
    raise checkpoint_lib.CheckpointError(
        f"{where}{'' if saved['record'] else 'out'} a record= function, and "
        f"this call has {'one' if current['record'] else 'none'}; one run's "
        f"history records the same values at every step. Pass the record= "
        f"of that run {fix}.")
  old_hp = saved.get("hyperparameters") or {}
  new_hp = current.get("hyperparameters") or {}
  for name in sorted(set(old_hp) & set(new_hp)):
    if old_hp[name] != new_hp[name]:
      raise checkpoint_lib.CheckpointError(
          f"{where} {name}={old_hp[name]!r}, and this call has {name}="
          f"{new_hp[name]!r}; resuming would return one run made with two "
          f"settings. Pass {name}={old_hp[name]!r} {fix}.")


def _conform_history(saved, new, directory):
  """Gives the restored history the structure of this run's (tuples, ...).

  Orbax restores containers without a template as dicts and lists, so a
  ``record`` that returns tuples or NamedTuples comes back as lists.
  """
  leaves, treedef = jax.tree.leaves(saved), jax.tree.structure(new)
  if len(leaves) != treedef.num_leaves:
    if (set(saved) ^ set(new)) - {"record"}:
      # Diagnostic rows (f, g, ...) only in one of them.
      cause = ("was the run saved with another diagnostics= (True, False or "
               "other names)? Pass the diagnostics= of that run")
    else:
      cause = ("was the run saved with another record= function? Pass the "
               "record= of that run")
    raise checkpoint_lib.CheckpointError(
        f"resumable_run: the history saved in {checkpoint_lib.checked_directory(directory)} does "
        f"not match this run's (keys {sorted(saved)} vs {sorted(new)}); "
        f"{cause}, or use a new directory for a new run.")
  return jax.tree.unflatten(treedef, leaves)


def _report_nonfinite(history, on_nonfinite, failure, state):
  """Warns or raises about non-finite steps, as :func:`jaxbilevel.run` does."""
  if failure is not None:
    step, what, hint = nonfinite_lib.nonfinite_report(
        failure, len(failure["step"]) - 1, state)
    message = (
        f"jaxbilevel.checkpoint.resumable_run: non-finite {what} at step "
        f"{step}{hint}. The run stopped with the iterate after step "
        f"{step - 1}; the checkpoints hold at most that iterate.")
    if on_nonfinite == "raise":
      raise base.NonFiniteError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
  elif on_nonfinite == "skip" and not history["finite"].all():
    warnings.warn(
        f"jaxbilevel.checkpoint.resumable_run: skipped "
        f"{int(np.sum(~history['finite']))} non-finite step(s).",
        RuntimeWarning, stacklevel=3)
