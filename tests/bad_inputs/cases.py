"""The bad-input corpus: each case turns a valid tiny checkpoint into a broken one."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ckptconv import hf_to_megatron


@dataclass
class Built:
    argv: list[str]           # CLI arguments (without the program name)
    inputs: list[Path]        # trees that must be unchanged afterwards
    dst: Path                 # must not exist afterwards
    needles: list[str]        # words the error line must contain
    marker: Path | None = None


@dataclass
class Case:
    name: str
    build: Callable[[Path, Callable], Built]


def _hf_copy(tmp: Path, hf_model_dir, variant="llama-gqa") -> Path:
    src = tmp / "src"
    shutil.copytree(hf_model_dir(variant), src)
    return src


def _sharded(tmp: Path, hf_model_dir) -> Path:
    from ckptconv.formats.hf import HFReader, HFWriter
    src = tmp / "src"
    src.mkdir()
    with HFReader(hf_model_dir("llama-gqa")) as r, HFWriter(src, list(r.tensors().values()), 200_000) as w:
        for name in r.tensors():
            w.write(name, r.read(name))
        w.write_config(r.config())
    return src


def _megatron(tmp: Path, hf_model_dir, **kw) -> Path:
    mg = tmp / "mg"
    hf_to_megatron(hf_model_dir("llama-gqa"), mg, show_progress=False, ckpt_format="torch", **kw)
    return mg


def _to_mg(src: Path, tmp: Path, *needles: str, extra=()) -> Built:
    return Built(["hf-to-megatron", str(src), str(tmp / "out"), *extra], [src], tmp / "out", list(needles))


def _to_hf(src: Path, tmp: Path, *needles: str, extra=()) -> Built:
    return Built(["megatron-to-hf", str(src), str(tmp / "out"), *extra], [src], tmp / "out", list(needles))


def truncated_safetensors(tmp, hf_model_dir):
    src = _hf_copy(tmp, hf_model_dir)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return _to_mg(src, tmp, "model.safetensors")


def corrupt_header(tmp, hf_model_dir):
    src = _hf_copy(tmp, hf_model_dir)
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:24] = b"{not json at all"
    f.write_bytes(bytes(data))
    return _to_mg(src, tmp, "model.safetensors")


def header_offsets_out_of_range(tmp, hf_model_dir):
    src = _hf_copy(tmp, hf_model_dir)
    f = src / "model.safetensors"
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = "model.layers.1.mlp.down_proj.weight"
    a, b = header[name]["data_offsets"]
    header[name]["data_offsets"] = [a + 10**9, b + 10**9]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return _to_mg(src, tmp, "model.safetensors", "down_proj")


def index_names_missing_shard(tmp, hf_model_dir):
    src = _sharded(tmp, hf_model_dir)
    shards = sorted(src.glob("model-*.safetensors"))
    shards[-1].unlink()
    return _to_mg(src, tmp, shards[-1].name)


def shard_with_unexpected_tensor(tmp, hf_model_dir):
    src = _sharded(tmp, hf_model_dir)
    shard = sorted(src.glob("model-*.safetensors"))[0]
    sd = load_file(shard)
    sd["model.layers.0.self_attn.rogue.weight"] = torch.zeros(2, 2)
    save_file(sd, shard, metadata={"format": "pt"})
    return _to_mg(src, tmp, "rogue")


def tp_shard_shape_mismatch(tmp, hf_model_dir):
    mg = _megatron(tmp, hf_model_dir, tp=2)
    path = mg / "release" / "mp_rank_01" / "model_optim_rng.pt"
    with torch.serialization.safe_globals([argparse.Namespace]):
        ck = torch.load(path, weights_only=True)
    key = "decoder.layers.1.mlp.linear_fc2.weight"
    ck["model"][key] = ck["model"][key][:, :-8].clone()
    torch.save(ck, path)
    return _to_hf(mg, tmp, "linear_fc2", "TP shards disagree")


def mixed_iterations(tmp, hf_model_dir):
    a = _megatron(tmp, hf_model_dir, tp=2, iteration=10)
    b = tmp / "b"
    hf_to_megatron(hf_model_dir("llama-gqa"), b, tp=2, iteration=20, show_progress=False, ckpt_format="torch")
    shutil.copy(b / "iter_0000020" / "mp_rank_01" / "model_optim_rng.pt",
                a / "iter_0000010" / "mp_rank_01" / "model_optim_rng.pt")
    return _to_hf(a, tmp, "mixed iterations", "mp_rank_01")


def missing_mp_rank(tmp, hf_model_dir):
    mg = _megatron(tmp, hf_model_dir, tp=2, pp=2)
    shutil.rmtree(mg / "release" / "mp_rank_00_001")
    return _to_hf(mg, tmp, "mp_rank_00_001")


def latest_names_missing_iteration(tmp, hf_model_dir):
    mg = _megatron(tmp, hf_model_dir)
    (mg / "latest_checkpointed_iteration.txt").write_text("99")
    return _to_hf(mg, tmp, "iter_0000099")


def groups_not_divisible_by_tp(tmp, hf_model_dir):
    return _to_mg(_hf_copy(tmp, hf_model_dir), tmp, "num_query_groups", "TP=3", extra=["--tp", "3"])


def unknown_architecture(tmp, hf_model_dir):
    src = _hf_copy(tmp, hf_model_dir)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["FancyNetForCausalLM"], "fancynet"
    (src / "config.json").write_text(json.dumps(cfg))
    return _to_mg(src, tmp, "FancyNetForCausalLM", "config.json")


def nonfinite_weights(tmp, hf_model_dir):
    src = _hf_copy(tmp, hf_model_dir)
    sd = load_file(src / "model.safetensors")
    sd["model.layers.2.self_attn.o_proj.weight"][0, 0] = float("inf")
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    return _to_mg(src, tmp, "o_proj", "--allow-nonfinite")


def dst_inside_src(tmp, hf_model_dir):
    src = _hf_copy(tmp, hf_model_dir)
    return Built(["hf-to-megatron", str(src), str(src / "mg")], [src], src / "mg", ["inside the source"])


def src_equals_dst(tmp, hf_model_dir):
    mg = _megatron(tmp, hf_model_dir)
    b = Built(["megatron-to-hf", str(mg), str(mg), "--overwrite"], [mg], tmp / "never", ["is the source"])
    return b


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_megatron_rank_file(tmp, hf_model_dir):
    mg = _megatron(tmp, hf_model_dir, tp=2)
    marker = tmp / "PWNED"
    path = mg / "release" / "mp_rank_01" / "model_optim_rng.pt"
    with torch.serialization.safe_globals([argparse.Namespace]):
        ck = torch.load(path, weights_only=True)
    ck["evil"] = _Payload(marker)
    torch.save(ck, path)
    b = _to_hf(mg, tmp, "system", "mp_rank_01")
    b.marker = marker
    return b


def malicious_pytorch_model_bin(tmp, hf_model_dir):
    src = _hf_copy(tmp, hf_model_dir)
    marker = tmp / "PWNED"
    sd = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    sd["evil"] = _Payload(marker)
    torch.save(sd, src / "pytorch_model.bin")
    b = _to_mg(src, tmp, "system", "pytorch_model.bin")
    b.marker = marker
    return b


def malicious_common_pt(tmp, hf_model_dir):
    mg = tmp / "mg"
    hf_to_megatron(hf_model_dir("llama-gqa"), mg, tp=2, show_progress=False, ckpt_format="torch_dist")
    marker = tmp / "PWNED"
    path = mg / "release" / "common.pt"
    with torch.serialization.safe_globals([argparse.Namespace]):
        common = torch.load(path, weights_only=True)
    common["evil"] = _Payload(marker)
    torch.save(common, path)
    b = _to_hf(mg, tmp, "system", "common.pt")
    b.marker = marker
    return b


CASES = [Case(f.__name__, f) for f in (
    truncated_safetensors, corrupt_header, header_offsets_out_of_range, index_names_missing_shard,
    shard_with_unexpected_tensor, tp_shard_shape_mismatch, mixed_iterations, missing_mp_rank,
    latest_names_missing_iteration, groups_not_divisible_by_tp, unknown_architecture, nonfinite_weights,
    dst_inside_src, src_equals_dst, malicious_megatron_rank_file, malicious_pytorch_model_bin, malicious_common_pt)]
