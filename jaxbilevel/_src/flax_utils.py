"""Splitting a flax parameter tree into the two levels ``x`` and ``y``, and back.

A bilevel method needs the upper variables ``x`` and the lower variables
``y`` as two pytrees, while a flax model keeps all its parameters in one
tree: a nested dict (linen ``variables["params"]``, or any plain dict of
arrays) or an ``nnx.State`` (from ``nnx.split(model)``). :func:`split_params`
selects the leaves of ``x`` by path or by predicate and puts the rest in
``y``; both halves keep the container type and the nesting of the input,
with only the selected paths, so that :func:`merge_params` rebuilds the full
tree inside ``f`` and ``g``. :func:`param_labels` makes label trees for
``optax.partition`` with the same selectors, to give parameter groups of one
level different optimizers.

A *selector* is either a regular expression, searched (``re.search``) in the
``"/"``-joined path (``"lin/lora/lora_a"``; anchor it with ``^``/``$`` to
match whole paths), or a predicate ``(path, leaf) -> bool`` where ``path`` is
the tuple of keys as strings and ``leaf`` is the array for a dict and the
``nnx.Variable`` (``nnx.Param``, ``nnx.LoRAParam``, ...) for an
``nnx.State``, so that a predicate can test the variable type.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Union

from flax import nnx
from flax import traverse_util

from jaxbilevel._src import base

Selector = Union[str, "re.Pattern[str]", Callable[[tuple, Any], bool]]

_LORA_NAME = re.compile(r"lora", re.IGNORECASE)


def is_lora(path: tuple, leaf: Any) -> bool:
  """A selector for LoRA adapters: ``nnx.LoRAParam`` variables or ``lora`` in the path.

  Matches the adapters of ``nnx.LoRA``/``nnx.LoRALinear`` (variables of type
  ``nnx.LoRAParam`` under ``.../lora/lora_a`` and ``lora_b``) and, in plain
  dicts, any parameter with a path component containing ``lora`` (any case),
  such as the ``lora_A``/``lora_B`` of PEFT-style checkpoints. Use it as the
  upper selector of :func:`split_params` when ``x`` is the adapters.

  Examples:
    >>> from jaxbilevel import flax_utils
    >>> flax_utils.is_lora(("layer0", "lora_A"), None)
    True
    >>> flax_utils.is_lora(("layer0", "kernel"), None)
    False
  """
  if isinstance(leaf, nnx.LoRAParam):
    return True
  return any(_LORA_NAME.search(part) for part in path)


def _as_predicate(selector: Selector, where: str) -> Callable[[tuple, Any],
                                                               bool]:
  if isinstance(selector, str):
    try:
      selector = re.compile(selector)
    except re.error as err:
      raise base.BilevelValidationError(
          f"{where}: {selector!r} is not a valid regular expression: {err}."
      ) from None
  if isinstance(selector, re.Pattern):
    pattern = selector
    return lambda path, leaf: pattern.search("/".join(path)) is not None
  if callable(selector):
    return selector
  raise base.BilevelValidationError(
      f"{where}: a selector must be a regular expression (str) matched "
      "against the '/'-joined parameter path, or a predicate (path, leaf) -> "
      f"bool; got {type(selector).__name__}.")


def _flatten(tree, where: str):
  """``(kind, [(path, str_path, leaf)])`` for an nnx.State or a nested dict."""
  if isinstance(tree, nnx.State):
    items = list(nnx.to_flat_state(tree))
    kind = "nnx"
  elif isinstance(tree, Mapping):
    items = list(traverse_util.flatten_dict(dict(tree)).items())
    kind = "dict"
  else:
    raise base.BilevelValidationError(
        f"{where}: expected an nnx.State (from nnx.split(model) or "
        "nnx.state(model)) or a nested dict of arrays (e.g. flax linen "
        f"variables['params']), got {type(tree).__name__}.")
  return kind, [(tuple(path), tuple(str(p) for p in path), leaf)
                for path, leaf in items]


def _unflatten(kind: str, items):
  """Rebuilds a tree of ``kind`` from ``[(path, leaf)]``."""
  if kind == "nnx":
    return nnx.from_flat_state(items)
  return traverse_util.unflatten_dict(dict(items))


def _paths_summary(items, limit: int = 8) -> str:
  shown = ["/".join(s) for _, s, _ in items[:limit]]
  more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
  return ", ".join(shown) + more


def split_params(params, upper: Selector) -> base.BilevelParams:
  """Splits a flax parameter tree into ``BilevelParams(x=selected, y=rest)``.

  Args:
    params: an ``nnx.State`` or a nested dict of arrays.
    upper: selector of the upper-level variables ``x`` (a regex on the
      ``"/"``-joined path or a predicate ``(path, leaf) -> bool``, see the
      module docstring); every other leaf goes to ``y``.

  Returns:
    A :class:`~jaxbilevel.BilevelParams` whose ``x`` and ``y`` have the type of
    ``params`` (``nnx.State`` or dict) and hold the selected and the other
    leaves under their original paths. Both must be non-empty.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbilevel import flax_utils
    >>> params = {"backbone": {"kernel": jnp.ones((2, 2), jnp.float32),
    ...                        "lora_a": jnp.zeros((2, 1), jnp.float32)},
    ...           "head": {"kernel": jnp.ones((2, 1), jnp.float32)}}
    >>> p = flax_utils.split_params(params, flax_utils.is_lora)
    >>> p.x
    {'backbone': {'lora_a': Array([[0.],
           [0.]], dtype=float32)}}
    >>> sorted(p.y), sorted(p.y["backbone"])
    (['backbone', 'head'], ['kernel'])
    >>> merged = flax_utils.merge_params(p.x, p.y)
    >>> sorted(merged["backbone"])
    ['kernel', 'lora_a']
  """
  kind, items = _flatten(params, "split_params")
  select = _as_predicate(upper, "split_params")
  x_items, y_items = [], []
  for path, str_path, leaf in items:
    chosen = bool(select(str_path, leaf))
    (x_items if chosen else y_items).append((path, str_path, leaf))
  for name, chosen, other in (("x", x_items, "no"), ("y", y_items, "every")):
    if not chosen:
      raise base.BilevelValidationError(
          f"split_params: the upper selector {upper!r} selects {other} "
          f"parameter, so {name} would be empty; both levels need variables. "
          f"The parameter paths are: {_paths_summary(items)}.")
  return base.BilevelParams(
      x=_unflatten(kind, [(p, leaf) for p, _, leaf in x_items]),
      y=_unflatten(kind, [(p, leaf) for p, _, leaf in y_items]))


def merge_params(x, y):
  """The full parameter tree from its two halves (inverse of :func:`split_params`).

  Call it inside ``f`` and ``g`` to rebuild the model's parameters, e.g.
  ``nnx.merge(graphdef, merge_params(x, y))`` or ``model.apply({"params":
  merge_params(x, y)}, inputs)``.

  Args:
    x: the upper half (an ``nnx.State`` or nested dict).
    y: the lower half, of the same type.

  Returns:
    One tree with the leaves of both, of the type of ``x``.
  """
  kind_x, x_items = _flatten(x, "merge_params (x)")
  kind_y, y_items = _flatten(y, "merge_params (y)")
  if kind_x != kind_y:
    raise base.BilevelValidationError(
        f"merge_params: x is {'an nnx.State' if kind_x == 'nnx' else 'a dict'}"
        f" but y is {'an nnx.State' if kind_y == 'nnx' else 'a dict'}; both "
        "halves must come from the same split_params call.")
  x_paths = {p for p, _, _ in x_items}
  both = sorted("/".join(s) for p, s, _ in y_items if p in x_paths)
  if both:
    raise base.BilevelValidationError(
        f"merge_params: x and y both hold the parameters {both}; each "
        "parameter must belong to exactly one level.")
  # A path that is a leaf in one half and a subtree in the other.
  for (name_a, items_a), (name_b, items_b) in (
      (("x", x_items), ("y", y_items)), (("y", y_items), ("x", x_items))):
    leaves = {p: s for p, s, _ in items_a}
    for p, s, _ in items_b:
      for i in range(1, len(p)):
        if p[:i] in leaves:
          raise base.BilevelValidationError(
              f"merge_params: {name_a} has a parameter at "
              f"'{'/'.join(leaves[p[:i]])}' where {name_b} has a subtree "
              f"(its parameter '{'/'.join(s)}'); the two halves have "
              "different structures at that path. Both must come from the "
              "same split_params call on one parameter tree.")
  return _unflatten(kind_x, [(p, leaf) for p, _, leaf in x_items + y_items])


def param_labels(rules: Mapping[str, Selector],
                 default: str) -> Callable[[Any], Any]:
  """Labels for ``optax.partition``: the first rule whose selector matches names a leaf.

  Args:
    rules: ordered dict ``label -> selector``; a leaf gets the label of the
      first selector that matches its path (and leaf), else ``default``.
    default: the label of leaves that no rule matches.

  Returns:
    A function ``params -> labels`` (a tree of strings of the same type and
    structure as ``params``), which is what ``optax.partition`` accepts as
    its ``param_labels``. It works on either level's tree (the ``x`` or ``y``
    from :func:`split_params`) or on a full tree.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from jaxbilevel import flax_utils
    >>> labels = flax_utils.param_labels({"frozen": "bias$"}, default="train")
    >>> x = {"dense": {"kernel": jnp.ones(2, jnp.float32),
    ...                "bias": jnp.ones(2, jnp.float32)}}
    >>> labels(x)
    {'dense': {'kernel': 'train', 'bias': 'frozen'}}
    >>> opt = optax.partition({"train": optax.sgd(0.5),
    ...                        "frozen": optax.set_to_zero()}, labels)
    >>> updates, _ = opt.update(x, opt.init(x), x)
    >>> updates["dense"]["kernel"], updates["dense"]["bias"]
    (Array([-0.5, -0.5], dtype=float32), Array([0., 0.], dtype=float32))
  """
  if not isinstance(rules, Mapping):
    raise base.BilevelValidationError(
        "param_labels: rules must be a dict label -> selector, got "
        f"{type(rules).__name__}.")
  predicates = [(label, _as_predicate(sel, "param_labels"))
                for label, sel in rules.items()]

  def label_of(str_path, leaf):
    for label, predicate in predicates:
      if predicate(str_path, leaf):
        return label
    return default

  def labels(params):
    kind, items = _flatten(params, "param_labels")
    if kind == "nnx":  # the labels sit in Variables, like the params
      return _unflatten(kind, [
          (p, leaf.replace(label_of(s, leaf))
           if isinstance(leaf, nnx.Variable) else label_of(s, leaf))
          for p, s, leaf in items])
    return _unflatten(kind, [(p, label_of(s, leaf)) for p, s, leaf in items])

  return labels
