"""LoRA adapters for flax Dense kernels, as a pure parameter transformation."""

from jaxbilevel._src.lora import init
from jaxbilevel._src.lora import lora
from jaxbilevel._src.lora import LoRA
from jaxbilevel._src.lora import matching_kernels
from jaxbilevel._src.lora import merge

__all__ = ("LoRA", "init", "lora", "matching_kernels", "merge")
