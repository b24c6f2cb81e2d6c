"""Cross-layer explanations: B's layer i holds A's layer j (a dropped layer, a pipeline stage
whose layers are offset). Works from per-tensor keys collected while streaming (sampled sketches
of both checkpoints, or full hashes against a manifest), so no tensor is read twice."""
from __future__ import annotations

import re
from typing import Callable

from .diagnose_rows import spans

_LAYER = re.compile(r"((?:^|\.)layers\.)(\d+)(\.)")


def split_layer(name: str) -> tuple[str, int] | None:
    m = _LAYER.search(name)
    if not m:
        return None
    return name[:m.start(2)] + "{i}" + name[m.end(2):], int(m.group(2))


def _span(i0: int, i1: int) -> str:
    return f"layer {i0}" if i0 == i1 else f"layers {i0}-{i1}"


def layer_offsets(failing: list[str], keys_a: dict[str, object], keys_b: dict[str, object], *,
                  layers_a: int, layers_b: int, stage_of: Callable[[int], int] | None = None,
                  missing_in_b: list[str] = (), sides: tuple[str, str] = ("A", "B")) -> dict[str, str]:
    """name -> sentence for every failing (or missing-in-B) tensor a layer offset explains:
    B's layer i holds A's layer j. ``stage_of`` names B's pipeline stage of a layer; ``sides``
    names A and B in the sentences (swap both to ask the question the other way round)."""
    index: dict[tuple[str, object], list[int]] = {}
    for name, key in keys_a.items():
        s = split_layer(name)
        if s:
            index.setdefault((s[0], key), []).append(s[1])
    offsets: dict[int, set[int]] = {}
    names_of: dict[int, list[str]] = {}
    for name in failing:
        s = split_layer(name)
        if not s or name not in keys_b:
            continue
        pattern, i = s
        js = [j for j in index.get((pattern, keys_b[name]), []) if j != i]
        if len(js) == 1:
            offsets.setdefault(i, set()).add(i - js[0])
            names_of.setdefault(i, []).append(name)
    shifted = sorted(i for i, ds in offsets.items() if len(ds) == 1)
    out: dict[str, str] = {}
    run: list[int] = []
    for i in shifted + [None]:
        if run and (i is None or i != run[-1] + 1 or offsets[i] != offsets[run[-1]]):
            msg = _describe(run[0], run[-1], next(iter(offsets[run[0]])), layers_a, layers_b, stage_of, sides)
            for layer in run:
                out.update((n, msg) for n in names_of[layer])
            if "dropped" in msg:
                for n in missing_in_b:
                    s = split_layer(n)
                    if s and s[1] >= layers_b:
                        out[n] = msg
            run = []
        if i is not None:
            run.append(i)
    return out


def _describe(i0: int, i1: int, d: int, layers_a: int, layers_b: int,
              stage_of: Callable[[int], int] | None, sides: tuple[str, str]) -> str:
    held = f"{sides[1]}'s {_span(i0, i1)} hold{'s' if i0 == i1 else ''} {sides[0]}'s {_span(i0 - d, i1 - d)}"
    if d < 0 and i1 == layers_b - 1 and layers_a - layers_b == -d:
        gone = _span(i0, i0 - d - 1)
        return f"{gone} dropped: {held}"
    if d > 0 and i1 == layers_b - 1 and layers_b - layers_a == d:
        return f"{_span(i0 - d, i0 - 1)} duplicated: {held}"
    if stage_of is not None:
        stages = sorted({stage_of(i) for i in range(i0, i1 + 1)})
        if stages:
            word = "stage" if len(stages) == 1 else "stages"
            return f"pipeline {word} {spans(stages)} layers offset by {abs(d)}: {held}"
    return f"{_span(i0, i1)} offset by {abs(d)}: {held}"


def both_ways(failing: list[str], keys_a: dict, keys_b: dict, *, layers_a: int, layers_b: int,
              stage_a: Callable[[int], int] | None, stage_b: Callable[[int], int] | None,
              missing_in_a: list[str] = (), missing_in_b: list[str] = ()) -> dict[str, str]:
    """B's layers holding A's (the usual: B is the converted one), then A's holding B's."""
    out = layer_offsets(failing, keys_a, keys_b, layers_a=layers_a, layers_b=layers_b,
                        stage_of=stage_b or stage_a, missing_in_b=missing_in_b)
    rest = [n for n in failing if n not in out]
    back = layer_offsets(rest, keys_b, keys_a, layers_a=layers_b, layers_b=layers_a,
                         stage_of=stage_a or stage_b, missing_in_b=missing_in_a, sides=("B", "A"))
    return {**back, **out}
