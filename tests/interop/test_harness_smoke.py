"""Proves the megatron-core harness itself, on checkpoints written BY HAND in this file.

Global (TP=1, PP=1) megatron local-spec weights are drawn at random and sliced per rank
with the layout rules of FORMATS.md (written out independently of ``ckptconv``):

* linear_qkv: rows grouped per query group [q heads of g, k_g, v_g], then dim-0 chunks
* linear_fc1: rank r holds cat(gate_r, up_r)
* linear_proj / linear_fc2: dim-1 chunks
* word embeddings / output layer: dim-0 chunks of the PADDED vocab
* norms: replicated; PP: contiguous layer blocks renumbered from 0 on every stage
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", exc_type=ImportError)
pytest.importorskip("psutil", exc_type=ImportError)

from mcore_harness import MegatronHarnessError, megatron_logits  # noqa: E402

H, NQ, NG, D, F, L = 64, 4, 2, 16, 128, 4
VOCAB, PADDED = 250, 256
ITER = 7


def make_args(tp, pp, *, untie=True, vpp=None, qkv_bias=False, te=False, vocab_size=VOCAB):
    return argparse.Namespace(
        num_layers=L, hidden_size=H, ffn_hidden_size=F, num_attention_heads=NQ, kv_channels=D,
        group_query_attention=True, num_query_groups=NG, max_position_embeddings=64,
        seq_length=64, position_embedding_type="rope", rotary_base=10000, rotary_percent=1.0,
        rotary_interleaved=False, use_rope_scaling=False, rope_scaling_factor=8.0,
        normalization="RMSNorm", norm_epsilon=1e-5, swiglu=True, add_bias_linear=False,
        add_qkv_bias=qkv_bias, untie_embeddings_and_output_weights=untie, vocab_size=vocab_size,
        padded_vocab_size=PADDED, make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        transformer_impl="transformer_engine" if te else "local",
        params_dtype=torch.float32, bf16=False, fp16=False,
    )


def global_weights(seed=0, qkv_bias=False):
    """Random global weights, q/k/v and gate/up kept separate (layout applied when slicing)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.08  # noqa: E731
    w = {"emb": r(PADDED, H), "out": r(PADDED, H), "final_norm": 1.0 + 0.3 * r(H), "layers": []}
    for _ in range(L):
        lw = {
            "q": r(NQ * D, H), "k": r(NG * D, H), "v": r(NG * D, H), "proj": r(H, NQ * D),
            "gate": r(F, H), "up": r(F, H), "fc2": r(H, F),
            "in_norm": 1.0 + 0.3 * r(H), "mlp_norm": 1.0 + 0.3 * r(H),
        }
        if qkv_bias:
            lw.update(qb=r(NQ * D), kb=r(NG * D), vb=r(NG * D))
        w["layers"].append(lw)
    return w


def grouped_qkv(q, k, v, swap_kv_group=None):
    """[q heads of g, k_g, v_g] for g in groups (works for weights and biases)."""
    per = NQ // NG
    blocks = []
    for gi in range(NG):
        kg, vg = k[gi * D:(gi + 1) * D], v[gi * D:(gi + 1) * D]
        if gi == swap_kv_group:
            kg, vg = vg, kg
        blocks += [q[gi * per * D:(gi + 1) * per * D], kg, vg]
    return torch.cat(blocks, 0)


def shard(w, tp, tr, pp, pr, *, vpp=1, v=0, untie=True, swap_kv=False, te=False):
    """State dict of (tp rank tr, pp stage pr, virtual chunk v). Chunk v of stage p holds
    the global layers starting at (v * pp + p) * L / (pp * vpp); local numbering from 0."""
    ch = lambda t, dim: torch.chunk(t, tp, dim=dim)[tr].clone()  # noqa: E731
    per_chunk = L // (pp * vpp)
    first, last = pr == 0 and v == 0, pr == pp - 1 and v == vpp - 1
    sd = {}
    if first:
        sd["embedding.word_embeddings.weight"] = ch(w["emb"], 0)
    for local in range(per_chunk):
        gl = (v * pp + pr) * per_chunk + local
        lw = w["layers"][gl]
        p = f"decoder.layers.{local}."
        swap = 0 if (swap_kv and gl == 0) else None
        in_norm = "self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight"
        mlp_norm = "mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight"
        sd[p + in_norm] = lw["in_norm"].clone()
        sd[p + "self_attention.linear_qkv.weight"] = ch(grouped_qkv(lw["q"], lw["k"], lw["v"], swap), 0)
        if "qb" in lw:
            sd[p + "self_attention.linear_qkv.bias"] = ch(grouped_qkv(lw["qb"], lw["kb"], lw["vb"], swap), 0)
        sd[p + "self_attention.linear_qkv._extra_state"] = None
        sd[p + "self_attention.linear_proj.weight"] = ch(lw["proj"], 1)
        sd[p + "self_attention.linear_proj._extra_state"] = None
        sd[p + mlp_norm] = lw["mlp_norm"].clone()
        sd[p + "mlp.linear_fc1.weight"] = torch.cat([ch(lw["gate"], 0), ch(lw["up"], 0)], 0)
        sd[p + "mlp.linear_fc1._extra_state"] = None
        sd[p + "mlp.linear_fc2.weight"] = ch(lw["fc2"], 1)
        sd[p + "mlp.linear_fc2._extra_state"] = None
    if last:
        sd["decoder.final_layernorm.weight"] = w["final_norm"].clone()
        if untie:
            sd["output_layer.weight"] = ch(w["out"], 0)
            sd["output_layer._extra_state"] = None
        elif pp > 1:  # tied + PP: the last stage keeps its own copy of the embedding
            sd["output_layer.weight"] = ch(w["emb"], 0)
            sd["output_layer._extra_state"] = None
    return sd


def write_ckpt(root: Path, w, tp, pp, *, vpp=None, untie=True, swap_kv=False, te=False,
               qkv_bias=False, drop_key=None, dtype=torch.float32):
    args = make_args(tp, pp, untie=untie, te=te, qkv_bias=qkv_bias, vpp=vpp)
    it_dir = root / f"iter_{ITER:07d}"
    for pr in range(pp):
        for tr in range(tp):
            state = {"args": args, "checkpoint_version": 3.0, "iteration": ITER}
            for v in range(vpp or 1):
                sd = shard(w, tp, tr, pp, pr, vpp=vpp or 1, v=v, untie=untie, swap_kv=swap_kv, te=te)
                sd = {k: (x.to(dtype) if torch.is_tensor(x) else x) for k, x in sd.items()}
                if drop_key is not None:
                    sd.pop(drop_key, None)
                state["model" if vpp is None else f"model{v}"] = sd
            name = f"mp_rank_{tr:02d}" if pp == 1 else f"mp_rank_{tr:02d}_{pr:03d}"
            (it_dir / name).mkdir(parents=True, exist_ok=True)
            torch.save(state, it_dir / name / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text(str(ITER))
    return root


def tokens():
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def weights():
    return global_weights()


@pytest.fixture(scope="module")
def ref_logits(weights, tmp_path_factory):
    root = write_ckpt(tmp_path_factory.mktemp("tp1pp1"), weights, 1, 1)
    t0 = time.perf_counter()
    out = megatron_logits(root, tokens())
    print(f"megatron_logits tp1pp1: {time.perf_counter() - t0:.1f}s")
    assert out.shape == (2, 8, VOCAB) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().max() > 1e-2
    return out


def test_tp2pp2_matches_tp1pp1(weights, ref_logits, tmp_path):
    root = write_ckpt(tmp_path, weights, 2, 2)
    t0 = time.perf_counter()
    out = megatron_logits(root, tokens())
    print(f"megatron_logits tp2pp2: {time.perf_counter() - t0:.1f}s")
    torch.testing.assert_close(out, ref_logits, atol=1e-5, rtol=0)


def test_wrong_qkv_slicing_is_detected(weights, ref_logits, tmp_path):
    root = write_ckpt(tmp_path, weights, 2, 2, swap_kv=True)
    out = megatron_logits(root, tokens())
    assert (out - ref_logits).abs().max().item() > 1e-3


def test_te_named_norms_and_bf16_weights(weights, ref_logits, tmp_path):
    """TE key names are renamed to the local spec; bf16 weights are cast to fp32."""
    root = write_ckpt(tmp_path, weights, 2, 1, te=True, dtype=torch.bfloat16)
    out = megatron_logits(root, tokens())
    assert (out - ref_logits).abs().max().item() < 0.1  # bf16 rounding only
    assert not torch.equal(out, ref_logits)


def test_tied_embeddings_under_pp(weights, tmp_path):
    """Tied: no output_layer at PP=1; own copy of the embedding on the last stage at PP>1."""
    ref = megatron_logits(write_ckpt(tmp_path / "a", weights, 1, 1, untie=False), tokens())
    out = megatron_logits(write_ckpt(tmp_path / "b", weights, 2, 2, untie=False), tokens())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_strict_load_error_surfaces(weights, tmp_path):
    root = write_ckpt(tmp_path, weights, 2, 2, drop_key="decoder.layers.1.mlp.linear_fc2.weight")
    t0 = time.perf_counter()
    with pytest.raises(MegatronHarnessError, match=r"Missing key\(s\).*decoder\.layers\.1\.mlp\.linear_fc2\.weight"):
        megatron_logits(root, tokens())
    assert time.perf_counter() - t0 < 60


def test_virtual_pipeline(weights, ref_logits, tmp_path):
    """vpp=2 at PP=2: rank files hold model0/model1, one layer per chunk, interleaved."""
    out = megatron_logits(write_ckpt(tmp_path, weights, 1, 2, vpp=2), tokens())
    torch.testing.assert_close(out, ref_logits, atol=1e-5, rtol=0)


def test_qkv_bias(tmp_path):
    """add_qkv_bias (Qwen2 style): bias grouped and split like the qkv weight."""
    w = global_weights(seed=1, qkv_bias=True)
    ref = megatron_logits(write_ckpt(tmp_path / "a", w, 1, 1, qkv_bias=True), tokens())
    out = megatron_logits(write_ckpt(tmp_path / "b", w, 2, 2, qkv_bias=True), tokens())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    bad = megatron_logits(write_ckpt(tmp_path / "c", w, 2, 2, qkv_bias=True, swap_kv=True), tokens())
    assert (bad - ref).abs().max().item() > 1e-3
