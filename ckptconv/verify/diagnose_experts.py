"""Cross-expert explanations: B's expert i of a layer holds A's expert j of that layer (experts
permuted, e.g. by a wrong EP placement; swapped; duplicated). Works from the same per-tensor keys
as the layer-offset diagnosis (sketches of B's differing tensors and of A's candidates), so no
tensor is read twice."""
from __future__ import annotations

import re

_EXPERT = re.compile(r"((?:^|\.)layers\.(\d+)\..*?experts\.(?:local_experts\.)?)(\d+)(\..+)$")


def split_expert(name: str) -> tuple[str, int, int] | None:
    """(name with the expert index blanked, layer, expert) of an expert tensor (Megatron or HF names)."""
    m = _EXPERT.search(name)
    if not m:
        return None
    return name[:m.start(3)] + "{e}" + name[m.end(3):], int(m.group(2)), int(m.group(3))


def candidates(name: str, num_experts: int) -> list[str]:
    """A's tensors of the other experts of ``name``'s layer (what B's expert may hold instead)."""
    s = split_expert(name)
    if not s or not num_experts:
        return []
    return [s[0].replace("{e}", str(e)) for e in range(num_experts) if e != s[2]]


def expert_swaps(failing: list[str], keys_a: dict, keys_b: dict) -> dict[str, str]:
    """name -> sentence for every failing expert tensor of B that equals another expert of A in
    the same layer: swapped pairs, duplicated experts and other permutations are told apart."""
    index: dict[tuple[str, object], list[int]] = {}
    for name, key in keys_a.items():
        s = split_expert(name)
        if s:
            index.setdefault((s[0], key), []).append(s[2])
    held: dict[str, int] = {}
    for name in failing:
        s = split_expert(name)
        if s and name in keys_b:
            js = [j for j in index.get((s[0], keys_b[name]), []) if j != s[2]]
            if len(js) == 1:
                held[name] = js[0]
    by_pattern: dict[str, dict[int, int]] = {}
    for name, j in held.items():
        pattern, _, i = split_expert(name)
        by_pattern.setdefault(pattern, {})[i] = j
    out = {}
    for name, j in held.items():
        pattern, layer, i = split_expert(name)
        moves = by_pattern[pattern]
        param = pattern.rsplit("{e}.", 1)[-1]
        if moves.get(j) == i:
            out[name] = f"layer {layer} experts {min(i, j)} and {max(i, j)} swapped ({param})"
        elif j not in moves:
            out[name] = f"layer {layer} expert {i} duplicates expert {j} ({param}): B's expert {i} holds A's expert {j}"
        else:
            out[name] = f"layer {layer} experts permuted ({param}): B's expert {i} holds A's expert {j}"
    return out
