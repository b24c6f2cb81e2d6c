"""HF config.json <-> ModelConfig for any family, driven by the family's tables.

One reader and one writer: a family only names its HF keys (``hf_keys``), their defaults,
the values it requires (``hf_required``), its fixed features and its window rule.
"""
from __future__ import annotations

from dataclasses import MISSING, fields

from ..errors import UnsupportedFamily
from . import windows
from .config import FREE, ModelConfig

_TYPES = {f.name: f.type for f in fields(ModelConfig)}
_HAS_DEFAULT = {f.name: f.default is not MISSING or f.default_factory is not MISSING for f in fields(ModelConfig)}
_CAST = {"int": int, "float": float, "bool": bool, "float | None": lambda v: None if v is None else float(v),
         "int | None": lambda v: None if v is None else int(v), "tuple": tuple}


def _get(hf: dict, key: str):
    cur = hf
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _put(hf: dict, key: str, value) -> None:
    *path, last = key.split(".")
    cur = hf
    for part in path:
        cur = cur.setdefault(part, {})
    cur[last] = value


def _keys(spec) -> tuple[str, ...]:
    return (spec,) if isinstance(spec, str) else tuple(spec)


def rope_parameters(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from a transformers 4.x or 5.x config."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling")
    if legacy:
        params = {**legacy, **params}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    drop = ("rope_theta", "partial_rotary_factor")
    scaling = None if rope_type in (None, "default") else {k: v for k, v in params.items() if k not in drop}
    return theta, scaling


def read_hf_config(family, hf: dict) -> ModelConfig:
    for key, accepted in family.hf_required.items():
        if _get(hf, key) not in accepted:
            raise UnsupportedFamily(f"{family.name} with {key}={_get(hf, key)!r} has no Megatron-Core equivalent in "
                                    f"the supported layouts", path="config.json",
                                    fix=f"supported: {key} in {list(accepted)}")
    theta, scaling = rope_parameters(hf)
    values: dict = {"family": family.name, "rope_theta": theta, "rope_scaling": scaling, "hf_config": dict(hf)}
    values.update(family.fixed_features())
    keyed = {**family.hf_keys, **{k: () for k in family.hf_defaults if k not in family.hf_keys}}
    for name, spec in keyed.items():
        found = next((v for k in _keys(spec) if (v := _get(hf, k)) is not None), None)
        if found is None and name in family.hf_defaults:
            default = family.hf_defaults[name]
            found = default(values) if callable(default) else default
        if found is None:
            if _HAS_DEFAULT[name]:
                continue
            raise UnsupportedFamily(f"config.json has no {_keys(spec)[0]!r}", path="config.json",
                                    fix=f"a {family.name} config states {_keys(spec)[0]}")
        values[name] = _CAST.get(_TYPES[name], lambda v: v)(found)
    values["layer_windows"] = windows.READ[family.windows](hf, int(values["num_layers"]))
    return ModelConfig(**values)


def write_hf_config(family, cfg: ModelConfig) -> dict:
    """A fresh HF config dict for ``cfg`` (used when the checkpoint carries none)."""
    hf: dict = {"architectures": [family.hf_architectures[0]], "model_type": family.hf_model_types[0],
                # Megatron args do not know the tokenizer's special ids (a family default such as
                # Phi-3's pad id 32000 may lie outside this model's vocabulary)
                "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if cfg.position == "rope" and "rope_theta" not in family.hf_keys:     # else the family places it
        hf["rope_parameters"] = {**(cfg.rope_scaling or {"rope_type": "default"}), "rope_theta": cfg.rope_theta}
    for key, accepted in family.hf_required.items():
        _put(hf, key, accepted[0])
    for name, spec in family.hf_keys.items():
        value = getattr(cfg, name)
        if value is not None:
            _put(hf, _keys(spec)[0], value)
    hf.update(windows.WRITE[family.windows](family.name, cfg.layer_windows, cfg.num_layers))
    return hf


def unmatched_features(family, cfg: ModelConfig) -> dict:
    """Features of ``cfg`` this family fixes to other values (empty: the family fits)."""
    out = {k: getattr(cfg, k) for k, v in family.fixed_features().items() if getattr(cfg, k) != v}
    if not windows.CAN_STATE[family.windows](cfg.layer_windows):
        out["layer_windows"] = cfg.layer_windows
    return out


__all__ = ["read_hf_config", "write_hf_config", "rope_parameters", "unmatched_features", "FREE"]
