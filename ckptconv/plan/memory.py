"""The dry-run's memory forecast: what the engine buffers for tensor data.

A tensor the engine streams (its op is row-wise and its source reads rows) passes through the row
blocks of the engine's byte budget (``engine.budget.Budget``): never more than the budget, and for
small tensors no more than a few of them in flight. A tensor it must hold whole (an op that is not
row-wise, such as GPT-2's transposed Conv1D weights, or a source that reads only whole tensors)
costs its sources, the transformed tensor, a rank slice and allocator slack: ``WHOLE_FACTOR`` times
its size (bench/ measured 3.7x before streaming). Python and torch themselves (~220 MiB) come on
top of both.
"""
from __future__ import annotations

from typing import Iterable

WHOLE_FACTOR = 4        # also the in-flight bound of a streamed tensor smaller than the budget


def memory_forecast(budget_bytes: int, streamed: Iterable[int], whole: Iterable[int]) -> dict:
    """``streamed`` / ``whole``: the sizes (bytes) of the tensors that go each way."""
    s, w = max(streamed, default=0), max(whole, default=0)
    return {"memory_forecast_bytes": min(int(budget_bytes), WHOLE_FACTOR * s) + WHOLE_FACTOR * w,
            "largest_whole_tensor_bytes": w}
