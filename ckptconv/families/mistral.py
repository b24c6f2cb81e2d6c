"""Mistral: the Llama tables; sliding_window is carried in the HF config."""
from __future__ import annotations

from .llama import LLAMA, hf_config_for, llama_config

MISTRAL = LLAMA.extend(
    "mistral",
    hf_architectures=("MistralForCausalLM",),
    hf_model_types=("mistral",),
    from_hf_config=lambda hf: llama_config(hf, family="mistral"),
    to_hf_config=lambda c: hf_config_for(c, "MistralForCausalLM", "mistral", sliding_window=None),
)
