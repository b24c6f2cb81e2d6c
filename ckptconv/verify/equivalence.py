"""`verify A B`: structural check, then every parameter group compared in one common layout,
streaming (each checkpoint read once, one group in flight per side while the previous one is
compared), then diagnoses, then (optionally) the logits tier."""
from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

from ..errors import CkptError, LayoutError
from ..formats.megatron_args_fields import REFUSED_UNLESS, check_args_fields
from ..plan.megatron_layout import tp_kind
from .compare import TensorResult, compare_tensor, rule_for, sketch, status_for
from .logits_budget import LOGITS_BUDGET_S, cross_framework, decide_logits
from .diagnose import Context, diagnose, group_label
from .diagnose_layers import split_layer
from .diagnose_experts import candidates
from .layer_report import layer_diagnoses
from .groups import Group, common_space, hf_groups, megatron_groups
from .manifest import model_fields
from .report import Report
from .sides import open_side
from .walk import Walker

MAX_NEIGHBOUR_READS = 256      # A tensors re-read at most to name a layer offset


def verify_checkpoints(a: str | Path, b: str | Path, *, atol: float | None = None, rtol: float | None = None,
                       iteration: str | int = "latest", hf_config: dict | None = None,
                       logits: bool | None = False, logits_budget: float = LOGITS_BUDGET_S) -> Report:
    """Compare checkpoint (or manifest) B against A; see docs/verification.md. ``logits``: True
    always runs the logits tier, False never, None (the CLI's default) when A and B are of
    different frameworks, their tensors agree, and the run is estimated to fit ``logits_budget``
    seconds."""
    t0, c0 = time.perf_counter(), time.process_time()
    report = Report(str(a), str(b))
    with ExitStack() as stack:
        sa = open_side(a, "A", iteration=iteration, hf_config=hf_config)
        stack.callback(sa.close)
        sb = open_side(b, "B", iteration=iteration, hf_config=hf_config)
        stack.callback(sb.close)
        cross = cross_framework(sa, sb)
        if logits and "manifest" in (sa.kind, sb.kind):
            raise CkptError("--logits needs two checkpoints, not a manifest",
                            path=b if sb.kind == "manifest" else a, fix="drop --logits or pass the checkpoint itself")
        check_sides_args(sa, sb)
        report.results.append(config_result(sa.cfg, sb.cfg, args_pair(sa, sb)))
        if "manifest" in (sa.kind, sb.kind):
            from .manifest_check import compare_with_manifest
            compare_with_manifest(sa, sb, report)
        else:
            compare_tensors(sa, sb, report, atol, rtol)
        add_replica_results(report, sa, sb)
        logits = decide_logits(report, sa, sb, cross, logits, logits_budget)
    if logits:
        from .logits import compare_logits
        report.logits = compare_logits(a, b, iteration=iteration, hf_config=hf_config)
    report.seconds, report.cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return report


def add_replica_results(report: Report, *sides) -> None:
    """A per-rank Megatron side whose replicated copies differ: the comparison read one copy
    (TP rank 0's), so a differing copy is a difference of its own, naming its file (or, where
    the copy compared already differs, part of that tensor's diagnosis)."""
    failed = {r.name: r for r in report.results if not r.ok}
    for side in sides:
        check = getattr(getattr(side, "reader", None), "replica_mismatches", None)
        for name, path in (check() if check else []):
            note = f"{side.label}: the copy of {name} in {path} differs from the one compared"
            if name in failed:
                failed[name].diagnosis = "; ".join(x for x in (failed[name].diagnosis, note) if x)
                continue
            report.results.append(TensorResult(
                name, "differs", "every replica equals the copy compared", None, None, None,
                detail=f"{side.label}: {path}",
                diagnosis=note + " (replicas must be identical: the checkpoint is corrupt or mixes rank files)"))


def _norm(v):
    if isinstance(v, dict):
        return {("rope_type" if k == "type" else k): (float(x) if isinstance(x, (int, float)) and not
                                                    isinstance(x, bool) else x) for k, x in v.items()} or None
    return v


def check_sides_args(sa, sb) -> None:
    """Across frameworks, a Megatron side is read through the family tables: refuse args fields
    they do not map (as a conversion would). Megatron vs Megatron compares the args instead."""
    kinds = {sa.kind, sb.kind}
    if "megatron" in kinds and len(kinds) == 2:
        side = sa if sa.kind == "megatron" else sb
        check_args_fields(side.reader.args, path=side.path)


def args_pair(sa, sb) -> dict:
    """Function-changing args fields no family maps, where two Megatron sides disagree."""
    if sa.kind != "megatron" or sb.kind != "megatron":
        return {}
    a, b = sa.reader.args, sb.reader.args
    return {k: (getattr(a, k, None), getattr(b, k, None)) for k in REFUSED_UNLESS
            if getattr(a, k, None) != getattr(b, k, None)}


def config_result(ca, cb, args_diff: dict | None = None) -> TensorResult:
    fa, fb = model_fields(ca), model_fields(cb)
    bad = [f"{k}: A {fa[k]!r} vs B {fb[k]!r}" for k in fa if _norm(fa[k]) != _norm(fb[k])]
    bad += [f"args.{k}: A {x!r} vs B {y!r}" for k, (x, y) in (args_diff or {}).items()]
    if bad:
        return TensorResult("config", "config", "architecture must match", None, None, None,
                            detail="; ".join(bad), diagnosis="model configs differ: " + "; ".join(bad))
    return TensorResult("config", "equal", "architecture fields equal")


def compare_tensors(sa, sb, report: Report, atol, rtol) -> None:
    space = common_space(sa, sb)
    groups, notes = megatron_groups(sa, sb) if space == "megatron" else hf_groups(sa, sb)
    report.layout = space
    report.notes += notes
    report.bytes_read = {"a": sum(m.nbytes for g in groups for m in g.a.values()),
                         "b": sum(m.nbytes for g in groups for m in g.b.values())}
    tps = tuple(dict.fromkeys(s.layout.tp for s in (sb, sa) if s.layout is not None))
    walker = Walker(sa, sb, space)
    keys_b: dict[str, bytes] = {}
    explained: set[str] = set()
    for g, tensors in walker.walk(groups):
        label = group_label(g.names if space == "megatron" or not g.mapping else g.mapping.hf)
        if g.tied:
            report.results.append(_tied(g, sa if g.tied == "a" else sb, tensors[0] or tensors[1]))
            continue
        out = _proven_equal(g, sb, space) if tensors is None else _compare_group(g, tensors, sa, sb, space, atol, rtol, keys_b)
        for r in out:
            r.group = label
            r.aliases = list(g.mapping.hf) if g.mapping and space == "megatron" else []
        if g.op == "vocab" and space == "megatron":
            _padding_note(report, label, sa, sb, g)
        failed = [r for r in out if r.status in ("differs", "shape")]
        if failed and tensors is not None and all(n in tensors[0] and n in tensors[1] for n in g.names):
            ta, tb = tensors
            ctx = Context(label, g.op, sa.cfg, g.mapping.hf if g.mapping else g.names,
                          fused=space == "megatron" and g.mapping is not None, tp_kind=_kind(g.names[0]), tps=tps)
            try:
                found, where = diagnose(ctx, [ta[n] for n in g.names], [tb[n] for n in g.names])
            except (RuntimeError, ValueError, IndexError) as e:     # best effort: never lose the verdict
                found, where = [], [f"{label}: no diagnosis ({type(e).__name__}: {e})"[:300]]
            for r in failed:
                r.diagnosis = "; ".join(found or where)
                if found:
                    explained.add(r.name)
        report.results += out
    keys_a = _neighbour_keys(report, walker, groups, keys_b, explained)
    layer_diagnoses(report, sa, sb, keys_a, keys_b, explained)


def _proven_equal(g: Group, sb, space: str) -> list[TensorResult]:
    out = []
    for n in g.names:
        a, b = g.a[n], g.b[n]
        rule = rule_for(a.dtype, b.dtype)
        numel = b.numel
        if g.op == "vocab" and space == "megatron":          # real rows only
            numel = numel // max(b.shape[0], 1) * sb.cfg.vocab_size
        out.append(TensorResult(n, status_for(rule), rule, numel=numel))
    return out


def _compare_group(g: Group, tensors, sa, sb, space, atol, rtol, keys_b: dict) -> list[TensorResult]:
    ta, tb = tensors
    out = []
    for name in g.names:
        x, y = ta.get(name), tb.get(name)
        if x is None or y is None:
            out.append(TensorResult(name, "missing_in_a" if x is None else "missing_in_b",
                                    detail=f"present only in {'B' if x is None else 'A'}",
                                    max_abs=None, max_rel=None, n_diff=None))
            continue
        if g.op == "vocab" and space == "megatron":
            x, y = x[:sa.cfg.vocab_size], y[:sb.cfg.vocab_size]
        res, _ = compare_tensor(name, x, y, atol, rtol)
        if not res.ok and split_layer(name):
            keys_b[name] = sketch(y)
        out.append(res)
    return out


def _neighbour_keys(report: Report, walker, groups: list[Group], keys_b: dict, explained: set[str]) -> dict:
    """Sketches of A's tensors in the layers next to each unexplained differing layer tensor (the
    candidates for "B's layer i holds A's layer j"), read only now, and only those."""
    by_name = {n: g for g in groups for n in g.names}
    want: list[str] = []
    for name in keys_b:
        s = split_layer(name)
        if name in explained or not s:
            continue
        near = [s[0].replace("{i}", str(s[1] + d)) for d in (-2, -1, 1, 2)]
        for cand in near + candidates(name, walker.sa.cfg.num_experts or 0):   # other layers, other experts
            if cand in by_name and cand in by_name[cand].a and cand not in want:
                want.append(cand)
    keys_a: dict[str, bytes] = {}
    for name in want[:MAX_NEIGHBOUR_READS]:
        g = by_name[name]
        t = walker.read_whole(g, "a").get(name)
        if t is not None:
            if g.op == "vocab" and walker.space == "megatron":
                t = t[:walker.sa.cfg.vocab_size]
            b_dtype = g.b[name].dtype if name in g.b else t.dtype
            keys_a[name] = sketch(t.to(b_dtype))
    return keys_a


def _kind(name: str) -> str | None:
    try:
        return tp_kind(name)
    except LayoutError:
        return None


def _padding_note(report: Report, label: str, sa, sb, g: Group) -> None:
    name = g.names[0]
    pads = {s.label: m[name].shape[0] - s.cfg.vocab_size for s, m in ((sa, g.a), (sb, g.b))
            if s.kind == "megatron" and name in m}
    if any(pads.values()):
        held = ", ".join(f"{k} {v}" for k, v in pads.items())
        report.notes.append(f"{label}: Megatron vocab padding rows not compared ({held})")


def _tied(g: Group, side, t: dict) -> TensorResult:
    (name,) = g.names
    v = side.cfg.vocab_size
    res, _ = compare_tensor(f"{name} (tied copy in {side.label})", t["__embedding__"][:v], t[name][:v])
    res.group, res.rule = "tied embedding", "the stored copy of a tied embedding equals the embedding"
    if not res.ok:
        res.diagnosis = f"{side.label}'s stored copy {name} of the tied embedding differs from the embedding"
    return res
