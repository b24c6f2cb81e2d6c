"""Issue 18.4: reshard carries `_extra_state` (e.g. Transformer Engine FP8 scaling state) through
as opaque bytes where the owner rank is unambiguous, resets the rest (listed in the summary),
and real megatron-core still loads the output (strict load_state_dict, dist_checkpointing.load).

Source: the real-megatron-core fixture (local spec, extra state None) with real bytes injected
into its rank files' `_extra_state` entries, as Transformer Engine stores them (uint8 tensors):
linear_qkv's bytes are the same on both TP ranks (owner unambiguous at any TP), linear_fc2's
differ per TP rank (carried only to the same TP rank of a per-rank checkpoint)."""
from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("megatron.core", exc_type=ImportError)

from ckptconv.engine.reshard import reshard
from mcore_dist_harness import megatron_dist_logits
from mcore_harness import megatron_logits

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "megatron_torch_tp2pp2"
RANK = re.compile(r"mp_rank_(\d\d)(?:_(\d\d\d))?$")
LOCAL_LAYERS = 2          # fixture: PP=2, 2 layers per stage


def state_bytes(global_layer: int, module: str, tp_rank: int) -> torch.Tensor:
    per_rank = tp_rank if module == "mlp.linear_fc2" else 0
    text = f"fp8-scaling layer={global_layer} module={module} rank={per_rank}".encode()
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).clone()


def load(f: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(f, weights_only=False)


def rank_files(root: Path) -> dict[tuple[int, int], Path]:
    out = {}
    for f in sorted(root.glob("*/mp_rank_*/model_optim_rng.pt")):
        m = RANK.match(f.parent.name)
        out[(int(m.group(1)), int(m.group(2) or 0))] = f
    return out


def extra(obj: dict, layers_per_stage: int, pp_rank: int) -> dict[tuple[int, str], torch.Tensor | None]:
    """{(global layer, module): value} of one rank file's `_extra_state` entries."""
    out = {}
    for k, v in obj["model"].items():
        m = re.match(r"decoder\.layers\.(\d+)\.(.+)\._extra_state$", k)
        if m:
            out[(pp_rank * layers_per_stage + int(m.group(1)), m.group(2))] = v
    return out


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("extra") / "mg"
    shutil.copytree(FIXTURE, root)
    for (t, p), f in rank_files(root).items():
        obj = load(f)
        for k in list(obj["model"]):
            m = re.match(r"decoder\.layers\.(\d+)\.(.+)\._extra_state$", k)
            if m:
                obj["model"][k] = state_bytes(p * LOCAL_LAYERS + int(m.group(1)), m.group(2), t)
        torch.save(obj, f)
    return root


def test_same_tp_carries_every_rank_bytes_and_megatron_loads_it(src, tmp_path):
    out = tmp_path / "tp2pp1"
    summary = reshard(src, out, ckpt_format="torch", tp=2, pp=1, show_progress=False)
    assert summary["extra_state_dropped"] == {} and summary["extra_state_carried"] == 2 * 4 * 4
    for (t, p), f in rank_files(out).items():
        got = extra(load(f), 4, p)
        assert len(got) == 16
        for (layer, module), v in got.items():
            assert torch.equal(v, state_bytes(layer, module, t)), (t, layer, module)
    ref = load_file(FIXTURE / "reference_logits.safetensors")
    logits = megatron_logits(out, ref["tokens"])          # real megatron-core, strict load
    assert (logits - ref["logits"]).abs().max().item() < 1e-4


def test_torch_dist_carries_unambiguous_state_and_megatron_loads_it(src, tmp_path):
    dist = tmp_path / "dist"
    summary = reshard(src, dist, ckpt_format="torch_dist", tp=1, pp=1, show_progress=False)
    dropped = summary["extra_state_dropped"]
    assert sorted(dropped) == [f"decoder.layers.{i}.mlp.linear_fc2._extra_state" for i in range(4)], dropped
    assert all("different bytes" in why for why in dropped.values())
    assert summary["extra_state_carried"] == 3 * 4
    ref = load_file(FIXTURE / "reference_logits.safetensors")
    logits = megatron_dist_logits(dist, ref["tokens"], tp=2, pp=1)     # real dist_checkpointing.load
    assert (logits - ref["logits"]).abs().max().item() < 1e-4
    # and back to per-rank files at TP=2 PP=2: the one stored copy goes to every TP rank
    back = tmp_path / "back"
    summary = reshard(dist, back, ckpt_format="torch", tp=2, pp=2, impl="local", show_progress=False)
    assert summary["extra_state_dropped"] == {}
    for (t, p), f in rank_files(back).items():
        for (layer, module), v in extra(load(f), LOCAL_LAYERS, p).items():
            if module == "mlp.linear_fc2":
                assert v is None
            else:
                assert torch.equal(v, state_bytes(layer, module, 0)), (t, layer, module)


def test_reshard_writes_megatrons_own_args_objects_back(tmp_path):
    """Real Megatron-LM args hold megatron-core objects (AttnBackend.auto); our unpickler reads
    them as inert placeholders, and reshard writes them back as the same objects."""
    from megatron.core.transformer.enums import AttnBackend

    src_args = load(rank_files(FIXTURE)[(0, 0)])["args"]
    assert src_args.attention_backend is AttnBackend.auto
    reshard(FIXTURE, tmp_path / "t", ckpt_format="torch", tp=1, pp=1, show_progress=False)
    reshard(FIXTURE, tmp_path / "d", ckpt_format="torch_dist", tp=1, pp=1, show_progress=False)
    for args in (load(rank_files(tmp_path / "t")[(0, 0)])["args"], load(tmp_path / "d" / "iter_0000010" / "common.pt")["args"]):
        assert args.attention_backend is AttnBackend.auto
        changed = {k for k in vars(src_args) if getattr(args, k, None) != getattr(src_args, k)}
        assert changed <= {"tensor_model_parallel_size", "pipeline_model_parallel_size", "padded_vocab_size",
                           "ckpt_format", "use_dist_ckpt", "num_layers_per_virtual_pipeline_stage"}, changed
