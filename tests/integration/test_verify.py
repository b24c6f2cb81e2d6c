"""The broken-conversion suite: every deliberately broken conversion exits 1 with the right
diagnosis; every correct conversion exits 0. Broken checkpoints are made by writing a correct
one and corrupting tensors (per-rank Megatron files edited with torch.load(weights_only=True))."""
from __future__ import annotations

import argparse
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptconv import hf_to_megatron, megatron_to_hf
from helpers import run

RANK = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
QKV = "decoder.layers.{}.self_attention.linear_qkv.weight"
FC1 = "decoder.layers.{}.mlp.linear_fc1.weight"


def verify_json(a, b, *extra):
    r = run("verify", a, b, "--json", "-", *extra)
    assert r.exit_code in (0, 1), r.output
    return r.exit_code, json.loads(r.stdout)


def to_megatron(src, dst, **kw):
    hf_to_megatron(src, dst, ckpt_format="torch", show_progress=False, **kw)
    return dst


def edit_ranks(root, fn):
    """fn(tp_rank, pp_rank, model_state_dict, rank_files) edits per-rank state dicts in place."""
    files = {}
    for f in sorted(root.glob("*/mp_rank_*/model_optim_rng.pt")):
        m = RANK.match(f.parent.name)
        with torch.serialization.safe_globals([argparse.Namespace]):
            files[(int(m.group(1)), int(m.group(2) or 0))] = (f, torch.load(f, weights_only=True))
    models = {k: obj["model"] for k, (_, obj) in files.items()}
    for (t, p), sd in models.items():
        fn(t, p, sd, models)
    for f, obj in files.values():
        torch.save(obj, f)


def edit_hf(path, fn):
    sd = load_file(path / "model.safetensors")
    fn(sd)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def src(hf_model_dir):
    return hf_model_dir("llama-gqa")      # 4 layers, 8 heads, 4 query groups, head_dim 8, vocab 250


def diagnoses(report):
    return " | ".join(report["diagnoses"])


def assert_broken(a, b, *needles):
    code, report = verify_json(a, b)
    assert code == 1 and not report["equivalent"], report
    text = diagnoses(report)
    for n in needles:
        assert n in text, text
    return report


# ---------------------------------------------------------------- broken conversions: exit 1
def test_kv_swapped_in_one_group(src, tmp_path):
    mg = to_megatron(src, tmp_path / "mg", tp=2)

    def swap(t, p, sd, _):
        if t == 1:                     # rank 1 holds query groups 2, 3; swap k/v of group 3
            w = sd["decoder.layers.1.self_attention.linear_qkv.weight"]
            k, v = w[32 + 16:32 + 24].clone(), w[32 + 24:32 + 32].clone()
            w[32 + 16:32 + 24], w[32 + 24:32 + 32] = v, k
    edit_ranks(mg, swap)
    report = assert_broken(src, mg, "layer 1 linear_qkv: query group 3 k and v rows swapped")
    failed = [t for t in report["tensors"] if t["status"] != "equal" and t["name"] != "config"]
    assert [t["name"] for t in failed] == [QKV.format(1)] and failed[0]["n_diff"] > 0


def test_q_heads_permuted(src, tmp_path):
    bad = shutil.copytree(src, tmp_path / "bad")

    def permute(sd):
        q = sd["model.layers.0.self_attn.q_proj.weight"]
        q[16:24], q[24:32] = q[24:32].clone(), q[16:24].clone()
    edit_hf(bad, permute)
    assert_broken(src, bad, "layer 0 q_proj/k_proj/v_proj: q heads permuted (B heads 2, 3 hold A heads 3, 2)")


def test_rope_interleave(src, tmp_path):
    bad = shutil.copytree(src, tmp_path / "bad")
    perm = torch.arange(8).view(2, 4).t().reshape(-1)

    def interleave(sd):
        for n in ("q_proj", "k_proj"):
            w = sd[f"model.layers.2.self_attn.{n}.weight"]
            sd[f"model.layers.2.self_attn.{n}.weight"] = w.view(-1, 8, 64)[:, perm].reshape(-1, 64).contiguous()
    edit_hf(bad, interleave)
    assert_broken(src, bad, "layer 2 q_proj/k_proj/v_proj: q and k heads permuted by the RoPE interleave")


def test_gate_up_swapped(src, tmp_path):
    mg = to_megatron(src, tmp_path / "mg", tp=2)

    def swap(t, p, sd, _):            # every rank wrote [up_r; gate_r] instead of [gate_r; up_r]
        w = sd[FC1.format(3)]
        sd[FC1.format(3)] = torch.cat(w.chunk(2)[::-1]).contiguous()
    edit_ranks(mg, swap)
    assert_broken(src, mg, "layer 3 linear_fc1: gate and up swapped")


def test_fc1_plain_tp_chunks(src, tmp_path):
    good = to_megatron(src, tmp_path / "good", tp=1)
    bad = to_megatron(src, tmp_path / "bad", tp=2)
    with torch.serialization.safe_globals([argparse.Namespace]):
        full = torch.load(good / "release/mp_rank_00/model_optim_rng.pt", weights_only=True)["model"]

    def chunk(t, p, sd, _):           # rank r got a plain row chunk of [gate; up]
        sd[FC1.format(0)] = full[FC1.format(0)].chunk(2)[t].clone()
    edit_ranks(bad, chunk)
    assert_broken(src, bad, "layer 0 linear_fc1: fc1 split over TP=2 as plain row chunks")


@pytest.mark.parametrize("tp,divisible_by,shift", [(1, 128, 6), (4, 128, 128)])
def test_vocab_rows_shifted(src, tmp_path, tp, divisible_by, shift):
    mg = to_megatron(src, tmp_path / "mg", tp=tp, divisible_by=divisible_by)
    name = "embedding.word_embeddings.weight"
    ranks = {}

    def collect(t, p, sd, models):
        ranks[t] = sd
    edit_ranks(mg, collect)
    full = torch.cat([ranks[t][name] for t in sorted(ranks)])
    moved = torch.roll(full, shift, 0)          # the padding ended up in front of the real rows
    rows = full.shape[0] // tp
    edit_ranks(mg, lambda t, p, sd, _: sd.__setitem__(name, moved[t * rows:(t + 1) * rows].clone()))
    assert_broken(src, mg, f"word_embeddings: vocab rows shifted by {shift}")


def test_tp_shard_duplicated(src, tmp_path):
    mg = to_megatron(src, tmp_path / "mg", tp=2)

    def dup(t, p, sd, models):        # rank 1 wrote rank 0's shards of every split tensor
        if t == 1:
            for k, v in models[(0, p)].items():
                if torch.is_tensor(v) and "norm" not in k:
                    sd[k] = v.clone()
    edit_ranks(mg, dup)
    report = assert_broken(src, mg, "TP shard 1 duplicates shard 0 (TP=2)")
    failed = [t for t in report["tensors"] if t["status"] == "differs"]
    assert len(failed) == 1 + 4 * 4 + 1 and all("TP shard 1 duplicates shard 0" in t["diagnosis"] for t in failed)


def test_replica_on_another_tp_rank_altered(src, tmp_path):
    """A replicated norm changed by one ulp in TP rank 1's file only: comparisons read one copy,
    so the other copy must be checked on its own (it passed unnoticed before)."""
    mg = to_megatron(src, tmp_path / "mg", tp=2)
    name = "decoder.layers.1.mlp.linear_fc1.layer_norm_weight"

    def nudge(t, p, sd, models):
        if t == 1 and name in sd:
            w = sd[name].clone()
            w.view(torch.int32)[3] += 1
            sd[name] = w
    edit_ranks(mg, nudge)
    report = assert_broken(src, mg, name, "mp_rank_01")
    failed = [t for t in report["tensors"] if t["status"] == "differs"]
    assert [t["name"] for t in failed] == [name]
    code, _ = verify_json(mg, mg)           # Megatron vs Megatron: the same copy is read on both sides
    assert code == 1


def test_layer_dropped(src, tmp_path):
    bad = shutil.copytree(src, tmp_path / "bad")

    def drop(sd):
        for k in [k for k in sd if ".layers." in k]:
            i = int(k.split(".")[2])
            v = sd.pop(k)
            if i != 1:
                sd[k.replace(f".layers.{i}.", f".layers.{i - (i > 1)}.")] = v
    edit_hf(bad, drop)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    report = assert_broken(src, bad, "layer 1 dropped: B's layers 1-2 hold A's layers 2-3")
    missing = [t for t in report["tensors"] if t["status"] == "missing_in_b"]
    assert len(missing) == 9 and all(".layers.3." in t["name"] and "dropped" in t["diagnosis"] for t in missing)


def test_pipeline_stage_offset(src, tmp_path):
    mg = to_megatron(src, tmp_path / "mg", pp=2)

    def offset(t, p, sd, models):     # stage 1 holds global layers 1, 2 instead of 2, 3
        if p == 1:
            prev = {k: v for k, v in models[(t, 0)].items() if k.startswith("decoder.layers.1.") and torch.is_tensor(v)}
            for k in [k for k in sd if k.startswith("decoder.layers.1.") and torch.is_tensor(sd[k])]:
                sd[k] = sd[k.replace("layers.1.", "layers.0.")].clone()
            for k, v in prev.items():
                sd[k.replace("layers.1.", "layers.0.")] = v.clone()
    edit_ranks(mg, offset)
    assert_broken(src, mg, "pipeline stage 1 layers offset by 1: B's layers 2-3 hold A's layers 1-2")


def test_bf16_rounded_the_wrong_way(src, tmp_path):
    mg = to_megatron(src, tmp_path / "mg", dtype=torch.bfloat16)
    a = load_file(src / "model.safetensors")["model.layers.2.mlp.down_proj.weight"]
    truncated = (a.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    edit_ranks(mg, lambda t, p, sd, _: sd.__setitem__("decoder.layers.2.mlp.linear_fc2.weight", truncated))
    assert_broken(src, mg, "layer 2 linear_fc2: ", "rounded toward zero (truncated) instead of to nearest even")


def test_vocab_padding_not_removed(src, tmp_path):
    bad = shutil.copytree(src, tmp_path / "bad")
    edit_hf(bad, lambda sd: sd.__setitem__("lm_head.weight", torch.cat([sd["lm_head.weight"], torch.zeros(6, 64)])))
    assert_broken(src, bad, "lm_head: B keeps 6 vocab padding rows (250-255)")


# ---------------------------------------------------------------- correct conversions: exit 0
@pytest.mark.parametrize("variant,kw", [
    ("llama-gqa", dict(tp=2, pp=2)), ("llama-gqa", dict(tp=4)), ("llama-gqa", dict(tp=2, pp=2, vpp=2)),
    ("llama-tied", dict(pp=2)), ("qwen2", dict(tp=2, pp=2, impl="local")), ("llama-mqa", dict(pp=2)),
])
def test_correct_conversions_pass(hf_model_dir, tmp_path, variant, kw):
    src = hf_model_dir(variant)
    mg = to_megatron(src, tmp_path / "mg", **kw)
    megatron_to_hf(mg, tmp_path / "hf", show_progress=False)
    for a, b in ((src, mg), (mg, src), (src, tmp_path / "hf"), (mg, tmp_path / "hf")):
        code, report = verify_json(a, b)
        assert code == 0 and report["equivalent"] and report["num_failed"] == 0, report["diagnoses"]
    if variant == "llama-tied":    # PP > 1 keeps a copy of the tied embedding on the last stage
        assert any(t["group"] == "tied embedding" and t["status"] == "equal" for t in report["tensors"])


def test_bf16_cast_and_resharding_pass(src, tmp_path):
    bf = to_megatron(src, tmp_path / "bf", tp=2, dtype=torch.bfloat16)
    code, report = verify_json(src, bf)
    assert code == 0 and {t["status"] for t in report["tensors"]} == {"equal", "rounded"}
    assert all(t["rule"] == "correctly rounded to bfloat16" for t in report["tensors"] if t["status"] == "rounded")
    t1 = to_megatron(src, tmp_path / "t1", tp=1)
    t4 = to_megatron(src, tmp_path / "t4", tp=4, pp=2)          # 256 vs 512 padded vocab rows
    code, report = verify_json(t1, t4)
    assert code == 0 and report["layout"] == "megatron"
    assert any("padding rows not compared (A 6, B 262)" in n for n in report["notes"])
    code, report = verify_json(bf, src)                          # the fp32 source is not bf16 widened
    assert code == 1
    megatron_to_hf(bf, tmp_path / "wide", dtype=torch.float32, show_progress=False)
    code, report = verify_json(bf, tmp_path / "wide")            # bf16 widened to fp32 exactly
    assert code == 0 and {t["rule"] for t in report["tensors"][1:]} == {"exact after conversion to float32"}


def test_tolerances_only_on_request(src, tmp_path):
    bad = shutil.copytree(src, tmp_path / "bad")
    edit_hf(bad, lambda sd: sd["model.norm.weight"].add_(1e-6))
    code, report = verify_json(src, bad)
    (t,) = [t for t in report["tensors"] if t["name"] == "model.norm.weight"]
    assert code == 1 and t["status"] == "differs" and t["n_diff"] == 64 and 0 < t["max_abs"] < 2e-6
    assert t["max_rel"] is not None and t["max_rel"] > 0
    code, report = verify_json(src, bad, "--atol", "1e-5")
    assert code == 0 and [t["status"] for t in report["tensors"] if t["name"] == "model.norm.weight"] == ["close"]


# ---------------------------------------------------------------- logits tier calibration
@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    """A tiny Llama whose weights have a trained model's scale (init 0.1 ~ 1/sqrt(hidden)), so
    activations are O(1) and the MLP is not in its near-linear regime."""
    import transformers

    from tiny_models import BASE
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**BASE, initializer_range=0.1))
    path = tmp_path_factory.mktemp("realistic")
    model.save_pretrained(path)
    return path


def _broken_logits_cases(src, tmp_path, dtype):
    kv = to_megatron(src, tmp_path / "kv", tp=2, dtype=dtype)

    def swap(t, p, sd, _):
        if t == 1:
            w = sd[QKV.format(1)]
            w[48:56], w[56:64] = w[56:64].clone(), w[48:56].clone()
    edit_ranks(kv, swap)
    gu = to_megatron(src, tmp_path / "gu", tp=2, dtype=dtype)
    edit_ranks(gu, lambda t, p, sd, _: sd.__setitem__(FC1.format(1), torch.cat(sd[FC1.format(1)].chunk(2)[::-1])))
    pad = to_megatron(src, tmp_path / "pad", dtype=dtype)      # padding rows placed before the vocab
    edit_ranks(pad, lambda t, p, sd, _: [sd.__setitem__(n, torch.roll(sd[n], 6, 0).contiguous())
                                         for n in ("embedding.word_embeddings.weight", "output_layer.weight")])
    kept = shutil.copytree(src, tmp_path / "kept")            # padding kept, config says 256
    edit_hf(kept, lambda sd: [sd.__setitem__(n, torch.cat([sd[n], torch.zeros(6, 64)]))
                              for n in ("model.embed_tokens.weight", "lm_head.weight")])
    cfg = json.loads((kept / "config.json").read_text())
    (kept / "config.json").write_text(json.dumps({**cfg, "vocab_size": 256}))
    return {"k/v swapped in one group": kv, "gate/up swapped": gu, "vocab padding in front": pad,
            "vocab padding kept": kept}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_logits_thresholds_separate_correct_from_broken(realistic, tmp_path, dtype):
    good = to_megatron(realistic, tmp_path / "good", tp=2, pp=2, dtype=dtype)
    code, report = verify_json(realistic, good, "--logits")
    lg = report["logits"]
    assert code == 0 and lg["ok"] and lg["tokens"] == 128
    assert lg["runner"] == {"a": "transformers (float32)", "b": "bundled runtime (float32, sharded)"}
    if dtype is None:      # TP2 x PP2 runtime vs transformers: fp32 compute noise only
        assert lg["kl"] < 1e-11 and lg["max_abs"] < 1e-5 and lg["cast_params"] == 0
    else:                  # a correct cast sits at the floor the thresholds are built from
        assert 0 < lg["kl"] == pytest.approx(lg["floor"]["kl"], rel=1e-3) and lg["cast_params"] == 39
    for name, bad in _broken_logits_cases(realistic, tmp_path, dtype).items():
        code, report = verify_json(realistic, bad, "--logits")
        lg = report["logits"]
        assert code == 1 and not lg["ok"], name
        if "thresholds" in lg:
            assert lg["kl"] > 1000 * lg["thresholds"]["kl"] and lg["top1"] < 0.6, (name, lg)
        else:
            assert "logits shapes differ" in lg["detail"], (name, lg)


def test_json_and_junit_reports(src, tmp_path):
    mg = to_megatron(src, tmp_path / "mg", tp=2)
    edit_ranks(mg, lambda t, p, sd, _: sd.__setitem__(FC1.format(3), torch.cat(sd[FC1.format(3)].chunk(2)[::-1])))
    r = run("verify", src, mg, "--json", tmp_path / "r.json", "--junit", tmp_path / "r.xml")
    assert r.exit_code == 1 and "NOT equivalent" in r.output.splitlines()[-1]
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["num_tensors"] == len(rep["tensors"]) == 1 + 3 + 4 * 6 and rep["num_failed"] == 1
    assert rep["layout"] == "megatron" and rep["logits"] is None and rep["bytes_read"]["a"] > 0
    (bad,) = [t for t in rep["tensors"] if t["status"] != "equal"]
    assert bad["name"] == FC1.format(3) and bad["aliases"] == ["model.layers.3.mlp.gate_proj.weight",
                                                                "model.layers.3.mlp.up_proj.weight"]
    assert bad["n_diff"] == bad["numel"] == 16384 and bad["max_abs"] > 0 and bad["rule"] == "exact"
    import xml.etree.ElementTree as ET
    root = ET.parse(tmp_path / "r.xml").getroot()
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == int(suite.get("tests")) == rep["num_tensors"] and suite.get("failures") == "1"
    failed = [c for c in cases if c.find("failure") is not None]
    assert [c.get("name") for c in failed] == [FC1.format(3)]
    assert failed[0].get("classname") == "ckptconv.verify.layers.3"
    assert failed[0].find("failure").get("message") == "layer 3 linear_fc1: gate and up swapped"
    r = run("verify", src, src, "--junit", "-")
    assert r.exit_code == 0 and ET.fromstring(r.output).find("testsuite").get("failures") == "0"


# ---------------------------------------------------------------- fast path building blocks
def test_row_map_runs_match_the_family_ops():
    from ckptconv.families import config_from_hf
    from ckptconv.ops import OpContext, get_op
    from ckptconv.verify.pieces import piece_runs, runs_equal
    cfg = config_from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 24,
                          "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 4,
                          "head_dim": 4, "vocab_size": 10})
    g = torch.Generator().manual_seed(0)
    for op, rows, padded in (("qkv", (32, 16, 16), 0), ("gate_up", (24, 24), 0), ("vocab", (10,), 16)):
        parts = [torch.randn(r, 16, generator=g) for r in rows]
        fused = get_op(op).forward(parts, OpContext(cfg, padded))
        for start, stop in ((0, fused.shape[0]), (3, 29), (9, 13)):
            runs = piece_runs(op, rows, cfg, padded, start, stop, 64)
            a_runs = [(off, parts[c][first:first + n]) for off, c, first, n in runs]
            real = min(stop, 10) - start if op == "vocab" else stop - start
            assert runs_equal(a_runs, [(0, fused[start:stop])], real), (op, start, stop)
            bad = fused[start:stop].clone()
            bad[min(real, bad.shape[0]) - 1, 5] += 1
            assert not runs_equal(a_runs, [(0, bad)], real), (op, start, stop)
    assert not runs_equal([(0, torch.zeros(3, 2))], [(0, torch.zeros(4, 2))], 4)      # rows not covered


def test_fast_path_sees_one_element_and_ignores_padding(src, tmp_path):
    mg = to_megatron(src, tmp_path / "mg", tp=2)
    name = "embedding.word_embeddings.weight"
    edit_ranks(mg, lambda t, p, sd, _: sd[name][127:128].add_(1.0) if t == 1 else None)   # padding row 255
    code, report = verify_json(src, mg)
    assert code == 0, report["diagnoses"]
    edit_ranks(mg, lambda t, p, sd, _: sd[name][121, 63:64].add_(1.0) if t == 1 else None)  # real row 249
    code, report = verify_json(src, mg)
    (bad,) = [t for t in report["tensors"] if t["status"] == "differs"]
    assert code == 1 and bad["name"] == name and bad["n_diff"] == 1
    assert "word_embeddings: differences only in TP shard 1 of 2" in bad["diagnosis"]


# ---------------------------------------------------------------- self-consistent wrong mapping
class _ConcatQKV:
    """A wrong QKV op that is its own exact inverse: plain [Q; K; V] instead of Megatron's
    per-query-group interleave (what the issue's experiment put in the family table)."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):          # other properties of the op (row_wise, ...): the real op's
        return getattr(self.real, name)

    def forward(self, xs, ctx):
        return torch.cat(list(xs), dim=0)

    def inverse(self, t, ctx):
        return [x.contiguous() for x in torch.split(t, [s[0] for s in self.inverse_shapes(t.shape, ctx)], dim=0)]

    def forward_shape(self, shapes, ctx):
        return self.real.forward_shape(shapes, ctx)

    def inverse_shapes(self, shape, ctx):
        return self.real.inverse_shapes(shape, ctx)


@pytest.fixture
def concat_qkv_table(monkeypatch):
    """The QKV op of the family table replaced by _ConcatQKV in this process, both directions
    (conversion and verify's tensor tier; the runtime's ranks read Megatron's layout themselves)."""
    from ckptconv import ops
    from ckptconv.verify import pieces

    monkeypatch.setitem(ops.OPS, "qkv", _ConcatQKV(ops.OPS["qkv"]))
    pieces.row_map.cache_clear()
    pieces.piece_runs.cache_clear()
    yield
    pieces.row_map.cache_clear()
    pieces.piece_runs.cache_clear()


def test_cross_framework_verify_catches_a_self_consistent_wrong_mapping(realistic, tmp_path, concat_qkv_table):
    """Issue 18.2(b): with a wrong but self-consistent mapping every tensor check passes; the
    automatic logits check of a cross-framework verify (the model fits the budget) fails it."""
    mg = to_megatron(realistic, tmp_path / "mg", tp=1)
    code, report = verify_json(realistic, mg, "--no-logits")
    assert code == 0 and report["num_failed"] == 0 and report["logits"] is None      # tensors fooled
    assert any("relative to ckptconv's layout tables" in n for n in report["notes"]), report["notes"]
    code, report = verify_json(realistic, mg)                                         # default: auto
    assert code == 1 and report["num_failed"] == 0 and not report["logits"]["ok"], report["logits"]
    assert report["logits"]["max_abs"] > 1000 * report["logits"]["thresholds"]["max_abs"]
    assert any("logits check run automatically" in n for n in report["notes"])
    code, report = verify_json(realistic, mg, "--logits-budget", "1")                  # does not fit
    assert code == 0 and report["logits"] is None
    assert any("relative to ckptconv's layout tables" in n and "--logits-budget 1" in n for n in report["notes"])
