"""Qwen2-MoE: Qwen2's attention (q/k/v bias); MoE layers with router ``mlp.gate``, experts
``mlp.experts.{e}.gate|up|down_proj`` and one shared expert ``mlp.shared_expert.*`` scaled by
``sigmoid(mlp.shared_expert_gate)``; dense and sparse layers mixed (``decoder_sparse_step``,
``mlp_only_layers``); softmax -> top-k, renormalised only with ``norm_topk_prob``."""
from __future__ import annotations

from .moe import (MOE_FEATURES, QWEN_MOE_HF_DEFAULTS, QWEN_MOE_HF_KEYS, SHARED_EXPERT_RULES, dense_mlp_only,
                  expert_rules)
from .qwen2 import QWEN2
from .schema import FREE

QWEN2_MOE = QWEN2.extend(
    "qwen2_moe",
    hf_architectures=("Qwen2MoeForCausalLM",),
    hf_model_types=("qwen2_moe",),
    layer_rules=dense_mlp_only(QWEN2.layer_rules)
    + expert_rules("mlp.gate.weight", "mlp.experts.{e}.", "gate_proj.weight", "up_proj.weight", "down_proj.weight")
    + SHARED_EXPERT_RULES,
    features={**MOE_FEATURES, "moe_norm_topk": FREE, "shared_expert_size": FREE, "shared_expert_gate": True},
    hf_keys={**QWEN_MOE_HF_KEYS, "shared_expert_size": "shared_expert_intermediate_size"},
    hf_defaults=QWEN_MOE_HF_DEFAULTS,
    hf_required={"qkv_bias": (True, None)},
)
