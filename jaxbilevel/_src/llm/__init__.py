"""Pretrained decoder language models in flax.nnx (see jaxbilevel.llm).

Not imported by ``import jaxbilevel``: the loaders need the optional ``llm``
extra (safetensors, gguf, tokenizers).
"""
