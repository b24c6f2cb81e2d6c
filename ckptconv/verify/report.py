"""The verification report: what was compared, per-parameter figures, diagnoses, logits tier.
Verifiers return one; the CLI renders it as text, JSON or JUnit and sets the exit code."""
from __future__ import annotations

from dataclasses import dataclass, field

from .compare import TensorResult

TEXT_FAILURE_LINES = 50
SUMMARY_FOLD = 3             # more parameters than this with one explanation -> one summary line


@dataclass
class Report:
    a: str
    b: str
    layout: str = "hf"                       # the common layout: "hf" or "megatron" (logical)
    results: list[TensorResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    logits: dict | None = None
    seconds: float = 0.0                     # wall time of the verification (after imports)
    cpu_seconds: float = 0.0                 # CPU time of all its threads
    bytes_read: dict = field(default_factory=dict)

    @property
    def tensors_ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)

    @property
    def equivalent(self) -> bool:
        return self.tensors_ok and (self.logits is None or bool(self.logits.get("ok")))

    @property
    def failed(self) -> list[TensorResult]:
        return [r for r in self.results if not r.ok]

    @property
    def diagnoses(self) -> list[str]:
        """Every distinct explanation, in checkpoint order."""
        seen: dict[str, None] = {}
        for r in self.failed:
            for d in filter(None, r.diagnosis.split("; ")):
                seen.setdefault(d, None)
        return list(seen)

    @property
    def summary(self) -> list[str]:
        """Diagnoses with the same explanation for many parameters, folded into one line each."""
        by_what: dict[str, list[str]] = {}
        for d in self.diagnoses:
            label, sep, what = d.partition(": ")
            key = what if sep and not label.startswith(("B's", "A's")) else d
            by_what.setdefault(key, []).append(label if key == what else "")
        out = []
        for what, labels in by_what.items():
            if len(labels) > SUMMARY_FOLD:
                shown = ", ".join(labels[:6]) + (", …" if len(labels) > 6 else "")
                out.append(f"{what} — in {len(labels)} parameters: {shown}")
            else:
                out += [f"{lb}: {what}" if lb else what for lb in labels]
        return out

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "equivalent": self.equivalent, "layout": self.layout,
                "num_tensors": len(self.results), "num_failed": len(self.failed),
                "diagnoses": self.diagnoses, "summary": self.summary, "notes": self.notes, "logits": self.logits,
                "seconds": round(self.seconds, 3), "cpu_seconds": round(self.cpu_seconds, 3),
                "bytes_read": self.bytes_read,
                "tensors": [r.to_dict() for r in self.results]}

    def text(self) -> str:
        lines = []
        failed = self.failed
        for r in failed[:TEXT_FAILURE_LINES]:
            figs = "" if r.max_abs is None else f" max_abs={r.max_abs:.3g} n_diff={r.n_diff}/{r.numel}"
            what = " ".join(x for x in (r.status, r.rule, r.detail) if x)
            lines.append(f"DIFFERS {r.name}: {what}{figs}")
        if len(failed) > TEXT_FAILURE_LINES:
            lines.append(f"... and {len(failed) - TEXT_FAILURE_LINES} more (see --json)")
        lines += [f"diagnosis: {d}" for d in self.summary]
        lines += [f"note: {n}" for n in self.notes]
        if self.logits is not None:
            lines.append(logits_line(self.logits))
        verdict = "equivalent" if self.equivalent else "NOT equivalent"
        lines.append(f"{verdict}: {len(self.results)} tensors compared ({self.layout} layout), "
                     f"{len(failed)} failed{'' if self.logits is None else ', logits ' + ('ok' if self.logits['ok'] else 'FAILED')}")
        return "\n".join(lines)


def logits_line(lg: dict) -> str:
    if "thresholds" not in lg:
        return f"logits: {'ok' if lg['ok'] else 'FAILED'}: {lg.get('detail', '')}"
    t = lg["thresholds"]
    return (f"logits: max_abs={lg['max_abs']:.3g} (<= {t['max_abs']:.3g}) KL={lg['kl']:.3g} (<= {t['kl']:.3g}) "
            f"top1={lg['top1']:.4f} (>= {t['top1']:.4f}) on {lg['tokens']} tokens: "
            f"{'ok' if lg['ok'] else 'FAILED'}")
