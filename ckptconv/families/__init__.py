"""Family registry: find the family of an HF config, or by name."""
from __future__ import annotations

from ..errors import UnsupportedFamily
from .llama import LLAMA
from .gemma import GEMMA2, GEMMA3
from .gpt2 import GPT2
from .mistral import MISTRAL
from .mixtral import MIXTRAL
from .phi3 import PHI3
from .qwen2 import QWEN2
from .qwen2_moe import QWEN2_MOE
from .qwen3 import QWEN3
from .qwen3_moe import QWEN3_MOE
from .schema import Family, Mapping, ModelConfig, Rule

# Registration order matters for Megatron args without an HF config: the first family whose
# fixed features fit the args is chosen (Llama before its window-capable Mistral).
FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3, PHI3, GPT2, GEMMA2, GEMMA3,
                                                    MIXTRAL, QWEN2_MOE, QWEN3_MOE)}


def family_by_name(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedFamily(f"unknown family {name!r}", fix=f"use one of {sorted(FAMILIES)}") from None


def family_for_hf(hf: dict, path: object = "config.json") -> Family:
    archs = hf.get("architectures") or []
    for fam in FAMILIES.values():
        if any(a in fam.hf_architectures for a in archs):
            return fam
    for fam in FAMILIES.values():
        if hf.get("model_type") in fam.hf_model_types:
            return fam
    raise UnsupportedFamily(
        f"unknown architecture {archs or hf.get('model_type')!r}", path=path,
        fix=f"supported: {', '.join(a for f in FAMILIES.values() for a in f.hf_architectures)}")


def config_from_hf(hf: dict, path: object = "config.json") -> ModelConfig:
    return family_for_hf(hf, path).from_hf_config(hf)


__all__ = ["FAMILIES", "Family", "Mapping", "ModelConfig", "Rule", "family_by_name",
           "family_for_hf", "config_from_hf"]
