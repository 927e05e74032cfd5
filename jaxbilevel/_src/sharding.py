"""Thin helpers around :mod:`jax.sharding` for data-parallel and sharded runs.

jaxbilevel has no distribution layer of its own. A bilevel step is an
ordinary jitted JAX computation, so placing its inputs with
:class:`jax.sharding.NamedSharding` is all it takes: with the batch sharded
along a mesh axis and the parameters replicated, XLA's SPMD partitioner
splits every per-example computation across the devices and inserts the
all-reduces that the means over the batch need. The two functions below only
spell out the usual placements; ``jax.device_put`` with any other
``NamedSharding`` (e.g. parameters sharded along a model axis) works the same.

Use meshes with ``AxisType.Auto`` axes (the default of
``jax.sharding.Mesh``; ``jax.make_mesh`` defaults to ``Explicit`` axes in
recent JAX, so pass ``axis_types``): with ``Explicit`` axes JAX asks the
objectives themselves to say how contractions over a sharded batch are
sharded, which ordinary ``f``/``g`` code does not do.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from jaxbilevel._src import base


def check_mesh_axis(mesh, axis, where: str) -> str:
  """Checks that ``mesh`` is a Mesh and ``axis`` one of its axis names."""
  if not isinstance(mesh, Mesh):
    raise base.BilevelValidationError(
        f"{where}: mesh must be a jax.sharding.Mesh, got "
        f"{type(mesh).__name__}.")
  if axis is None:
    return mesh.axis_names[0]
  if axis not in mesh.axis_names:
    raise base.BilevelValidationError(
        f"{where}: {axis!r} is not an axis of the mesh; its axes are "
        f"{tuple(mesh.axis_names)}.")
  return axis


def shard_batch(batch: Any, mesh: Mesh, axis: str = "data", *,
                batch_axis: int = 0, process_local: bool = False) -> Any:
  """Places every leaf of ``batch`` with dimension ``batch_axis`` sharded along ``axis``.

  This is data parallelism: each device holds ``1/mesh.shape[axis]`` of the
  examples, and a jitted step on the sharded batch computes the same means
  as on one device (up to the order of floating-point summation).

  Args:
    batch: a pytree of arrays (a batch passed as ``batch=``) or, with
      ``batch_axis=1``, per-step batches with a leading step axis
      (``batches=``).
    mesh: a :class:`jax.sharding.Mesh`.
    axis: the mesh axis the examples are split over.
    batch_axis: which dimension of every leaf indexes the examples.
    process_local: in a multi-process run (after
      ``jax.distributed.initialize()``), ``batch`` is this process's share of
      the global batch and the global array is assembled with
      ``jax.make_array_from_process_local_data``; with one process this is
      the same as ``False``.

  Returns:
    ``batch`` with every leaf a ``jax.Array`` sharded as described.

  Examples:
    >>> import jax, numpy as np, jaxbilevel as jbl
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    >>> batch = jbl.shard_batch({"a": np.ones((4, 3))}, mesh)
    >>> batch["a"].sharding.spec
    P('data',)
  """
  axis = check_mesh_axis(mesh, axis, "shard_batch")
  size = mesh.shape[axis]
  spec = PartitionSpec(*([None] * batch_axis + [axis]))
  sharding = NamedSharding(mesh, spec)
  leaves = jax.tree_util.tree_leaves_with_path(batch)
  if not leaves:
    raise base.BilevelValidationError("shard_batch: batch has no array leaves.")
  for path, leaf in leaves:
    shape = np.shape(leaf)
    where = f"batch{jax.tree_util.keystr(path)}"
    if len(shape) <= batch_axis:
      raise base.BilevelValidationError(
          f"shard_batch: {where} has shape {shape}, which has no dimension "
          f"{batch_axis} (batch_axis) to shard.")
    if not process_local and shape[batch_axis] % size:
      raise base.BilevelValidationError(
          f"shard_batch: {where} has {shape[batch_axis]} examples along "
          f"dimension {batch_axis}, not divisible by the {size} devices of "
          f"mesh axis {axis!r}; pad or drop examples so that it is.")
  if process_local:
    return jax.tree.map(
        lambda leaf: jax.make_array_from_process_local_data(
            sharding, np.asarray(leaf)), batch)
  return jax.device_put(batch, sharding)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a full copy of every leaf of ``tree`` on every device of ``mesh``.

  Examples:
    >>> import jax, jax.numpy as jnp, numpy as np, jaxbilevel as jbl
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    >>> jbl.replicate(jnp.ones(3), mesh).sharding.spec
    P()
  """
  check_mesh_axis(mesh, None, "replicate")
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def place_on_mesh(tree: Any, mesh: Mesh) -> Any:
  """Replicates the leaves of ``tree`` that are not already placed on ``mesh``.

  Leaves that are ``jax.Array`` s with a ``NamedSharding`` over this very
  mesh (e.g. a batch sharded with :func:`shard_batch`) keep their sharding.
  """
  replicated = NamedSharding(mesh, PartitionSpec())

  def place(leaf):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
      return leaf
    return jax.device_put(leaf, replicated)

  return jax.tree.map(place, tree)


def _fsdp_spec(shape, size: int, axis: str, min_size: int) -> PartitionSpec:
  """Splits the largest dimension divisible by ``size`` (ties: the first)."""
  if int(np.prod(shape, dtype=np.int64)) < min_size:
    return PartitionSpec()
  candidates = [(d, -i) for i, d in enumerate(shape) if d % size == 0]
  if not candidates:
    return PartitionSpec()
  _, neg_index = max(candidates)
  spec = [None] * len(shape)
  spec[-neg_index] = axis
  return PartitionSpec(*spec)


def fsdp_shardings(tree: Any, mesh: Mesh, axis: str = "fsdp", *,
                   min_size: int = 2 ** 14) -> Any:
  """Fully-sharded (FSDP / ZeRO-3) placements: one ``NamedSharding`` per leaf.

  Each leaf with at least ``min_size`` elements is split along its largest
  dimension that ``mesh.shape[axis]`` divides (the first such dimension on a
  tie), so each device stores ``1/mesh.shape[axis]`` of it; smaller leaves,
  and leaves with no divisible dimension, are replicated. Inside a jitted
  step XLA gathers a sharded weight where it is used and reduce-scatters its
  gradient, which is what fully-sharded data parallelism does by hand
  (Rajbhandari et al., 2020; Zhao et al., 2023). The placement changes where
  the numbers live, not the numbers: a step gives the same result as on one
  device, up to the order of floating-point sums.

  Combine with :func:`shard_batch` over the same or another mesh axis for
  data parallelism.

  Args:
    tree: a pytree of arrays (or of anything with a ``shape``, e.g.
      ``jax.ShapeDtypeStruct``).
    mesh: a :class:`jax.sharding.Mesh`.
    axis: the mesh axis to shard over.
    min_size: leaves with fewer elements are replicated (their all-gathers
      would cost more than they save).

  Returns:
    A pytree of :class:`jax.sharding.NamedSharding` with the structure of
    ``tree`` (pass it to ``jax.device_put`` or as ``out_shardings``).

  Examples:
    >>> import jax, numpy as np, jaxbilevel as jbl
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    >>> tree = {"w": np.zeros((64, 512)), "b": np.zeros(8)}
    >>> specs = jbl.fsdp_shardings(tree, mesh, min_size=100)
    >>> specs["w"].spec, specs["b"].spec
    (P(None, 'fsdp'), P())

  References:
    Rajbhandari, Rasley, Ruwase and He, "ZeRO: Memory Optimizations Toward
    Training Trillion Parameter Models", SC 2020 (arXiv:1910.02054).

    Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded Data
    Parallel", VLDB 2023 (arXiv:2304.11277).
  """
  axis = check_mesh_axis(mesh, axis, "fsdp_shardings")
  if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)):
    raise base.BilevelValidationError(
        f"fsdp_shardings: min_size must be an int, got {min_size!r}.")
  size = mesh.shape[axis]
  return jax.tree.map(
      lambda leaf: NamedSharding(
          mesh, _fsdp_spec(np.shape(leaf), size, axis, int(min_size))), tree)


def shard_fsdp(tree: Any, mesh: Mesh, axis: str = "fsdp", *,
               min_size: int = 2 ** 14) -> Any:
  """Places ``tree`` as :func:`fsdp_shardings` describes.

  In a multi-process run every process passes the same full values (e.g.
  the same checkpoint) and keeps only its devices' shards.

  Examples:
    >>> import jax, numpy as np, jaxbilevel as jbl
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    >>> w = jbl.shard_fsdp({"w": np.ones((64, 512))}, mesh, min_size=100)["w"]
    >>> w.sharding.spec
    P(None, 'fsdp')
  """
  shardings = fsdp_shardings(tree, mesh, axis, min_size=min_size)
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def place(leaf, where):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return jax.device_put(leaf, where)
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, where,
                                        lambda index: host[index])

  return jax.tree.map(place, tree, shardings)
