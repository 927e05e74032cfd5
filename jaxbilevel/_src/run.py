"""Driving a bilevel transformation: a pure ``scan_run`` and the host-side ``run``.

The drivers are split by concern: the compiled loop (:mod:`loop`), the
non-finite policy (:mod:`nonfinite`: unguarded chunks replayed guarded on
failure), the options they share (:mod:`options`), the host side
(:mod:`host`: progress bar, history) and the cache of compiled programs
(:mod:`programs`). Each talks to the method only through its
``init``/``step`` (:func:`jaxbilevel.step`) and the ``diagnostics=``
argument.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbilevel._src import base
from jaxbilevel._src import host as host_lib
from jaxbilevel._src import loop as loop_lib
from jaxbilevel._src import nonfinite as nonfinite_lib
from jaxbilevel._src import options as options_lib
from jaxbilevel._src import programs
from jaxbilevel._src import tree as tree_lib


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
  called inside ``jax.jit`` and ``jax.vmap``: pass the method as an argument
  of the traced function (it is a pytree of its hyperparameters) or build it
  inside, to sweep hyperparameters without recompiling (see the example).

  With ``on_nonfinite="stop"`` or ``"skip"`` the steps run unguarded, as
  :func:`run` runs a chunk: the loop costs what the algorithm costs, and one
  check after it (of the recorded diagnostics and the final params and
  state, to which a NaN or an infinity propagates) decides whether the steps
  are run again from the start with a guard at every step (a choice between
  the new and the previous iterate). The replay is compiled too (about twice
  the compile time of the plain loop) but runs only when needed: it is a
  ``lax.while_loop`` of zero or one iteration, so under ``jax.vmap`` it runs
  only if some point needs it.
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
  options = options_lib.check_options(
      "scan_run", num_steps=num_steps, batch=batch, batches=batches,
      record=record, record_every=record_every, diagnostics=diagnostics,
      on_nonfinite=on_nonfinite, modes=("stop", "skip", "ignore"))
  run_in = functools.partial(
      scan_steps, tx, params, num_steps=options.num_steps, state=state,
      batch=batch, batches=batches, record=record,
      record_every=options.record_every, diagnostics=options.diagnostics)
  if on_nonfinite == "ignore":
    return run_in(mode="ignore")
  return _replayed_if_not_finite(run_in, mode=on_nonfinite,
                                 length=options.num_steps)


def _replayed_if_not_finite(run_in, *, mode, length):
  """The steps unguarded, run again with the per-step guard only if needed.

  As :func:`run` does per chunk: the unguarded loop (``"fast"``) costs what
  the algorithm costs; after it, one check of the recorded rows and the
  final params and state (a NaN or an infinity propagates to them) decides
  whether the run is replayed from the start with the guard of ``mode``
  (``"stop"`` or ``"skip"``; the steps are deterministic, so the replay
  reaches the same iterates up to the first non-finite step). The replay is
  a ``lax.while_loop`` of zero or one iteration, not a ``lax.cond``: under
  ``jax.vmap`` a ``cond`` on a batched flag runs both branches for every
  point, where the loop runs only while some point needs it.
  """
  params, state, history = run_in(mode="fast")
  state = loop_lib.with_last_diagnostics(state, history)
  names = loop_lib.find_diagnostics(state)
  finite = tree_lib.tree_all_finite((
      {k: v for k, v in history.items() if k in names}, params,
      loop_lib.with_diagnostics(state, {})))
  true = jnp.ones((length,), bool)
  fast = (params, state, dict(
      history, step=jnp.arange(length, dtype=jnp.int32), finite=true,
      updates_finite=true, state_finite=true))

  def replay(carry):
    del carry
    return True, run_in(mode=mode)

  _, (params, state, history) = jax.lax.while_loop(
      lambda carry: ~carry[0], replay, (finite, fast))
  return params, state, history


def scan_steps(tx, params, *, num_steps, state, batch, batches, record,
               record_every, diagnostics, mode):
  """:func:`scan_run` in a given loop mode (``"fast"`` too), checked arguments.

  """
  options_lib.check_transformation(tx, "scan_run")
  if state is None:
    state = tx.init(params)
  else:
    options_lib.check_given_state(tx, params, state, "scan_run")
  if batches is not None and not callable(batches):
    batches = jax.tree.map(lambda b: b[:num_steps], batches)
  params, state, _, history = loop_lib.scan_chunk(
      tx, params, state, batch, batches, jnp.asarray(0, jnp.int32),
      jnp.asarray(False), length=num_steps, mode=mode, record=record,
      record_every=record_every,
      diagnostics=options_lib.diagnostics_option(diagnostics, "scan_run"))
  return params, state, history


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
        on_nonfinite: str = "stop",
        check_gamma: Optional[Callable] = None):
  """Runs a bilevel transformation for ``num_steps`` outer iterations.

  The steps run as jitted ``lax.scan`` chunks of ``chunk_size`` steps (so a
  long run compiles at most twice: the chunk and the remainder); between
  chunks the host updates the progress bar and checks that the parameters,
  the optimizer state and the diagnostics are finite. Without a progress bar
  the run is one chunk by default: every chunk ends in a wait for the device
  and a check on the host, which on small problems costs as much as many
  steps. When a step produces a NaN
  or infinite value the run stops, returns the last finite iterate and says
  at which step and in which quantity the problem appeared. The steps
  themselves carry no guard: only a chunk whose check fails is run again
  from its start, with a guard at every step that stops at the first
  non-finite one (the steps are deterministic, so the replay reaches the
  same iterates).

  Compiled programs are shared: a method is a pytree whose leaves are its
  floating-point hyperparameters (``gamma``, ...; see
  :class:`BilevelTransformation`), passed to the program as arguments, so a
  newly built method with the same objectives and optimizer objects reuses
  the program of an earlier run and a Python loop over hyperparameter values
  compiles once. An optax optimizer is a closure, compared by identity; build
  it with :func:`as_value` to make its learning rate a leaf too. At most 16
  compiled programs are kept (the least recently used is dropped first), so
  memory stays flat over many runs.

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
    check_gamma: optional :func:`jaxbilevel.gamma_check` of ``f`` and ``g``:
      at the end of the run (and at the recorded rows when it is also
      ``record``) compares f at the method's y with f at the re-fitted lower
      solution and warns with :class:`jaxbilevel.PenaltyGapWarning` when
      they disagree (the penalty constant is too small).

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
  options_lib.check_host_call(params, "jaxbilevel.run")
  options_lib.check_transformation(tx, "jaxbilevel.run")
  num_steps, record_every, diagnostics, _ = options_lib.check_options(
      "run", num_steps=num_steps, batch=batch, batches=batches, record=record,
      record_every=record_every, diagnostics=diagnostics,
      on_nonfinite=on_nonfinite)
  if chunk_size is not None:
    chunk_size = base.check_static_int(chunk_size, "chunk_size")
  if progress is None:
    progress = num_steps > (chunk_size or 1000) and host_lib.interactive()
  if chunk_size is None:
    chunk_size = min(num_steps, 1000) if progress else num_steps
  chunk_size = min(max(chunk_size - chunk_size % record_every, record_every),
                   num_steps)
  params = options_lib.strongly_typed(params)
  programs.check_hyperparameters_fit(tx, base.params_dtype(params),
                                     "jaxbilevel.run")
  if state is None and chunk_size < num_steps:
    state = programs.init_state(tx, params)
  if state is not None:
    loop_lib.find_diagnostics(state)  # fails clearly for a non-bilevel transformation
  elif tx not in programs.PROGRAMS:
    # A one-chunk run initialises the state in its program; the first run of
    # a program checks the state's structure without computing it.
    loop_lib.find_diagnostics(jax.eval_shape(tx.init, params))
  params, state, parts, failure = nonfinite_lib.drive(
      tx, params, state, batch=batch, batches=batches, first_step=0,
      num_steps=num_steps, chunk_size=chunk_size, on_nonfinite=on_nonfinite,
      record=record, record_every=record_every,
      diagnostics=diagnostics,
      progress=progress)
  history = options_lib.History(host_lib.concat_history(parts))
  if failure is not None:
    message = nonfinite_lib.nonfinite_message("jaxbilevel.run", failure, state)
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
  if check_gamma is not None and failure is None:
    from jaxbilevel._src import choosing  # pylint: disable=g-import-not-at-top
    choosing.after_run(check_gamma, record, history, params, state,
                       where="jaxbilevel.run")
  return params, state, history
