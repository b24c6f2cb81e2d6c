"""Real FSDP2 training jobs for the DCP tests: 2 gloo ranks on CPU, a tiny seeded Llama
(tests/tiny_models), `fully_shard` per decoder layer and at the root, a few AdamW steps, then a
`torch.distributed.checkpoint` save the way users write it. Rank 0 also keeps what the job held
(the gathered full state dict, `full.safetensors`) and the live sharded model's logits
(`logits.pt`) as the references the tests compare against.

Both saves users write are made from the same trained state: ``model_only/``
(`dcp.save(get_model_state_dict(model))`: bare HF names) and ``model_optim/``
(`dcp.save({"model": msd, "optim": osd})` of `get_state_dict(model, optim)`).
``load``: instead of training, load a DCP checkpoint into the sharded model (`dcp.load` +
`set_model_state_dict`) and write its logits (the hf-to-dcp test).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import build_model, tokens  # noqa: E402


def _worker(rank: int, world: int, port: int, variant: str, out: str, steps: int, load: str | None,
            key: str | None):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                         set_model_state_dict)
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = build_model(variant, seed=3).train()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        ids = tokens(model.config.vocab_size, batch=2, seq=12, seed=11)
        out = Path(out)
        if load is not None:
            sd = get_model_state_dict(model)
            dcp.load({key: sd} if key else sd, checkpoint_id=load)
            set_model_state_dict(model, sd)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            for step in range(steps):
                x = tokens(model.config.vocab_size, batch=2, seq=12, seed=100 + step * world + rank)
                loss = model(x, labels=x).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
            dcp.save(get_model_state_dict(model), checkpoint_id=str(out / "model_only"))
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(out / "model_optim"))
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                from safetensors.torch import save_file
                save_file({k: v.contiguous().clone() for k, v in full.items()}, str(out / "full.safetensors"))
                model.config.save_pretrained(out / "config")
        model.eval()
        with torch.no_grad():
            logits = model(ids).logits
        if rank == 0:
            torch.save({"logits": logits, "tokens": ids}, out / "logits.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(out: Path, variant: str = "llama-gqa", steps: int = 3, *,
            load: Path | None = None, key: str | None = None, world: int = 2) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_worker, args=(world, free_port(), variant, str(out), steps,
                                      None if load is None else str(load), key),
                       nprocs=world, join=True, start_method="spawn")
    return out


if __name__ == "__main__":
    run_job(Path(sys.argv[1]), sys.argv[2])
