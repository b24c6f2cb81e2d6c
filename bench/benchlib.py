"""Shared pieces of the bench/ scripts: the synthetic Llama checkpoint (written one tensor at a
time by ckptconv's streaming HFWriter, in a child process), running a child with its own wall
time, CPU time and peak RSS measured by a small parent, and the facts about the machine.

Peak RSS is the child's ``ru_maxrss`` read by GNU time (else a tiny fork/exec/wait4 wrapper),
never by the driver: Linux copies the parent's RSS high-water mark into the child's across
fork+exec, so a driver that imported torch would put ~220 MiB under every number. Drivers using
this module must not import torch either.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MiB = 2**20


# ------------------------------------------------------------------------------------------------
# synthetic checkpoint
# ------------------------------------------------------------------------------------------------
def llama_config(a: argparse.Namespace, layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": a.hidden, "intermediate_size": a.ffn, "num_hidden_layers": layers,
        "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads,
        "head_dim": a.hidden // a.heads, "vocab_size": a.vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[a.dtype],
        "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02,
    }


def llama_shapes(a: argparse.Namespace, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of an untied Llama, in HF's usual order."""
    h, f, v, hd = a.hidden, a.ffn, a.vocab, a.hidden // a.heads
    q, kv = a.heads * hd, a.kv_heads * hd
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def model_facts(a: argparse.Namespace, layers: int) -> dict:
    item = {"bf16": 2, "fp16": 2, "fp32": 4}[a.dtype]
    numels = {}
    for name, shape in llama_shapes(a, layers):
        n = 1
        for s in shape:
            n *= s
        numels[name] = n
    params = sum(numels.values())
    layer_params = sum(n for k, n in numels.items() if k.startswith("model.layers."))
    big = max(numels, key=numels.get)
    return {"layers": layers, "params": params, "bytes": params * item,
            "layer_bytes": layer_params * item, "largest_tensor": big,
            "largest_tensor_bytes": numels[big] * item, "num_tensors": len(numels)}


def generate(a: argparse.Namespace, layers: int, out_dir: Path) -> None:
    """Child-process entry: write the checkpoint tensor by tensor (never the whole model)."""
    import torch

    from ckptconv.formats.hf import HFWriter
    from ckptconv.plan.output_shards import parse_size
    from ckptconv.types import TensorMeta, parse_dtype

    dtype = parse_dtype(a.dtype)
    torch.manual_seed(a.seed + layers)
    shapes = llama_shapes(a, layers)
    out_dir.mkdir(parents=True)
    writer = HFWriter(out_dir, [TensorMeta(n, s, dtype) for n, s in shapes], parse_size(a.shard_size))
    with writer:
        for name, shape in shapes:
            if len(shape) == 1:  # norm weights: around 1, like a trained model
                t = 1.0 + 0.05 * torch.randn(shape)
            else:
                t = torch.empty(shape).normal_(0.0, 0.02)
            writer.write(name, t.to(dtype))
            del t
        writer.write_config(llama_config(a, layers))
    if not (out_dir / HFWriter.INDEX_NAME).is_file():
        raise SystemExit(f"expected a sharded checkpoint with {HFWriter.INDEX_NAME} in {out_dir}; "
                         f"lower --shard-size")


# ------------------------------------------------------------------------------------------------
# measuring children
# ------------------------------------------------------------------------------------------------
_GNU_TIME = "/usr/bin/time"
# Fallback when GNU time is missing: a minimal interpreter (no site, no imports beyond os/sys) that
# forks, execs the command and reports the child's own rusage from wait4.
_WRAPPER = ("import os,sys\n"
            "pid=os.fork()\n"
            "if pid==0:\n"
            "    try: os.execvp(sys.argv[2],sys.argv[2:])\n"
            "    finally: os._exit(127)\n"
            "_,st,ru=os.wait4(pid,0)\n"
            "open(sys.argv[1],'w').write('%d\\n'%ru.ru_maxrss)\n"
            "sys.exit(os.waitstatus_to_exitcode(st) & 255)\n")


def rss_probe() -> str:
    return "gnu-time" if os.access(_GNU_TIME, os.X_OK) else "python-wait4-wrapper"


CHILD_ENV: dict[str, str] = {}     # --child-env KEY=VALUE, applied to the ckptconv children only
BASE_ENV: dict[str, str] = {}      # applied to every child (PYTHONPATH of a --git-rev snapshot)


def run_child(cmd: list[str], log_dir: Path, tag: str, env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` to completion; wall time, CPU time and peak RSS of exactly that process.

    Peak RSS comes from ``ru_maxrss`` of a *small* parent (GNU time, else a tiny fork/exec/wait4
    Python wrapper), never from this driver: Linux carries the parent's RSS high-water mark into
    the child's ``ru_maxrss`` across fork+exec, so measuring from a big process would report at
    least the driver's own RSS for every child."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path, rss_path = (log_dir / f"{tag}.{x}" for x in ("stdout", "stderr", "maxrss"))
    rss_path.unlink(missing_ok=True)
    if rss_probe() == "gnu-time":
        wrapped = [_GNU_TIME, "-f", "%M", "-o", str(rss_path), *map(str, cmd)]
    else:
        wrapped = [sys.executable, "-S", "-c", _WRAPPER, str(rss_path), *map(str, cmd)]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(wrapped, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                env={**os.environ, **BASE_ENV, **(env or {})})
        _, status, ru = os.wait4(proc.pid, 0)   # wrapper + command: for CPU time
        wall = time.perf_counter() - t0
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    try:  # GNU time writes "Command exited with non-zero status N" before %M on failure
        maxrss_kib = int(rss_path.read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        maxrss_kib = None
    stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    return {"cmd": " ".join(map(str, cmd)), "rc": rc, "wall_s": wall,
            "cpu_s": ru.ru_utime + ru.ru_stime,
            "peak_rss_mib": None if maxrss_kib is None else maxrss_kib / 1024,
            "stdout_tail": stdout[-2000:], "stderr_tail": stderr[-4000:], "_stdout": stdout}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def sync() -> None:
    """Flush dirty pages between steps (untimed) so one step's write-back does not bill the next."""
    os.sync()


# ------------------------------------------------------------------------------------------------
# facts about the machine
# ------------------------------------------------------------------------------------------------
TORCH_THREADS = [sys.executable, "-c", "import torch; print(torch.get_num_threads())"]


def machine_facts(out_root: Path, torch_threads_output: str | None = None) -> dict:
    """CPU, cores, RAM, disk, load, versions, git state. ``torch_threads_output``: what
    TORCH_THREADS printed, if the caller ran it (else it is run here)."""
    # The driver never imports torch: its RSS must stay small (see run_child).
    from importlib import metadata

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    def meminfo(key: str) -> int | None:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name")) or cpu
    except (OSError, StopIteration):
        pass
    try:
        if torch_threads_output is None:
            torch_threads_output = subprocess.run(TORCH_THREADS, capture_output=True, text=True, timeout=120).stdout
        threads = int(torch_threads_output.strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        threads = None
    git = {}
    for key, args in (("commit", ["rev-parse", "HEAD"]), ("dirty_files", ["status", "--porcelain"])):
        try:  # read-only git queries: which code was measured
            res = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
            git[key] = res.stdout.strip() if key == "commit" else \
                [l[3:] for l in res.stdout.splitlines() if not l[3:].startswith("bench/")]
        except (OSError, subprocess.SubprocessError):
            git[key] = None
    fs = None
    try:
        res = subprocess.run(["df", "-T", str(out_root)], capture_output=True, text=True, timeout=30)
        fs = res.stdout.splitlines()[-1].split()[1]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return {"cpu_model": cpu, "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "ram_bytes": meminfo("MemTotal"), "ram_available_bytes_at_start": meminfo("MemAvailable"),
            "kernel": platform.release(), "python": platform.python_version(),
            "torch": version("torch"), "torch_threads": threads, "safetensors": version("safetensors"),
            "ckptconv": version("ckptconv"), "rss_probe": rss_probe(), "out_dir": str(out_root),
            "out_dir_filesystem": fs, "git": git, "loadavg_at_start": list(os.getloadavg()),
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}



def ckptconv_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("ckptconv")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "ckptconv.cli.main"]
