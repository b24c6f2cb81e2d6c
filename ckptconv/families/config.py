"""ModelConfig: the architecture facts a conversion needs, independent of any framework's names.

The architecture is data (norm kind and offset, activation, gating, biases, position
embedding, qk-norm, soft-capping, embedding scale, per-layer windows, ...): the HF config
reader/writer (``families.hf_config``), the Megatron args (both ways), the runtime's shapes
and its decoder block are all derived from these fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

FREE = "<read from the HF config>"     # a feature a family reads per model instead of fixing it


@dataclass(frozen=True)
class ModelConfig:
    """The architecture facts a conversion needs, independent of any framework's names."""
    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    qkv_bias: bool
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict | None = field(default=None, compare=False)
    hf_config: dict = field(default_factory=dict, compare=False, repr=False)
    # -- architecture features (defaults: Llama) -------------------------------------
    norm: str = "rmsnorm"                   # rmsnorm | layernorm (with bias)
    norm_offset: float = 0.0                # 1.0: y = x_hat * (1 + w) (zero-centred gamma)
    activation: str = "silu"                # silu | gelu_tanh | gelu
    gated: bool = True                      # act(gate) * up (fc1 = [gate; up]) or act(fc1)
    linear_bias: bool = False               # a bias on every linear (GPT-2)
    position: str = "rope"                  # rope | learned_absolute
    qk_norm: bool = False                   # per-head q/k norm before RoPE (Qwen3, Gemma 3)
    sandwich_norm: bool = False             # post-attention / post-feedforward norms (Gemma 2/3)
    embedding_scale: bool = False           # embeddings * sqrt(hidden), in the model dtype (Gemma)
    attn_softcap: float | None = None       # tanh soft-capping of attention scores (Gemma 2)
    final_softcap: float | None = None      # tanh soft-capping of the logits (Gemma 2)
    query_pre_attn_scalar: float | None = None   # softmax scale = this ** -0.5 (default head_dim)
    rotary_percent: float = 1.0             # fraction of each head's dims that RoPE rotates
    rope_local_theta: float | None = None   # RoPE base of sliding-window layers (Gemma 3)
    layer_windows: tuple = ()               # per layer: sliding window W (attend to delta < W) or None
    # -- Mixture of Experts (num_experts None: a dense model) --------------------------
    num_experts: int | None = None          # routed experts per MoE layer
    moe_topk: int | None = None             # experts each token is routed to
    moe_ffn_hidden_size: int | None = None  # one expert's FFN size
    moe_norm_topk: bool = True              # softmax over the chosen k (Mixtral) vs top-k of softmax over all
    shared_expert_size: int | None = None   # FFN size of the always-on shared expert (Qwen2-MoE)
    shared_expert_gate: bool = False        # shared expert scaled by sigmoid(gate . x)
    moe_sparse_step: int = 1                # HF decoder_sparse_step: layer i is MoE when (i + 1) % step == 0 ...
    moe_dense_layers: tuple = ()            # ... and i is not one of these (HF mlp_only_layers)

    @property
    def q_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def softmax_scale(self) -> float:
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` is a Mixture-of-Experts layer (HF Qwen2-MoE's rule)."""
        return bool(self.num_experts) and layer not in tuple(self.moe_dense_layers) \
            and (layer + 1) % int(self.moe_sparse_step or 1) == 0


FEATURES = tuple(f.name for f in fields(ModelConfig)
                 if f.name in ("qkv_bias", "norm", "norm_offset", "activation", "gated", "linear_bias", "position",
                               "qk_norm", "sandwich_norm", "embedding_scale", "attn_softcap", "final_softcap",
                               "query_pre_attn_scalar", "rotary_percent", "rope_local_theta",
                               "num_experts", "moe_norm_topk", "shared_expert_size", "shared_expert_gate"))
