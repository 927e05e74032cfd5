r"""LoRA adapters on an nnx model and its split into bilevel variables.

:func:`add_lora` wraps the ``nnx.Linear`` projections whose path matches a
regular expression: the output becomes

.. math:: W^\top h + b + \tfrac{\alpha}{r}\, (h A) B,
   \qquad A\in\mathbb R^{d_{in}\times r},\ B\in\mathbb R^{r\times d_{out}},

with ``A`` and ``B`` held by ``nnx.LoRA`` as ``nnx.LoRAParam`` variables and
``B = 0`` at the start, so the logits are unchanged (Hu et al., 2022).

:func:`bilevel_split` turns the model into the variables of a bilevel
problem as in PBGD-Free LLM fine-tuning (Chen et al., 2025): the adapters
are the upper-level ``x``, the head ``lm_head`` the lower-level ``y``, and
all other weights are frozen: they are closed over by ``apply_fn`` (or
passed to it explicitly) and never differentiated.

References:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR
  2022 (arXiv:2106.09685).
  Chen, Xu, Wang and Chen, "Foundations of Bilevel Fine-tuning: Value-
  Function-Free Penalty Methods" (PBGD-Free), 2025.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence, Tuple, Union

from flax import nnx
import jax
import jax.numpy as jnp

from jaxbilevel._src import base

Targets = Union[str, Sequence[str]]


class ScaledLoRA(nnx.Module):
  r"""``base(h) + (alpha / rank) * lora(h)`` around an existing ``nnx.Linear``.

  ``nnx.LoRA`` has no :math:`\alpha/r` factor; this wrapper adds it, keeps
  the wrapped layer as ``base`` (so the frozen kernel keeps its path under
  ``.../q_proj/base/kernel``) and the adapters under ``.../q_proj/lora``.

  Args:
    base_linear: the layer to adapt (``nnx.Linear``).
    rank: r.
    alpha: :math:`\alpha`; the update is scaled by :math:`\alpha/r` (PEFT's
      convention).
    rngs: ``nnx.Rngs`` for ``A`` (He-uniform; ``B`` is zero).
    param_dtype: dtype of ``A`` and ``B`` (default: that of the base).
  """

  def __init__(self, base_linear: nnx.Linear, *, rank: int, alpha: float,
               rngs: nnx.Rngs, param_dtype=None):
    self.base = base_linear
    self.scale = float(alpha) / rank
    self.lora = nnx.LoRA(
        base_linear.in_features, rank, base_linear.out_features,
        dtype=base_linear.dtype,
        param_dtype=param_dtype or base_linear.param_dtype, rngs=rngs)

  def __call__(self, h):
    return self.base(h) + self.scale * self.lora(h)


def _pattern(targets: Targets) -> "re.Pattern[str]":
  if isinstance(targets, str):
    targets = (targets,)
  if not targets or not all(isinstance(t, str) for t in targets):
    raise base.BilevelValidationError(
        f"add_lora: targets must be a regular expression or a sequence of "
        f"them (e.g. ('q_proj', 'v_proj')), got {targets!r}.")
  try:
    return re.compile("|".join(f"(?:{t})" for t in targets))
  except re.error as err:
    raise base.BilevelValidationError(
        f"add_lora: targets {targets!r} is not a valid regular expression: "
        f"{err}.") from None


def _path_str(path) -> str:
  return "/".join(str(p) for p in path)


def add_lora(model: nnx.Module, *, targets: Targets = ("q_proj", "v_proj"),
             rank: int = 16, alpha: float = 32.0, rngs: nnx.Rngs,
             param_dtype=None) -> nnx.Module:
  """Wraps the matching ``nnx.Linear`` layers of ``model`` in :class:`ScaledLoRA`.

  A layer is adapted when a target is found (``re.search``) in its
  ``"/"``-joined path, e.g. ``"layers/3/self_attn/q_proj"``. The head
  ``lm_head`` is the lower-level variable of :func:`bilevel_split` and may
  not be adapted. The model is modified in place (nnx style) and returned.

  Args:
    model: an nnx model, e.g. :class:`jaxbilevel.llm.CausalLM`.
    targets: regular expression(s) on the layer paths.
    rank: r (int >= 1).
    alpha: :math:`\\alpha`; the update is scaled by :math:`\\alpha/r`.
    rngs: ``nnx.Rngs`` for the ``A`` matrices.
    param_dtype: dtype of the adapters (default: that of each layer).

  Returns:
    ``model``, with ``2 * (number of adapted layers)`` new ``nnx.LoRAParam``
    leaves, all ``B`` zero.

  Examples:
    >>> import jax
    >>> from flax import nnx
    >>> from jaxbilevel import llm
    >>> model = llm.add_lora(
    ...     llm.CausalLM(llm.LMConfig.tiny(), rngs=nnx.Rngs(0)), rank=4,
    ...     rngs=nnx.Rngs(1))
    >>> len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    8
  """
  rank = base.check_static_int(rank, "rank")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
    raise base.BilevelValidationError(
        f"add_lora: alpha must be a number, got {alpha!r}.")
  pattern = _pattern(targets)
  linears = [(path, module) for path, module in nnx.iter_modules(model)
             if isinstance(module, nnx.Linear)]
  chosen = [(path, module) for path, module in linears
            if pattern.search(_path_str(path)) and path[-1] != "base"]
  if not chosen:
    names = [_path_str(p) for p, _ in linears]
    raise base.BilevelValidationError(
        f"add_lora: targets {targets!r} match no nnx.Linear layer (or only "
        f"already adapted ones). The layers are: {', '.join(names[:10])}"
        f"{' ...' if len(names) > 10 else ''}.")
  heads = [_path_str(p) for p, _ in chosen if "lm_head" in p]
  if heads:
    raise base.BilevelValidationError(
        f"add_lora: targets {targets!r} match {heads}; lm_head is the "
        "lower-level variable y of bilevel_split and is trained in full. "
        "Narrow the targets (e.g. 'self_attn/(q|v)_proj').")
  for path, module in chosen:
    parent = model
    for key in path[:-1]:
      parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    wrapped = ScaledLoRA(module, rank=rank, alpha=alpha, rngs=rngs,
                         param_dtype=param_dtype)
    if isinstance(path[-1], int):
      parent[path[-1]] = wrapped
    else:
      setattr(parent, path[-1], wrapped)
  return model


_Y_FILTER = nnx.All(nnx.Param, nnx.PathContains("lm_head"))


def bilevel_split(model: nnx.Module) -> Tuple[Callable, base.BilevelParams,
                                              dict]:
  """Splits an adapted model into ``apply_fn``, ``BilevelParams(x, y)``, frozen.

  ``x`` holds every ``nnx.LoRAParam`` (the adapters), ``y`` the parameters
  of ``lm_head``, ``frozen`` all other variables; the three are nested
  dicts (``nnx.to_pure_dict``) that partition the model's state.

  ``apply_fn(x, y, input_ids, attention_mask=None, *, positions=None,
  frozen=None) -> logits`` rebuilds the model with ``nnx.merge`` and calls
  it; it is pure, so it can be used inside ``jax.grad``/``jax.jit``. The
  frozen weights are closed over; pass ``frozen=`` explicitly to make them a
  ``jit`` argument instead of a captured constant (for large models).

  Reference model (e.g. DPO's :math:`\\pi_{ref}`): the logits with the
  adapters off are ``apply_fn(zero_adapters(x), y0, ...)``, which equal the
  base model's exactly (``B = 0`` adds an exact zero).

  Args:
    model: a model with LoRA adapters (:func:`add_lora`) and an ``lm_head``.

  Returns:
    ``(apply_fn, jaxbilevel.BilevelParams(x, y), frozen)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbilevel import llm
    >>> model = llm.CausalLM(llm.LMConfig.tiny(), rngs=nnx.Rngs(0))
    >>> ids = jnp.array([[1, 2, 3]])
    >>> base_logits = model(ids)
    >>> llm.add_lora(model, rank=4, rngs=nnx.Rngs(1))
    CausalLM(...)
    >>> apply_fn, params, frozen = llm.bilevel_split(model)
    >>> sorted(params.y)
    ['lm_head']
    >>> logits = jax.jit(apply_fn)(params.x, params.y, ids)
    >>> bool(jnp.allclose(logits, base_logits, atol=1e-6))
    True
  """
  graphdef, x_state, y_state, frozen_state = nnx.split(
      model, nnx.LoRAParam, _Y_FILTER, ...)
  x, y = nnx.to_pure_dict(x_state), nnx.to_pure_dict(y_state)
  frozen_default = nnx.to_pure_dict(frozen_state)
  if not jax.tree.leaves(x):
    raise base.BilevelValidationError(
        "bilevel_split: the model has no nnx.LoRAParam; call add_lora(model, "
        "...) first.")
  if not jax.tree.leaves(y):
    raise base.BilevelValidationError(
        "bilevel_split: the model has no parameters under 'lm_head'.")

  def apply_fn(x, y, input_ids, attention_mask=None, *, positions=None,
               frozen=None):
    rebuilt = nnx.merge(graphdef, x, y,
                        frozen_default if frozen is None else frozen)
    return rebuilt(input_ids, attention_mask, positions=positions)

  return apply_fn, base.BilevelParams(x=x, y=y), frozen_default


def zero_adapters(x):
  """``x`` with every ``lora_b`` set to zero: the adapters switched off.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbilevel import llm
    >>> x = {"q_proj": {"lora": {"lora_a": jnp.ones((2, 1)),
    ...                          "lora_b": jnp.ones((1, 2))}}}
    >>> llm.zero_adapters(x)["q_proj"]["lora"]["lora_b"].tolist()
    [[0.0, 0.0]]
  """
  def zero(path, leaf):
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", None))
    return jnp.zeros_like(leaf) if name == "lora_b" else leaf

  return jax.tree_util.tree_map_with_path(zero, x)
