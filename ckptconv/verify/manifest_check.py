"""`verify CKPT manifest.json`: compare a checkpoint against fingerprints, without the other
checkpoint at hand. Each logical parameter (HF names) is cast to the manifest's dtype and hashed
(SHA-256, on a worker thread while the next one is read); a mismatch is explained by matching
hashes across parameters (swaps, layer offsets), since no values are available."""
from __future__ import annotations

from ..types import dtype_name
from .compare import TensorResult, newly_nonfinite, reference
from .diagnose import group_label, short
from .diagnose_layers import split_layer
from .layer_report import layer_diagnoses
from .walk import prefetched
from .groups import hf_groups, read_group
from .manifest import tensor_digest
from .report import Report
from .sides import ManifestSide

_OVERFLOW = "overflow:"      # in place of a digest: this many finite values overflowed the cast


def compare_with_manifest(sa, sb, report: Report) -> None:
    report.layout = "hf (fingerprints)"
    if sa.kind == "manifest" and sb.kind == "manifest":
        digests = {"a": _manifest_digests(sa), "b": _manifest_digests(sb)}
        groups = [g for g in hf_groups(sa, sb)[0]]
        results = [_result(n, digests["a"].get(n), digests["b"].get(n), sa, sb) for g in groups for n in g.names]
    else:
        results, digests = _hash_checkpoint(sa, sb, report)
    report.results += results
    _explain(report, sa, sb, digests["a"], digests["b"])


def _manifest_digests(side: ManifestSide) -> dict[str, tuple]:
    return {n: (tuple(e["shape"]), e["dtype"], e["sha256"]) for n, e in side.manifest.tensors.items()}


def _hash_checkpoint(sa, sb, report: Report):
    man, ck, ck_key = (sb, sa, "a") if sb.kind == "manifest" else (sa, sb, "b")
    groups, notes = hf_groups(sa, sb)
    report.notes += notes
    metas = man.hf_metas()

    def load(g, key):
        if key != ck_key:
            return {}
        out = {}
        for n, t in read_group(ck, man, g, key, "hf").items():
            target = metas[n].dtype if n in metas else t.dtype
            ref, _ = reference(t, target)
            over = newly_nonfinite(t, ref)       # the digest of an overflowed cast matches nothing
            digest = f"{_OVERFLOW}{over}" if over else tensor_digest(ref)
            out[n] = (tuple(t.shape), dtype_name(ref.dtype), digest, dtype_name(t.dtype))
        return out

    ck_digests: dict[str, tuple] = {}
    for g, ta, tb in prefetched(groups, lambda g: load(g, "a"), lambda g: load(g, "b")):
        ck_digests.update(ta if ck_key == "a" else tb)
    md = _manifest_digests(man)
    digests = {ck_key: ck_digests, "b" if ck_key == "a" else "a": md}
    report.bytes_read = {ck_key: sum(m.nbytes for g in groups for m in (g.a if ck_key == "a" else g.b).values())}
    results = []
    for g in groups:
        for n in g.names:
            results.append(_result(n, digests["a"].get(n), digests["b"].get(n), sa, sb))
            results[-1].group = group_label(g.mapping.hf if g.mapping else g.names)
    return results, digests


def _result(name: str, da, db, sa, sb) -> TensorResult:
    none = dict(max_abs=None, max_rel=None, n_diff=None)
    if da is None or db is None:
        return TensorResult(name, "missing_in_a" if da is None else "missing_in_b",
                            detail=f"present only in {'B' if da is None else 'A'}", **none)
    if da[0] != db[0]:
        return TensorResult(name, "shape", detail=f"A {list(da[0])} vs B {list(db[0])}", **none)
    stored = [d[3] for d in (da, db) if len(d) > 3]        # the checkpoint's own dtype
    cast = bool(stored) and stored[0] != da[1]
    rule = f"sha256 equal after casting to {da[1]}" if cast else "sha256 equal"
    if da[1] != db[1]:
        return TensorResult(name, "differs", rule, detail=f"dtype A {da[1]} vs B {db[1]}",
                            numel=_numel(da[0]), **none)
    over = next((d[2][len(_OVERFLOW):] for d in (da, db) if d[2].startswith(_OVERFLOW)), None)
    if over is not None:
        return TensorResult(name, "differs", rule, detail=f"{over} finite value(s) become Inf/NaN when cast to "
                            f"{da[1]} (overflow)", numel=_numel(da[0]), **none)
    if da[2] == db[2]:
        return TensorResult(name, "rounded" if cast else "equal", rule, numel=_numel(da[0]))
    return TensorResult(name, "differs", rule, detail="fingerprint differs", numel=_numel(da[0]), **none)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _explain(report: Report, sa, sb, da: dict, db: dict) -> None:
    """Name swaps and layer offsets from hash matches across parameters."""
    failing = [r for r in report.results if r.status in ("differs", "shape")]
    by_hash: dict[str, list[str]] = {}
    for n, d in da.items():
        by_hash.setdefault(d[2], []).append(n)
    for r in failing:
        held = [n for n in by_hash.get(db[r.name][2], []) if n != r.name] if r.name in db else []
        if len(held) == 1:
            other = held[0]
            back = other in db and db[other][2] == da[r.name][2]
            same_layer = (split_layer(other) or (None, -1))[1] == (split_layer(r.name) or (None, -2))[1]
            if back and same_layer:
                r.diagnosis = f"{r.group}: {short(r.name)} and {short(other)} swapped"
            else:
                r.diagnosis = f"B's {r.name} holds A's {other}"
    layer_diagnoses(report, sa, sb, {n: d[2] for n, d in da.items()}, {n: d[2] for n, d in db.items()})
