"""Tensor-tier verification: structural check, then exact equality per logical parameter, or
"B is A correctly rounded to B's dtype" where dtypes differ. Tolerances only on request."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..sources import open_hf_view
from .view import mapping_groups


@dataclass
class TensorResult:
    name: str
    status: str                  # "equal" | "rounded" | "close" | "differs" | "missing_in_a" | "missing_in_b" | "shape"
    rule: str = ""
    max_abs: float = 0.0
    max_rel: float = 0.0
    n_diff: int = 0
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("equal", "rounded", "close")


@dataclass
class Report:
    a: str
    b: str
    results: list[TensorResult] = field(default_factory=list)

    @property
    def equivalent(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)

    def to_dict(self) -> dict:
        failed = [r for r in self.results if not r.ok]
        return {"a": self.a, "b": self.b, "equivalent": self.equivalent, "num_tensors": len(self.results),
                "num_failed": len(failed), "tensors": [asdict(r) for r in self.results]}


def compare_tensor(name: str, a: torch.Tensor, b: torch.Tensor, atol: float | None, rtol: float | None) -> TensorResult:
    if tuple(a.shape) != tuple(b.shape):
        return TensorResult(name, "shape", detail=f"{tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dtype == b.dtype:
        ref, rule = a, "exact"
    elif a.dtype.itemsize >= b.dtype.itemsize:
        ref, rule = a.to(b.dtype), f"correctly rounded to {str(b.dtype)[6:]}"
    else:
        ref, rule = a.to(b.dtype), f"exact after widening to {str(b.dtype)[6:]}"
    diff = (ref.double() - b.double()).abs()
    n_diff = int((ref != b).sum())
    max_abs = float(diff.max()) if diff.numel() else 0.0
    denom = ref.double().abs().clamp_min(torch.finfo(torch.float32).tiny)
    max_rel = float((diff / denom).max()) if diff.numel() else 0.0
    if n_diff == 0:
        return TensorResult(name, "equal" if rule == "exact" else "rounded", rule)
    if atol is not None or rtol is not None:
        if torch.allclose(ref.double(), b.double(), atol=atol or 0.0, rtol=rtol or 0.0):
            return TensorResult(name, "close", f"allclose(atol={atol}, rtol={rtol})", max_abs, max_rel, n_diff)
    return TensorResult(name, "differs", rule, max_abs, max_rel, n_diff)


def compare_checkpoints(a: str, b: str, *, atol: float | None = None, rtol: float | None = None,
                        iteration: str = "latest") -> Report:
    report = Report(str(a), str(b))
    with open_hf_view(a, iteration=iteration) as va, open_hf_view(b, iteration=iteration) as vb:
        ma, mb = va.tensors(), vb.tensors()
        for name in sorted(set(ma) - set(mb)):
            report.results.append(TensorResult(name, "missing_in_b"))
        for name in sorted(set(mb) - set(ma)):
            report.results.append(TensorResult(name, "missing_in_a"))
        for mapping in mapping_groups(va):
            for name in mapping.hf:
                if name in ma and name in mb:
                    report.results.append(compare_tensor(name, va.read(name), vb.read(name), atol, rtol))
    return report
