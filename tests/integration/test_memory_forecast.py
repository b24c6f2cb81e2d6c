"""The dry-run's memory forecast follows the engine's streaming: the row-block budget for tensors
read by rows, plus 4x the largest tensor that has to be held whole. Each forecast is checked
against what the same conversion then buffers (``buffered_peak_bytes``) and, for GPT-2 (whose
transposed Conv1D weights are not row-wise), against the tensors the engine says it held whole.
Config-only dry runs of 70B-671B: tests/integration/test_dry_run_forecast.py."""
from __future__ import annotations

import re

from ckptconv import hf_to_megatron, megatron_to_hf
from ckptconv.engine.reshard import reshard
from ckptconv.plan.memory import WHOLE_FACTOR, memory_forecast
from helpers import hf_tensors

BUDGET = 32 << 10


def test_forecast_arithmetic():
    assert memory_forecast(256 << 20, [1 << 30], []) == {"memory_forecast_bytes": 256 << 20,
                                                        "largest_whole_tensor_bytes": 0}
    assert memory_forecast(256 << 20, [1 << 20, 3 << 20], [])["memory_forecast_bytes"] == 12 << 20
    assert memory_forecast(1 << 20, [8 << 20], [5 << 20])["memory_forecast_bytes"] == (1 << 20) + 20 * (1 << 20)


def _pair(run, **kw):
    """(dry-run summary, real summary) of one conversion with the same arguments."""
    return run(dry_run=True, **kw), run(**kw)


def _held_whole(real: dict) -> int:
    """The most bytes the run held for one whole tensor (its summary: "name (N bytes)")."""
    return max((int(re.search(r"\((\d+) bytes\)", w).group(1)) for w in real["whole_tensors_over_budget"]),
               default=0)


def _holds(dry: dict, real: dict) -> None:
    assert real["buffered_peak_bytes"] <= dry["memory_forecast_bytes"]
    # whole tensors held by the run are the ones the forecast expected to be held whole
    assert _held_whole(real) <= WHOLE_FACTOR * dry["largest_whole_tensor_bytes"]


def test_llama_streams_every_tensor_under_the_budget(hf_model_dir, tmp_path):
    src = hf_model_dir("llama-gqa")
    largest = max(t.numel() * t.element_size() for t in hf_tensors(src).values())
    assert largest > BUDGET
    kw = dict(tp=2, pp=2, show_progress=False, memory_budget=BUDGET)
    dry, real = _pair(lambda **k: hf_to_megatron(src, tmp_path / "mg", **k), **kw)
    assert dry["largest_whole_tensor_bytes"] == 0 and dry["memory_forecast_bytes"] == BUDGET < largest
    _holds(dry, real)
    dry, real = _pair(lambda **k: megatron_to_hf(tmp_path / "mg", tmp_path / "hf", **k),
                      show_progress=False, memory_budget=BUDGET)
    assert dry["largest_whole_tensor_bytes"] == 0 and dry["memory_forecast_bytes"] == BUDGET
    _holds(dry, real)
    dry, real = _pair(lambda **k: reshard(tmp_path / "mg", tmp_path / "r", **k),
                      tp=4, pp=1, ckpt_format="torch", show_progress=False, memory_budget=BUDGET)
    assert dry["largest_whole_tensor_bytes"] == 0 and dry["memory_forecast_bytes"] == BUDGET
    _holds(dry, real)


def test_gpt2_transposed_weights_are_forecast_whole(hf_model_dir, tmp_path):
    src = hf_model_dir("gpt2")
    kw = dict(tp=2, pp=1, show_progress=False, memory_budget=BUDGET)
    dry, real = _pair(lambda **k: hf_to_megatron(src, tmp_path / "mg", **k), **kw)
    whole = dry["largest_whole_tensor_bytes"]
    assert 0 < whole <= dry["largest_tensor_bytes"]
    assert dry["memory_forecast_bytes"] == BUDGET + WHOLE_FACTOR * whole
    assert _held_whole(real) > BUDGET           # the run did hold a transposed weight whole
    _holds(dry, real)
    dry, real = _pair(lambda **k: megatron_to_hf(tmp_path / "mg", tmp_path / "hf", **k),
                      show_progress=False, memory_budget=BUDGET)
    assert dry["largest_whole_tensor_bytes"] > 0
    _holds(dry, real)
    dry, real = _pair(lambda **k: reshard(tmp_path / "mg", tmp_path / "r", **k),
                      tp=1, pp=1, ckpt_format="torch", show_progress=False, memory_budget=BUDGET)
    assert dry["largest_whole_tensor_bytes"] > 0
    _holds(dry, real)

