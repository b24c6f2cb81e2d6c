"""ops/rows.row_runs: the runs it gives rebuild each row-wise op's forward exactly (the streaming
engine reads only the input rows of the runs it needs, so a wrong run is a wrong checkpoint)."""
from __future__ import annotations

import pytest
import torch

from ckptconv.families.config import ModelConfig
from ckptconv.ops import OPS, OpContext, get_op
from ckptconv.ops.rows import row_runs


def _cfg(heads, kv, head_dim=4, hidden=None, ffn=12, vocab=10):
    hidden = hidden or heads * head_dim
    return ModelConfig("llama", 2, hidden, ffn, heads, kv, head_dim, vocab, False, False, 1e-5, 1e4, 64)


CASES = [(_cfg(4, 4), 10), (_cfg(8, 2), 10), (_cfg(6, 3, head_dim=2), 16), (_cfg(4, 1), 12)]


def _inputs(op, cfg, g):
    """Random inputs of ``op`` (rows x 3 columns) with the row counts the family would give it."""
    rows = {"qkv": (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim),
            "gate_up": (cfg.ffn_hidden_size, cfg.ffn_hidden_size), "vocab": (cfg.vocab_size,),
            "identity": (cfg.hidden_size,), "qkv_fused": ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim,)}.get(op)
    return None if rows is None else [torch.randn(n, 3, generator=g) for n in rows]


@pytest.mark.parametrize("cfg,padded", CASES)
@pytest.mark.parametrize("op", sorted(OPS))
def test_runs_rebuild_the_forward(op, cfg, padded):
    impl, ctx, g = get_op(op), OpContext(cfg, padded), torch.Generator().manual_seed(0)
    xs = _inputs(op, cfg, g)
    runs = row_runs(op, tuple(x.shape[0] for x in xs) if xs else (4,), ctx)
    if not impl.row_wise:
        assert runs is None
        return
    if xs is None:
        pytest.skip(f"{op}: inputs not built here")
    want = impl.forward(xs, ctx)
    got = torch.cat([xs[r.src][r.at:r.at + r.n] if r.src >= 0 else torch.zeros(r.n, 3) for r in runs])
    assert [r.out for r in runs] == [sum(q.n for q in runs[:i]) for i in range(len(runs))]
    assert torch.equal(got, want)
    if op == "vocab":
        assert runs[-1].src == -1 and runs[-1].n == padded - cfg.vocab_size or padded == cfg.vocab_size
