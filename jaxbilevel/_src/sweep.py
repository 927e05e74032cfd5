"""Hyperparameter sweeps: one method over a grid, in one compiled program."""

from __future__ import annotations

import functools
import inspect
import itertools
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from jaxbilevel._src import base
from jaxbilevel._src import loop as loop_lib
from jaxbilevel._src import nonfinite as nonfinite_lib
from jaxbilevel._src import options as options_lib
from jaxbilevel._src import run as run_lib
from jaxbilevel._src import sharding as sharding_lib
from jaxbilevel._src import tree as tree_lib

Grid = Mapping[str, Any]


def product_grid(**axes) -> dict:
  """The Cartesian product of per-hyperparameter values, as a :func:`sweep` grid.

  Args:
    **axes: ``name=values`` with ``values`` a 1-D sequence or array.

  Returns:
    A dict ``name -> 1-D numpy array`` with one entry per combination; the
    first axis varies slowest (``numpy.meshgrid(..., indexing="ij")`` order).

  Examples:
    >>> import jaxbilevel as jbl
    >>> grid = jbl.product_grid(gamma=[1.0, 10.0], lr=[0.1, 0.2, 0.3])
    >>> grid["gamma"].tolist(), grid["lr"].tolist()
    ([1.0, 1.0, 1.0, 10.0, 10.0, 10.0], [0.1, 0.2, 0.3, 0.1, 0.2, 0.3])
  """
  if not axes:
    raise base.BilevelValidationError("product_grid needs at least one axis.")
  values = {}
  for name, vals in axes.items():
    arr = np.asarray(vals)
    if arr.ndim != 1 or arr.size == 0:
      raise base.BilevelValidationError(
          f"product_grid: {name} must be a non-empty 1-D sequence of values, "
          f"got shape {arr.shape}.")
    values[name] = arr
  combos = list(itertools.product(*(range(len(v)) for v in values.values())))
  return {name: vals[[c[i] for c in combos]]
          for i, (name, vals) in enumerate(values.items())}


def _check_grid(grid, make_tx, dtype) -> tuple[dict, int]:
  """Validates the grid and returns it as arrays, with its number of points."""
  if not isinstance(grid, Mapping) or not grid:
    raise base.BilevelValidationError(
        "sweep: grid must be a non-empty dict name -> 1-D array of values "
        f"(one value per grid point), got {type(grid).__name__}"
        f"{' (empty)' if isinstance(grid, Mapping) else ''}. Use "
        "jaxbilevel.product_grid for a Cartesian product.")
  points, sizes = {}, {}
  for name, vals in grid.items():
    arr = vals if isinstance(vals, jax.Array) else np.asarray(vals)
    if arr.ndim != 1:
      raise base.BilevelValidationError(
          f"sweep: grid[{name!r}] must be a 1-D array (one value per grid "
          f"point), got shape {np.shape(arr)}. A value shared by all points "
          "belongs in make_tx (e.g. a default argument), not in the grid.")
    kind = arr.dtype
    if base.is_floating(kind):
      target = dtype if dtype is not None else kind
      if not (isinstance(arr, jax.Array) and kind == target):
        arr = jnp.asarray(arr, dtype=target)
    elif base.is_integer(kind):
      if not isinstance(arr, jax.Array):
        arr = jnp.asarray(arr)
    else:
      raise base.BilevelValidationError(
          f"sweep: grid[{name!r}] must hold numbers (floats or ints), got "
          f"dtype {kind}.")
    points[name] = arr
    sizes[name] = arr.shape[0]
  if len(set(sizes.values())) != 1:
    raise base.BilevelValidationError(
        f"sweep: every grid entry needs the same number of points, got "
        f"{sizes}. Use jaxbilevel.product_grid for a Cartesian product.")
  num_points = next(iter(sizes.values()))
  if num_points == 0:
    raise base.BilevelValidationError("sweep: the grid has no points.")
  try:
    _checked_callable_with(make_tx, tuple(points))
  except TypeError:  # an unhashable make_tx: check it every time
    _check_callable_with(make_tx, tuple(points))
  return points, num_points


def _check_callable_with(make_tx, names):
  """Checks that ``make_tx(**point)`` binds the grid names."""
  try:
    inspect.signature(make_tx).bind(**{name: None for name in names})
  except TypeError as err:
    raise base.BilevelValidationError(
        f"sweep: make_tx cannot be called as make_tx(**point) with the grid "
        f"names {sorted(names)}: {err}. Its signature is "
        f"{inspect.signature(make_tx)}.") from None
  except ValueError:
    pass  # No signature available (e.g. a builtin): let the call decide.


_checked_callable_with = functools.lru_cache(maxsize=64)(_check_callable_with)


def _sweep_core(points, params, batch, batches, *, make_tx, params_fn,
                batches_fn, num_steps, record, record_every, diagnostics,
                mode):
  """Runs the steps of every grid point, vmapped over the points."""

  def one(point):
    tx = make_tx(**point)
    if not isinstance(tx, optax.GradientTransformation):
      raise base.BilevelValidationError(
          "sweep: make_tx(**point) must return an optax gradient "
          f"transformation (e.g. jaxbilevel.pbgd_free(...)), got "
          f"{type(tx).__name__}.")
    p0 = params if params_fn is None else params_fn(point)
    return run_lib.scan_steps(
        tx, p0, num_steps=num_steps, state=None, batch=batch,
        batches=batches if batches_fn is None else batches_fn, record=record,
        record_every=record_every, diagnostics=diagnostics, mode=mode)

  params, state, history = jax.vmap(one)(points)
  # Whether every point's steps and, for a small model, its final iterate
  # are finite, as one value read by the host.
  if mode == "fast":
    finite = loop_lib.unchecked_finite(history, params, state)
    # The recorded diagnostics' incoming values would be outputs (one copy
    # each) that the host replaces with the last rows: they are left out.
    state = loop_lib.with_diagnostics(state, {
        k: v for k, v in loop_lib.find_diagnostics(state).items()
        if k not in history})
    return params, state, history, finite
  finite = jnp.all(history["finite"])
  if loop_lib.checked_in_program(params, state):
    # (Diagnostics not recorded are NaN: the recorded ones are in history.)
    finite &= tree_lib.tree_all_finite(
        (params, loop_lib.with_diagnostics(state, {})))
  return params, state, history, finite


# Module-level jit: calls with the same make_tx, shapes and static options
# reuse one executable whatever the grid values are.
_sweep_jit = jax.jit(
    _sweep_core,
    static_argnames=("make_tx", "params_fn", "batches_fn", "num_steps",
                     "record", "record_every", "diagnostics", "mode"))


# One compiled call instead of a slice per diagnostic, for histories that are
# not in this process's host memory.
_with_last_diagnostics = jax.jit(loop_lib.with_last_diagnostics,
                                 static_argnames="names")


def _last_diagnostics(state, history):
  """``state`` with the last recorded diagnostics (see ``with_last_diagnostics``).

  A history in host memory (the CPU backend) is read in place: its last
  rows are NumPy views, which cost nothing; elsewhere one compiled call
  slices them on the device.
  """
  # (The rows come from one program: they all lie where the first does.)
  names = tuple(history)
  if nonfinite_lib.on_host(next(iter(history.values())).sharding):
    return loop_lib.with_last_diagnostics(
        state, {k: np.asarray(v) for k, v in history.items()}, names)
  return _with_last_diagnostics(state, history, names=names)


def _pad_points(points, num_points, multiple):
  """Repeats the last point so that the number of points is a multiple."""
  extra = -num_points % multiple
  if not extra:
    return points
  return {k: jnp.concatenate([v, jnp.repeat(v[-1:], extra)])
          for k, v in points.items()}


def _warn_nonfinite(history, points, num_points):
  finite = np.asarray(history["finite"])
  bad = np.flatnonzero(~finite.all(axis=1))
  if not bad.size:
    return
  first = int(bad[0])
  step = int(np.asarray(history["step"])[first][np.argmin(finite[first])])
  values = {k: np.asarray(v[first]).item() for k, v in points.items()}
  warnings.warn(
      f"jaxbilevel.sweep: {bad.size} of {num_points} grid points had "
      f"non-finite steps; the first is point {first} {values}, at step "
      f"{step}. Inspect history['finite'] (points x steps).", RuntimeWarning,
      stacklevel=3)


def sweep(make_tx: Callable[..., optax.GradientTransformationExtraArgs],
          params: Union[base.BilevelParams,
                        Callable[[dict], base.BilevelParams]],
          grid: Grid,
          *,
          num_steps: int,
          batch: Any = None,
          batches: Any = None,
          record: Optional[Callable] = None,
          record_every: int = 1,
          diagnostics: Union[bool, Sequence[str]] = False,
          on_nonfinite: str = "stop",
          mesh: Optional[Mesh] = None,
          axis: Optional[str] = None):
  """Runs a bilevel method at every point of a hyperparameter grid, in one compiled program.

  For each grid point ``p`` this runs ``scan_run(make_tx(**p), params,
  num_steps=num_steps, ...)``; the runs are ``jax.vmap`` -ed over the points
  and compiled once with ``jax.jit``. The grid values are traced arrays, so a
  later call with other values (same names, same number of points, same
  ``make_tx`` function object) reuses the compiled program; changing the
  number of points, ``num_steps`` or ``make_tx`` compiles again. Everything
  that ``make_tx`` gets from the grid must therefore be usable as a traced
  scalar: penalty constants, learning rates (``optax.sgd(lr)``), schedule
  parameters; loop lengths such as ``inner_steps`` stay fixed in ``make_tx``.

  With ``mesh``, the grid axis is sharded along the mesh axis ``axis``: each
  device runs its share of the points (the grid is padded with copies of its
  last point to a multiple of the axis size, and the padding is dropped from
  the results). ``params``, ``batch`` and ``batches`` are replicated over the
  mesh unless they are already ``NamedSharding`` -placed on it, so on a 2-D
  mesh ``("grid", "data")`` a batch sharded with
  ``shard_batch(batch, mesh, "data")`` makes each run data-parallel too.

  Args:
    make_tx: ``make_tx(**point) -> transformation``, called with one grid
      point's values as traced scalars, e.g. ``lambda gamma, lr:
      jbl.pbgd_free(f, g, gamma=gamma, upper_optimizer=optax.sgd(lr), ...)``.
      Define it once (not inline in a loop) so that repeated sweeps reuse the
      compiled program.
    params: the initial :class:`BilevelParams` shared by all points, or a
      function ``point -> BilevelParams`` (e.g. an initialization that depends
      on a ``seed`` entry of the grid).
    grid: dict ``name -> 1-D array``, one value per point, every entry of the
      same length (see :func:`product_grid`). Floating values are cast to the
      dtype of ``params`` (when ``params`` is a ``BilevelParams``).
    num_steps: outer iterations per point (static).
    batch: a batch used at every step by every point.
    batches: per-step batches shared by all points (see :func:`scan_run`).
    record: optional ``(params, state) -> pytree`` recorded after every
      ``record_every``-th step (e.g. :func:`jaxbilevel.lower_level_evaluation`).
    record_every: see :func:`run`; ``num_steps`` must be a multiple of it.
    diagnostics: also record each method's diagnostics every step: ``True``
      for all, or a sequence of names (e.g. ``("f",)``: the upper objective
      the step computes anyway, at no extra cost). Off by default: they are
      then not computed; see :func:`scan_run`.
    on_nonfinite: ``"stop"``, ``"skip"`` or ``"ignore"``, per point (see
      :func:`scan_run`); a warning names the first point with non-finite
      steps. With ``"stop"`` the points run unguarded and the sweep is run
      again with a per-step guard only when some point failed (see
      :mod:`jaxbilevel.run`'s notes), so a sweep without failures compiles
      and runs like the plain loop.
    mesh: optional :class:`jax.sharding.Mesh` to shard the grid over.
    axis: the mesh axis for the grid (default: the mesh's first axis).

  Returns:
    ``(params, state, history)`` as from :func:`scan_run`, with a leading
    axis of length ``len(grid points)`` on every leaf (``history`` leaves are
    ``points x num_steps``).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> f = lambda x, y, batch: (y - 1.0) ** 2 + x ** 2
    >>> g = lambda x, y, batch: (y - x) ** 2
    >>> def make_tx(gamma, lr):
    ...   return jbl.alt_pbgd(f, g, gamma=gamma, upper_optimizer=optax.sgd(lr),
    ...                       lower_optimizer=optax.sgd(0.2), inner_steps=5)
    >>> p0 = jbl.BilevelParams(x=jnp.array(0.0), y=jnp.array(0.0))
    >>> grid = jbl.product_grid(gamma=[10.0, 100.0], lr=[0.1, 0.2])
    >>> params, state, history = jbl.sweep(make_tx, p0, grid, num_steps=300,
    ...                                    diagnostics=True)
    >>> params.x.shape, history["f"].shape
    ((4,), (4, 300))
    >>> # argmin F_gamma = gamma / (2 gamma + 1): 0.4762 and 0.4975.
    >>> [round(float(v), 4) for v in params.x]
    [0.4762, 0.4762, 0.4975, 0.4975]
  """
  if not callable(make_tx):
    raise base.BilevelValidationError(
        f"sweep: make_tx must be a callable make_tx(**point) -> "
        f"transformation, got {type(make_tx).__name__}.")
  num_steps, record_every, diagnostics, _ = options_lib.check_options(
      "sweep", num_steps=num_steps, batch=batch, batches=batches,
      record=record, record_every=record_every, diagnostics=diagnostics,
      on_nonfinite=on_nonfinite, modes=("stop", "skip", "ignore"),
      why_not=" (a sweep cannot raise from inside the compiled program)")
  if isinstance(params, base.BilevelParams):
    base.check_params(params, "sweep")
    params_fn, dtype = None, base.params_dtype(params)
  elif callable(params):
    params_fn, params, dtype = params, None, None
  else:
    raise base.BilevelValidationError(
        "sweep: params must be a jaxbilevel.BilevelParams shared by all grid "
        "points or a function point -> BilevelParams, got "
        f"{type(params).__name__}.")
  points, num_points = _check_grid(grid, make_tx, dtype)
  batches_fn = batches if callable(batches) else None
  if batches_fn is None and batches is not None:
    batches = jax.tree.map(lambda b: b[:num_steps], batches)

  run_points = points
  if mesh is not None:
    axis = sharding_lib.check_mesh_axis(mesh, axis, "sweep")
    run_points = _pad_points(points, num_points, mesh.shape[axis])
    run_points = jax.device_put(
        run_points, NamedSharding(mesh, PartitionSpec(axis)))
    params, batch, batches = sharding_lib.place_on_mesh(
        (params, batch, None if batches_fn else batches), mesh)
    if batches_fn is not None:
      batches = None

  options = dict(make_tx=make_tx, params_fn=params_fn, batches_fn=batches_fn,
                 num_steps=num_steps, record=record, record_every=record_every,
                 diagnostics=diagnostics)
  args = (run_points, params, batch,
          None if batches_fn is not None else batches)
  mode = "fast" if on_nonfinite == "stop" else on_nonfinite
  num_run_points = jax.tree.leaves(run_points)[0].shape[0]
  *out, finite = _sweep_jit(*args, mode=mode, **options)
  finite = bool(finite) and (loop_lib.checked_in_program(out[0], out[1])
                             or nonfinite_lib.all_finite(
                                 (out[0], loop_lib.with_diagnostics(out[1], {}))))
  if mode == "fast" and not finite:
    # Some point failed: run again with the per-step guard, which freezes
    # each failed point at its last finite iterate.
    *out, _ = _sweep_jit(*args, mode="stop", **options)
  elif mode == "fast":
    recorded = {k: v for k, v in out[2].items() if k != "record"}
    if recorded:
      out[1] = _last_diagnostics(out[1], recorded)
    out[2] = loop_lib.unchecked_rows(out[2], 0, num_steps,
                                    points=(num_run_points,))
  if num_run_points != num_points:
    out = jax.tree.map(lambda v: v[:num_points], out)
  if not finite and on_nonfinite != "ignore":
    _warn_nonfinite(out[2], points, num_points)
  return out[0], out[1], options_lib.History(out[2])
