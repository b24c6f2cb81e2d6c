"""What is compared, from metadata alone: groups of parameters in one common layout.

A group is one family mapping (e.g. a layer's q/k/v, or its fused ``linear_qkv``): it is read
once from each side and its tensors are compared together, so a diagnosis can look at q, k and
v at once. The common layout is Megatron logical (global layers, TP=1, padded vocab) when either
side is a Megatron checkpoint, else Hugging Face names.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..families.schema import Mapping
from ..types import TensorMeta
from .sides import EMBED_HF, EMBED_MG, is_derived_buffer, is_tied_copy


@dataclass
class Group:
    names: tuple[str, ...]                     # result names, in the common layout
    op: str = "identity"                       # the family op linking these names
    mapping: Mapping | None = None
    a: dict[str, TensorMeta] = field(default_factory=dict)     # metas present on A
    b: dict[str, TensorMeta] = field(default_factory=dict)
    tied: str | None = None                    # "a" / "b": a stored tied-embedding copy on that side

    @property
    def key(self) -> str:
        return self.names[0]


def common_space(sa, sb) -> str:
    return "megatron" if "megatron" in (sa.kind, sb.kind) else "hf"


def peer_padding(side, peer) -> int:
    """Vocab rows an HF side is padded to in Megatron layout: the Megatron peer's padding."""
    return peer.padded if peer.kind == "megatron" else side.cfg.vocab_size


def _mg_metas(side, peer) -> tuple[dict[str, TensorMeta], dict[str, Mapping], dict[str, TensorMeta]]:
    """(megatron metas, mapping by megatron name, leftover HF metas) of one side."""
    maps = {m.megatron: m for m in side.family.expand(side.cfg)}
    if side.kind == "megatron":
        return side.mg_metas(), maps, {}
    out, used = {}, set()
    hf = side.hf_metas()
    for name, m in maps.items():
        meta = side.mg_meta(m, peer_padding(side, peer))
        if meta is not None:
            out[name] = meta
            used.update(m.hf)
        elif any(n in hf for n in m.hf):         # partly present: report the fused tensor missing
            used.update(n for n in m.hf if n in hf)
    return out, maps, {n: v for n, v in hf.items() if n not in used}


def megatron_groups(sa, sb) -> tuple[list[Group], list[str]]:
    ma, maps_a, left_a = _mg_metas(sa, sb)
    mb, maps_b, left_b = _mg_metas(sb, sa)
    maps = {**maps_b, **maps_a}
    order = list(maps_a) + [n for n in maps_b if n not in maps_a]
    groups = [Group((n,), maps[n].op, maps[n], _pick(ma, n), _pick(mb, n)) for n in order]
    notes: list[str] = []
    for side_key, metas, left, side in (("a", ma, left_a, sa), ("b", mb, left_b, sb)):
        extra = [n for n in metas if n not in maps]
        for n in extra + list(left):
            meta = metas.get(n) or left[n]
            if is_tied_copy(side, n):
                groups.append(Group((n,), "vocab", a={n: meta} if side_key == "a" else {},
                                    b={n: meta} if side_key == "b" else {}, tied=side_key))
            elif is_derived_buffer(n):
                notes.append(f"{side.label}: {n} ignored (derived buffer)")
            else:
                _add_leftover(groups, n, side_key, meta)
    return groups, notes


def hf_groups(sa, sb) -> tuple[list[Group], list[str]]:
    ha, hb = sa.hf_metas(), sb.hf_metas()
    groups: list[Group] = []
    seen: set[str] = set()
    for side in (sa, sb):
        if side.kind == "manifest":
            continue
        for m in side.family.expand(side.cfg):
            if m.hf in {g.names for g in groups}:
                continue
            groups.append(Group(m.hf, m.op, m, _pick(ha, *m.hf), _pick(hb, *m.hf)))
            seen.update(m.hf)
    notes: list[str] = []
    for side_key, metas, side in (("a", ha, sa), ("b", hb, sb)):
        for n, meta in metas.items():
            if n in seen:
                continue
            if side.kind != "manifest" and is_tied_copy(side, n):
                groups.append(Group((n,), "identity", a={n: meta} if side_key == "a" else {},
                                    b={n: meta} if side_key == "b" else {}, tied=side_key))
            elif is_derived_buffer(n):
                notes.append(f"{side.label}: {n} ignored (derived buffer)")
            else:
                _add_leftover(groups, n, side_key, meta)
            seen.add(n)
    return groups, notes


def _pick(metas: dict, *names: str) -> dict:
    return {n: metas[n] for n in names if n in metas}


def _add_leftover(groups: list[Group], name: str, side_key: str, meta: TensorMeta) -> None:
    for g in groups:
        if g.mapping is None and g.tied is None and g.names == (name,):
            getattr(g, side_key)[name] = meta
            return
    groups.append(Group((name,), a={name: meta} if side_key == "a" else {},
                        b={name: meta} if side_key == "b" else {}))


def read_group(side, peer, g: Group, side_key: str, space: str) -> dict[str, torch.Tensor]:
    """The group's tensors present on one side, in the common layout (one read per tensor)."""
    present = g.a if side_key == "a" else g.b
    if not present:
        return {}
    if g.tied:
        (name,) = g.names
        if side.kind == "megatron":
            return {name: side.read(name), "__embedding__": side.read(EMBED_MG)}
        return {name: side.source.read(name), "__embedding__": side.source.read(EMBED_HF)}
    if space == "megatron":
        (name,) = g.names
        if side.kind == "megatron":
            return {name: side.read(name)}
        if g.mapping is None:
            return {name: side.source.read(name)}
        return {name: side.read_mg(g.mapping, peer_padding(side, peer))}
    if side.kind == "megatron":
        return side.read_hf_group(g.mapping) if g.mapping else {}
    return side.read_hf([n for n in g.names if n in present])
