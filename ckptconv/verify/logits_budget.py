"""When a cross-framework `verify` runs the logits tier by itself.

Tensor equivalence between frameworks (HF or DeepSpeed vs Megatron) is computed through
ckptconv's own layout tables (the family ops that also do the conversion): a mapping that is
wrong in the same way in both directions passes every tensor check. The logits tier runs the
Megatron side on the bundled runtime, which reads Megatron's layout itself, against
transformers on the other side, so it catches that. It runs when the tensors agree and the
estimated cost fits a budget; otherwise the report says what the verdict rests on.
"""
from __future__ import annotations

from .report import Report

LOGITS_BUDGET_S = 120.0       # default --logits-budget (seconds)
CPU_FLOPS = 1e10              # conservative fp32 CPU throughput (2 cores) for the estimate
READ_BPS = 2e8                # bytes/s for loading / staging the weights
STARTUP_S = 20.0              # importing transformers, spawning the runtime's ranks (measured ~15 s)
RUNS = 3                      # A, A rounded to B's dtypes (the calibration floor), B
TABLES_NOTE = ("tensor equivalence across frameworks is relative to ckptconv's layout tables (the same "
               "family ops the conversion uses); the logits check, which runs each side independently, ")


def cross_framework(sa, sb) -> bool:
    kinds = {sa.kind, sb.kind}
    return "megatron" in kinds and len(kinds) == 2 and "manifest" not in kinds


def estimate_seconds(sa, sb, tokens: int) -> float:
    """A generous estimate of the logits tier's wall time for these two sides."""
    params = sum(m.numel for m in sb.hf_metas().values())
    nbytes = sum(m.nbytes for s in (sa, sb) for m in s.hf_metas().values())
    return STARTUP_S + RUNS * 2.0 * params * tokens / CPU_FLOPS + 2 * nbytes / READ_BPS


def decide_logits(report: Report, sa, sb, cross: bool, logits: bool | None, budget: float) -> bool:
    """Whether to run the logits tier (None: automatic), noting in ``report`` why not."""
    if logits is not None:
        if cross and not logits:
            report.notes.append(TABLES_NOTE + "was turned off (--no-logits)")
        return bool(logits)
    if not cross:
        return False
    if not report.tensors_ok:
        report.notes.append("logits check not run: the tensors already differ")
        return False
    from .logits import BATCH, SEQ
    est = estimate_seconds(sa, sb, BATCH * SEQ)
    if est > budget:
        report.notes.append(TABLES_NOTE + f"was not run: estimated {est:.0f} s > --logits-budget {budget:.0f} s")
        return False
    report.notes.append(f"logits check run automatically (cross-framework; estimated {est:.0f} s <= "
                        f"--logits-budget {budget:.0f} s)")
    return True
