"""docs/families.md's tables, rendered from the family tables (``python -m ckptconv.families.doc``
rewrites the generated part; a test checks the file is current)."""
from __future__ import annotations

import sys
from pathlib import Path

from . import FAMILIES
from .config import FREE
from .schema import Family

BEGIN, END = "<!-- generated: python -m ckptconv.families.doc -->", "<!-- end generated -->"

SHOWN = ("norm", "norm_offset", "activation", "gated", "qkv_bias", "linear_bias", "position", "qk_norm",
         "rotary_percent", "sandwich_norm", "embedding_scale", "attn_softcap", "final_softcap")

# How each family is checked (test files under tests/); kept next to the tables on purpose.
VERIFIED = {
    "llama": "round trips; golden layout; runtime vs transformers; real Megatron-Core load + logits; real "
             "Megatron-Core save -> HF (fixture)",
    "mistral": "round trips; golden layout; runtime vs transformers (incl. window 5)",
    "qwen2": "round trips; golden layout; runtime vs transformers (incl. per-layer windows); real Megatron-Core "
             "load + logits",
    "qwen3": "round trips; golden layout; runtime vs transformers; real Megatron-Core load + logits; real "
             "Megatron-Core save -> HF",
    "phi3": "round trips; golden layout; runtime vs transformers; real Megatron-Core load + logits; real "
            "Megatron-Core save -> HF",
    "gpt2": "round trips; golden layout; runtime vs transformers; real Megatron-Core load + logits; real "
            "Megatron-Core save -> HF",
    "gemma2": "round trips; golden layout (Megatron-Bridge names); runtime vs transformers (soft-caps, "
              "alternating windows); not loadable by Megatron-Core 0.16.1 (see below)",
    "gemma3": "round trips; golden layout (Megatron-Bridge names); runtime vs transformers (q/k norm, two RoPE "
              "bases, window pattern); not loadable by Megatron-Core 0.16.1 (see below)",
    "mixtral": "round trips (EP/ETP, grouped GEMM); runtime vs transformers at EP 2 (TP/PP/ETP); real Megatron-Core "
               "load + logits at EP 2; real Megatron-Core save at EP 2 -> HF and runtime (fixtures)",
    "qwen2_moe": "round trips (EP/ETP, grouped GEMM); runtime vs transformers at EP 2 (shared expert, dense + sparse "
                 "layers); real Megatron-Core load + logits at EP 2",
    "qwen3_moe": "round trips (EP/ETP, grouped GEMM); runtime vs transformers at EP 2 (TP/ETP); real Megatron-Core "
                 "load + logits at EP 2",
}


def _value(v) -> str:
    if v is FREE:
        return "from config"
    if isinstance(v, bool):
        return "yes" if v else "-"
    return "-" if v is None else str(v)


def _ops(f: Family) -> str:
    ops = sorted({r.op for r in (*f.global_rules, *f.layer_rules)} - {"identity"})
    return ", ".join(ops)


def render() -> str:
    fams = list(FAMILIES.values())
    head = "| feature | " + " | ".join(f.name for f in fams) + " |"
    rows = [head, "|" + " --- |" * (len(fams) + 1)]
    rows.append("| HF architecture | " + " | ".join(f.hf_architectures[0] for f in fams) + " |")
    for name in SHOWN:
        rows.append(f"| {name} | " + " | ".join(_value(f.features.get(name)) for f in fams) + " |")
    rows.append("| sliding windows (HF) | " + " | ".join(f.windows for f in fams) + " |")
    rows.append("| tensor rules (global + per layer) | " + " | ".join(
        f"{len(f.global_rules)} + {len(f.layer_rules)}" for f in fams) + " |")
    rows.append("| ops besides identity | " + " | ".join(_ops(f) for f in fams) + " |")
    verified = ["", "| family | how it is verified |", "| --- | --- |"]
    verified += [f"| {f.name} | {VERIFIED.get(f.name, 'round trips')} |" for f in fams]
    return "\n".join([BEGIN, *rows, *verified, END])


def update(path: Path) -> bool:
    """Rewrite the generated part of ``path``; True if it changed."""
    text = path.read_text()
    a, b = text.index(BEGIN), text.index(END) + len(END)
    new = text[:a] + render() + text[b:]
    path.write_text(new)
    return new != text


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/families.md")
    print(("updated " if update(target) else "unchanged ") + str(target))
