"""Pretrained decoder LMs (Llama / Qwen2) in flax.nnx, with LoRA and a bilevel split.

Not imported by ``import jaxbilevel``; the loaders need the optional
``llm`` extra: ``pip install -e ".[llm]"`` in a jaxbilevel checkout (or
``pip install safetensors gguf tokenizers``).
"""

from jaxbilevel._src.llm.adapters import add_lora
from jaxbilevel._src.llm.adapters import bilevel_split
from jaxbilevel._src.llm.adapters import ScaledLoRA
from jaxbilevel._src.llm.adapters import zero_adapters
from jaxbilevel._src.llm.chat import chat_template
from jaxbilevel._src.llm.chat import format_chat
from jaxbilevel._src.llm.chat import read_chat_template
from jaxbilevel._src.llm.data import apply_chat_template
from jaxbilevel._src.llm.data import batch_iterator
from jaxbilevel._src.llm.data import from_hf_dataset
from jaxbilevel._src.llm.data import hh_messages
from jaxbilevel._src.llm.data import LLMDataError
from jaxbilevel._src.llm.data import load_preference_jsonl
from jaxbilevel._src.llm.data import load_sft_jsonl
from jaxbilevel._src.llm.data import PREFERENCE_KEYS
from jaxbilevel._src.llm.data import preference_to_sft
from jaxbilevel._src.llm.data import PreferenceExample
from jaxbilevel._src.llm.data import read_jsonl
from jaxbilevel._src.llm.data import SFT_KEYS
from jaxbilevel._src.llm.data import SFTExample
from jaxbilevel._src.llm.data import shuffle
from jaxbilevel._src.llm.data import split_hh_dialogue
from jaxbilevel._src.llm.data import stacked_batches
from jaxbilevel._src.llm.data import tokenize_preferences
from jaxbilevel._src.llm.data import tokenize_sft
from jaxbilevel._src.llm.data import train_eval_split
from jaxbilevel._src.llm.export import load_adapter
from jaxbilevel._src.llm.export import merge_lora
from jaxbilevel._src.llm.export import read_adapter
from jaxbilevel._src.llm.export import save_adapter
from jaxbilevel._src.llm.generate import forward_cached
from jaxbilevel._src.llm.generate import generate
from jaxbilevel._src.llm.generate import Generation
from jaxbilevel._src.llm.generate import init_cache
from jaxbilevel._src.llm.generate import KVCache
from jaxbilevel._src.llm.generate import top_p_filter
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
from jaxbilevel._src.llm.losses import add_reference_logprobs
from jaxbilevel._src.llm.losses import dpo_logprobs
from jaxbilevel._src.llm.losses import dpo_metrics
from jaxbilevel._src.llm.losses import dpo_reward_margin
from jaxbilevel._src.llm.losses import make_dpo_loss
from jaxbilevel._src.llm.losses import make_sft_loss
from jaxbilevel._src.llm.losses import preference_accuracy
from jaxbilevel._src.llm.losses import preference_eval
from jaxbilevel._src.llm.losses import sequence_logprobs
from jaxbilevel._src.llm.losses import token_logprobs
from jaxbilevel._src.llm.model import CausalLM
from jaxbilevel._src.llm.model import count_params
from jaxbilevel._src.llm.model import LMConfig
from jaxbilevel._src.llm.model import rope_inverse_frequencies
from jaxbilevel._src.llm.model import UnknownArchitectureError
from jaxbilevel._src.llm.problem import dpo_sft_problem
from jaxbilevel._src.llm.problem import DPOSFTProblem

__all__ = (
    "CausalLM",
    "CheckpointError",
    "DPOSFTProblem",
    "Generation",
    "KVCache",
    "LLMDataError",
    "LMConfig",
    "PREFERENCE_KEYS",
    "PreferenceExample",
    "SFTExample",
    "SFT_KEYS",
    "ScaledLoRA",
    "UnknownArchitectureError",
    "add_lora",
    "add_reference_logprobs",
    "apply_chat_template",
    "batch_iterator",
    "bilevel_split",
    "chat_template",
    "count_params",
    "dpo_logprobs",
    "dpo_metrics",
    "dpo_reward_margin",
    "dpo_sft_problem",
    "format_chat",
    "forward_cached",
    "from_hf_dataset",
    "generate",
    "gguf_to_hf_name",
    "hf_parameter_names",
    "hh_messages",
    "init_cache",
    "load_adapter",
    "load_gguf",
    "load_preference_jsonl",
    "load_pretrained",
    "load_safetensors",
    "load_sft_jsonl",
    "load_tokenizer",
    "locate",
    "make_dpo_loss",
    "make_sft_loss",
    "merge_lora",
    "preference_accuracy",
    "preference_eval",
    "preference_to_sft",
    "read_adapter",
    "read_chat_template",
    "read_config",
    "read_jsonl",
    "rope_inverse_frequencies",
    "rope_permute",
    "rope_unpermute",
    "save_adapter",
    "save_safetensors",
    "sequence_logprobs",
    "shuffle",
    "split_hh_dialogue",
    "stacked_batches",
    "token_logprobs",
    "top_p_filter",
    "tokenize_preferences",
    "tokenize_sft",
    "train_eval_split",
    "zero_adapters",
)
