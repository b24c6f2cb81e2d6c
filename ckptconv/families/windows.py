"""How an HF config states sliding-window attention per layer, both ways.

``cfg.layer_windows`` holds, per layer, the window W (a query attends to keys at distance
< W, as transformers' sliding-window mask does) or None (full causal attention). A family
names one of these rules:
* ``none``: the HF model has no windows (Llama, GPT-2).
* ``all``: ``sliding_window`` applies to every layer (Mistral, Phi-3).
* ``layer_types``: ``layer_types`` marks the sliding layers (Qwen2/Qwen3 write
  ``use_sliding_window``/``max_window_layers`` too, and older configs state only those).
"""
from __future__ import annotations

from ..errors import UnsupportedFamily

SLIDING = "sliding_attention"


def _window(hf: dict) -> int | None:
    w = hf.get("sliding_window")
    return int(w) if w and hf.get("use_sliding_window", True) else None


def read_none(hf: dict, layers: int) -> tuple:
    return ()


def read_all(hf: dict, layers: int) -> tuple:
    w = _window(hf)
    return (w,) * layers if w else ()


def read_layer_types(hf: dict, layers: int) -> tuple:
    w = _window(hf)
    if not w:
        return ()
    types = hf.get("layer_types") or [SLIDING if i >= int(hf.get("max_window_layers", 0)) else "full_attention"
                                       for i in range(layers)]
    out = tuple(w if t == SLIDING else None for t in types[:layers])
    return out if any(out) else ()


def _single(family: str, windows: tuple) -> int | None:
    sizes = {w for w in windows if w}
    if len(sizes) > 1:
        raise UnsupportedFamily(f"{family} states one sliding window size, the model has {sorted(sizes)}",
                                fix="pass --hf-config with the model's HF config.json")
    return sizes.pop() if sizes else None


def write_none(family: str, windows: tuple) -> dict:
    if any(windows):
        raise UnsupportedFamily(f"the model has sliding-window layers (window {_single(family, windows)}), which "
                                f"{family} cannot state in its HF config", fix="pass --hf-config with the model's "
                                "HF config.json (e.g. a Mistral or Qwen2 config)")
    return {}


def write_all(family: str, windows: tuple) -> dict:
    if any(windows) and not all(windows):
        raise UnsupportedFamily(f"{family} applies its sliding window to every layer; this model has full-attention "
                                f"layers {[i for i, w in enumerate(windows) if not w]}",
                                fix="pass --hf-config with the model's HF config.json")
    return {"sliding_window": _single(family, windows)}


def write_layer_types(family: str, windows: tuple, layers: int) -> dict:
    w = _single(family, windows)
    windows = windows or (None,) * layers
    sliding = [i for i, x in enumerate(windows) if x]
    return {"sliding_window": w, "use_sliding_window": bool(sliding),
            "max_window_layers": sliding[0] if sliding else layers,
            "layer_types": [SLIDING if x else "full_attention" for x in windows]}


READ = {"none": read_none, "all": read_all, "layer_types": read_layer_types}
WRITE = {"none": lambda f, w, n: write_none(f, w), "all": lambda f, w, n: write_all(f, w),
         "layer_types": write_layer_types}
# which rule can state which window pattern (used to pick a family from Megatron args)
CAN_STATE = {"none": lambda w: not any(w), "all": lambda w: not any(w) or (all(w) and len(set(w)) == 1),
             "layer_types": lambda w: len({x for x in w if x}) <= 1}
