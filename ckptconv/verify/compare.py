"""Tensor-tier comparison of one parameter: exact equality, or "B is A correctly rounded to B's
dtype" where dtypes differ. Tolerances only on request. Figures only when something differs."""
from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import asdict, dataclass, field

import torch

from ..types import dtype_name

OK_STATUSES = ("equal", "rounded", "close")
_CHUNK = 1 << 22          # elements per chunk when computing figures (bounded temporaries)
_LIBC = ctypes.util.find_library("c")
_memcmp = ctypes.CDLL(_LIBC).memcmp if _LIBC else None
if _memcmp is not None:
    _memcmp.argtypes, _memcmp.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int
_INT_VIEWS = (torch.int64, torch.int32, torch.int16, torch.uint8)
_SKETCH = 512             # elements sampled for a tensor's sketch (cross-tensor matching)


@dataclass
class TensorResult:
    name: str
    status: str      # equal | rounded | close | differs | shape | missing_in_a | missing_in_b | config
    rule: str = ""
    max_abs: float | None = 0.0
    max_rel: float | None = 0.0
    n_diff: int | None = 0
    numel: int = 0
    detail: str = ""
    diagnosis: str = ""
    group: str = ""
    aliases: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES

    def to_dict(self) -> dict:
        return asdict(self)


def rule_for(a_dtype: torch.dtype, b_dtype: torch.dtype) -> str:
    """The rule B is held to: A itself, A correctly rounded to B's dtype, or A converted exactly."""
    if a_dtype == b_dtype:
        return "exact"
    if a_dtype.is_floating_point and b_dtype.is_floating_point and a_dtype.itemsize > b_dtype.itemsize:
        return f"correctly rounded to {dtype_name(b_dtype)}"
    return f"exact after conversion to {dtype_name(b_dtype)}"


def status_for(rule: str) -> str:
    """The status of a parameter that satisfies ``rule``."""
    return "rounded" if rule.startswith("correctly rounded") else "equal"


def reference(a: torch.Tensor, b_dtype: torch.dtype) -> tuple[torch.Tensor, str]:
    """What B must hold given A (``a.to`` rounds to nearest even), and the rule's name."""
    return (a if a.dtype == b_dtype else a.to(b_dtype)), rule_for(a.dtype, b_dtype)


def newly_nonfinite(a: torch.Tensor, ref: torch.Tensor) -> int:
    """How many finite values of ``a`` became Inf/NaN in ``ref`` (``a`` cast to another dtype).
    One reduction over ``ref`` when nothing overflowed (the common case); a count only if so."""
    if ref.dtype == a.dtype or not (ref.is_floating_point() and a.is_floating_point()) or ref.numel() == 0:
        return 0
    lo, hi = torch.aminmax(ref)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return 0
    fa, fr = a.reshape(-1), ref.reshape(-1)
    return sum(int((torch.isfinite(fa[s:s + _CHUNK]) & ~torch.isfinite(fr[s:s + _CHUNK])).sum())
               for s in range(0, fr.numel(), _CHUNK))


def cast_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """B holds exactly A cast to B's dtype, and the cast turned no finite value of A into Inf/NaN."""
    ref = a if a.dtype == b.dtype else a.to(b.dtype)
    return values_equal(ref, b) and newly_nonfinite(a, ref) == 0


def _overflow_detail(a: torch.Tensor, b_dtype: torch.dtype, n: int) -> str:
    big = float(a.double().abs().nan_to_num(0.0, 0.0, 0.0).max())
    return (f"{n} finite value(s) of A are Inf/NaN in B ({dtype_name(b_dtype)} overflow: max |A| {big:.6g}, "
            f"{dtype_name(b_dtype)} range ±{torch.finfo(b_dtype).max:.6g})")


def _memcmp_contiguous(x: torch.Tensor, y: torch.Tensor) -> bool | None:
    """memcmp of two contiguous CPU tensors; None if they are laid out otherwise. (libc's memcmp
    stops at the first difference, allocates nothing and releases the GIL once; torch's
    elementwise equal runs several times slower. Strided tensors go to one torch call instead of
    a memcmp per row: each call would give up and re-take the GIL, which under the reader
    threads' contention costs up to a switch interval per row.)"""
    if _memcmp is None or x.device.type != "cpu" or y.device.type != "cpu":
        return None
    if not (x.is_contiguous() and y.is_contiguous()):
        return None
    nbytes = x.numel() * x.element_size()
    return nbytes == 0 or _memcmp(x.data_ptr(), y.data_ptr(), nbytes) == 0


def bitwise_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (memcmp where the layout allows, else compared as the widest
    integers that tile the rows: several times faster than a floating-point comparison)."""
    if x.dtype != y.dtype or tuple(x.shape) != tuple(y.shape):
        return False
    if x.dim() == 0:
        x, y = x.reshape(1), y.reshape(1)
    fast = _memcmp_contiguous(x, y)
    if fast is not None:
        return fast
    for dt in _INT_VIEWS:
        try:
            xv, yv = x.view(dt), y.view(dt)
        except RuntimeError:
            continue
        return torch.equal(xv, yv)
    return torch.equal(x, y)


def values_equal(ref: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact value equality (NaN equals NaN at the same position; -0 equals +0)."""
    if bitwise_equal(ref, b) or torch.equal(ref, b):
        return True
    if ref.is_floating_point():
        return count_diff(ref, b) == 0
    return False


def count_diff(ref: torch.Tensor, b: torch.Tensor) -> int:
    n = 0
    fr, fb = ref.reshape(-1), b.reshape(-1)
    for s in range(0, fr.numel(), _CHUNK):
        x, y = fr[s:s + _CHUNK], fb[s:s + _CHUNK]
        ne = x != y
        if x.is_floating_point():
            ne &= ~(torch.isnan(x) & torch.isnan(y))
        n += int(ne.sum())
    return n


def figures(ref: torch.Tensor, b: torch.Tensor) -> tuple[float, float | None, int]:
    """(max abs difference, max relative difference over elements where ref != 0, count of
    differing elements), computed in float64 in bounded chunks."""
    max_abs, max_rel, n = 0.0, None, 0
    fr, fb = ref.reshape(-1), b.reshape(-1)
    for s in range(0, fr.numel(), _CHUNK):
        x, y = fr[s:s + _CHUNK].double(), fb[s:s + _CHUNK].double()
        d = (x - y).abs()
        both_nan = torch.isnan(x) & torch.isnan(y)
        d[both_nan] = 0.0
        d[torch.isnan(d)] = float("inf")      # NaN on one side only
        n += int((d != 0).sum())
        if d.numel():
            max_abs = max(max_abs, float(d.max()))
        nz = x != 0
        if bool(nz.any()):
            r = float((d[nz] / x[nz].abs()).max())
            max_rel = r if max_rel is None else max(max_rel, r)
    return max_abs, max_rel, n


def compare_tensor(name: str, a: torch.Tensor, b: torch.Tensor, atol: float | None = None,
                   rtol: float | None = None) -> tuple[TensorResult, torch.Tensor | None]:
    """The result and the reference tensor (A in B's dtype; None on a shape mismatch)."""
    if tuple(a.shape) != tuple(b.shape):
        return TensorResult(name, "shape", detail=f"A {list(a.shape)} vs B {list(b.shape)}",
                            max_abs=None, max_rel=None, n_diff=None, numel=b.numel()), None
    ref, rule = reference(a, b.dtype)
    over = newly_nonfinite(a, ref)
    if over:          # overflowing values are a difference, whatever the tolerances
        _, _, n = figures(ref, b)          # figures count Inf vs Inf as differing, so n >= over
        return TensorResult(name, "differs", rule, float("inf"), float("inf"), max(n, over), b.numel(),
                            detail=_overflow_detail(a, b.dtype, over)), ref
    if values_equal(ref, b):
        return TensorResult(name, status_for(rule), rule, numel=b.numel()), ref
    max_abs, max_rel, n = figures(ref, b)
    res = TensorResult(name, "differs", rule, max_abs, max_rel, n, b.numel())
    if atol is not None or rtol is not None:
        if torch.allclose(ref.double(), b.double(), atol=atol or 0.0, rtol=rtol or 0.0):
            res.status, res.rule = "close", f"allclose(atol={atol}, rtol={rtol}) instead of {rule}"
    return res, ref


def sketch(t: torch.Tensor) -> bytes:
    """A cheap fingerprint (shape, dtype, values at fixed sampled positions) for finding which
    tensor of the other checkpoint a differing tensor holds. Not a proof of equality."""
    flat = t.reshape(-1)
    n = flat.numel()
    k = min(n, _SKETCH)
    idx = torch.arange(k, dtype=torch.int64) * max(n - 1, 0) // max(k - 1, 1)
    head = f"{tuple(t.shape)}|{t.dtype}|".encode()
    return head + flat[idx].contiguous().view(torch.uint8).numpy().tobytes()
