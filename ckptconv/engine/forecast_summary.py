"""The dry-run summary's time forecast: the plan's work (``plan.forecast.Work``) with the rates
measured now (``engine.calibrate``). Additive summary fields: ``time_forecast_s`` and
``time_forecast`` (its parts, the rates and the work counted)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..plan.forecast import Work, forecast_seconds
from .calibrate import measure_rates


def largest_file(root: str | Path | None) -> Path | None:
    """The biggest file under ``root`` (the source whose read rate is measured), if any."""
    if root is None or not Path(root).is_dir():
        return None
    files = [p for p in Path(root).rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size, default=None)


def time_forecast(command: str, summary: dict, dst: str | Path, *, pieces: int, source: str | Path | None = None,
                  workers: int = 1) -> dict:
    work = Work(command, summary["format"], summary.get("bytes_read", summary["bytes_written"]),
                summary["bytes_written"], pieces, workers)
    rates = measure_rates(dst, largest_file(source))
    fc = forecast_seconds(work, rates)
    return {"time_forecast_s": round(fc["seconds"], 2),
            "time_forecast": {"parts_s": {k: round(v, 3) for k, v in fc["parts"].items()},
                              "rates": rates.to_dict(), "work": asdict(work)}}
