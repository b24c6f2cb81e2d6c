"""One rank's whole job: load its chunks, run the pipeline stage loop, hand logits to rank 0.

Chunks run in global layer order, as Megatron-Core's interleaved schedule does for one
micro-batch: chunk v of stage p receives [b, s, h] from stage p-1 (from the last stage's
chunk v-1 when p == 0) and sends its output to stage p+1 (wrapping to stage 0), always to
the rank at the same place in the stage. The last chunk of the last stage produces
vocab-parallel logits, gathered over TP; that stage's rank 0 sends them to global rank 0.
"""
from __future__ import annotations

import torch

from .loader import weight_getter
from .model import ModelChunk, Tables
from .parallel import Parallel


def build_chunks(spec, par: Parallel, get) -> list[ModelChunk]:
    lay = spec.layout
    where = lay.layer_locations()
    chunks = []
    for v in range(lay.chunks):
        layers = [g for g, (p, c, _) in enumerate(where) if p == par.pp_rank and c == v]
        first = par.pp_rank == 0 and v == 0
        last = par.pp_rank == lay.pp - 1 and v == lay.chunks - 1
        chunks.append(ModelChunk(spec.cfg, par, get, layers, first, last))
    return chunks


def load_rank(spec, par: Parallel) -> list[ModelChunk]:
    """This rank's model chunks, read from its own shard of the checkpoint."""
    shards = spec.open_shards(par.tp_rank, par.pp_rank, par.ep_rank)
    try:
        get = weight_getter(shards, spec.cfg, spec.layout, spec.padded_vocab, spec.dtype, par.device)
        return build_chunks(spec, par, get)
    finally:
        shards.close()


def stage_forward(chunks: list[ModelChunk], ids: torch.Tensor, par: Parallel, hidden: int,
                  dtype: torch.dtype) -> torch.Tensor | None:
    """Run this rank's chunks; the padded logits [b, s, V_pad] on the last stage, else None."""
    b, s = ids.shape
    tables = Tables(chunks[0].cfg, s, par.device, dtype)
    out = None
    for chunk in chunks:
        if chunk.first:
            x = ids
        elif par.pp == 1:
            x = out
        else:
            x = par.recv_prev((b, s, hidden), dtype)
        out = chunk(x, tables)
        if not chunk.last and par.pp > 1:
            par.send_next(out)
            out = None
    return out


def to_rank0(logits: torch.Tensor | None, par: Parallel, shape: tuple[int, ...], dtype) -> torch.Tensor | None:
    src = par.global_rank(0, par.pp - 1)
    if par.rank == src and src != 0:
        par.send(logits, 0)
    elif par.rank == 0 and src != 0:
        logits = par.recv(shape, dtype, src)
    return logits if par.rank == 0 else None


def run_rank(spec, tokens: torch.Tensor, par: Parallel) -> torch.Tensor | None:
    """Logits [b, s, vocab] (trimmed to the true vocab, float32, CPU) on global rank 0, else None."""
    chunks = load_rank(spec, par)
    ids = tokens.to(par.device)
    out = stage_forward(chunks, ids, par, spec.cfg.hidden_size, spec.dtype)
    out = to_rank0(out, par, (*tokens.shape, spec.padded_vocab), spec.dtype)
    return None if out is None else out[..., : spec.cfg.vocab_size].float().cpu()
