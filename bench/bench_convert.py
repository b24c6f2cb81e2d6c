#!/usr/bin/env python
"""Memory-boundedness benchmark for ckptconv: peak RSS follows the largest tensor, not the model.

For each model depth (same width, same vocab) this script

  1. generates a synthetic Llama HF checkpoint (sharded safetensors + index) with the streaming
     ``HFWriter`` -- in a child process, one tensor in memory at a time;
  2. times a baseline ``cp -r SRC COPY`` of the same bytes (warm page cache, like the conversion);
  3. runs, each as its own child process:
        ckptconv hf-to-megatron SRC MG --tp T --pp P --json
        ckptconv megatron-to-hf MG BACK --json
        ckptconv verify SRC BACK
     and records wall time, CPU time and peak RSS of every child;
  4. writes ``results.md`` / ``results.json`` and prints a table.

Peak RSS is the kernel's high-water mark of the child's resident set (``ru_maxrss``), read by a
*small* parent: ``/usr/bin/time -f %M`` (else a tiny fork/exec/wait4 Python wrapper). Not from
this driver: Linux copies the parent's RSS high-water mark into the child's ``ru_maxrss`` across
fork+exec, so a fat parent would put a floor under every child's number. For the same reason
the driver never imports torch. The number is per child, not cumulative, and counts anonymous
memory (tensors, interpreter, torch) plus any file pages the child mapped. ckptconv reads with
``readinto`` (no mmap), so page cache used for file I/O is *not* in it.

    .venv/bin/python bench/bench_convert.py                      # defaults below
    .venv/bin/python bench/bench_convert.py --layers 4 16 32 --dtype fp32 --keep
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MARKER = ".ckptconv-bench"          # only directories carrying this file are ever deleted
MiB = 2**20
CAL_MIB = 256                      # calibration: a python that allocates this much should read ~this much more

sys.path.insert(0, str(HERE))
from benchlib import (BASE_ENV, CHILD_ENV, ckptconv_cmd, du, generate, machine_facts,  # noqa: E402
                      model_facts, run_child, sync)


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------
def snapshot_code(rev: str, dest: Path) -> dict:
    """Extract ``ckptconv/`` at git revision ``rev`` into ``dest`` (read-only for the repository:
    ``git archive`` touches neither the index nor the working tree) and point every child at it."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    tar = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", sha, "ckptconv"],
                         capture_output=True, check=True).stdout
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(dest, filter="data")
    BASE_ENV["PYTHONPATH"] = str(dest) + (os.pathsep + os.environ["PYTHONPATH"]
                                          if os.environ.get("PYTHONPATH") else "")
    BASE_ENV["PYTHONSAFEPATH"] = "1"   # `python -c` must not put the cwd (maybe the checkout) first
    where = subprocess.run([sys.executable, "-c", "import ckptconv; print(ckptconv.__file__)"],
                           capture_output=True, text=True, env={**os.environ, **BASE_ENV}).stdout.strip()
    if not where.startswith(str(dest)):
        raise SystemExit(f"--git-rev: children import ckptconv from {where!r}, not from the snapshot {dest}")
    return {"measured_code": f"git archive {sha} (rev {rev!r})", "measured_commit": sha}


def interpreter_baselines(log_dir: Path) -> dict:
    py = sys.executable
    cmds = {"true (measurement floor)": ["true"],
            "python -c pass": [py, "-c", "pass"],
            f"python -c 'bytearray({CAL_MIB} MiB)' (calibration)": [py, "-c", f"b = bytearray({CAL_MIB} * 2**20)"],
            "python -c 'import torch'": [py, "-c", "import torch"],
            "python -c 'import ckptconv.cli.main'": [py, "-c", "import ckptconv.cli.main"],
            "ckptconv --help": [*ckptconv_cmd(), "--help"]}
    out = {}
    for i, (label, cmd) in enumerate(cmds.items()):
        runs = [run_child(cmd, log_dir, f"baseline{i}-{k}") for k in range(3)]
        out[label] = {"peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
                      "wall_s": statistics.median(r["wall_s"] for r in runs), "rc": max(r["rc"] for r in runs)}
    return out


def bench_one(a: argparse.Namespace, layers: int, root: Path) -> dict:
    facts = model_facts(a, layers)
    d = root / f"llama-h{a.hidden}-L{layers}"
    src, copy, mg, back, logs = d / "hf", d / "cp-copy", d / "megatron", d / "hf-back", d / "logs"
    d.mkdir(parents=True)
    res: dict = {"model": facts, "steps": {}, "ok": True}
    steps = res["steps"]
    print(f"\n== {layers} layers: {facts['params'] / 1e6:.0f}M params, {facts['bytes'] / 1e9:.2f} GB "
          f"({a.dtype}), largest tensor {facts['largest_tensor_bytes'] / MiB:.0f} MiB", flush=True)

    def step(key: str, cmd: list[str], ok_check=None, env: dict[str, str] | None = None) -> dict:
        r = run_child(cmd, logs, key, env)
        sync()
        if r["rc"] != 0 or (ok_check and not ok_check(r)):
            r["failed"] = True
            res["ok"] = False
            print(f"   !! {key} FAILED (rc={r['rc']}): {r['cmd']}\n{r['stdout_tail']}\n{r['stderr_tail']}",
                  flush=True)
        out = r.pop("_stdout")
        steps[key] = r
        print(f"   {key:<16} {r['wall_s']:7.2f} s  peak RSS {r['peak_rss_mib']:7.0f} MiB  rc={r['rc']}", flush=True)
        return {"r": r, "stdout": out}

    step("generate", [sys.executable, __file__, "--_generate", str(src), *a._passthrough, "--_layers", str(layers)])
    if not res["ok"]:
        return res
    res["model"]["disk_bytes_hf"] = du(src)
    res["model"]["hf_files"] = sorted(p.name for p in src.iterdir())

    # Baseline: plain copy of the same bytes, warm cache (SRC was just written, it is in page cache).
    cps = []
    for k in range(a.cp_repeats):
        r = run_child(["cp", "-r", str(src), str(copy)], logs, f"cp{k}")
        sync()
        shutil.rmtree(copy)
        sync()
        cps.append(r["wall_s"])
        if r["rc"]:
            res["ok"] = False
    steps["cp -r"] = {"cmd": f"cp -r {src} {copy}", "rc": 0, "wall_s": statistics.median(cps),
                      "all_wall_s": cps, "cpu_s": None, "peak_rss_mib": r["peak_rss_mib"]}
    print(f"   {'cp -r (median)':<16} {steps['cp -r']['wall_s']:7.2f} s  (runs: "
          f"{', '.join(f'{x:.2f}' for x in cps)})", flush=True)

    cli = ckptconv_cmd()

    def parse_json(o: dict):
        try:
            return json.loads(o["stdout"])
        except ValueError:
            return None

    fmt_args = ["--ckpt-format", a.mg_format] if a.mg_format else []
    o = step("hf-to-megatron", [*cli, "hf-to-megatron", str(src), str(mg), "--tp", str(a.tp), "--pp", str(a.pp),
                                *fmt_args, "--json"], env=CHILD_ENV)
    if o["r"].get("failed"):
        return res
    summ = parse_json(o) or {}
    res["hf_to_megatron_summary"] = {k: summ.get(k) for k in (
        "format", "tp", "pp", "layers_per_stage", "padded_vocab_size", "tensors_read", "tensors_written", "bytes_read",
        "bytes_written", "largest_tensor_bytes", "memory_forecast_bytes")}
    res["model"]["disk_bytes_megatron"] = du(mg)

    o = step("megatron-to-hf", [*cli, "megatron-to-hf", str(mg), str(back), "--json"], env=CHILD_ENV)
    if o["r"].get("failed"):
        return res
    summ = parse_json(o) or {}
    res["megatron_to_hf_summary"] = {k: summ.get(k) for k in (
        "tensors_read", "tensors_written", "bytes_read", "bytes_written", "largest_tensor_bytes",
        "memory_forecast_bytes")}
    res["model"]["disk_bytes_back"] = du(back)

    step("verify", [*cli, "verify", str(src), str(back)],
         ok_check=lambda r: "equivalent:" in r["_stdout"] and "NOT" not in r["_stdout"], env=CHILD_ENV)
    res["verify_output"] = steps["verify"]["stdout_tail"].strip().splitlines()[-1:] or [""]
    return res


def ratio(x: float | None, y: float | None) -> float | None:
    return None if x is None or not y else x / y


def analyse(results: dict) -> dict:
    sizes = results["sizes"]
    base = results["interpreter_baseline"]["python -c 'import ckptconv.cli.main'"]["peak_rss_mib"]
    for s in sizes:
        cp = s["steps"].get("cp -r", {}).get("wall_s")
        big = s["model"]["largest_tensor_bytes"] / MiB
        for key, r in s["steps"].items():
            if key in ("cp -r", "generate"):
                continue
            r["ratio_to_cp"] = ratio(r["wall_s"], cp)
            r["rss_above_import_mib"] = r["peak_rss_mib"] - base
            r["rss_above_import_in_largest_tensors"] = (r["peak_rss_mib"] - base) / big
    small, large = sizes[0], sizes[-1]
    key = {"small_layers": small["model"]["layers"], "large_layers": large["model"]["layers"],
           "model_bytes_ratio": large["model"]["bytes"] / small["model"]["bytes"],
           "layer_bytes_ratio": large["model"]["layer_bytes"] / small["model"]["layer_bytes"],
           "largest_tensor_bytes_ratio": large["model"]["largest_tensor_bytes"] / small["model"]["largest_tensor_bytes"],
           "steps": {}}
    for step in ("generate", "hf-to-megatron", "megatron-to-hf", "verify"):
        a, b = small["steps"].get(step), large["steps"].get(step)
        if a and b:
            key["steps"][step] = {"peak_rss_mib_small": a["peak_rss_mib"], "peak_rss_mib_large": b["peak_rss_mib"],
                                  "rss_ratio": b["peak_rss_mib"] / a["peak_rss_mib"],
                                  "rss_delta_mib": b["peak_rss_mib"] - a["peak_rss_mib"],
                                  "wall_ratio": b["wall_s"] / a["wall_s"]}
            key["steps"][step]["bounded"] = key["steps"][step]["rss_ratio"] <= results["config"]["rss_tolerance"]
    key["all_bounded"] = all(v["bounded"] for v in key["steps"].values())
    results["key"] = key
    return results


# ------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------
def fmt(x, spec: str = ".2f", none: str = "—") -> str:
    return none if x is None else format(x, spec)


def render_markdown(res: dict) -> str:
    m, cfg, key = res["machine"], res["config"], res["key"]
    L = []
    L.append("# ckptconv conversion benchmark: peak memory vs model size\n")
    L.append(f"Generated by `bench/bench_convert.py` on {m['date_utc']} UTC. Command:\n")
    L.append(f"```\n{res['command']}\n```\n")
    status = "all steps succeeded, verify: equivalent" if res["ok"] else "**SOME STEPS FAILED — see below**"
    L.append(f"Status: {status}.\n")
    L.append(f"**Verdict: {res['verdict']}** (a step counts as bounded when its peak RSS at "
             f"{key['large_layers']} layers is at most {cfg['rss_tolerance']:.2f}x the one at "
             f"{key['small_layers']} layers).\n")
    if cfg.get("child_env"):
        L.append(f"ckptconv children ran with extra environment: `{' '.join(cfg['child_env'])}`.\n")
    L.append("## Key result\n")
    L.append(f"Same width (hidden {cfg['hidden']}, ffn {cfg['ffn']}, vocab {cfg['vocab']}, {cfg['dtype']}); "
             f"{key['small_layers']} vs {key['large_layers']} layers. Model bytes grow "
             f"**{key['model_bytes_ratio']:.2f}x** (transformer-layer bytes {key['layer_bytes_ratio']:.2f}x; "
             f"the untied embedding + lm_head are the same in both), the largest tensor grows "
             f"{key['largest_tensor_bytes_ratio']:.2f}x.\n")
    L.append("| step | peak RSS, " + f"{key['small_layers']} layers (MiB) | peak RSS, {key['large_layers']} "
             "layers (MiB) | RSS ratio | RSS delta (MiB) | wall-time ratio | bounded? |")
    L.append("|---|---:|---:|---:|---:|---:|---|")
    for step, k in key["steps"].items():
        L.append(f"| {step} | {k['peak_rss_mib_small']:.0f} | {k['peak_rss_mib_large']:.0f} | "
                 f"**{k['rss_ratio']:.3f}** | {k['rss_delta_mib']:+.0f} | {k['wall_ratio']:.2f} | "
                 f"{'yes' if k['bounded'] else '**NO — grows with the model**'} |")
    L.append("")
    L.append("## Machine\n")
    L.append(f"- CPU: {m['cpu_model']}; {m['logical_cores']} logical cores ({m['usable_cores']} usable); "
             f"torch threads {m['torch_threads']}")
    L.append(f"- RAM: {m['ram_bytes'] / 2**30:.1f} GiB total, {m['ram_available_bytes_at_start'] / 2**30:.1f} GiB "
             f"available at start (so every checkpoint stays in page cache: warm-cache numbers)")
    L.append(f"- Disk: `{m['out_dir']}` on {m['out_dir_filesystem']}")
    L.append(f"- Load average (1/5/15 min) at start {' / '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}, at end "
             f"{' / '.join(f'{x:.2f}' for x in m.get('loadavg_at_end', []))} (other work on the machine slows "
             f"wall times; peak RSS is unaffected)")
    L.append(f"- Linux {m['kernel']}, Python {m['python']}, torch {m['torch']}, safetensors {m['safetensors']}, "
             f"ckptconv {m['ckptconv']}")
    g = m["git"]
    if g.get("measured_commit"):
        L.append(f"- Code measured: **{g['measured_code']}** (the checkout's HEAD was {str(g.get('commit'))[:12]}; "
                 "uncommitted edits in the working tree were *not* measured)\n")
    else:
        L.append(f"- Code measured: the working tree at HEAD {str(g.get('commit'))[:12]}, with uncommitted changes "
                 f"outside bench/: {', '.join(g.get('dirty_files') or []) or 'none'}\n")
    L.append("## Fixed overhead: interpreter baseline RSS\n")
    L.append("| command | peak RSS (MiB) | wall s |")
    L.append("|---|---:|---:|")
    for label, b in res["interpreter_baseline"].items():
        L.append(f"| `{label}` | {b['peak_rss_mib']:.0f} | {b['wall_s']:.2f} |")
    L.append("\n(median of 3). Everything a conversion uses above `import ckptconv.cli.main` is tensor data, "
             "buffers and allocator slack.\n")
    L.append("## Models\n")
    L.append("| layers | params | bytes (GB) | on disk HF (GB) | on disk Megatron (GB) | Megatron format | tensors | "
             "largest tensor | largest tensor (MiB) | converter's forecast (MiB) |")
    L.append("|---:|---:|---:|---:|---:|---|---:|---|---:|---:|")
    for s in res["sizes"]:
        mo = s["model"]
        fc = (s.get("hf_to_megatron_summary") or {}).get("memory_forecast_bytes")
        L.append(f"| {mo['layers']} | {mo['params'] / 1e6:.1f}M | {mo['bytes'] / 1e9:.3f} | "
                 f"{fmt(mo.get('disk_bytes_hf') and mo['disk_bytes_hf'] / 1e9, '.3f')} | "
                 f"{fmt(mo.get('disk_bytes_megatron') and mo['disk_bytes_megatron'] / 1e9, '.3f')} | "
                 f"{(s.get('hf_to_megatron_summary') or {}).get('format') or '—'} | "
                 f"{mo['num_tensors']} | `{mo['largest_tensor']}` | {mo['largest_tensor_bytes'] / MiB:.0f} | "
                 f"{fmt(fc and fc / MiB, '.0f')} |")
    L.append("")
    L.append("## Per step\n")
    L.append("Wall time ratio is against `cp -r SRC COPY` of the same model (median of "
             f"{cfg['cp_repeats']} runs, same warm cache). \"Above import\" = peak RSS minus the "
             "`import ckptconv.cli.main` baseline, also expressed in multiples of the largest tensor.\n")
    L.append("| layers | step | wall s | ratio to cp | CPU s | peak RSS (MiB) | above import (MiB) | "
             "above import / largest tensor | rc |")
    L.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in res["sizes"]:
        for step, r in s["steps"].items():
            L.append(f"| {s['model']['layers']} | {step} | {r['wall_s']:.2f} | {fmt(r.get('ratio_to_cp'))} | "
                     f"{fmt(r.get('cpu_s'))} | {fmt(r.get('peak_rss_mib'), '.0f')} | "
                     f"{fmt(r.get('rss_above_import_mib'), '.0f')} | "
                     f"{fmt(r.get('rss_above_import_in_largest_tensors'))} | {r['rc']} |")
    L.append("")
    fails = [(s["model"]["layers"], k, r) for s in res["sizes"] for k, r in s["steps"].items() if r.get("failed")]
    if fails:
        L.append("## Failures\n")
        for layers, k, r in fails:
            L.append(f"### {layers} layers, {k} (rc={r['rc']})\n\n```\n$ {r['cmd']}\n{r['stdout_tail']}\n"
                     f"{r['stderr_tail']}\n```\n")
    L.append("## How this was measured\n")
    L.append("- Every step runs in its own child process. Peak RSS is that child's `ru_maxrss` (its own "
             "high-water resident set: interpreter, torch's libraries and every tensor buffer), read by a small "
             f"parent ({m['rss_probe']}: `/usr/bin/time -f %M`, the number `time -v` prints as *Maximum "
             "resident set size*). Not from the Python driver: Linux carries the parent's RSS high-water mark "
             "into the child's `ru_maxrss` across fork+exec, so a big parent would set a floor under every "
             "child (a first draft of this bench measured `true` at 222 MiB that way); the driver also never "
             "imports torch. The calibration row checks the probe: allocating "
             f"{CAL_MIB} MiB must add ~{CAL_MIB} MiB over `python -c pass`.")
    L.append("- ckptconv reads with positioned `readinto` (no mmap), so the page cache holding the checkpoint "
             "is *not* counted in RSS. With this much RAM every file written is still cached when it is read "
             "back: all timings are warm-cache. `cp -r` is run right before the conversion on the same "
             "(cached) source, so the ratio compares like with like; `os.sync()` runs (untimed) after every "
             "step so one step's write-back is not billed to the next. Neither cp nor ckptconv fsyncs.")
    L.append("- The `generate` step is the synthetic-checkpoint writer (`HFWriter`, one random tensor at a "
             "time); it is listed because it exercises the same streaming writer, not as a conversion cost.")
    L.append("- `verify` reads both checkpoints and compares every tensor (in float64), so its ratio to cp "
             "counts reading twice the bytes plus the comparison arithmetic.")
    return "\n".join(L) + "\n"


def print_table(res: dict) -> None:
    print("\n" + "=" * 100)
    hdr = f"{'layers':>6} {'step':<16} {'wall s':>8} {'x cp':>7} {'peak RSS MiB':>13} {'above import':>13} " \
          f"{'/largest':>9} {'rc':>3}"
    print(hdr)
    print("-" * len(hdr))
    for s in res["sizes"]:
        for step, r in s["steps"].items():
            print(f"{s['model']['layers']:>6} {step:<16} {r['wall_s']:8.2f} {fmt(r.get('ratio_to_cp')):>7} "
                  f"{fmt(r.get('peak_rss_mib'), '.0f'):>13} {fmt(r.get('rss_above_import_mib'), '.0f'):>13} "
                  f"{fmt(r.get('rss_above_import_in_largest_tensors')):>9} {r['rc']:>3}")
    k = res["key"]
    print("-" * len(hdr))
    print(f"model bytes {k['small_layers']} -> {k['large_layers']} layers: x{k['model_bytes_ratio']:.2f} "
          f"(layer bytes x{k['layer_bytes_ratio']:.2f})")
    for step, v in k["steps"].items():
        print(f"KEY {step:<15} peak RSS {v['peak_rss_mib_small']:.0f} MiB @ {k['small_layers']} layers vs "
              f"{v['peak_rss_mib_large']:.0f} MiB @ {k['large_layers']} layers: ratio {v['rss_ratio']:.3f} "
              f"({v['rss_delta_mib']:+.0f} MiB){'' if v['bounded'] else '  <-- GROWS WITH THE MODEL'}")


# ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--layers", type=int, nargs="+", default=[4, 16],
                   help="model depths to compare (key line: smallest vs largest)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default="bf16",
                   help="dtype of the synthetic weights (conversions keep it)")
    p.add_argument("--shard-size", default="500MB", help="max safetensors shard size of the synthetic model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--mg-format", default=None, metavar="FMT",
                   help="pass --ckpt-format FMT to hf-to-megatron (default: the CLI's own default)")
    p.add_argument("--cp-repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("/tmp/ckptconv-bench"), help="scratch directory")
    p.add_argument("--results-dir", type=Path, default=HERE, help="where results.md / results.json go")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    p.add_argument("--git-rev", default=None, metavar="REV",
                   help="benchmark ckptconv as committed at REV (e.g. HEAD), extracted with git archive into "
                        "the scratch dir and put first on the children's PYTHONPATH; default: the working tree")
    p.add_argument("--child-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the ckptconv children (diagnostics, e.g. "
                        "MALLOC_MMAP_THRESHOLD_=1048576); recorded in the results")
    p.add_argument("--rss-tolerance", type=float, default=1.10,
                   help="a step whose peak RSS ratio (largest/smallest model) exceeds this is reported as "
                        "growing with the model and the script exits 1")
    p.add_argument("--_generate", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--_layers", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a._passthrough = ["--hidden", str(a.hidden), "--ffn", str(a.ffn), "--vocab", str(a.vocab), "--heads",
                      str(a.heads), "--kv-heads", str(a.kv_heads), "--dtype", a.dtype, "--shard-size",
                      a.shard_size, "--seed", str(a.seed)]
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a._generate:
        generate(a, a._layers, a._generate)
        return 0
    if a.hidden % a.heads or a.heads % a.kv_heads:
        raise SystemExit("--hidden must be divisible by --heads and --heads by --kv-heads")
    for kv in a.child_env:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise SystemExit(f"--child-env wants KEY=VALUE, got {kv!r}")
        CHILD_ENV[k] = v
    layers = sorted(set(a.layers))
    if len(layers) < 2:
        raise SystemExit("give at least two --layers values to compare")
    for n in layers:
        if n % a.pp:
            raise SystemExit(f"--layers {n} is not divisible by --pp {a.pp}")
    root = a.out.resolve()
    if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
        raise SystemExit(f"{root} exists, is not empty and was not made by this benchmark; pick another --out")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / MARKER).write_text("scratch space of bench/bench_convert.py; safe to delete\n")

    results: dict = {"command": " ".join([Path(sys.executable).relative_to(REPO).as_posix()
                                          if Path(sys.executable).is_relative_to(REPO) else sys.executable,
                                          Path(__file__).relative_to(REPO).as_posix()
                                          if Path(__file__).is_relative_to(REPO) else __file__,
                                          *(argv if argv is not None else sys.argv[1:])]),
                     "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                                if not k.startswith("_")},
                     "machine": machine_facts(root), "sizes": []}
    results["machine"]["git"].update(
        snapshot_code(a.git_rev, root / "code") if a.git_rev else
        {"measured_code": "working tree (editable install)", "measured_commit": None})
    results["config"]["layers"] = layers
    t0 = time.perf_counter()
    try:
        print("interpreter baselines ...", flush=True)
        results["interpreter_baseline"] = interpreter_baselines(root / "logs")
        for label, b in results["interpreter_baseline"].items():
            print(f"   {label:<40} peak RSS {b['peak_rss_mib']:6.0f} MiB", flush=True)
        for n in layers:
            results["sizes"].append(bench_one(a, n, root))
            if not a.keep:  # free the disk as we go; the numbers are already taken
                shutil.rmtree(root / f"llama-h{a.hidden}-L{n}" / "hf", ignore_errors=True)
                shutil.rmtree(root / f"llama-h{a.hidden}-L{n}" / "megatron", ignore_errors=True)
                shutil.rmtree(root / f"llama-h{a.hidden}-L{n}" / "hf-back", ignore_errors=True)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    results["total_bench_s"] = time.perf_counter() - t0
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    results["ok"] = all(s["ok"] for s in results["sizes"])
    analyse(results)
    results["verdict"] = ("FAILED: a step failed" if not results["ok"] else
                          "bounded: peak RSS does not grow with the model" if results["key"]["all_bounded"] else
                          "GROWS: peak RSS of " + ", ".join(k for k, v in results["key"]["steps"].items()
                                                           if not v["bounded"]) + " grows with the model")
    a.results_dir.mkdir(parents=True, exist_ok=True)
    (a.results_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (a.results_dir / "results.md").write_text(render_markdown(results))
    print_table(results)
    print(f"\nwrote {a.results_dir / 'results.md'} and {a.results_dir / 'results.json'} "
          f"(bench took {results['total_bench_s']:.0f} s){'' if a.keep else '; scratch removed'}")
    print(f"VERDICT: {results['verdict']}")
    return 0 if results["ok"] and results["key"]["all_bounded"] else 1


if __name__ == "__main__":
    sys.exit(main())
