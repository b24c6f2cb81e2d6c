"""bench/bench_scale.py's logic (not its timings): a --smoke run on the tiny case whose children run
in this process (ckptconv commands through click, generation through the script's own entry), so
it takes seconds; the done-when checks on hand-made results."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import bench_scale  # noqa: E402
import scale_report  # noqa: E402

from ckptconv.cli.main import cli  # noqa: E402


def in_process(ckptconv: list[str]):
    """A bench runner: ckptconv commands and the generator in this process, cp/sync for real,
    interpreter baselines skipped. Same result keys as benchlib.run_child (no RSS)."""
    def runner(cmd: list[str], log_dir: Path, tag: str) -> dict:
        t0 = time.perf_counter()
        out, err, rc = "", "", 0
        if cmd[:len(ckptconv)] == ckptconv:
            r = CliRunner().invoke(cli, cmd[len(ckptconv):])
            out, rc = r.stdout, r.exit_code
            err = r.stderr if hasattr(r, "stderr") else ""
        elif cmd[0] == sys.executable and cmd[1].endswith("bench_scale.py"):
            rc = bench_scale.main(cmd[2:])
        elif cmd[0] == sys.executable:
            pass                                        # `python -c "import ..."` baselines
        else:
            p = subprocess.run(cmd, capture_output=True, text=True)
            out, err, rc = p.stdout, p.stderr, p.returncode
        return {"cmd": " ".join(cmd), "rc": rc, "wall_s": time.perf_counter() - t0, "cpu_s": None,
                "peak_rss_mib": None, "_stdout": out, "stdout_tail": out[-2000:], "stderr_tail": err[-2000:]}
    return runner


def test_smoke_run_measures_every_step_and_cleans_up(tmp_path):
    a = bench_scale.parse_args(["--smoke", "--data-dir", str(tmp_path / "data"), "--results-dir", str(tmp_path),
                                "--doc", str(tmp_path / "benchmarks.md")])
    res = bench_scale.run(a, runner=in_process(bench_scale.ckptconv_cmd()))
    assert res["ok"]
    (case,) = res["cases"]
    assert list(case["steps"]) == ["cp -r + sync", "hf-to-megatron", "megatron-to-hf", "verify", "reshard"]
    for key in ("hf-to-megatron", "megatron-to-hf", "reshard"):
        s = case["steps"][key]
        assert s["forecast_s"] > 0 and s["forecast_error"] == pytest.approx((s["forecast_s"] - s["wall_s"]) / s["wall_s"])
        assert s["ratio_to_cp"] > 0
    assert case["steps"]["verify"]["ok"]
    # the source is kept for the next run, every output is gone
    (src,) = [p for p in (tmp_path / "data").iterdir() if p.name.startswith("llama-")]
    assert (src / "model.safetensors.index.json").is_file()
    assert [p.name for p in (tmp_path / "data" / "out-bench-scale").iterdir() if p.name != "logs"] == []
    (fc,) = res["config_forecasts"]         # --smoke: the 70B config only
    assert fc["config"] == "llama3-70b.json" and fc["params"] == pytest.approx(70.55e9, rel=1e-3)
    assert fc["time_forecast_s"] > 0
    assert json.loads((tmp_path / "results_scale.json").read_text())["cases"][0]["case"] == "tiny"
    doc = (tmp_path / "benchmarks.md").read_text()
    assert "## tiny:" in doc and "## Machine" in doc and "llama3-70b.json" in doc
    # --reforecast recomputes the same forecasts from the recorded rates and work
    saved = json.loads((tmp_path / "results_scale.json").read_text())
    again = bench_scale.reforecast(json.loads(json.dumps(saved)))
    for key in ("hf-to-megatron", "megatron-to-hf", "reshard"):
        assert again["cases"][0]["steps"][key]["forecast_s"] == pytest.approx(case["steps"][key]["forecast_s"], abs=0.01)
    # a second run reuses the source instead of generating it again
    again = bench_scale.Bench(a, in_process(bench_scale.ckptconv_cmd()))
    assert again.source(bench_scale.CASES["tiny"][0]) == src


def _step(wall, cp_ratio, rss, err=None):
    return {"wall_s": wall, "ratio_to_cp": cp_ratio, "peak_rss_mib": rss, "forecast_error": err, "rc": 0}


def test_done_when_checks_read_the_right_numbers():
    conv = ("hf-to-megatron", "megatron-to-hf", "reshard")
    res = {"cases": [
        {"case": "7B", "steps": {**{k: _step(10, 1.2, 700, 0.1) for k in conv}, "verify": _step(5, 0.9, 200)}},
        {"case": "7B-8L", "steps": {k: _step(3, 1.2, 690) for k in conv}},
        {"case": "405B-width", "steps": {k: _step(3, 1.2, 1600) for k in conv}},
        {"case": "1GB", "steps": {**{k: _step(3, 2.5, 500, 0.1) for k in conv[:2]}, "reshard": _step(3, 1.5, 500, -0.3)}},
        {"case": "100MB", "steps": {"hf-to-megatron": _step(2.5, 3, 300)}},
    ]}
    got = {claim: ok for claim, ok, _ in scale_report.checks(res)}
    assert got["7B hf-to-megatron ≤ 1.3× cp -r + sync"] and got["7B verify ≤ 1.0× cp -r + sync"]
    assert got["7B: peak RSS of every converting command ≤ 1.5 GiB"]
    assert got["405B-width: peak RSS of every converting command ≤ 1.5 GiB"] is False
    assert got["peak RSS does not grow from 8 to 32 layers (≤ 1.10×)"]
    assert got["7B: dry-run time forecast within 25% of the measured wall time"]
    assert got["1GB: dry-run time forecast within 25% of the measured wall time"] is False
    assert got["100 MB hf-to-megatron ≤ 3 s wall including start-up"]
    assert got["1 GB: each converting command ≤ 2× cp -r + sync"] is False
