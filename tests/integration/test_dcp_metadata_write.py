"""ckptconv writes DCP `.metadata` itself (formats/dcp_metadata_write.py, no torch DCP import):
torch's own reader must rebuild from it exactly the Metadata `dcp.save` writes for the same
tensors, `dcp.load` must read the tensors back bit-exact, and a torch_dist conversion must not
import torch.distributed.checkpoint at all (its import is ~2 s of start-up)."""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from ckptconv.formats.dcp_metadata_write import PlanItem, Stored, metadata_bytes, tensor_item
from ckptconv.formats.dcp_write import DcpWriter
from ckptconv.formats.pickle_emit import Call, Global, New, dumps
from ckptconv.types import TensorMeta

ROOT = Path(__file__).resolve().parents[2]


def _state_dict():
    g = torch.Generator().manual_seed(0)
    return {"embed.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
            "layers.0.norm": torch.randn(5, generator=g),
            "scale": torch.tensor(3.0, dtype=torch.float64),
            "empty": torch.zeros(0, 4, dtype=torch.float16),
            "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3)}


def _save_ours(sd, path: Path) -> None:
    w = DcpWriter(path, [TensorMeta(k, tuple(v.shape), v.dtype) for k, v in sd.items()])
    with w:
        for k, v in sd.items():
            w.write(k, v)


def test_metadata_is_what_dcp_save_writes_and_loads_bit_exact(tmp_path):
    sd = _state_dict()
    _save_ours(sd, tmp_path / "ours")
    dcp.save(sd, checkpoint_id=str(tmp_path / "torch"), no_dist=True)
    ours, theirs = (FileSystemReader(str(tmp_path / d)).read_metadata() for d in ("ours", "torch"))
    assert type(ours) is type(theirs)
    assert ours.state_dict_metadata == theirs.state_dict_metadata and ours.version == theirs.version
    assert ours.storage_data.keys() == theirs.storage_data.keys()
    for key, where in theirs.storage_data.items():
        mine = next(k for k in ours.storage_data if k == key)
        assert mine.index == key.index and ours.storage_data[key].length == where.length
    back = {k: torch.full_like(v, 7) for k, v in sd.items()}
    dcp.load(back, checkpoint_id=str(tmp_path / "ours"), no_dist=True)
    assert all(torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in sd)


def test_chunked_metadata_matches_torchs_global_plan():
    """Chunks of stacked keys (torch_dist's layers) and BYTES items: the state_dict_metadata torch's
    default planner makes from the equivalent write items, with the same chunk index hints."""
    items = [PlanItem("common_state/shard_0_1"),
             tensor_item("decoder.layers.w", (1, 0, 0), (1, 2, 3), (2, 2, 3), torch.bfloat16),
             tensor_item("decoder.layers.w", (0, 0, 0), (1, 2, 3), (2, 2, 3), torch.bfloat16),
             tensor_item("out", (0,), (4,), (4,), torch.float32)]
    stored = {it.key: Stored("__0_0.distcp", 100 * k, 10 + k) for k, it in enumerate(items)}
    md = pickle.loads(metadata_bytes(items, stored))

    def torch_item(it):
        if it.is_bytes:
            return WriteItem(MetadataIndex(it.fqn), WriteItemType.BYTE_IO)
        chunk = ChunkStorageMetadata(torch.Size(it.offsets), torch.Size(it.sizes))
        return WriteItem(MetadataIndex(it.fqn, torch.Size(it.offsets)), WriteItemType.SHARD,
                         tensor_data=TensorWriteData(chunk, TensorProperties(dtype=it.dtype), torch.Size(it.size)))

    plans, reference = create_default_global_save_plan([SavePlan([torch_item(it) for it in items])])
    assert md.state_dict_metadata == reference.state_dict_metadata
    for it, planned in zip(items, plans[0].items):
        key = next(k for k in md.storage_data if k == planned.index)
        assert key.index == planned.index.index
        assert md.storage_data[key].offset == stored[it.key].offset


def test_inconsistent_plans_are_refused():
    from ckptconv.errors import LayoutError
    a = tensor_item("w", (0, 0), (1, 3), (2, 3), torch.float32)
    with pytest.raises(LayoutError, match="not written"):
        metadata_bytes([a], {})
    b = tensor_item("w", (1, 0), (1, 3), (2, 4), torch.float32)
    with pytest.raises(LayoutError, match="chunk of a"):
        metadata_bytes([a, b], {a.key: Stored("f", 0, 1), b.key: Stored("f", 1, 1)})


def test_pickle_emit_round_trips_plain_values_and_names_globals():
    value = {"s": "ünïcode\nline", "big": [1 << 70, -(1 << 40), -1, 0, 2 ** 31 - 1, 2 ** 31], "t": (None, True, False),
             "nested": [{"k": ()}, [], {}], "size": Call(Global("torch", "Size"), ((2, 3),)),
             "dtype": Global("torch", "bfloat16")}
    back = pickle.loads(dumps(value))
    assert back["size"] == torch.Size([2, 3]) and back["dtype"] is torch.bfloat16
    assert {k: v for k, v in back.items() if k not in ("size", "dtype")} == \
        {k: v for k, v in value.items() if k not in ("size", "dtype")}
    obj = pickle.loads(dumps(New(Global("argparse", "Namespace"), {"a": 1})))
    assert vars(obj) == {"a": 1}
    with pytest.raises(TypeError):
        dumps(object())


def test_a_torch_dist_conversion_does_not_import_torch_dcp(hf_model_dir, tmp_path):
    code = ("import sys\nfrom ckptconv import hf_to_megatron\n"
            f"hf_to_megatron({str(hf_model_dir())!r}, {str(tmp_path / 'out')!r}, tp=2, pp=2, ckpt_format='torch_dist')\n"
            "print(sorted(m for m in sys.modules if m.startswith('torch.distributed.checkpoint')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    (metadata,) = (tmp_path / "out").rglob(".metadata")
    md = FileSystemReader(str(metadata.parent)).read_metadata()     # torch's reader, in this process
    assert "decoder.layers.self_attention.linear_qkv.weight" in md.state_dict_metadata
