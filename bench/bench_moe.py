#!/usr/bin/env python
"""Mixture-of-Experts bench: hf-to-megatron at EP 2 and reshard EP 2 -> EP 4 of a Mixtral-shaped
bf16 checkpoint (8 experts, hidden 4096, expert ffn 14336, 32 heads / 8 kv heads, vocab 32000,
4 layers: ~12 GB), wall time / `cp -r` of the source and peak RSS of each step.

Each step is its own child process under GNU time (`%M`: that child's peak RSS):

    generate                a synthetic MixtralForCausalLM in the hub layout (HFWriter, one tensor at a time)
    cp -r                   the HF checkpoint (the baseline)
    hf-to-megatron          --ckpt-format torch --tp 1 --pp 1 --ep 2   (mp_rank_00_000, mp_rank_00_001)
    reshard                 --ckpt-format torch --ep 4                 (mp_rank_00_00{0..3})
    verify                  the EP 4 output against the HF source (must say equivalent)

    python bench/bench_moe.py [--layers 4] [--work /tmp/ckptconv-bench-moe]

Writes bench/results_moe.md (+ .json). Memory must stay bounded by one expert's tensor
(14336 x 4096 bf16 = 112 MiB), never by a layer's experts (2.6 GiB).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_torch_dist import du, run  # noqa: E402

PY = sys.executable
MiB = 2**20


def shapes(a) -> list[tuple[str, tuple[int, ...]]]:
    d, kv = a.hidden // a.heads, a.kv_heads * (a.hidden // a.heads)
    out = [("model.embed_tokens.weight", (a.vocab, a.hidden))]
    for i in range(a.layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (a.hidden,)), (p + "self_attn.q_proj.weight", (a.heads * d, a.hidden)),
                (p + "self_attn.k_proj.weight", (kv, a.hidden)), (p + "self_attn.v_proj.weight", (kv, a.hidden)),
                (p + "self_attn.o_proj.weight", (a.hidden, a.heads * d)),
                (p + "post_attention_layernorm.weight", (a.hidden,)),
                (p + "block_sparse_moe.gate.weight", (a.experts, a.hidden))]
        for e in range(a.experts):
            q = p + f"block_sparse_moe.experts.{e}."
            out += [(q + "w1.weight", (a.ffn, a.hidden)), (q + "w3.weight", (a.ffn, a.hidden)),
                    (q + "w2.weight", (a.hidden, a.ffn))]
    return out + [("model.norm.weight", (a.hidden,)), ("lm_head.weight", (a.vocab, a.hidden))]


def generate(a, out: Path) -> None:
    import torch

    from ckptconv.formats.hf import HFWriter
    from ckptconv.plan.output_shards import parse_size
    from ckptconv.types import TensorMeta

    torch.manual_seed(0)
    out.mkdir(parents=True)
    todo = shapes(a)
    with HFWriter(out, [TensorMeta(n, s, torch.bfloat16) for n, s in todo], parse_size("2GB")) as w:
        for name, shape in todo:
            t = 1.0 + 0.05 * torch.randn(shape) if len(shape) == 1 else torch.empty(shape).normal_(0, 0.02)
            w.write(name, t.to(torch.bfloat16))
            del t
        w.write_config({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": a.hidden,
                        "intermediate_size": a.ffn, "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
                        "num_key_value_heads": a.kv_heads, "head_dim": a.hidden // a.heads, "vocab_size": a.vocab,
                        "num_local_experts": a.experts, "num_experts_per_tok": 2, "sliding_window": None,
                        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--work", type=Path, default=Path("/tmp/ckptconv-bench-moe"))
    p.add_argument("--generate-only", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.generate_only:
        return generate(a, a.generate_only)
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    hf, cp, mg, ep4 = (a.work / n for n in ("hf", "hf-copy", "mg-ep2", "mg-ep4"))
    sizes = [f"--{k}={getattr(a, k.replace('-', '_'))}" for k in ("layers", "experts", "hidden", "ffn", "heads",
                                                                 "kv-heads", "vocab")]
    steps = {"generate": run([PY, __file__, *sizes, f"--generate-only={hf}"], a.work / "gen.log")}
    steps["cp -r"] = run(["cp", "-r", str(hf), str(cp)], a.work / "cp.log")
    shutil.rmtree(cp)
    cli = [PY, "-m", "ckptconv"]
    steps["hf-to-megatron --ep 2"] = run([*cli, "hf-to-megatron", str(hf), str(mg), "--ckpt-format", "torch",
                                          "--ep", "2", "--json"], a.work / "h2m.log")
    steps["reshard --ep 4"] = run([*cli, "reshard", str(mg), str(ep4), "--ckpt-format", "torch", "--ep", "4",
                                   "--json"], a.work / "reshard.log")
    steps["verify hf vs ep4"] = run([*cli, "verify", str(hf), str(ep4)], a.work / "verify.log")
    ok = "equivalent" in (a.work / "verify.log").read_text()
    base = steps["cp -r"]["wall_s"]
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "args": vars(a) | {"work": str(a.work)},
           "hf_bytes": du(hf), "ep2_files": sorted(d.name for d in next(mg.glob("release")).iterdir()),
           "ep4_files": sorted(d.name for d in next(ep4.glob("release")).iterdir()),
           "largest_tensor_mib": a.ffn * a.hidden * 2 / MiB, "layer_experts_mib": 3 * a.experts * a.ffn * a.hidden * 2 / MiB,
           "verify_equivalent": ok, "steps": steps}
    (HERE / "results_moe.json").write_text(json.dumps(res, indent=2))
    lines = [f"# MoE bench ({res['date']}, {res['machine']})", "",
             f"Mixtral-shaped bf16: {a.experts} experts, hidden {a.hidden}, expert ffn {a.ffn}, {a.layers} layers, "
             f"vocab {a.vocab}: {res['hf_bytes'] / 2**30:.2f} GiB. Largest tensor (one expert's w1) "
             f"{res['largest_tensor_mib']:.0f} MiB; one layer's experts {res['layer_experts_mib'] / 1024:.1f} GiB.", "",
             "| step | wall s | ÷ cp -r | peak RSS MiB |", "| --- | --- | --- | --- |"]
    for name, s in steps.items():
        lines.append(f"| {name} | {s['wall_s']} | {s['wall_s'] / base:.2f} | {s['peak_rss_mib']} |")
    lines += ["", f"EP 2 files: {', '.join(res['ep2_files'])}; EP 4 files: {', '.join(res['ep4_files'])}.",
              f"verify (HF source vs the EP 4 output): {'equivalent' if ok else 'NOT equivalent'}."]
    (HERE / "results_moe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(a.work)


if __name__ == "__main__":
    main()
