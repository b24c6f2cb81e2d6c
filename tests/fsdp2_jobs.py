"""Real FSDP2 training jobs for the DCP tests: 2 gloo ranks on CPU, a tiny seeded Llama
(tests/tiny_models), `fully_shard` per decoder layer and at the root, a few AdamW steps, then a
`torch.distributed.checkpoint` save the way users write it. Rank 0 also keeps what the job held
(the gathered full state dict, `full.safetensors`) and the live sharded model's logits
(`logits.pt`) as the references the tests compare against.

Both saves users write are made from the same trained state: ``model_only/``
(`dcp.save(get_model_state_dict(model))`: bare HF names) and ``model_optim/``
(`dcp.save({"model": msd, "optim": osd})` of `get_state_dict(model, optim)`).
``mode="accelerate"``: train and save with accelerate instead (``state/`` = its ``save_state`` dir).
``load=PATH``: instead of training, load a DCP checkpoint into the sharded model (`dcp.load` +
`set_model_state_dict`) and write its logits (the hf-to-dcp test).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import build_model, tokens  # noqa: E402


def _worker(rank: int, world: int, store: str, mode: str, variant: str, out: str, steps: int, load: str | None,
            key: str | None):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                         set_model_state_dict)
    from torch.distributed.fsdp import fully_shard

    # a FileStore in the job's own directory: no TCP port to pick, so no race with other jobs
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"file://{store}")
    try:
        torch.manual_seed(0)
        model = build_model(variant, seed=3).train()
        ids = tokens(model.config.vocab_size, batch=2, seq=12, seed=11)
        out = Path(out)
        if mode == "accelerate":
            model = _accelerate_train_and_save(model, rank, world, steps, out)
        else:
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        if mode == "load":
            sd = get_model_state_dict(model)
            dcp.load({key: sd} if key else sd, checkpoint_id=load)
            set_model_state_dict(model, sd)
        if mode == "fsdp2":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            for step in range(steps):
                x = tokens(model.config.vocab_size, batch=2, seq=12, seed=100 + step * world + rank)
                model(x, labels=x).loss.backward()
                opt.step()
                opt.zero_grad()
            dcp.save(get_model_state_dict(model), checkpoint_id=str(out / "model_only"))
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(out / "model_optim"))
        if mode != "load":
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


def _accelerate_train_and_save(model, rank: int, world: int, steps: int, out: Path):
    """accelerate's own FSDP2 path: ``Accelerator(fsdp_plugin=...)``, ``prepare``, ``backward``,
    ``save_state(out / "state")`` (SHARDED_STATE_DICT). On CPU accelerate picks MULTI_CPU and never
    selects FSDP by itself (its state code enables FSDP only for GPU-like devices), so the job
    sets the distributed type to FSDP after constructing the Accelerator; everything after that
    (fully_shard via prepare, the DCP saves of save_state) is accelerate's code."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT",
                                            auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
    acc = Accelerator(cpu=True, fsdp_plugin=plugin)
    PartialState().distributed_type = DistributedType.FSDP
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    assert acc.is_fsdp2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = acc.prepare(model, opt)
    for step in range(steps):
        x = tokens(model.config.vocab_size, batch=2, seq=12, seed=100 + step * world + rank)
        acc.backward(model(x, labels=x).loss)
        opt.step()
        opt.zero_grad()
    acc.save_state(str(out / "state"))
    return model


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(out: Path, variant: str = "llama-gqa", steps: int = 3, *, mode: str = "fsdp2",
            load: Path | None = None, key: str | None = None, world: int = 2) -> Path:
    """``mode``: "fsdp2" (train, save model_only/ and model_optim/), "accelerate" (train and
    ``save_state`` into state/) or "load" (load the DCP checkpoint ``load``, optionally under
    ``key``, into the sharded model). Every mode writes logits.pt; the training modes also
    full.safetensors and config/."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mode = "load" if load is not None else mode
    store = tempfile.mkdtemp(prefix="fsdp2_store_")
    try:
        mp.start_processes(_worker, args=(world, os.path.join(store, "store"), mode, variant, str(out), steps,
                                          None if load is None else str(load), key),
                           nprocs=world, join=True, start_method="spawn")
    finally:
        shutil.rmtree(store, ignore_errors=True)
    return out


if __name__ == "__main__":
    run_job(Path(sys.argv[1]), sys.argv[2])
