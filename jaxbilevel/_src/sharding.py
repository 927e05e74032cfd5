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
