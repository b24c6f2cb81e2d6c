"""What a model family is: a declarative table of rules, its architecture features and the
names its HF config uses for them.

A rule maps one Megatron logical tensor (global layer index ``{i}``, TP=1 layout) to the
Hugging Face tensors it is made of, through one pure op (see ``ckptconv.ops``). How a
Megatron tensor is split over TP/PP ranks is not family knowledge: it is a property of the
Megatron module and lives in ``ckptconv.plan.megatron_layout``.

The architecture is data on ``ModelConfig`` (norm kind and offset, activation, gating,
biases, position embedding, qk-norm, soft-capping, embedding scale, per-layer windows, ...):
the HF config reader/writer (``families.hf_config``), the Megatron args (both ways), the
runtime's shapes and its decoder block are all derived from these fields.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Callable

from . import hf_config
from .config import FEATURES, FREE, ModelConfig  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class Rule:
    """megatron name pattern <- hf name patterns, through ``op``; ``when`` filters by config."""
    megatron: str
    hf: tuple[str, ...]
    op: str = "identity"
    when: str | None = None      # name of a predicate in CONDITIONS (or, per layer, LAYER_CONDITIONS)


@dataclass(frozen=True)
class Mapping:
    """One concrete rule instance: a Megatron logical tensor and its HF tensors."""
    megatron: str
    hf: tuple[str, ...]
    op: str


CONDITIONS: dict[str, Callable[[ModelConfig], bool]] = {
    "untied": lambda c: not c.tie_embeddings,
    "qkv_bias": lambda c: c.qkv_bias,
    "linear_bias": lambda c: c.linear_bias,
    "qk_norm": lambda c: c.qk_norm,
    "norm_bias": lambda c: c.norm == "layernorm",
    "learned_position": lambda c: c.position == "learned_absolute",
    "sandwich_norm": lambda c: c.sandwich_norm,
}

# Conditions of one decoder layer (cfg, layer index): dense MLP vs Mixture-of-Experts layers.
LAYER_CONDITIONS: dict[str, Callable[[ModelConfig, int], bool]] = {
    "moe_layer": lambda c, i: c.is_moe_layer(i),
    "dense_layer": lambda c, i: not c.is_moe_layer(i),
    "moe_shared_expert": lambda c, i: c.is_moe_layer(i) and bool(c.shared_expert_size),
    "moe_shared_expert_gate": lambda c, i: c.is_moe_layer(i) and bool(c.shared_expert_size) and c.shared_expert_gate,
}

# Index variables a rule pattern may use, and how many values each takes for a model.
INDEX_RANGES: dict[str, Callable[[ModelConfig], int]] = {"i": lambda c: c.num_layers,
                                                         "e": lambda c: c.num_experts or 0}
_VARS = re.compile(r"\{(\w+)\}")


def expand_rule(r: Rule, cfg: ModelConfig, **fixed: int) -> list[Mapping]:
    """Every instance of ``r``: one per value of each index variable its patterns name (those
    given in ``fixed`` take that value)."""
    names = sorted({v for p in (r.megatron, *r.hf) for v in _VARS.findall(p)} - set(fixed))
    out = []
    for values in itertools.product(*(range(INDEX_RANGES[v](cfg)) for v in names)):
        env = {**fixed, **dict(zip(names, values))}
        out.append(Mapping(r.megatron.format(**env), tuple(h.format(**env) for h in r.hf), r.op))
    return out


@dataclass(frozen=True)
class Family:
    """A model family: its tables, its fixed architecture features and its HF config names.

    ``features``: ModelConfig feature -> value this family always has (FREE: read per model
    through ``hf_keys``). ``hf_keys``: ModelConfig field -> HF config key or keys (the first
    present is read, the first is written; a dotted key looks inside a sub-dict, e.g.
    ``rope_parameters.partial_rotary_factor``; None in ``extend`` drops a key). ``hf_defaults``: value
    of a field when its HF key is absent (a callable gets the config read so far).
    ``hf_required``: HF key -> accepted values (the first is written back). ``windows``: how the
    HF config states per-layer sliding windows (see ``families.windows``). ``ignore_hf``:
    regexes of HF tensors that carry no weights (derived buffers)."""
    name: str
    hf_architectures: tuple[str, ...]
    hf_model_types: tuple[str, ...]
    global_rules: tuple[Rule, ...]
    layer_rules: tuple[Rule, ...]
    features: dict = field(default_factory=dict)
    hf_keys: dict = field(default_factory=dict)
    hf_defaults: dict = field(default_factory=dict)
    hf_required: dict = field(default_factory=dict)
    windows: str = "none"
    ignore_hf: tuple[str, ...] = ()

    def expand(self, cfg: ModelConfig) -> list[Mapping]:
        """Every concrete mapping for this model, in Megatron state_dict order."""
        def keep(r: Rule, i: int | None = None) -> bool:
            if r.when in LAYER_CONDITIONS:
                return LAYER_CONDITIONS[r.when](cfg, i)
            return r.when is None or CONDITIONS[r.when](cfg)
        head = [r for r in self.global_rules if keep(r) and r.megatron.startswith("embedding.")]
        tail = [r for r in self.global_rules if keep(r) and not r.megatron.startswith("embedding.")]
        out = [m for r in head for m in expand_rule(r, cfg)]
        for i in range(cfg.num_layers):
            out += [m for r in self.layer_rules if keep(r, i) for m in expand_rule(r, cfg, i=i)]
        return out + [m for r in tail for m in expand_rule(r, cfg)]

    def from_hf_config(self, hf: dict) -> ModelConfig:
        return hf_config.read_hf_config(self, hf)

    def to_hf_config(self, cfg: ModelConfig) -> dict:
        return hf_config.write_hf_config(self, cfg)

    def fixed_features(self) -> dict:
        return {k: v for k, v in self.features.items() if v is not FREE}

    def extend(self, name: str, *, hf_architectures: tuple[str, ...], hf_model_types: tuple[str, ...],
               global_rules: tuple[Rule, ...] | None = None, layer_rules: tuple[Rule, ...] | None = None,
               extra_layer_rules: tuple[Rule, ...] = (), features: dict | None = None,
               hf_keys: dict | None = None, hf_defaults: dict | None = None, hf_required: dict | None = None,
               windows: str | None = None, ignore_hf: tuple[str, ...] = ()) -> "Family":
        """A derived family: these tables with some rules replaced or added, some features,
        HF keys, defaults and requirements overridden."""
        return Family(name, hf_architectures, hf_model_types,
                      self.global_rules if global_rules is None else global_rules,
                      (self.layer_rules if layer_rules is None else layer_rules) + extra_layer_rules,
                      {**self.features, **(features or {})},
                      {k: v for k, v in {**self.hf_keys, **(hf_keys or {})}.items() if v is not None},
                      {**self.hf_defaults, **(hf_defaults or {})},
                      {k: v for k, v in {**self.hf_required, **(hf_required or {})}.items() if v is not None},
                      windows or self.windows, self.ignore_hf + ignore_hf)
