"""LoRA adapters for the Dense kernels of a flax parameter tree, as a pure transformation.

A LoRA adapter (Hu et al., 2021) replaces a frozen kernel :math:`W\\in
\\mathbb R^{d_{in}\\times d_{out}}` by :math:`W + s\\,AB` with
:math:`A\\in\\mathbb R^{d_{in}\\times r}`, :math:`B\\in\\mathbb R^{r\\times
d_{out}}` and scale :math:`s=\\alpha/r`. Here the adapters are a separate
pytree (a nested dict that mirrors the paths of the adapted kernels), so that
they can be one level of a bilevel problem (``x`` = adapters, as in the DPO/SFT
experiments of Jiang et al., NeurIPS 2025) while the base parameters stay untouched:

* :func:`init` creates ``{"lora_a": A, "lora_b": B}`` for every 2-D
  ``kernel`` (or 3-D ``DenseGeneral`` kernel) whose ``"/"``-joined path
  matches a regular expression, with ``B = 0`` so the adapted model equals
  the base model at the start;
* :func:`merge` returns the effective parameters :math:`W+sAB` (a new tree;
  differentiable in the adapters, the base and the scale).

A 3-D ``DenseGeneral`` kernel, e.g. a fused attention projection of shape
``[d_model, heads, head_dim]`` (``in_axes=1``) or an output projection
``[heads, head_dim, d_model]`` (``in_axes=2``), is adapted as the matrix
``[prod(input axes), prod(output axes)]`` it applies: ``A`` and ``B`` stay
2-D and the update :math:`sAB` is reshaped (row-major, as ``DenseGeneral``
contracts its axes) to the kernel's shape.

Both work on plain nested dicts, e.g. flax linen ``variables["params"]``. The
adapter leaves are named ``lora_a``/``lora_b``, so
:func:`jaxbilevel.flax_utils.is_lora` selects them.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from flax import traverse_util
import numpy as np

from jaxbilevel._src import base

Pattern = Union[str, "re.Pattern[str]"]

_A, _B = "lora_a", "lora_b"


def _flat(tree, where: str) -> dict:
  if not isinstance(tree, Mapping):
    raise base.BilevelValidationError(
        f"{where}: expected a nested dict of arrays (e.g. flax linen "
        f"variables['params']), got {type(tree).__name__}.")
  return traverse_util.flatten_dict(dict(tree))


def _pattern(target: Pattern, where: str) -> "re.Pattern[str]":
  if isinstance(target, re.Pattern):
    return target
  if not isinstance(target, str):
    raise base.BilevelValidationError(
        f"{where}: target must be a regular expression (str), got "
        f"{type(target).__name__}.")
  try:
    return re.compile(target)
  except re.error as err:
    raise base.BilevelValidationError(
        f"{where}: {target!r} is not a valid regular expression: {err}."
    ) from None


def matching_kernels(params, target: Pattern,
                     kernel_name: str = "kernel") -> list:
  """The paths (tuples of keys) of the kernels that :func:`init` adapts.

  A leaf is matched when its last key is ``kernel_name`` and ``target`` is
  found (``re.search``) in its ``"/"``-joined path, e.g.
  ``"blocks_0/attn/query/kernel"``.
  """
  pattern = _pattern(target, "lora")
  return [path for path in _flat(params, "lora")
          if path[-1] == kernel_name
          and pattern.search("/".join(str(p) for p in path))]


def init(key: jax.Array, params, *, target: Pattern, rank: int,
         kernel_name: str = "kernel", dtype=None, in_axes: int = 1) -> dict:
  r"""LoRA adapters for the kernels of ``params`` matched by ``target``.

  For a kernel of shape ``(d_in, d_out)`` the adapter holds ``lora_a`` of
  shape ``(d_in, rank)``, drawn from :math:`\mathcal N(0, 1/d_{in})`, and
  ``lora_b`` of shape ``(rank, d_out)``, zero; the adapters of a kernel at
  ``(..., "dense", "kernel")`` live at ``(..., "dense")``.

  Decision: the Gaussian :math:`1/d_{in}` variance for ``A`` (LoRA papers use
  Kaiming-uniform or Gaussian inits; any choice works because ``B = 0``
  makes the initial update zero) keeps :math:`\|xA\|` of the order of
  :math:`\|x\|`.

  Args:
    key: a ``jax.random`` key.
    params: nested dict of the base parameters.
    target: regular expression searched in each kernel's ``"/"``-joined path
      (e.g. ``r"attn/(query|value)"``).
    rank: r, the adapter rank (static int >= 1).
    kernel_name: the name of the adapted leaves (flax ``Dense`` uses
      ``"kernel"``).
    dtype: dtype of the adapters (default: that of each kernel).
    in_axes: for 3-D ``DenseGeneral`` kernels, how many leading axes are
      inputs (1: ``[d_in, heads, head_dim]``, 2: ``[heads, head_dim,
      d_out]``); ``A`` is ``(prod(input axes), rank)`` and ``B`` is
      ``(rank, prod(output axes))``. Ignored for 2-D kernels.

  Returns:
    The adapters, a nested dict with ``lora_a``/``lora_b`` leaves.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbilevel import lora
    >>> params = {"attn": {"query": {"kernel": jnp.ones((8, 4)),
    ...                              "bias": jnp.zeros(4)},
    ...                    "key": {"kernel": jnp.ones((8, 4))}}}
    >>> adapters = lora.init(jax.random.PRNGKey(0), params,
    ...                      target="attn/query", rank=2)
    >>> jax.tree.map(jnp.shape, adapters)
    {'attn': {'query': {'lora_a': (8, 2), 'lora_b': (2, 4)}}}
    >>> general = {"qkv": {"kernel": jnp.ones((8, 2, 4))}}  # DenseGeneral
    >>> jax.tree.map(jnp.shape, lora.init(jax.random.PRNGKey(0), general,
    ...                                   target="qkv", rank=2))
    {'qkv': {'lora_a': (8, 2), 'lora_b': (2, 8)}}
  """
  rank = base.check_static_int(rank, "rank")
  if in_axes not in (1, 2):
    raise base.BilevelValidationError(
        f"lora.init: in_axes must be 1 or 2 (leading input axes of a 3-D "
        f"DenseGeneral kernel), got {in_axes!r}.")
  paths = matching_kernels(params, target, kernel_name)
  flat = _flat(params, "lora.init")
  if not paths:
    kernels = ["/".join(map(str, p)) for p in flat if p[-1] == kernel_name]
    raise base.BilevelValidationError(
        f"lora.init: the target {getattr(target, 'pattern', target)!r} "
        f"matches no '{kernel_name}' leaf. The kernels are: "
        f"{', '.join(kernels[:12]) or '(none)'}"
        f"{' ...' if len(kernels) > 12 else ''}.")
  adapters = {}
  for path, k in zip(paths, jax.random.split(key, len(paths))):
    kernel = flat[path]
    if jnp.ndim(kernel) not in (2, 3):
      raise base.BilevelValidationError(
          f"lora.init: the kernel {'/'.join(map(str, path))} has shape "
          f"{jnp.shape(kernel)}; LoRA adapters are defined for 2-D Dense "
          "kernels (d_in, d_out) and 3-D DenseGeneral kernels. Narrow the "
          "target regular expression.")
    if not jnp.issubdtype(jnp.result_type(kernel), jnp.floating):
      raise base.BilevelValidationError(
          f"lora.init: the kernel {'/'.join(map(str, path))} has dtype "
          f"{jnp.result_type(kernel)}; LoRA adapts floating-point kernels "
          "only. Cast the parameters to a floating dtype or narrow the target "
          "regular expression.")
    split = 1 if jnp.ndim(kernel) == 2 else in_axes
    d_in = math.prod(jnp.shape(kernel)[:split])
    d_out = math.prod(jnp.shape(kernel)[split:])
    kind = jnp.result_type(kernel) if dtype is None else dtype
    adapters[path[:-1] + (_A,)] = (
        jax.random.normal(k, (d_in, rank), kind) / jnp.sqrt(d_in).astype(kind))
    adapters[path[:-1] + (_B,)] = jnp.zeros((rank, d_out), kind)
  return traverse_util.unflatten_dict(adapters)


def merge(params, adapters, *, scale: Any = 1.0,
          kernel_name: str = "kernel") -> dict:
  r"""The effective parameters: every adapted kernel :math:`W` becomes :math:`W + sAB`.

  For a 3-D ``DenseGeneral`` kernel, :math:`sAB` (a matrix
  ``[prod(input axes), prod(output axes)]``) is reshaped to the kernel's
  shape; the input/output split is read from the shape of ``A``.

  Pure and differentiable in ``params``, ``adapters`` and ``scale`` (which
  may be a traced array). The result is a new nested dict; ``params`` is not
  modified.

  Args:
    params: nested dict of the base parameters.
    adapters: output of :func:`init` (possibly updated by training).
    scale: :math:`s=\alpha/r`.
    kernel_name: the name of the adapted leaves.

  Returns:
    The merged parameters, a nested dict with the structure of ``params``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbilevel import lora
    >>> params = {"dense": {"kernel": jnp.zeros((2, 2))}}
    >>> adapters = {"dense": {"lora_a": jnp.ones((2, 1)),
    ...                       "lora_b": jnp.array([[1.0, 2.0]])}}
    >>> lora.merge(params, adapters, scale=0.5)["dense"]["kernel"].tolist()
    [[0.5, 1.0], [0.5, 1.0]]
  """
  if base._is_concrete(scale) and not np.all(np.isfinite(np.asarray(scale))):  # pylint: disable=protected-access
    raise base.BilevelValidationError(
        f"lora.merge: scale must be finite, got {scale!r}; it multiplies "
        "every adapter update (scale = alpha / rank), so a non-finite scale "
        "makes every adapted kernel NaN or infinite.")
  flat = dict(_flat(params, "lora.merge (params)"))
  flat_adapters = _flat(adapters, "lora.merge (adapters)")
  prefixes = {path[:-1] for path in flat_adapters}
  for prefix in sorted(prefixes, key=lambda p: tuple(map(str, p))):
    where = "/".join(map(str, prefix))
    if (prefix + (_A,) not in flat_adapters
        or prefix + (_B,) not in flat_adapters):
      raise base.BilevelValidationError(
          f"lora.merge: the adapter at {where} needs both '{_A}' and '{_B}', "
          f"got {sorted(p[-1] for p in flat_adapters if p[:-1] == prefix)}.")
    kernel_path = prefix + (kernel_name,)
    if kernel_path not in flat:
      raise base.BilevelValidationError(
          f"lora.merge: there is an adapter at {where} but params has no "
          f"'{where}/{kernel_name}'; the adapters must come from lora.init on "
          "the same parameter tree.")
    kernel = flat[kernel_path]
    a, b = flat_adapters[prefix + (_A,)], flat_adapters[prefix + (_B,)]
    shape = tuple(jnp.shape(kernel))
    # (rows, cols) of the matrix each split of the kernel's axes gives.
    splits = [(math.prod(shape[:i]), math.prod(shape[i:]))
              for i in range(1, len(shape))]
    if (jnp.ndim(a) != 2 or jnp.ndim(b) != 2
        or (jnp.shape(a)[0], jnp.shape(b)[1]) not in splits
        or jnp.shape(a)[1] != jnp.shape(b)[0]):
      raise base.BilevelValidationError(
          f"lora.merge: at {where} the adapter shapes {jnp.shape(a)} @ "
          f"{jnp.shape(b)} do not give the kernel shape {shape}.")
    s = jnp.asarray(scale, jnp.result_type(kernel))
    delta = (s * (a @ b)).reshape(shape)
    flat[kernel_path] = kernel + delta.astype(jnp.result_type(kernel))
  return traverse_util.unflatten_dict(flat)


class LoRA(NamedTuple):
  """A LoRA configuration: a pair of pure functions (see :func:`lora`).

  Attributes:
    init: ``init(key, params) -> adapters``.
    merge: ``merge(params, adapters) -> effective params``.
    rank: the adapter rank r.
    scale: :math:`\\alpha/r`.
  """

  init: Callable[[jax.Array, Any], dict]
  merge: Callable[[Any, Any], dict]
  rank: int
  scale: float


def lora(target: Pattern, *, rank: int, alpha: Optional[float] = None,
         kernel_name: str = "kernel", in_axes: int = 1) -> LoRA:
  r"""Binds a target, rank and :math:`\alpha` into an ``(init, merge)`` pair.

  Args:
    target: regular expression on the kernel paths (see :func:`init`).
    rank: r (static int >= 1).
    alpha: :math:`\alpha` (default ``rank``, i.e. scale 1); the update is
      scaled by :math:`\alpha/r`, as in PEFT.
    kernel_name: the name of the adapted leaves.
    in_axes: leading input axes of 3-D ``DenseGeneral`` kernels (see
      :func:`init`).

  Returns:
    A :class:`LoRA`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbilevel import lora
    >>> adapter = lora.lora(r"query", rank=4, alpha=8.0)
    >>> params = {"query": {"kernel": jnp.ones((3, 5))}}
    >>> adapters = adapter.init(jax.random.PRNGKey(0), params)
    >>> merged = adapter.merge(params, adapters)   # B = 0: equals the base
    >>> bool(jnp.all(merged["query"]["kernel"] == params["query"]["kernel"]))
    True
    >>> adapter.scale
    2.0
  """
  rank = base.check_static_int(rank, "rank")
  alpha = float(rank) if alpha is None else alpha
  base.check_hyperparameter(alpha, "alpha")
  if callable(alpha):
    raise base.BilevelValidationError("lora: alpha must be a number.")
  pattern = _pattern(target, "lora")
  scale = float(alpha) / rank

  def init_fn(key, params):
    return init(key, params, target=pattern, rank=rank,
                kernel_name=kernel_name, in_axes=in_axes)

  def merge_fn(params, adapters):
    return merge(params, adapters, scale=scale, kernel_name=kernel_name)

  return LoRA(init=init_fn, merge=merge_fn, rank=rank, scale=scale)
