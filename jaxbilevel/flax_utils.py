"""Splitting flax parameter trees (:class:`flax.nnx.State` or nested dicts) into the two levels."""

from jaxbilevel._src.flax_utils import is_lora
from jaxbilevel._src.flax_utils import merge_params
from jaxbilevel._src.flax_utils import param_labels
from jaxbilevel._src.flax_utils import split_params

__all__ = ("is_lora", "merge_params", "param_labels", "split_params")
