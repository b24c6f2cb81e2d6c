"""Megatron-Core distributed checkpoints (torch_dist): write, read, reshard, real fixtures, bad input."""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from ckptconv import hf_to_megatron, inspect_checkpoint, megatron_to_hf
from ckptconv.engine.reshard import reshard
from ckptconv.errors import MissingTensors
from ckptconv.formats.megatron_dist import MegatronDistReader
from ckptconv.formats.megatron_dist_write import MegatronDistWriter
from ckptconv.plan.megatron_layout import MegatronLayout
from ckptconv.types import TensorMeta
from tiny_models import hf_logits
from helpers import assert_same_hf, assert_same_rank_models, hf_tensors, one_line_error as exit_2, run

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
DIST_FIXTURES = ["megatron_dist_tp2pp2", "megatron_dist_tp1", "megatron019_dist_tp2pp2", "megatron019_dist_tp1"]
LAYOUTS = [(1, 1, None), (2, 2, None), (2, 2, 2), (4, 1, None)]
MODELS = [("llama-gqa", torch.float32), ("qwen2", torch.float32), ("llama-tied", torch.bfloat16),
          ("mistral", torch.float32)]


def torch_dcp_state(iter_dir) -> dict:
    """Every tensor of a DCP checkpoint loaded by torch's own reader (not ours)."""
    reader = dcp.FileSystemReader(str(iter_dir))
    md = reader.read_metadata()
    state = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
             if hasattr(v, "size") and not k.startswith("optimizer")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # "assuming the intent is to load in a single process"
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state


# ------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("variant,dtype", MODELS, ids=[f"{v}-{str(d)[6:]}" for v, d in MODELS])
@pytest.mark.parametrize("tp,pp,vpp", LAYOUTS, ids=[f"tp{t}pp{p}vpp{v}" for t, p, v in LAYOUTS])
def test_hf_torch_dist_hf_bit_exact(hf_model_dir, tmp_path, variant, dtype, tp, pp, vpp):
    src = hf_model_dir(variant, dtype)
    summary = hf_to_megatron(src, tmp_path / "mg", tp=tp, pp=pp, vpp=vpp, show_progress=False)
    assert summary["format"] == "megatron_torch_dist" and "files" not in summary
    with MegatronDistReader(tmp_path / "mg") as r:
        assert (r.layout.tp, r.layout.pp, r.layout.vpp) == (tp, pp, vpp)
        assert r.args.ckpt_format == "torch_dist" and r.common["checkpoint_version"] == 3.0
    megatron_to_hf(tmp_path / "mg", tmp_path / "hf", show_progress=False)
    assert_same_hf(src, tmp_path / "hf")


def test_stored_layout_is_megatrons(hf_model_dir, tmp_path):
    """Checked with torch's own DCP reader: global keys with a stacked layer axis, fc1 = [gate; up],
    padded vocab rows are zeros, one `_extra_state` bytes item per TE module and layer."""
    src = hf_model_dir("qwen2")
    hf_to_megatron(src, tmp_path / "mg", tp=2, pp=2, show_progress=False)
    it = tmp_path / "mg" / "release"
    assert json.loads((it / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert (tmp_path / "mg" / "latest_checkpointed_iteration.txt").read_text() == "release"
    full, st = hf_tensors(src), torch_dcp_state(it)
    assert st["decoder.layers.self_attention.linear_qkv.weight"].shape == (4, 128, 64)
    gate, up = full["model.layers.2.mlp.gate_proj.weight"], full["model.layers.2.mlp.up_proj.weight"]
    assert torch.equal(st["decoder.layers.mlp.linear_fc1.weight"][2], torch.cat([gate, up]))
    assert torch.equal(st["decoder.layers.self_attention.linear_qkv.layer_norm_weight"][3],
                       full["model.layers.3.input_layernorm.weight"])
    emb = st["embedding.word_embeddings.weight"]
    assert emb.shape == (256, 64) and torch.equal(emb[:250], full["model.embed_tokens.weight"]) and not emb[250:].any()
    md = dcp.FileSystemReader(str(it)).read_metadata()
    extra = sorted(k for k in md.state_dict_metadata if "_extra_state" in k)
    assert len(extra) == 4 * 5 and "decoder.layers.self_attention.core_attention._extra_state/shard_3_4" in extra
    with torch.serialization.safe_globals([argparse.Namespace]):
        common = torch.load(it / "common.pt", weights_only=True)
    assert common["args"].padded_vocab_size == 256 and common["ckptconv"]["family"] == "qwen2"


def test_records_share_few_files_and_integrity_digests_are_the_files(hf_model_dir, tmp_path, monkeypatch):
    """Records go into a few large files (here one; several past the file size cap), and the
    integrity.json digests hashed while writing equal a fresh SHA-256 of each file."""
    from ckptconv.formats import dcp_records
    from ckptconv.formats.megatron_dist_integrity import file_digest

    src = hf_model_dir("llama-gqa")
    hf_to_megatron(src, tmp_path / "one", tp=2, pp=2, show_progress=False)
    monkeypatch.setattr(dcp_records, "FILE_BYTES", 1)     # a new file after every record
    hf_to_megatron(src, tmp_path / "many", tp=2, pp=2, show_progress=False)
    for name, expect in (("one", lambda n: n == 1), ("many", lambda n: n > 20)):
        it = tmp_path / name / "release"
        files = json.loads((it / "integrity.json").read_text())["files"]
        data = sorted(f for f in files if f.endswith(".distcp"))
        assert expect(len(data)), data
        assert files == {p.name: file_digest(p) for p in it.iterdir() if p.name != "integrity.json"}
        ours, theirs = hf_tensors(src), torch_dcp_state(it)
        emb = ours["model.embed_tokens.weight"]
        assert torch.equal(theirs["embedding.word_embeddings.weight"][:emb.shape[0]], emb)


def test_out_of_order_writes_and_missing_tensor(tmp_path):
    """The writer accepts writes in any order; a planned tensor never written fails at close."""
    layout = MegatronLayout(1, 1, 2)
    metas = [TensorMeta(f"decoder.layers.{i}.mlp.linear_fc2.weight", (4, 8), torch.float32) for i in range(2)]
    metas.append(TensorMeta("decoder.final_layernorm.weight", (4,), torch.float32))
    data = {m.name: torch.randn(m.shape) for m in metas}
    args = argparse.Namespace(num_layers=2, hidden_size=4)
    with MegatronDistWriter(tmp_path / "a", layout, metas, args=args, iteration=5, impl="local", tie_copy=False) as w:
        for m in reversed(metas):
            w.write(m.name, data[m.name])
    st = torch_dcp_state(tmp_path / "a" / "iter_0000005")
    assert torch.equal(st["decoder.layers.mlp.linear_fc2.weight"][1], data[metas[1].name])
    w = MegatronDistWriter(tmp_path / "b", layout, metas, args=args, iteration=5, impl="local", tie_copy=False)
    w.write(metas[0].name, data[metas[0].name])
    with pytest.raises(MissingTensors, match="never written"):
        w.close()
    assert not (tmp_path / "b" / "iter_0000005" / "metadata.json").exists()
    assert not [t for t in threading.enumerate() if t.name == "ckptconv-dcp-writer"]


def test_failure_mid_conversion_leaves_nothing(hf_model_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_model_dir("llama-gqa"), src)
    sd = load_file(src / "model.safetensors")
    sd["model.layers.2.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    exit_2(run("hf-to-megatron", src, tmp_path / "mg", "--tp", 2), "NaN/Inf", "up_proj")
    assert not (tmp_path / "mg").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not [t for t in threading.enumerate() if t.name == "ckptconv-dcp-writer"]


# ------------------------------------------------------------------------------------ reshard


def test_real_torch_fixture_to_torch_dist_and_back_is_bit_exact(tmp_path):
    """Megatron-Core's own per-rank files (local spec, TP2 PP2) -> torch_dist at TP1 -> torch at TP2 PP2."""
    src = FIXTURES / "megatron_torch_tp2pp2"
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    s = reshard(src, tmp_path / "dist", ckpt_format="torch_dist", tp=1, pp=1, show_progress=False)
    assert s["dropped_state"] == ["num_floating_point_operations_so_far", "rng_state"]
    back = reshard(tmp_path / "dist", tmp_path / "torch", ckpt_format="torch", tp=2, pp=2, show_progress=False)
    assert back["transformer_impl"] == "local" and back["iteration"] == 10
    assert_same_rank_models(src, tmp_path / "torch")
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before


def test_hf_torch_reshard_roundtrip_with_vpp_and_vocab_repadding(hf_model_dir, tmp_path):
    src = hf_model_dir("qwen2")
    hf_to_megatron(src, tmp_path / "t", tp=2, pp=2, vpp=2, ckpt_format="torch", show_progress=False)
    reshard(tmp_path / "t", tmp_path / "d4", ckpt_format="torch_dist", tp=4, pp=1, show_progress=False)
    with MegatronDistReader(tmp_path / "d4") as r:
        emb = r.read("embedding.word_embeddings.weight")
        assert r.args.padded_vocab_size == 512 and emb.shape == (512, 64) and not emb[250:].any()
        assert (r.layout.tp, r.layout.pp, r.layout.vpp) == (4, 1, None)
    reshard(tmp_path / "d4", tmp_path / "t2", ckpt_format="torch", tp=2, pp=2, vpp=2, show_progress=False)
    assert_same_rank_models(tmp_path / "t", tmp_path / "t2")
    megatron_to_hf(tmp_path / "d4", tmp_path / "hf", show_progress=False)
    assert_same_hf(src, tmp_path / "hf")


def test_reshard_cli_dry_run_and_layout_error(tmp_path):
    src = FIXTURES / "megatron_dist_tp2pp2"
    r = run("reshard", src, tmp_path / "x", "--ckpt-format", "torch", "--tp", 1, "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert (s["source_tp"], s["tp"], s["pp"], s["padded_vocab_size"]) == (2, 1, 2, 256) and not (tmp_path / "x").exists()
    exit_2(run("reshard", src, tmp_path / "y", "--tp", 4), "num_query_groups=2", "TP=4")
    exit_2(run("reshard", src, tmp_path / "z", "--pp", 3), "PP x VPP")
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


# ------------------------------------------------------------------------------------ real fixtures
@pytest.mark.parametrize("name", DIST_FIXTURES)
def test_real_megatron_dist_fixture_to_hf_matches_megatron_logits(tmp_path, name):
    ref = load_file(FIXTURES / name / "reference_logits.safetensors")
    summary = megatron_to_hf(FIXTURES / name, tmp_path / "hf", show_progress=False)
    assert summary["iteration"] == 10
    logits = hf_logits(tmp_path / "hf", ref["tokens"])
    assert logits.shape == ref["logits"].shape
    assert (logits - ref["logits"]).abs().max().item() < 1e-4


def test_inspect_lists_training_state():
    info = inspect_checkpoint(FIXTURES / "megatron_dist_tp1")
    assert info["format"] == "megatron_torch_dist" and info["family"] == "qwen2" and (info["tp"], info["pp"]) == (1, 1)
    assert {"optimizer", "rng_state", "opt_param_scheduler"} <= set(info["other_state"])
    assert not [t for t in info["tensors"] if t.startswith(("optimizer", "rng"))]
    assert info["tensors"]["decoder.layers.1.self_attention.linear_qkv.bias"]["shape"] == [128]
    with MegatronDistReader(FIXTURES / "megatron_dist_tp1") as r:
        assert any(k.startswith("optimizer.state.exp_avg.") for k in r.sharded_state["optimizer"])
        assert r.read_extra_state("decoder.layers.1.mlp.linear_fc1._extra_state") is None
    out = run("inspect", FIXTURES / "megatron_dist_tp2pp2").output
    assert "megatron_torch_dist" in out and "family=llama" in out


_BLOCK_MEGATRON = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("megatron", "transformer_engine", "apex"):
            raise ImportError(f"blocked import of {name}")
sys.meta_path.insert(0, Block())
from ckptconv.formats.detect import detect_format
from ckptconv.formats.megatron import open_megatron_reader
from ckptconv.inspect import inspect_checkpoint
out = {}
for root in sys.argv[1:]:
    inspect_checkpoint(root)
    with open_megatron_reader(root, detect_format(root)) as r:
        for name in r.tensors():
            out[root + ":" + name] = r.read(name).double().sum().item()
        for name in getattr(r, "read_extra_state", None) and r.extra_state or []:
            r.read_extra_state(name)
assert not [m for m in sys.modules if m.split(".")[0] == "megatron"]
print(json.dumps(out))
"""


def test_every_fixture_reads_with_megatron_blocked():
    roots = [str(FIXTURES / n) for n in DIST_FIXTURES]
    proc = subprocess.run([sys.executable, "-c", _BLOCK_MEGATRON, *roots, str(FIXTURES / "megatron_torch_tp2pp2")],
                          capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(FIXTURES.parent)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    sums = json.loads(proc.stdout)
    for root in roots:            # the same values as torch's own DCP reader gives
        st = torch_dcp_state(Path(root) / "iter_0000010")
        qkv = st["decoder.layers.self_attention.linear_qkv.weight"]
        for i in range(qkv.shape[0]):
            assert sums[f"{root}:decoder.layers.{i}.self_attention.linear_qkv.weight"] == qkv[i].double().sum().item()
        assert sums[f"{root}:embedding.word_embeddings.weight"] == st["embedding.word_embeddings.weight"].double().sum().item()
    assert len(sums) == 27 + 16 + 27 + 27 + 9     # + the 0.19 fixtures (tp2pp2; tp1 has 1 layer)


class CountingFile:
    def __init__(self, path, counter):
        self._f, self._c = open(path, "rb"), counter  # noqa: SIM115

    def readinto(self, buf):
        n = self._f.readinto(buf)
        self._c[0] += n or 0
        return n

    def read(self, n=-1):
        b = self._f.read(n)
        self._c[0] += len(b)
        return b

    def __getattr__(self, name):
        return getattr(self._f, name)


def test_slice_reads_read_only_the_needed_bytes(hf_model_dir, tmp_path):
    hf_to_megatron(hf_model_dir("llama-gqa"), tmp_path / "mg", show_progress=False)
    count = [0]
    with MegatronDistReader(tmp_path / "mg", opener=lambda p: CountingFile(p, count)) as r:
        full = r.read("embedding.word_embeddings.weight")
        count[0] = 0
        rows = r.read_slice("embedding.word_embeddings.weight", 0, 100, 164)
        assert torch.equal(rows, full[100:164])
        assert 64 * 64 * 4 <= count[0] < 64 * 64 * 4 + 4096, count[0]        # 16 KiB of a 64 KiB tensor
        count[0] = 0
        layer = r.read("decoder.layers.2.mlp.linear_fc2.weight")             # one layer of the stacked tensor
        assert layer.nbytes <= count[0] < layer.nbytes + 4096, count[0]
    count[0] = 0
    with MegatronDistReader(FIXTURES / "megatron_dist_tp2pp2", opener=lambda p: CountingFile(p, count)) as r:
        start = count[0]
        half = r.read_slice("output_layer.weight", 0, 0, 128)                # = TP rank 0's stored chunk
        assert torch.equal(half, r.read("output_layer.weight")[:128])
        count[0] = start
        r.read_slice("output_layer.weight", 0, 0, 128)
        assert count[0] - start < 128 * 64 * 4 + 4096


# ------------------------------------------------------------------------------------ bad input
@pytest.fixture
def dist_copy(tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(FIXTURES / "megatron_dist_tp2pp2", dst)
    return dst, dst / "iter_0000010"


def test_missing_metadata_and_common(dist_copy, tmp_path):
    root, it = dist_copy
    (it / ".metadata").rename(it / "moved")
    exit_2(run("megatron-to-hf", root, tmp_path / "a"), ".metadata", "Fix:")
    (it / "moved").rename(it / ".metadata")
    (it / "common.pt").unlink()
    exit_2(run("inspect", root), "common.pt")
    assert not (tmp_path / "a").exists()


def test_truncated_data_file(dist_copy, tmp_path):
    root, it = dist_copy
    data = it / "__3_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    exit_2(run("megatron-to-hf", root, tmp_path / "hf"), "__3_0.distcp", "Fix:")
    assert not (tmp_path / "hf").exists()


def test_unsupported_backend(dist_copy, tmp_path):
    root, it = dist_copy
    (it / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr", "sharded_backend_version": 1}))
    exit_2(run("megatron-to-hf", root, tmp_path / "hf"), "'zarr'", "torch_dist")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ckptconv-pwned-by-metadata",))


def test_malicious_metadata_is_refused_not_run(dist_copy, tmp_path):
    root, it = dist_copy
    marker = Path("/tmp/ckptconv-pwned-by-metadata")
    marker.unlink(missing_ok=True)
    (it / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": _Evil()}))
    exit_2(run("inspect", root), "posix.system", ".metadata")
    assert not marker.exists()


def test_metadata_pointing_outside_the_directory(dist_copy, tmp_path):
    root, it = dist_copy
    md = dcp.FileSystemReader(str(it)).read_metadata()
    for info in md.storage_data.values():
        info.relative_path = "../../etc/passwd"
    (it / ".metadata").write_bytes(pickle.dumps(md))
    exit_2(run("megatron-to-hf", root, tmp_path / "hf"), "../../etc/passwd", "tampered")
