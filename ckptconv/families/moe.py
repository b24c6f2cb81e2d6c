"""What every Mixture-of-Experts family adds to the dense tables it extends, as data.

In an MoE layer the dense MLP (``mlp.linear_fc1/fc2``) gives way to a router and ``E`` experts
(``{e}`` ranges over ``num_experts``; the Megatron name carries the GLOBAL expert index, the
parallel layout places it on its EP rank), plus, for some families, a shared expert and its gate.
The pre-MLP norm stays. Layers are chosen per layer (``moe_layer`` / ``dense_layer``), so dense
and sparse layers mix (Qwen2-MoE's ``decoder_sparse_step`` / ``mlp_only_layers``).
"""
from __future__ import annotations

from dataclasses import replace

from .llama import M, L
from .schema import FREE, Rule

EXPERT = M + "mlp.experts.local_experts.{e}."
DENSE_MLP = (M + "mlp.linear_fc1.weight", M + "mlp.linear_fc2.weight")


def dense_mlp_only(rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """``rules`` with the dense MLP's weights kept to dense layers."""
    return tuple(replace(r, when="dense_layer") if r.megatron in DENSE_MLP else r for r in rules)


def expert_rules(router: str, experts: str, gate: str, up: str, down: str) -> tuple[Rule, ...]:
    """Router and per-expert SwiGLU MLP; HF names relative to ``model.layers.{i}.``."""
    return (
        Rule(M + "mlp.router.weight", (L + router,), when="moe_layer"),
        Rule(EXPERT + "linear_fc1.weight", (L + experts + gate, L + experts + up), "gate_up", when="moe_layer"),
        Rule(EXPERT + "linear_fc2.weight", (L + experts + down,), when="moe_layer"),
    )


SHARED_EXPERT_RULES = (
    Rule(M + "mlp.shared_experts.linear_fc1.weight",
         (L + "mlp.shared_expert.gate_proj.weight", L + "mlp.shared_expert.up_proj.weight"), "gate_up",
         when="moe_shared_expert"),
    Rule(M + "mlp.shared_experts.linear_fc2.weight", (L + "mlp.shared_expert.down_proj.weight",),
         when="moe_shared_expert"),
    Rule(M + "mlp.shared_experts.gate_weight", (L + "mlp.shared_expert_gate.weight",), when="moe_shared_expert_gate"),
)

# features an MoE family reads per model; a family fixes the others
MOE_FEATURES = {"num_experts": FREE, "shared_expert_size": None, "shared_expert_gate": False}
# Qwen-MoE config keys (Qwen2-MoE names the expert count num_experts, Qwen3-MoE num_local_experts)
QWEN_MOE_HF_KEYS = {
    "num_experts": ("num_experts", "num_local_experts"), "moe_topk": "num_experts_per_tok",
    "moe_ffn_hidden_size": "moe_intermediate_size", "moe_norm_topk": "norm_topk_prob",
    "moe_sparse_step": "decoder_sparse_step", "moe_dense_layers": "mlp_only_layers",
}
QWEN_MOE_HF_DEFAULTS = {"moe_norm_topk": False, "moe_sparse_step": 1, "moe_dense_layers": ()}
