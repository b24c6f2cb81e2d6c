"""Qwen3-MoE: Qwen3's attention (per-head q/k RMSNorm, no bias); MoE layers as Qwen2-MoE's
without the shared expert; softmax -> top-k, renormalised with ``norm_topk_prob``."""
from __future__ import annotations

from .moe import MOE_FEATURES, QWEN_MOE_HF_DEFAULTS, QWEN_MOE_HF_KEYS, dense_mlp_only, expert_rules
from .qwen3 import QWEN3
from .schema import FREE

QWEN3_MOE = QWEN3.extend(
    "qwen3_moe",
    hf_architectures=("Qwen3MoeForCausalLM",),
    hf_model_types=("qwen3_moe",),
    layer_rules=dense_mlp_only(QWEN3.layer_rules)
    + expert_rules("mlp.gate.weight", "mlp.experts.{e}.", "gate_proj.weight", "up_proj.weight", "down_proj.weight"),
    features={**MOE_FEATURES, "moe_norm_topk": FREE},
    hf_keys={**QWEN_MOE_HF_KEYS, "num_experts": ("num_local_experts", "num_experts")},
    hf_defaults=QWEN_MOE_HF_DEFAULTS,
    windows="all",
)
