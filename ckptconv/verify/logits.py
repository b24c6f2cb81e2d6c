"""Logits tier: run A and B on fixed tokens and compare max |diff|, KL(A || B) and top-1
agreement, in float32 from each checkpoint's weights (Megatron checkpoints on the bundled
runtime, sharded as they are on disk; HF through transformers).

Thresholds are calibrated against the cast itself: A is also run with its weights rounded to B's
dtypes (the "floor": exactly what a correct cast changes), and B may differ from A by at most
FACTOR times the floor, or by fp32 compute noise when no cast is involved. A correct conversion
sits at the floor (x1); the broken conversions of the calibration test (test_verify.py,
test_logits_thresholds_separate_correct_from_broken) sit at >= 1000x the threshold (measured
table in docs/verification.md).
"""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ..errors import CkptError
from ..formats.detect import detect_format
from ..formats.hf_hub import resolve_hf_source
from ..formats.megatron import READERS as MEGATRON_READERS
from .sides import open_side

BATCH, SEQ, SEED = 2, 64, 0
KL_FLOOR = 1e-9            # fp32 compute noise: runtime at TP2 x PP2 vs transformers measured 1.3e-13
MAX_ABS_FLOOR = 1e-4       # x max |logit|: fp32 compute noise (runtime vs transformers measured 1e-6 x max)
FACTOR = 2.0               # x what rounding A's weights to B's dtypes alone does (a correct cast: x1)
TOP1_SLACK = 0.02          # top-1 agreement may fall this far below the floor's


def fixed_tokens(vocab: int, batch: int = BATCH, seq: int = SEQ, seed: int = SEED) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@contextmanager
def _as_hf_dir(path, iteration, hf_config) -> Iterator[Path]:
    p = resolve_hf_source(str(path), None)
    if p.is_dir() and detect_format(p) == "hf":
        yield p
        return
    from ..engine.convert import source_to_hf
    from ..sources import open_hf_view
    with tempfile.TemporaryDirectory(prefix="ckptconv-logits-") as tmp:
        with open_hf_view(p, iteration=iteration, hf_config=hf_config) as src:
            source_to_hf(src, Path(tmp) / "hf", show_progress=False)
        yield Path(tmp) / "hf"


def _is_megatron(path) -> bool:
    p = Path(path)
    return p.is_dir() and detect_format(p) in MEGATRON_READERS


@torch.no_grad()
def model_logits(path, tokens: torch.Tensor, *, iteration: str | int = "latest", hf_config: dict | None = None,
                 round_to: dict[str, torch.dtype] | None = None) -> torch.Tensor:
    """float32 logits [batch, seq, vocab] of the checkpoint at ``path`` on ``tokens``.

    Megatron checkpoints run as they lie on disk, sharded, on the bundled TP x PP runtime
    (``ckptconv.runtime.logits``, float32); HF directories run through transformers; any other
    format is streamed into a temporary HF directory first. ``round_to`` (HF name -> dtype)
    rounds those weights before running (the calibration floor; always through transformers)."""
    if not round_to and _is_megatron(path):
        from ..runtime import logits as runtime_logits
        return runtime_logits(path, tokens, dtype=torch.float32, iteration=iteration, hf_config=hf_config).float()
    import transformers

    with _as_hf_dir(path, iteration, hf_config) as d:
        model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        for name, p in model.named_parameters():
            dt = (round_to or {}).get(name)
            if dt is not None and dt != p.dtype:
                p.copy_(p.to(dt).float())
        out = model(tokens).logits.float()
        del model
    return out


def logits_stats(la: torch.Tensor, lb: torch.Tensor) -> dict:
    a, b = la.double(), lb.double()
    pa, pb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = float((pa.exp() * (pa - pb)).sum(-1).mean())
    top1 = float((a.argmax(-1) == b.argmax(-1)).double().mean())
    return {"max_abs": float((a - b).abs().max()), "kl": max(kl, 0.0), "top1": top1}


def _dtypes(path, iteration, hf_config) -> tuple[dict[str, torch.dtype], int]:
    side = open_side(path, "B", iteration=iteration, hf_config=hf_config)
    try:
        if side.kind == "manifest":
            raise CkptError("--logits needs two checkpoints, not a manifest", path=path,
                            fix="drop --logits or pass the checkpoint itself")
        return {n: m.dtype for n, m in side.hf_metas().items()}, side.cfg.vocab_size
    finally:
        side.close()


def compare_logits(a, b, *, iteration: str | int = "latest", hf_config: dict | None = None) -> dict:
    da, va = _dtypes(a, iteration, hf_config)
    db, vb = _dtypes(b, iteration, hf_config)
    tokens = fixed_tokens(min(va, vb))
    runner = {k: "bundled runtime (float32, sharded)" if _is_megatron(p) else "transformers (float32)"
              for k, p in (("a", a), ("b", b))}
    out = {"runner": runner, "tokens": tokens.numel(), "seed": SEED}
    try:
        la = model_logits(a, tokens, iteration=iteration, hf_config=hf_config)
        cast = {n: dt for n, dt in db.items() if n in da and da[n] != dt}
        lf = model_logits(a, tokens, iteration=iteration, hf_config=hf_config, round_to=cast) if cast else la
    except Exception as e:  # noqa: BLE001 - a model that does not run is a finding, not a crash
        return {**out, "ok": False, "detail": f"A does not run: {' '.join(str(e).split())[:300]}"}
    try:
        lb = model_logits(b, tokens, iteration=iteration, hf_config=hf_config)
    except Exception as e:  # noqa: BLE001
        return {**out, "ok": False, "detail": f"B does not run: {' '.join(str(e).split())[:300]}"}
    if la.shape != lb.shape:
        return {**out, "ok": False, "detail": f"logits shapes differ: A {list(la.shape)} vs B {list(lb.shape)}"}
    floor = logits_stats(la, lf)
    got = logits_stats(la, lb)
    scale = float(la.abs().max())
    thr = {"max_abs": max(MAX_ABS_FLOOR * scale, FACTOR * floor["max_abs"]),
           "kl": max(KL_FLOOR, FACTOR * floor["kl"]), "top1": floor["top1"] - TOP1_SLACK}
    ok = got["max_abs"] <= thr["max_abs"] and got["kl"] <= thr["kl"] and got["top1"] >= thr["top1"]
    return {**out, **got, "ok": ok, "floor": floor, "thresholds": thr, "cast_params": len(cast),
            "detail": "" if ok else "logits differ beyond what the dtype cast explains"}
