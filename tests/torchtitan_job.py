"""torchtitan 0.3.0 on CPU, one gloo process: its Llama3 model (flex attention, complex RoPE),
optimizer and LR-scheduler containers and its CheckpointManager, driven by a loop of our own.

    python tests/torchtitan_job.py OUT [--tied]            save OUT/checkpoint/step-3/ after 3 AdamW steps
    python tests/torchtitan_job.py OUT --load DCP_DIR      load DCP_DIR model-only (initial_load_path)

FlexAttention has no backward on CPU (torch 2.13), so the steps use seeded stand-in gradients:
the optimizer / scheduler state are real, the weights move as in training. Sizes are
tests/tiny_models.BASE. Writes OUT/reference.pt: tokens, torchtitan's own logits and the model's
state dict as the job held it.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import BASE, tokens  # noqa: E402


def build(tied: bool):
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.llama3 import _build_llama3_layers
    from torchtitan.models.llama3.model import Llama3Model

    dim, heads, vocab = BASE["hidden_size"], BASE["num_attention_heads"], BASE["vocab_size"]
    cfg = Llama3Model.Config(
        dim=dim, vocab_size=vocab, enable_weight_tying=tied,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim),
        norm=RMSNorm.Config(normalized_shape=dim, eps=BASE["rms_norm_eps"]),
        lm_head=Linear.Config(in_features=dim, out_features=vocab),
        layers=_build_llama3_layers(
            n_layers=BASE["num_hidden_layers"], dim=dim, n_heads=heads, n_kv_heads=BASE["num_key_value_heads"],
            hidden_dim=BASE["intermediate_size"], attn_backend="flex",
            rope=ComplexRoPE.Config(dim=BASE["head_dim"], max_seq_len=BASE["max_position_embeddings"],
                                    theta=10000.0, scaling="none")))
    torch.manual_seed(0)
    model = cfg.build()
    model.init_states()
    return model


def main() -> None:
    from torchtitan.components.checkpointer.dcp import CheckpointManager
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw

    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--tied", action="store_true")
    p.add_argument("--load", type=Path)
    p.add_argument("--port", default="29561")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=a.port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    model = build(a.tied)
    optim = default_adamw(lr=1e-2, implementation="for-loop").build(model_parts=[model])
    sched = LRSchedulersContainer.Config(warmup_steps=1).build(optimizers=optim, training_steps=3)
    extra = dict(initial_load_path=str(a.load), initial_load_model_only=True) if a.load else {}
    ckpt = CheckpointManager(CheckpointManager.Config(enable=True, folder="checkpoint", interval=1, **extra),
                             dataloader=None, model_parts=[model], optimizers=optim, lr_schedulers=sched,
                             states={}, sd_adapter=None, base_folder=str(a.out))
    if a.load:
        assert ckpt.load(), "torchtitan loaded nothing"
    else:
        for step in range(1, 4):
            g = torch.Generator().manual_seed(step)
            for prm in model.parameters():
                prm.grad = 0.1 * torch.randn(prm.shape, generator=g)
            optim.step()
            sched.step()
            optim.zero_grad()
        ckpt.save(curr_step=3)
    ckpt.close()
    ids = tokens(BASE["vocab_size"], batch=2, seq=12, seed=7)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        logits = model(ids, pos, model.get_attention_masks(pos))
    torch.save({"tokens": ids, "logits": logits, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}},
               a.out / "reference.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
