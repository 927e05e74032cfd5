r"""LoRA adapters in PEFT's file layout, and merging them into the base weights.

:func:`save_adapter` writes the adapters of a model (and, by default, its
re-fitted output head) as a PEFT LoRA adapter directory:

* ``adapter_model.safetensors`` with, for an adapted projection
  ``model.layers.{i}.self_attn.q_proj``, the tensors
  ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``
  (``[r, in]``, i.e. :math:`A^\top`) and ``...lora_B.weight`` (``[out, r]``,
  :math:`B^\top`), and the head as ``base_model.model.lm_head.weight``
  (``[vocab, hidden]``, a *module to save*);
* ``adapter_config.json`` with ``peft_type: "LORA"``, ``task_type:
  "CAUSAL_LM"``, ``r``, ``lora_alpha``, ``target_modules``,
  ``modules_to_save`` and ``base_model_name_or_path``.

Conventions match PEFT's: the update of ``W x`` is
:math:`\frac{\alpha}{r} B^\top A^\top x` in PEFT's ``[out, in]`` layout,
which is :math:`\frac{\alpha}{r}\,x A B` with jaxbilevel's ``[in, out]``
matrices (``use_rslora`` adapters, scaled by :math:`\alpha/\sqrt r`, are read
too). So ``peft.PeftModel.from_pretrained(transformers_model, directory)``
on the same base weights computes the same logits, and :func:`load_adapter`
reads such a directory back (or one written by PEFT).

:func:`merge_lora` folds every adapter into its base kernel,
:math:`W \leftarrow W + \frac{\alpha}{r} A B`, so that the merged model can be
saved as an ordinary checkpoint (:func:`jaxbilevel.llm.save_safetensors`).

Note: the SmolLM2 weights of :func:`jaxbilevel.llm.load_pretrained`
(``"smollm2"``) are the dequantized Q4_1 GGUF weights, not the original
bfloat16 ones; an adapter trained on them applies to the original checkpoint
only approximately.
"""

from __future__ import annotations

import collections
import json
import math
import pathlib
import re
from typing import Any, Dict, Optional, Tuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jaxbilevel._src import base
from jaxbilevel._src.llm import adapters as adapters_lib
from jaxbilevel._src.llm import loading

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_KEY = re.compile(r"(.+)\.lora_(A|B)\.weight")


def _wrappers(model):
  return [(tuple(path), module) for path, module in nnx.iter_modules(model)
          if isinstance(module, adapters_lib.ScaledLoRA)]


def _hf_name(path) -> str:
  return "model." + ".".join(str(p) for p in path)


def _nnx_path(name: str) -> Tuple[Any, ...]:
  if not name.startswith("model."):
    raise loading.CheckpointError(f"unexpected module name {name!r}.")
  return tuple(int(p) if p.isdigit() else p
               for p in name[len("model."):].split("."))


def _child(parent, key):
  return parent[key] if isinstance(key, int) else getattr(parent, key)


def _lookup(model, path):
  node = model
  for key in path:
    node = _child(node, key)
  return node


def _replace(model, path, new):
  parent = _lookup(model, path[:-1])
  if isinstance(path[-1], int):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


def _with_params(model, params):
  if params is None:
    return model
  if not isinstance(params, base.BilevelParams):
    raise base.BilevelValidationError(
        f"params must be BilevelParams(x, y) from llm.bilevel_split, got "
        f"{type(params).__name__}.")
  model = nnx.clone(model)
  nnx.update(model, params.x, params.y)
  return model


def merge_lora(model: nnx.Module, *,
               params: Optional[base.BilevelParams] = None) -> nnx.Module:
  r"""A copy of ``model`` with every LoRA adapter folded into its kernel.

  Each :class:`jaxbilevel.llm.ScaledLoRA` wrapper is replaced by its base
  ``nnx.Linear`` with kernel :math:`W + \frac{\alpha}{r} A B` (``[in, out]``
  layout; computed in float32 at least and cast to the kernel's dtype). The
  merged model computes the adapted model's logits (up to float rounding)
  and can be saved with :func:`jaxbilevel.llm.save_safetensors`. ``model`` is
  not modified.

  Args:
    model: a model with adapters (:func:`jaxbilevel.llm.add_lora`).
    params: optional trained ``BilevelParams(x, y)`` of
      :func:`jaxbilevel.llm.bilevel_split` to merge instead of the values
      held by ``model`` (the head ``y`` is copied in too).

  Returns:
    The merged model (no ``nnx.LoRAParam`` left).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbilevel import llm
    >>> model = llm.add_lora(
    ...     llm.CausalLM(llm.LMConfig.tiny(), rngs=nnx.Rngs(0)), rank=4,
    ...     rngs=nnx.Rngs(1))
    >>> lora = model.layers[0].self_attn.q_proj.lora
    >>> lora.lora_b[...] = jnp.ones_like(lora.lora_b[...])
    >>> merged = llm.merge_lora(model)
    >>> ids = jnp.array([[1, 2, 3]])
    >>> bool(jnp.allclose(merged(ids), model(ids), atol=1e-5))
    True
  """
  model = nnx.clone(_with_params(model, params))
  wrappers = _wrappers(model)
  if not wrappers:
    raise base.BilevelValidationError(
        "merge_lora: the model has no LoRA adapters (llm.add_lora or "
        "llm.load_adapter add them).")
  for path, wrapper in wrappers:
    linear = wrapper.base
    kernel = linear.kernel[...]
    kind = jnp.promote_types(kernel.dtype, jnp.float32)
    delta = wrapper.scale * (wrapper.lora.lora_a[...].astype(kind)
                             @ wrapper.lora.lora_b[...].astype(kind))
    linear.kernel[...] = (kernel.astype(kind) + delta).astype(kernel.dtype)
    _replace(model, path, linear)
  return model


def _all_linear_names(model):
  return {_hf_name(p) for p, m in nnx.iter_modules(model)
          if isinstance(m, nnx.Linear) and p and p[0] != "lm_head"
          and p[-1] != "base"}


def save_adapter(model: nnx.Module, path_dir, *,
                 params: Optional[base.BilevelParams] = None,
                 save_head: bool = True,
                 base_model_name_or_path: Optional[str] = None) -> None:
  """Writes the model's LoRA adapters (and head) as a PEFT adapter directory.

  See the module docstring for the layout. ``target_modules`` is the list
  of adapted projection names (``["q_proj", "v_proj"]``) when every layer's
  projection of those names is adapted, else a regular expression matching
  exactly the adapted modules (PEFT matches a string with ``re.fullmatch``).

  Args:
    model: a :class:`jaxbilevel.llm.CausalLM` with adapters.
    path_dir: the output directory (created).
    params: optional trained ``BilevelParams(x=adapters, y=head)`` of
      :func:`jaxbilevel.llm.bilevel_split` to write instead of the values
      held by ``model``.
    save_head: also write ``lm_head`` (``modules_to_save: ["lm_head"]``):
      needed when the head was trained, as the lower variable of
      :func:`jaxbilevel.llm.dpo_sft_problem` is.
    base_model_name_or_path: recorded in ``adapter_config.json`` (e.g.
      ``"HuggingFaceTB/SmolLM2-135M-Instruct"``) for PEFT's
      ``AutoPeftModelForCausalLM``.

  Adapters of different ranks or scales (several :func:`add_lora` calls)
  are written with the most common ``(r, lora_alpha)`` as the defaults and
  the others in PEFT's ``rank_pattern`` / ``alpha_pattern``, keyed by the
  escaped full module name.

  Raises:
    BilevelValidationError: the model has no adapters.
  """
  loading._require("safetensors")  # pylint: disable=protected-access
  from safetensors.flax import save_file  # pylint: disable=g-import-not-at-top
  model = _with_params(model, params)
  wrappers = _wrappers(model)
  if not wrappers:
    raise base.BilevelValidationError(
        "save_adapter: the model has no LoRA adapters; add them with "
        "llm.add_lora (or train a llm.dpo_sft_problem) first.")
  def setting(wrapper):
    r = int(wrapper.lora.lora_a.shape[1])
    return r, float(wrapper.scale) * r   # (r, lora_alpha)

  counts = collections.Counter(setting(w) for _, w in wrappers)
  rank, alpha = max(counts, key=lambda k: (counts[k], k))
  rank_pattern, alpha_pattern = {}, {}
  tensors: Dict[str, jax.Array] = {}
  names = set()
  for path, wrapper in wrappers:
    name = _hf_name(path)
    names.add(name)
    r, a = setting(wrapper)
    if r != rank:
      rank_pattern[re.escape(name)] = r
    if a != alpha:
      alpha_pattern[re.escape(name)] = a
    tensors[f"{_PREFIX}{name}.lora_A.weight"] = jnp.asarray(
        wrapper.lora.lora_a[...]).T
    tensors[f"{_PREFIX}{name}.lora_B.weight"] = jnp.asarray(
        wrapper.lora.lora_b[...]).T
  short = sorted({n.rsplit(".", 1)[-1] for n in names})
  covered = {n for n in _all_linear_names(model) | names
             if n.rsplit(".", 1)[-1] in short}
  if covered == names:
    target_modules: Any = short
  else:
    target_modules = "|".join(re.escape(n) for n in sorted(names))
  config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "r": rank,
      "lora_alpha": alpha,
      "target_modules": target_modules,
      "modules_to_save": None,
      "lora_dropout": 0.0,
      "bias": "none",
      "fan_in_fan_out": False,
      "use_rslora": False,
      "use_dora": False,
      "init_lora_weights": True,
      "inference_mode": True,
      "rank_pattern": rank_pattern,
      "alpha_pattern": alpha_pattern,
  }
  if save_head:
    tensors[f"{_PREFIX}lm_head.weight"] = jnp.asarray(
        model.lm_head.kernel[...]).T
    config["modules_to_save"] = ["lm_head"]
  path_dir = pathlib.Path(path_dir)
  path_dir.mkdir(parents=True, exist_ok=True)
  save_file({k: jnp.array(v) for k, v in tensors.items()},
            str(path_dir / ADAPTER_FILE), metadata={"format": "pt"})
  (path_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def read_adapter(path_dir) -> Tuple[dict, Dict[str, np.ndarray]]:
  """``(adapter_config dict, {tensor name: array})`` of a PEFT directory."""
  loading._require("safetensors")  # pylint: disable=protected-access
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  path_dir = pathlib.Path(path_dir)
  if not path_dir.is_dir():
    raise FileNotFoundError(f"{path_dir}: not a directory (expected a PEFT "
                            f"adapter with {ADAPTER_CONFIG}).")
  config = loading._read_json(path_dir / ADAPTER_CONFIG,  # pylint: disable=protected-access
                              "the adapter config")
  file = path_dir / ADAPTER_FILE
  if not file.is_file():
    raise FileNotFoundError(f"{file}: adapter weights not found.")
  try:
    with safe_open(str(file), framework="flax") as handle:
      tensors = {k: handle.get_tensor(k) for k in handle.keys()}
  except Exception as err:  # safetensors raises its own error types.
    raise loading.CheckpointError(
        f"{file}: not a readable safetensors file ({err}).") from None
  return config, tensors


def load_adapter(model: nnx.Module, path_dir, *,
                 rngs: Optional[nnx.Rngs] = None) -> nnx.Module:
  """Loads a PEFT LoRA adapter directory into ``model`` (in place).

  Projections named in the file are wrapped in
  :class:`jaxbilevel.llm.ScaledLoRA` (or, if already wrapped, overwritten)
  with ``A = lora_A.T``, ``B = lora_B.T`` and scale ``lora_alpha / r``
  (``lora_alpha / sqrt(r)`` with ``use_rslora``); a saved ``lm_head`` is
  copied into the head.

  Args:
    model: a :class:`jaxbilevel.llm.CausalLM` with the base weights the
      adapter was trained on.
    path_dir: a directory with ``adapter_config.json`` and
      ``adapter_model.safetensors`` (:func:`save_adapter` or PEFT's
      ``save_pretrained``).
    rngs: unused randomness for the wrappers' construction (default
      ``nnx.Rngs(0)``; every value is then overwritten).

  Returns:
    ``model``.

  Raises:
    CheckpointError: not a LoRA adapter, a variant that is not covered
      (DoRA, trained biases), or tensors that do not match the model.

  Examples:
    >>> import tempfile, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbilevel import llm
    >>> config = llm.LMConfig.tiny()
    >>> model = llm.add_lora(llm.CausalLM(config, rngs=nnx.Rngs(0)),
    ...                      rank=4, rngs=nnx.Rngs(1))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...   llm.save_adapter(model, tmp)
    ...   other = llm.load_adapter(llm.CausalLM(config, rngs=nnx.Rngs(0)),
    ...                            tmp)
    >>> ids = jnp.array([[1, 2, 3]])
    >>> bool(jnp.all(other(ids) == model(ids)))
    True
  """
  config, tensors = read_adapter(path_dir)
  where = str(pathlib.Path(path_dir) / ADAPTER_CONFIG)
  if config.get("peft_type") != "LORA":
    raise loading.CheckpointError(
        f"{where}: peft_type={config.get('peft_type')!r}; only LORA adapters "
        "are read.")
  for flag in ("use_dora", "fan_in_fan_out"):
    if config.get(flag):
      raise loading.CheckpointError(f"{where}: {flag}=true is not covered.")
  if config.get("bias", "none") != "none" or config.get("lora_bias"):
    raise loading.CheckpointError(
        f"{where}: bias={config.get('bias')!r}; adapters with trained biases "
        "are not covered.")
  default_rank, default_alpha = config.get("r"), config.get("lora_alpha")
  if not isinstance(default_rank, int) or default_rank < 1 or not isinstance(
      default_alpha, (int, float)):
    raise loading.CheckpointError(
        f"{where}: needs an int r >= 1 and a number lora_alpha, got "
        f"r={default_rank!r}, lora_alpha={default_alpha!r}.")

  def pattern(patterns, name, default):
    # PEFT's rule (peft.utils.other.get_pattern_key): the first key that
    # matches the end of the module name at a "." boundary.
    for key, value in (patterns or {}).items():
      if re.match(rf"(.*\.)?({key})$", name):
        return value
    return default
  pairs: Dict[str, Dict[str, Any]] = collections.defaultdict(dict)
  head = None
  for key, value in tensors.items():
    name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    match = _KEY.fullmatch(name)
    if match:
      pairs[match.group(1)][match.group(2)] = value
    elif name in ("lm_head.weight", "lm_head.modules_to_save.default.weight"):
      head = value
    else:
      raise loading.CheckpointError(
          f"{path_dir}/{ADAPTER_FILE}: unexpected tensor {key!r} (expected "
          "...lora_A.weight, ...lora_B.weight or lm_head.weight).")
  if not pairs and head is None:
    raise loading.CheckpointError(f"{path_dir}/{ADAPTER_FILE}: no tensors.")
  rngs = nnx.Rngs(0) if rngs is None else rngs
  for name, ab in sorted(pairs.items()):
    if set(ab) != {"A", "B"}:
      raise loading.CheckpointError(
          f"{path_dir}: {name} has lora_{'/'.join(sorted(ab))} only; both "
          "lora_A and lora_B are needed.")
    rank = pattern(config.get("rank_pattern"), name, default_rank)
    alpha = pattern(config.get("alpha_pattern"), name, default_alpha)
    scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    path = _nnx_path(name)
    try:
      module = _lookup(model, path)
    except (AttributeError, IndexError, KeyError, TypeError):
      raise loading.CheckpointError(
          f"{path_dir}: the adapter targets {name}, which the model does not "
          "have (another architecture or number of layers?).") from None
    linear = module.base if isinstance(
        module, adapters_lib.ScaledLoRA) else module
    if not isinstance(linear, nnx.Linear):
      raise loading.CheckpointError(
          f"{path_dir}: {name} is a {type(module).__name__}, not a linear "
          "projection.")
    a, b = jnp.asarray(ab["A"]).T, jnp.asarray(ab["B"]).T
    if (a.shape != (linear.in_features, a.shape[1]) or a.shape[1] != rank
        or b.shape != (rank, linear.out_features)):
      raise loading.CheckpointError(
          f"{path_dir}: {name} has lora_A {tuple(ab['A'].shape)} and lora_B "
          f"{tuple(ab['B'].shape)}; with r={rank} the projection "
          f"[{linear.out_features}, {linear.in_features}] needs "
          f"({rank}, {linear.in_features}) and ({linear.out_features}, "
          f"{rank}).")
    if not isinstance(module, adapters_lib.ScaledLoRA):
      module = adapters_lib.ScaledLoRA(linear, rank=rank, alpha=alpha,
                                       rngs=rngs)
      _replace(model, path, module)
    elif module.lora.lora_a.shape[1] != rank:
      raise loading.CheckpointError(
          f"{path_dir}: {name} already has an adapter of rank "
          f"{module.lora.lora_a.shape[1]}, the file rank {rank}.")
    module.scale = float(scale)
    module.lora.lora_a[...] = a.astype(module.lora.lora_a.dtype)
    module.lora.lora_b[...] = b.astype(module.lora.lora_b.dtype)
  if head is not None:
    kernel = model.lm_head.kernel
    if tuple(head.shape) != tuple(kernel.shape)[::-1]:
      raise loading.CheckpointError(
          f"{path_dir}: lm_head.weight has shape {tuple(head.shape)}, the "
          f"model's head {tuple(kernel.shape)[::-1]}.")
    kernel[...] = jnp.asarray(head).T.astype(kernel.dtype)
  return model
