"""`ckptconv run CKPT`: rerun a checkpoint with the bundled parallel runtime, summarise its logits.

Exit 0 on success, 1 when a rank fails or times out, 2 on usage or input errors (including a
checkpoint that needs more ranks than --nproc allows). Under torchrun pass
`--launcher torchrun`; rank 0 prints and writes the outputs (see docs/runtime.md).
"""
from __future__ import annotations

import json
import os
import sys
import time

import click
import torch

from ..engine.convert import load_hf_config_arg
from ..runtime import RankFailure, check_tokens, prepare_run, resolve_nproc, run_distributed, run_local
from .common import debug_option, handle_errors


def parse_tokens(text: str) -> list[list[int]]:
    """'1 2 3' or '1,2,3'; several sequences separated by ';' (equal lengths)."""
    try:
        rows = [[int(x) for x in row.replace(",", " ").split()] for row in text.split(";") if row.strip()]
    except ValueError:
        raise click.BadParameter("token ids must be integers, e.g. --tokens \"1 2 3\"", param_hint="--tokens")
    if not rows or len({len(r) for r in rows}) != 1:
        raise click.BadParameter("give one or more sequences of equal length ('1 2 3; 4 5 6')", param_hint="--tokens")
    return rows


def logits_summary(logits: torch.Tensor, top: int = 5) -> dict:
    last = logits[:, -1].float()
    probs, ids = last.softmax(-1).topk(min(top, last.shape[-1]), dim=-1)
    return {"shape": list(logits.shape), "mean": logits.mean().item(), "std": logits.std().item(),
            "min": logits.min().item(), "max": logits.max().item(),
            "argmax": logits.argmax(-1).tolist(),
            "last_position_top": [[{"id": int(i), "prob": round(float(p), 6)} for i, p in zip(r_ids, r_p)]
                                  for r_ids, r_p in zip(ids, probs)]}


def write_logits(path: str, logits: torch.Tensor, tokens: torch.Tensor) -> None:
    if path.endswith(".pt"):
        torch.save({"logits": logits, "tokens": tokens}, path)
    else:
        from safetensors.torch import save_file
        save_file({"logits": logits.contiguous(), "tokens": tokens.contiguous()}, path)


def summary_text(s: dict) -> str:
    lg = s["logits"]
    lines = [f"ran {s['family']} from {s['format']} {s['checkpoint']}",
             f"  TP={s['tp']} PP={s['pp']} VPP={s['vpp']}"
             + (f" EP={s['ep']} ETP={s['etp']} ({s['num_experts']} experts, top-{s['moe_topk']})"
                if s.get("num_experts") else "")
             + f" on {s['ranks']} rank(s), {s['device']}, {s['dtype']}; "
             f"reads: {s['reads']}",
             f"  tokens {s['tokens_shape']} -> logits {lg['shape']} (vocab {s['vocab_size']}, padded "
             f"{s['padded_vocab_size']}) in {s['seconds']:.2f} s",
             f"  logits mean {lg['mean']:.4g} std {lg['std']:.4g} min {lg['min']:.4g} max {lg['max']:.4g}"]
    for b, row in enumerate(lg["last_position_top"]):
        lines.append(f"  sequence {b}: argmax {lg['argmax'][b]}")
        lines.append("    last position top: " + ", ".join(f"{t['id']} ({t['prob']:.3f})" for t in row))
    if s.get("saved_logits"):
        lines.append(f"  logits saved to {s['saved_logits']}")
    return "\n".join(lines)


@click.command("run")
@click.argument("ckpt")
@click.option("--tokens", "tokens_text", default=None, help='Token ids, e.g. "1 2 3" (several: "1 2; 3 4").')
@click.option("--random-tokens", type=click.IntRange(min=1), default=None, help="N random token ids per sequence.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --random-tokens.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Number of random sequences (with --random-tokens).")
@click.option("--nproc", default="auto", show_default=True,
              help="Ranks allowed: auto (= TP x PP; PP x lcm(TP, ETP x EP) with experts) or N.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="Execution dtype.")
@click.option("--tp", type=click.IntRange(min=1), default=None, help="Re-shard on load to this TP.")
@click.option("--pp", type=click.IntRange(min=1), default=None, help="Re-shard on load to this PP.")
@click.option("--vpp", type=click.IntRange(min=1), default=None, help="Virtual pipeline chunks when re-sharding.")
@click.option("--ep", type=click.IntRange(min=1), default=None,
              help="Re-shard on load to this expert-parallel degree (Mixture-of-Experts).")
@click.option("--etp", type=click.IntRange(min=1), default=None,
              help="Re-shard on load to this expert tensor-parallel degree (must divide TP).")
@click.option("--iteration", default="latest", show_default=True)
@click.option("--hf-config", type=click.Path(exists=True), default=None,
              help="HF config.json (or its directory) when the checkpoint carries none.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--launcher", type=click.Choice(["local", "torchrun"]), default="local", show_default=True,
              help="local: start the ranks here; torchrun: this process is one rank of a torchrun job.")
@click.option("--timeout", type=float, default=1800.0, show_default=True,
              help="Seconds before the run is abandoned.")
@click.option("--json", "json_file", type=click.Path(), default=None,
              help="Write the JSON summary here ('-' = stdout).")
@click.option("--save-logits", type=click.Path(), default=None, help="Write logits + tokens (.safetensors, or .pt).")
@debug_option
@handle_errors
def command(ckpt, tokens_text, random_tokens, seed, batch, nproc, dtype, tp, pp, vpp, ep, etp, iteration, hf_config,
            device, launcher, timeout, json_file, save_logits):
    """Rerun CKPT (Megatron at any TP/PP/VPP/EP, or HF) on its ranks and summarise its logits."""
    if (tokens_text is None) == (random_tokens is None):
        raise click.UsageError("give exactly one of --tokens or --random-tokens")
    if nproc != "auto" and not (nproc.isdigit() and int(nproc) >= 1):
        raise click.BadParameter("must be auto or a positive integer", param_hint="--nproc")
    spec = prepare_run(ckpt, tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, iteration=iteration, device=device,
                       hf_config=load_hf_config_arg(hf_config),
                       dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    vocab = spec.cfg.vocab_size
    if random_tokens is not None:
        ids = torch.randint(0, vocab, (batch, random_tokens), generator=torch.Generator().manual_seed(seed))
    else:
        try:
            ids = check_tokens(parse_tokens(tokens_text), vocab)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--tokens")
    start = time.monotonic()
    try:
        if launcher == "torchrun":
            env = {k: int(os.environ.get(k, "-1")) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
            if min(env.values()) < 0:
                raise click.UsageError("--launcher torchrun needs RANK, LOCAL_RANK and WORLD_SIZE: start it with "
                                       "torchrun")
            out = run_distributed(spec, ids, rank=env["RANK"], local_rank=env["LOCAL_RANK"], world=env["WORLD_SIZE"],
                                  timeout_s=timeout)
            if env["RANK"] != 0:
                return
        else:
            resolve_nproc(spec, nproc)
            out = run_local(spec, ids, timeout_s=timeout)
    except RankFailure as e:
        if click.get_current_context().params.get("debug"):
            click.echo(e.details, err=True)
        click.echo(f"error: {e}. Fix: rerun with --debug to see every rank's traceback", err=True)
        sys.exit(1)
    summary = {**spec.summary(), "tokens_shape": list(ids.shape),
               "seconds": round(time.monotonic() - start, 3), "logits": logits_summary(out)}
    if save_logits:
        write_logits(str(save_logits), out, ids)
        summary["saved_logits"] = str(save_logits)
    if json_file == "-":
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    if json_file:
        with open(json_file, "w") as f:
            json.dump(summary, f, indent=2, default=str)
    click.echo(summary_text(summary))
