#!/usr/bin/env python
"""DeepSpeed consolidation: `ckptconv deepspeed-to-hf` vs DeepSpeed's own
`zero_to_fp32.py --safe_serialization`, side by side on the same ~207M-parameter fp32 checkpoints.

    .venv/bin/python bench/bench_deepspeed.py --ds-python /tmp/ds_venv/bin/python [--repeats 3]

1. Writes a ~207M-parameter Llama (hidden 1024, 12 layers, vocab 32000) trained one AdamW step in
   fp32 with real DeepSpeed ZeRO-2 and ZeRO-3, world size 2 (gloo, CPU), under --work (default
   /tmp/ckptconv_bench_ds; skipped when already there; not committed). Needs a Python with
   deepspeed (see fixtures/README.md) and its `deepspeed` launcher next to it.
2. For each checkpoint: reads every file once (warm page cache), then runs the two tools
   alternately --repeats times, each in a fresh process; wall time and the process's peak RSS
   come from os.wait4 (ru_maxrss).
3. Checks the two outputs hold the same tensors bit for bit (one tensor in memory at a time).
4. Writes bench/results_deepspeed.json and the table in bench/results_deepspeed.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIZE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
            num_key_value_heads=8, vocab_size=32000, max_position_embeddings=256)


def worker(stage: int, out: str) -> None:
    """Runs under `deepspeed --num_gpus 2`: one AdamW step, then save_checkpoint."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    torch.manual_seed(1234)
    cfg = LlamaConfig(**SIZE, architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(cfg)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 100,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
          "zero_optimization": {"stage": stage}, "bf16": {"enabled": False}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(torch.distributed.get_rank()))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    engine.save_checkpoint(out, tag="global_step1")
    if torch.distributed.get_rank() == 0:
        cfg.save_pretrained(out)                 # as an HF Trainer checkpoint-N/ has it
    torch.distributed.barrier()


def make_checkpoint(ds_python: Path, stage: int, out: Path) -> None:
    if (out / "latest").is_file():
        return
    shutil.rmtree(out, ignore_errors=True)
    launcher = ds_python.parent / "deepspeed"
    t = time.time()
    subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(29650 + stage), __file__,
                    "--worker", str(stage), "--out", str(out)], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/ds_torch_ext")})
    print(f"wrote ZeRO-{stage} checkpoint {out} in {time.time() - t:.0f}s", flush=True)


def measure(cmd: list[str]) -> dict:
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": ru.ru_maxrss / 1024}


def warm(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def same_outputs(a: Path, b: Path) -> tuple[bool, int]:
    import torch
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, "pt") as s:
                out.update({k: f for k in s.keys()})
        return out
    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return False, 0
    for k in ia:
        with safe_open(ia[k], "pt") as sa, safe_open(ib[k], "pt") as sb:
            x, y = sa.get_tensor(k), sb.get_tensor(k)
            if x.dtype != y.dtype or not torch.equal(x, y):
                return False, len(ia)
    return True, len(ia)


def write_markdown(results: dict, path: Path) -> None:
    rows = []
    for name, c in results["cases"].items():
        d, o, x = (c["median"][t] for t in ("deepspeed", "ckptconv", "ckptconv_no_scan"))
        rows.append(f"| {name.replace('zero', 'ZeRO-')} | {c['checkpoint_bytes'] / 1e9:.2f} GB | "
                    f"{d['wall_s']:.1f} s / {d['peak_rss_mb']:.0f} MB | {o['wall_s']:.1f} s / {o['peak_rss_mb']:.0f} MB | "
                    f"**{c['time_ratio']:.2f}x** | **{c['rss_ratio']:.2f}x** | {x['wall_s']:.1f} s "
                    f"({c['time_ratio_no_scan']:.2f}x) | {'yes' if c['outputs_identical'] else 'NO'} ({c['tensors']} tensors) |")
    each = "; ".join(f"{n}: " + ", ".join(f"{t} " + " ".join(f"{r['wall_s']:.1f}s/{r['peak_rss_mb']:.0f}MB" for r in rs)
                                          for t, rs in c["runs"].items()) for n, c in results["cases"].items())
    block = f"""<!-- results: written by bench/bench_deepspeed.py -->

Generated by `bench/bench_deepspeed.py` ({results['machine']}, no GPU). Input: a ~207M-parameter Llama
(hidden 1024, 12 layers, vocab 32000) trained one AdamW step in fp32 by real DeepSpeed 0.19.8,
world size 2 (gloo on CPU), saved with `engine.save_checkpoint` (written to /tmp, not committed).
Output of both tools: one 828 MB fp32 `model.safetensors`.

- DeepSpeed: `python CKPT/zero_to_fp32.py CKPT OUT --safe_serialization` (the script DeepSpeed
  copies into the checkpoint, run in a venv with deepspeed installed, which it needs).
- ckptconv: `ckptconv deepspeed-to-hf CKPT OUT --json` (config.json next to the checkpoint); and the
  same with `--allow-nonfinite`, which skips the NaN/Inf scan of every tensor (DeepSpeed does none).

Each tool runs in a fresh process, alternating, {results['repeats']} times per checkpoint, after one pass
over the checkpoint files to warm the page cache. Wall time: median; peak RSS: the process's
`ru_maxrss` from `os.wait4`, the worst run. Both outputs are compared tensor by tensor.

| checkpoint | size | zero_to_fp32.py (time / peak RSS) | ckptconv (time / peak RSS) | time ratio | RSS ratio | ckptconv --allow-nonfinite (ratio) | identical |
| --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

Targets: time <= 1.0x, peak RSS <= 0.5x. All runs (time/RSS): {each}.
<!-- /results -->"""
    text = path.read_text() if path.is_file() else "# DeepSpeed consolidation: ckptconv vs DeepSpeed's zero_to_fp32\n\n"
    if "<!-- results" in text:
        head, rest = text.split("<!-- results", 1)
        text = head + block + rest.split("<!-- /results -->", 1)[1]
    else:
        text += block + "\n"
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ds-python", type=Path, required=True, help="python of a venv with deepspeed installed")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ckptconv_bench_ds"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stages", type=int, nargs="*", default=[2, 3])
    a = ap.parse_args()
    ours_cli = str(ROOT / ".venv" / "bin" / "ckptconv")
    results = {"machine": f"{os.cpu_count()} cores", "repeats": a.repeats, "cases": {}}
    for stage in a.stages:
        ckpt = a.work / f"z{stage}_fp32_200m"
        make_checkpoint(a.ds_python, stage, ckpt)
        warm(ckpt)
        runs = {"deepspeed": [], "ckptconv": [], "ckptconv_no_scan": []}
        for i in range(a.repeats):
            for tool in runs:
                out = a.work / f"out_{tool}_z{stage}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = ([str(a.ds_python), str(ckpt / "zero_to_fp32.py"), str(ckpt), str(out), "--safe_serialization"]
                       if tool == "deepspeed" else [ours_cli, "deepspeed-to-hf", str(ckpt), str(out), "--json"])
                if tool == "ckptconv_no_scan":       # same, without the NaN/Inf scan of every tensor
                    cmd.append("--allow-nonfinite")
                runs[tool].append(measure(cmd))
                print(f"ZeRO-{stage} {tool:9s} run {i + 1}: {runs[tool][-1]['wall_s']:.2f} s, "
                      f"{runs[tool][-1]['peak_rss_mb']:.0f} MB", flush=True)
        equal, n = same_outputs(a.work / f"out_deepspeed_z{stage}", a.work / f"out_ckptconv_z{stage}")
        params = json.loads((ckpt / "config.json").read_text())
        med = {t: {"wall_s": statistics.median(r["wall_s"] for r in rs),
                   "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)} for t, rs in runs.items()}
        results["cases"][f"zero{stage}"] = {
            "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()),
            "output_bytes": sum(f.stat().st_size for f in (a.work / f"out_ckptconv_z{stage}").rglob("*")),
            "hidden_size": params["hidden_size"], "runs": runs, "median": med, "outputs_identical": equal,
            "tensors": n, "time_ratio": med["ckptconv"]["wall_s"] / med["deepspeed"]["wall_s"],
            "time_ratio_no_scan": med["ckptconv_no_scan"]["wall_s"] / med["deepspeed"]["wall_s"],
            "rss_ratio": med["ckptconv"]["peak_rss_mb"] / med["deepspeed"]["peak_rss_mb"]}
    (HERE / "results_deepspeed.json").write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results, HERE / "results_deepspeed.md")
    print(json.dumps({k: {x: v[x] for x in ("time_ratio", "rss_ratio", "outputs_identical")}
                      for k, v in results["cases"].items()}, indent=1))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--worker", type=int)
        ap.add_argument("--out")
        ap.add_argument("--local_rank", type=int, default=-1)
        w = ap.parse_known_args()[0]
        worker(w.worker, w.out)
    else:
        main()
