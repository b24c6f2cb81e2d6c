#!/usr/bin/env python
"""`--workers 2` vs `--workers 1`: the speed-up on a CPU-bound case and on a disk-bound one.

    /work/venv/bin/python bench/bench_workers.py                  # ~1 GB bf16 Llama, both cases
    /work/venv/bin/python bench/bench_workers.py --layers 4 --repeats 1 --cases hf-to-megatron-torch

* CPU-bound: the source is in the page cache (read once before timing) and the output goes to
  tmpfs (``--tmpfs``, default /dev/shm: at most 4 GB there), so neither disk is in the way.
* disk-bound: the output goes to a disk directory (``--disk``) and the time includes ``sync``
  (the data reaching the disk), the source still cached.
Each (case, workers) pair runs ``--repeats`` times, alternating 1 and 2 workers so that load from
other processes on the machine falls on both alike; the table gives the median wall time, the
speed-up (median of 1 worker ÷ median of 2), the children's CPU seconds and the load average
around the run (on a shared machine the speed-up cannot exceed the CPU the others leave).
Every 2-worker output is checked against the 1-worker output (`verify`, exit 0) once per case.

For other benchmarks (bench_scale.py): ``measure(cmd_without_workers, out_dir, workers, sync)``
runs one command and returns {"wall_s", "cpu_s", "peak_rss_kib"}; ``run_cases(...)`` the table.
The driver never imports torch (the children do).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
MARK = ".ckptconv-bench-workers"


def ckptconv(*args) -> list[str]:
    return [PY, "-m", "ckptconv", *map(str, args)]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def measure(cmd: list[str], out: Path, workers: int, *, sync: bool) -> dict:
    """Run ``cmd`` (a ckptconv command line without DST and --workers) writing ``out``; wall time
    (including ``sync`` when asked), CPU time of the process tree, peak RSS of the largest process."""
    import resource

    if out.exists():
        shutil.rmtree(out)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen([*cmd[:5], str(out), *cmd[5:], "--workers", str(workers), "--json"], env=env(),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    if sync:
        os.sync()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} --workers {workers} failed:\n{stderr[-3000:]}")
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_kib": ru.ru_maxrss,
            "workers": json.loads(stdout)["workers"]}


def warm(path: Path) -> None:
    """Read every file once so the source is in the page cache."""
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass


def load() -> float:
    return os.getloadavg()[0]


def generate(src: Path, layers: int, shard: str) -> None:
    subprocess.run([PY, str(HERE / "bench_convert.py"), "--_generate", str(src), "--_layers", str(layers),
                    "--shard-size", shard], check=True, env=env(), cwd=REPO)


def case_table(src: Path, mg: Path) -> dict[str, list]:
    """id -> ckptconv command line without DST (DST goes after SRC)."""
    return {
        "hf-to-megatron-torch": ckptconv("hf-to-megatron", src, "--tp", 2, "--pp", 2, "--ckpt-format", "torch"),
        "hf-to-megatron-dist": ckptconv("hf-to-megatron", src, "--tp", 2, "--pp", 2, "--ckpt-format", "torch_dist"),
        "megatron-to-hf": ckptconv("megatron-to-hf", mg, "--max-shard-size", "200MB"),
        "reshard-dist": ckptconv("reshard", mg, "--tp", 4, "--pp", 1, "--ckpt-format", "torch_dist"),
    }


def run_cases(cases: dict[str, list], out_root: Path, *, repeats: int, sync: bool, warm_paths: list[Path]) -> dict:
    """{case: {"1": [...], "2": [...], "speedup": x, "load": [before, after]}} for one output root."""
    res = {}
    for name, cmd in cases.items():
        for p in warm_paths:
            warm(p)
        runs = {"1": [], "2": []}
        before = load()
        for _ in range(repeats):
            for w in (1, 2):
                runs[str(w)].append(measure(cmd, out_root / f"{name}-w{w}", w, sync=sync))
        after = load()
        check = subprocess.run(ckptconv("verify", out_root / f"{name}-w1", out_root / f"{name}-w2", "--no-logits"),
                               env=env(), cwd=REPO, capture_output=True, text=True)
        for w in (1, 2):
            shutil.rmtree(out_root / f"{name}-w{w}", ignore_errors=True)
        med = {w: statistics.median(r["wall_s"] for r in runs[w]) for w in runs}
        res[name] = {**runs, "median_s": med, "speedup": med["1"] / med["2"], "load": [before, after],
                     "verify_exit": check.returncode, "ran_workers": runs["2"][0]["workers"]}
        print(f"  {name}: 1 worker {med['1']:.2f} s, 2 workers {med['2']:.2f} s -> x{res[name]['speedup']:.2f} "
              f"(load {before:.1f}/{after:.1f}, verify {check.returncode})", flush=True)
    return res


def render(meta: dict, results: dict) -> str:
    lines = ["# `--workers 2` vs `--workers 1` (bench/bench_workers.py)", "",
             f"Machine: {meta['machine']}; {meta['cpus']} usable CPUs shared with other jobs, {meta['mem_gib']:.0f} GiB RAM. "
             f"Model: synthetic Llama bf16, {meta['layers']} layers, hidden {meta['hidden']}, "
             f"{meta['src_gib']:.2f} GiB. Median of {meta['repeats']} runs each, 1 and 2 workers alternating.",
             "Load: the 1-minute load average before/after the case (the machine's other jobs); with "
             f"{meta['cpus']} CPUs, a load above {meta['cpus']} means the second worker competes for a core. "
             "Cores busy: CPU seconds of the whole process tree ÷ wall seconds (one process already uses more "
             "than one core: its write-behind and check threads, torch's intra-op threads).", ""]
    for kind, title in (("cpu", f"CPU-bound: source in page cache, output on tmpfs ({meta['tmpfs']})"),
                        ("disk", f"disk-bound: output on disk ({meta['disk']}), time includes sync")):
        if kind not in results:
            continue
        lines += [f"## {title}", "", "| case | 1 worker s | 2 workers s | speed-up | CPU s (1 / 2) | cores busy (1 / 2) "
                  "| load before/after | verify |", "|---|---|---|---|---|---|---|---|"]
        for name, r in results[kind].items():
            cpu1 = statistics.median(x["cpu_s"] for x in r["1"])
            cpu2 = statistics.median(x["cpu_s"] for x in r["2"])
            lines.append(f"| {name} | {r['median_s']['1']:.2f} | {r['median_s']['2']:.2f} | {r['speedup']:.2f}× | "
                         f"{cpu1:.1f} / {cpu2:.1f} | {cpu1 / r['median_s']['1']:.2f} / {cpu2 / r['median_s']['2']:.2f} | "
                         f"{r['load'][0]:.1f} / {r['load'][1]:.1f} | "
                         f"{'ok' if r['verify_exit'] == 0 else 'FAILED'} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", nargs="+", default=None)
    p.add_argument("--kinds", nargs="+", default=["cpu", "disk"], choices=["cpu", "disk"])
    p.add_argument("--work", type=Path, default=Path("/work/bench-data/out-perf-workers"),
                   help="scratch on disk: the source, the Megatron input, the disk-bound outputs")
    p.add_argument("--tmpfs", type=Path, default=Path("/dev/shm/ckptconv-bench-workers"))
    p.add_argument("--results", type=Path, default=HERE / "results_workers.md")
    p.add_argument("--note", default="", help="a paragraph appended to the results (what the numbers mean)")
    a = p.parse_args()
    work, shm = a.work, a.tmpfs
    for d in (work, shm):
        if d.exists() and not (d / MARK).exists():
            raise SystemExit(f"{d} exists and was not made by this benchmark")
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        (d / MARK).touch()
    try:
        src, mg = work / "hf", work / "mg"
        generate(src, a.layers, "400MB")
        subprocess.run(ckptconv("hf-to-megatron", src, mg, "--tp", 2, "--pp", 2, "--ckpt-format", "torch",
                                "--workers", 1, "--json"), check=True, env=env(), cwd=REPO, stdout=subprocess.DEVNULL)
        cases = case_table(src, mg)
        cases = {k: v for k, v in cases.items() if a.cases is None or k in a.cases}
        results = {}
        cfg = json.loads((src / "config.json").read_text())
        meta = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": len(os.sched_getaffinity(0)),
                "mem_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, "layers": a.layers,
                "hidden": cfg["hidden_size"], "src_gib": sum(f.stat().st_size for f in src.rglob("*") if f.is_file()) / 2**30,
                "repeats": a.repeats, "tmpfs": str(shm), "disk": str(work)}
        for kind in a.kinds:
            print(f"{kind}:", flush=True)
            results[kind] = run_cases(cases, shm if kind == "cpu" else work, repeats=a.repeats, sync=kind == "disk",
                                      warm_paths=[src, mg])
        a.results.write_text(render(meta, results) + (f"\n{a.note}\n" if a.note else ""))
        a.results.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"wrote {a.results}")
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
