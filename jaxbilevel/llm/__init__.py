"""Pretrained decoder LMs (Llama / Qwen2) in flax.nnx, with LoRA and a bilevel split.

Not imported by ``import jaxbilevel``; the loaders need the optional
``llm`` extra: ``pip install 'jaxbilevel[llm]'``.
"""

from jaxbilevel._src.llm.adapters import add_lora
from jaxbilevel._src.llm.adapters import bilevel_split
from jaxbilevel._src.llm.adapters import ScaledLoRA
from jaxbilevel._src.llm.adapters import zero_adapters
from jaxbilevel._src.llm.loading import CheckpointError
from jaxbilevel._src.llm.loading import gguf_to_hf_name
from jaxbilevel._src.llm.loading import hf_parameter_names
from jaxbilevel._src.llm.loading import load_gguf
from jaxbilevel._src.llm.loading import load_pretrained
from jaxbilevel._src.llm.loading import load_safetensors
from jaxbilevel._src.llm.loading import load_tokenizer
from jaxbilevel._src.llm.loading import locate
from jaxbilevel._src.llm.loading import read_config
from jaxbilevel._src.llm.loading import rope_permute
from jaxbilevel._src.llm.loading import rope_unpermute
from jaxbilevel._src.llm.loading import save_safetensors
from jaxbilevel._src.llm.model import CausalLM
from jaxbilevel._src.llm.model import count_params
from jaxbilevel._src.llm.model import LMConfig
from jaxbilevel._src.llm.model import rope_inverse_frequencies
from jaxbilevel._src.llm.model import UnknownArchitectureError

__all__ = (
    "CausalLM",
    "CheckpointError",
    "LMConfig",
    "ScaledLoRA",
    "UnknownArchitectureError",
    "add_lora",
    "bilevel_split",
    "count_params",
    "gguf_to_hf_name",
    "hf_parameter_names",
    "load_gguf",
    "load_pretrained",
    "load_safetensors",
    "load_tokenizer",
    "locate",
    "read_config",
    "rope_inverse_frequencies",
    "rope_permute",
    "rope_unpermute",
    "save_safetensors",
    "zero_adapters",
)
