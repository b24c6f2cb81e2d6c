"""Mistral: the Llama tables; ``sliding_window`` applies to every layer."""
from __future__ import annotations

from .llama import LLAMA

MISTRAL = LLAMA.extend(
    "mistral",
    hf_architectures=("MistralForCausalLM",),
    hf_model_types=("mistral",),
    windows="all",
)
