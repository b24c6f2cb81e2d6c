"""Mixtral: Mistral's attention, every layer a Mixture-of-Experts layer (router
``block_sparse_moe.gate``, experts ``block_sparse_moe.experts.{e}.w1|w3|w2`` = gate, up, down on
disk); softmax -> top-k -> renormalise over the chosen k (Megatron: ``moe_router_pre_softmax``
False)."""
from __future__ import annotations

from .llama import LLAMA
from .moe import MOE_FEATURES, dense_mlp_only, expert_rules

MIXTRAL = LLAMA.extend(
    "mixtral",
    hf_architectures=("MixtralForCausalLM",),
    hf_model_types=("mixtral",),
    layer_rules=dense_mlp_only(LLAMA.layer_rules)
    + expert_rules("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.", "w1.weight", "w3.weight",
                   "w2.weight"),
    features={**MOE_FEATURES, "moe_norm_topk": True},
    hf_keys={"num_experts": ("num_local_experts", "num_experts"), "moe_topk": "num_experts_per_tok",
             "moe_ffn_hidden_size": "intermediate_size"},
    hf_defaults={"moe_topk": 2},
    windows="all",
)
