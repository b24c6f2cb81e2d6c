#!/usr/bin/env python
"""Performance at scale, in one run: each converting command side by side with `cp -r` + `sync` of
the same bytes, peak RSS, and the dry-run's time forecast against the measured wall time.

Cases (synthetic bf16 Llama checkpoints, written once into --data-dir and reused):

    100MB        hidden 1024, 4 layers (~107 MB): hf-to-megatron end to end, start-up included
    1GB          hidden 2048, 8 layers (~0.97 GB): every command below
    7B           Llama-2 7B shapes (32 layers, 12.55 GiB): every command below
    7B-8L        the 7B width at 8 layers: the converting commands (peak RSS must not grow 8 -> 32)
    405B-width   hidden 16384, vocab 128256, 2 layers, ffn 8192 (~12.3 GB; the embedding alone 4.2 GB)

Commands per case: `cp -r SRC COPY` then `sync` (the floor), hf-to-megatron torch_dist TP2 PP2,
megatron-to-hf (from that), reshard TP2 PP2 -> TP4 PP1 torch_dist, verify SRC vs the HF round
trip (must say equivalent). Each converting command runs first with `--dry-run --json` (its
forecast, taken in the same conditions) and then for real. Every child's peak RSS is measured by
benchlib.run_child (a small parent: GNU time or a wait4 wrapper); the driver never imports torch.
Ratios are (wall + the sync after it) / (cp + its sync). Then `bench/bench_workers.py` (the
--workers measurement) runs if present, and the config-only forecasts for fixtures/configs/.

    python bench/bench_scale.py                          # 100MB 1GB 7B 7B-8L 405B-width
    python bench/bench_scale.py --cases 100MB 1GB        # the small ones (~1.2 GB of scratch)
    python bench/bench_scale.py --smoke --data-dir /tmp/s --out-dir /tmp/s/out --results-dir /tmp/s --doc /tmp/s/b.md

Big runs write GB-sized outputs: they hold --lock (flock; default DATA_DIR/.lock) for the whole
case, write under --out-dir and delete every output right after it is measured. Writes
bench/results_scale.json and docs/benchmarks.md (see bench/scale_report.py).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchlib import (REPO, TORCH_THREADS, ckptconv_cmd, du, generate, llama_config, machine_facts,  # noqa: E402
                      model_facts, run_child)
from scale_report import render  # noqa: E402

CONFIGS = REPO / "fixtures" / "configs"
CONFIG_LAYOUTS = {"llama3-70b.json": ["--tp", "8", "--pp", "4"], "llama3-405b.json": ["--tp", "8", "--pp", "9"],
                  "qwen3-moe-deepseek-v3-size.json": ["--tp", "2", "--pp", "1", "--ep", "8"]}


@dataclass(frozen=True)
class Shape:
    hidden: int
    ffn: int
    vocab: int
    layers: int
    heads: int
    kv_heads: int
    dtype: str = "bf16"
    shard_size: str = "2GB"
    seed: int = 0

    def name(self) -> str:
        return (f"llama-h{self.hidden}-f{self.ffn}-v{self.vocab}-L{self.layers}-a{self.heads}-kv{self.kv_heads}-"
                f"{self.dtype}")


FULL = ("cp", "hf-to-megatron", "megatron-to-hf", "verify", "reshard")
CONVERT = ("cp", "hf-to-megatron", "megatron-to-hf", "reshard")
CASES: dict[str, tuple[Shape, tuple[str, ...]]] = {
    "100MB": (Shape(1024, 2816, 4000, 4, 8, 2, shard_size="50MB"), ("cp", "hf-to-megatron")),
    "1GB": (Shape(2048, 5632, 32000, 8, 16, 4, shard_size="500MB"), FULL),
    "7B": (Shape(4096, 11008, 32000, 32, 32, 32), FULL),
    "7B-8L": (Shape(4096, 11008, 32000, 8, 32, 32), CONVERT),
    "405B-width": (Shape(16384, 8192, 128256, 2, 128, 8), CONVERT),
    "tiny": (Shape(64, 128, 512, 4, 8, 4, shard_size="100KB"), FULL),        # --smoke
}
DEFAULT_CASES = ["100MB", "1GB", "7B", "7B-8L", "405B-width"]
BIG = 10**9                # a case writing more than this holds the lock


class Bench:
    """One run: the children it starts (through ``runner``: benchlib.run_child, or a test's)."""

    def __init__(self, a: argparse.Namespace, runner=run_child):
        self.a, self.runner = a, runner
        self.logs = a.out_dir / "logs"
        self.cli = ckptconv_cmd()

    def child(self, cmd: list, tag: str) -> dict:
        r = self.runner([str(c) for c in cmd], self.logs, tag)
        r["stdout"] = r.pop("_stdout", "")
        return r

    def synced(self, cmd: list, tag: str) -> dict:
        """``cmd``, then a timed ``sync`` so its write-back is billed to it (and not to the next)."""
        self.child(["sync"], f"{tag}-presync")
        r = self.child(cmd, tag)
        r["sync_s"] = self.child(["sync"], f"{tag}-sync")["wall_s"]
        return r

    # -------------------------------------------------------------------------------------------
    def source(self, shape: Shape) -> Path:
        """The case's HF checkpoint in --data-dir: reused when its config matches, else generated."""
        path = self.a.data_dir / shape.name()
        found = [d for d in sorted(self.a.data_dir.glob("*")) if _same_model(d, shape)] if self.a.data_dir.is_dir() else []
        if found:
            return found[0]          # also one another bench made (same config: same shapes)
        if path.exists():
            raise SystemExit(f"{path} exists but is incomplete; remove it (it is not ours to delete)")
        partial = path.with_name(path.name + ".partial")       # ours: a crashed generation's leftovers
        shutil.rmtree(partial, ignore_errors=True)
        gen = self.child([sys.executable, __file__, "--_generate", partial, "--_shape", json.dumps(asdict(shape))],
                         f"generate-{shape.name()}")
        if gen["rc"]:
            raise SystemExit(f"generating {path} failed:\n{gen['stderr_tail']}")
        partial.rename(path)
        return path

    def command(self, res: dict, key: str, args: list, cp: dict, forecast: bool = True) -> dict:
        """The dry-run forecast (``forecast``) and the measured run of one ckptconv command."""
        fc, detail, tag = None, None, f"{res['case']}-{key}"
        if forecast:
            dry = self.child([*self.cli, *args, "--dry-run", "--json"], f"{tag}-dry")
            try:
                summary = json.loads(dry["stdout"])
                fc, detail = summary.get("time_forecast_s"), summary.get("time_forecast")
            except ValueError:
                pass
        r = self.synced([*self.cli, *args, "--json"] if key != "verify" else [*self.cli, *args], tag)
        r["forecast_s"], r["forecast"] = fc, detail     # detail: the rates and work, to re-forecast later
        r["forecast_error"] = None if fc is None or not r["wall_s"] else (fc - r["wall_s"]) / r["wall_s"]
        r["ratio_to_cp"] = (r["wall_s"] + r["sync_s"]) / (cp["wall_s"] + cp["sync_s"])
        r["ok"] = r["rc"] == 0 and (key != "verify" or ("equivalent" in r["stdout"] and "NOT" not in r["stdout"]))
        res["ok"] &= r["ok"]
        res["steps"][key] = {k: v for k, v in r.items() if k != "stdout"}
        print(f"   {key:<16} {r['wall_s']:8.2f} s  x cp {r['ratio_to_cp']:5.2f}  peak RSS "
              f"{r['peak_rss_mib'] or float('nan'):6.0f} MiB  forecast {fc if fc is not None else '-'}  rc={r['rc']}",
              flush=True)
        return r

    def case(self, name: str) -> dict:
        shape, steps = CASES[name]
        facts = model_facts(argparse.Namespace(**asdict(shape)), shape.layers)
        res = {"case": name, "shape": asdict(shape), "model": facts, "steps": {}, "ok": True}
        print(f"== {name}: {shape.name()} ({facts['bytes'] / 1e9:.2f} GB)", flush=True)
        with self.lock(facts["bytes"] > BIG):
            src = self.source(shape)
            res["model"]["disk_bytes"] = du(src)
            work = self.a.out_dir / name
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            mg, back, rs, copy = work / "mg", work / "hf-back", work / "reshard", work / "copy"
            try:
                cp = self.synced(["cp", "-r", src, copy], f"{name}-cp")
                shutil.rmtree(copy)
                res["steps"]["cp -r + sync"] = {k: v for k, v in cp.items() if k != "stdout"}
                print(f"   {'cp -r':<16} {cp['wall_s']:8.2f} s  + sync {cp['sync_s']:.2f} s", flush=True)
                if "hf-to-megatron" in steps:
                    self.command(res, "hf-to-megatron", ["hf-to-megatron", src, mg, "--tp", "2", "--pp", "2",
                                                         "--ckpt-format", "torch_dist"], cp)
                if self.dropped(name, shape, src) and "verify" not in steps:
                    shutil.rmtree(src)          # not needed any more: room for the next two outputs
                if "megatron-to-hf" in steps:
                    self.command(res, "megatron-to-hf", ["megatron-to-hf", mg, back], cp)
                if "verify" in steps:
                    self.command(res, "verify", ["verify", src, back], cp, forecast=False)
                shutil.rmtree(back, ignore_errors=True)
                if "reshard" in steps:
                    self.command(res, "reshard", ["reshard", mg, rs, "--tp", "4", "--pp", "1",
                                                  "--ckpt-format", "torch_dist"], cp)
            finally:
                shutil.rmtree(work, ignore_errors=True)     # outputs never outlive their case
                if self.dropped(name, shape, src):
                    shutil.rmtree(src, ignore_errors=True)
        return res

    def dropped(self, name: str, shape: Shape, src: Path) -> bool:
        """--drop-sources names this case and its source is one this script named (generated)."""
        return name in self.a.drop_sources and src.name == shape.name()

    @contextlib.contextmanager
    def lock(self, needed: bool):
        if not needed:
            yield
            return
        self.a.lock.parent.mkdir(parents=True, exist_ok=True)
        with open(self.a.lock, "a") as f:
            print(f"   waiting for {self.a.lock} ...", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -------------------------------------------------------------------------------------------
    def config_forecasts(self) -> list[dict]:
        """Dry runs of hf-to-megatron from the shipped configs alone (70B, 405B, 671B-sized MoE)."""
        out = []
        for name in self.a.configs:
            layout = CONFIG_LAYOUTS[name]
            r = self.child([*self.cli, "hf-to-megatron", CONFIGS / name, self.a.out_dir / "config-only", *layout,
                            "--dry-run", "--json"], f"config-{name}")
            try:
                s = json.loads(r["stdout"])
            except ValueError:
                out.append({"config": name, "rc": r["rc"], "error": r["stderr_tail"][-500:]})
                continue
            out.append({"config": name, "layout": " ".join(layout), "params": s["bytes_read"] // 2,
                        "bytes_written": s["bytes_written"], "memory_forecast_bytes": s["memory_forecast_bytes"],
                        "time_forecast_s": s["time_forecast_s"], "parts_s": s["time_forecast"]["parts_s"],
                        "peak_rss_mib": r["peak_rss_mib"], "rc": r["rc"]})
        return out

    def workers(self) -> dict | None:
        script = HERE / "bench_workers.py"
        if not script.is_file():
            return {"ran": False, "why": "bench/bench_workers.py is not in this checkout"}
        with self.lock(True):            # it writes GB-sized outputs of its own
            r = self.child([sys.executable, script, *self.a.workers_args], "bench_workers")
        return {"ran": True, "cmd": r["cmd"], "rc": r["rc"], "wall_s": r["wall_s"],
                "stdout_tail": r["stdout"][-3000:], "results": "bench/results_workers.md"}


def _same_model(d: Path, shape: Shape) -> bool:
    """``d`` is a complete synthetic checkpoint of ``shape`` (its config.json says so)."""
    if d.suffix in (".tmp", ".partial") or not (d / "model.safetensors.index.json").is_file():
        return False
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return False
    want = llama_config(argparse.Namespace(**asdict(shape)), shape.layers)
    keys = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "tie_word_embeddings", "torch_dtype")
    return all(cfg.get(k) == want[k] for k in keys)


def run(a: argparse.Namespace, runner=run_child) -> dict:
    a.out_dir.mkdir(parents=True, exist_ok=True)
    b = Bench(a, runner)
    threads = b.child(TORCH_THREADS, "torch-threads")["stdout"]
    results = {"command": " ".join(sys.argv), "machine": machine_facts(a.out_dir, threads), "cases": [],
               "note": a.note}
    t0 = time.perf_counter()
    baseline = b.child([sys.executable, "-c", "import ckptconv.cli.main"], "import-cli")
    results["startup"] = {"import ckptconv.cli.main": _brief(baseline),
                          "ckptconv --help": _brief(b.child([*b.cli, "--help"], "help")),
                          "import torch": _brief(b.child([sys.executable, "-c", "import torch"], "import-torch")),
                          "import torch.distributed.checkpoint": _brief(b.child(
                              [sys.executable, "-c", "import torch.distributed.checkpoint"], "import-dcp"))}
    results["config_forecasts"] = b.config_forecasts()
    results["workers"] = {"ran": False, "why": "--no-workers" if not a.run_workers else "not run yet"}
    for name in a.cases:
        results["cases"].append(b.case(name))
        _write(a, results, t0)                  # after every case: a long run that stops keeps its numbers
    if a.run_workers:
        results["workers"] = b.workers()
    _write(a, results, t0)
    print(f"wrote {a.results_dir / 'results_scale.json'} and {a.doc}; ok={results['ok']}", flush=True)
    return results


def _write(a: argparse.Namespace, results: dict, t0: float) -> None:
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    results["total_s"] = time.perf_counter() - t0
    results["ok"] = all(c["ok"] for c in results["cases"])
    a.results_dir.mkdir(parents=True, exist_ok=True)
    (a.results_dir / "results_scale.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    a.doc.parent.mkdir(parents=True, exist_ok=True)
    a.doc.write_text(render(results))


def reforecast(results: dict) -> dict:
    """Recompute every step's forecast from the rates and work its dry run recorded, with this
    checkout's plan/forecast.py (after a PROFILES change: no need to rerun the conversions)."""
    from ckptconv.plan.forecast import Rates, Work, forecast_seconds     # pure arithmetic: no torch

    for case in results["cases"]:
        for s in case["steps"].values():
            if s.get("forecast"):
                fc = forecast_seconds(Work(**s["forecast"]["work"]), Rates(**s["forecast"]["rates"]))
                s["forecast_s"] = fc["seconds"]
                s["forecast"]["parts_s"] = fc["parts"]
                s["forecast_error"] = (fc["seconds"] - s["wall_s"]) / s["wall_s"]
    return results


def _brief(r: dict) -> dict:
    return {"wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"], "rc": r["rc"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=None, help=f"default: {DEFAULT_CASES}")
    p.add_argument("--smoke", action="store_true", help="the tiny case only, no bench_workers (checks the logic)")
    p.add_argument("--data-dir", type=Path, default=Path("/work/bench-data"), help="synthetic sources (kept)")
    p.add_argument("--out-dir", type=Path, default=None, help="outputs, deleted after each case "
                                                              "[default: DATA_DIR/out-bench-scale]")
    p.add_argument("--lock", type=Path, default=None, help="flock held by big cases [default: DATA_DIR/.lock]")
    p.add_argument("--results-dir", type=Path, default=HERE, help="where results_scale.json goes")
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--configs", nargs="*", choices=sorted(CONFIG_LAYOUTS), default=None,
                   help="fixtures/configs/ to forecast from the config alone [default: all; --smoke: the 70B]")
    p.add_argument("--drop-sources", nargs="*", default=[], metavar="CASE",
                   help="delete these cases' generated sources after them (disk space; default: keep)")
    p.add_argument("--no-workers", dest="run_workers", action="store_false",
                   help="do not run bench/bench_workers.py")
    p.add_argument("--workers-args", nargs=argparse.REMAINDER, default=[],
                   help="arguments for bench/bench_workers.py (the rest of the command line)")
    p.add_argument("--note", default=None, help="a sentence for the top of --doc (e.g. the machine's state)")
    p.add_argument("--reforecast", type=Path, metavar="RESULTS_JSON",
                   help="recompute the forecasts of a results_scale.json with this checkout's forecast model, "
                        "rewrite it and --doc; runs nothing")
    p.add_argument("--_generate", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--_shape", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.cases = a.cases or (["tiny"] if a.smoke else DEFAULT_CASES)
    if a.configs is None:
        a.configs = ["llama3-70b.json"] if a.smoke else list(CONFIG_LAYOUTS)
    if a.smoke:
        a.run_workers = False
    a.out_dir = a.out_dir or a.data_dir / "out-bench-scale"
    a.lock = a.lock or a.data_dir / ".lock"
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a._generate:
        shape = json.loads(a._shape)
        generate(argparse.Namespace(**shape), shape["layers"], a._generate)
        return 0
    if a.reforecast:
        results = reforecast(json.loads(a.reforecast.read_text()))
        a.reforecast.write_text(json.dumps(results, indent=2, default=str) + "\n")
        a.doc.write_text(render(results))
        return 0
    return 0 if run(a)["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
