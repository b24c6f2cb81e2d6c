"""What a model family is: a declarative table of rules plus the config mapping.

A rule maps one Megatron logical tensor (global layer index ``{i}``, TP=1 layout) to the
Hugging Face tensors it is made of, through one pure op (see ``ckptconv.ops``). How a
Megatron tensor is split over TP/PP ranks is not family knowledge: it is a property of the
Megatron module and lives in ``ckptconv.plan.megatron_layout``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


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

    @property
    def q_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class Rule:
    """megatron name pattern <- hf name patterns, through ``op``; ``when`` filters by config."""
    megatron: str
    hf: tuple[str, ...]
    op: str = "identity"
    when: str | None = None      # name of a ModelConfig predicate in CONDITIONS


@dataclass(frozen=True)
class Mapping:
    """One concrete rule instance: a Megatron logical tensor and its HF tensors."""
    megatron: str
    hf: tuple[str, ...]
    op: str


CONDITIONS: dict[str, Callable[[ModelConfig], bool]] = {
    "untied": lambda c: not c.tie_embeddings,
    "qkv_bias": lambda c: c.qkv_bias,
}


@dataclass(frozen=True)
class Family:
    """A model family: its tables and its HF config mapping (both directions)."""
    name: str
    hf_architectures: tuple[str, ...]
    hf_model_types: tuple[str, ...]
    global_rules: tuple[Rule, ...]
    layer_rules: tuple[Rule, ...]
    from_hf_config: Callable[[dict], ModelConfig]
    to_hf_config: Callable[[ModelConfig], dict]

    def expand(self, cfg: ModelConfig) -> list[Mapping]:
        """Every concrete mapping for this model, in Megatron state_dict order."""
        def keep(r: Rule) -> bool:
            return r.when is None or CONDITIONS[r.when](cfg)
        out: list[Mapping] = []
        head = [r for r in self.global_rules if keep(r) and r.megatron.startswith("embedding.")]
        tail = [r for r in self.global_rules if keep(r) and not r.megatron.startswith("embedding.")]
        for r in head:
            out.append(Mapping(r.megatron, r.hf, r.op))
        for i in range(cfg.num_layers):
            for r in self.layer_rules:
                if keep(r):
                    out.append(Mapping(r.megatron.format(i=i), tuple(h.format(i=i) for h in r.hf), r.op))
        for r in tail:
            out.append(Mapping(r.megatron, r.hf, r.op))
        return out

    def extend(self, name: str, *, hf_architectures: tuple[str, ...], hf_model_types: tuple[str, ...],
               extra_layer_rules: tuple[Rule, ...] = (),
               from_hf_config: Callable[[dict], ModelConfig] | None = None,
               to_hf_config: Callable[[ModelConfig], dict] | None = None) -> "Family":
        """A derived family: same tables plus extra rules, optionally another config mapping."""
        return Family(name, hf_architectures, hf_model_types, self.global_rules,
                      self.layer_rules + extra_layer_rules,
                      from_hf_config or self.from_hf_config, to_hf_config or self.to_hf_config)
