"""Our DCP `.metadata` unpickler (`dcp_metadata` + the `dcp_types` stand-ins): it never imports
`torch.distributed.checkpoint`, loads exactly what torch's own reader loads, and stays strict."""
from __future__ import annotations

import dataclasses
import enum
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint.filesystem import _StorageInfo

from ckptconv import hf_to_megatron
from ckptconv.errors import CorruptCheckpoint, UnsafeCheckpoint
from ckptconv.formats import dcp_types as dt
from ckptconv.formats.dcp_metadata import _MetadataUnpickler, load_metadata

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = {"tp2pp2": ROOT / "fixtures" / "megatron_dist_tp2pp2" / "iter_0000010",
            "tp1": ROOT / "fixtures" / "megatron_dist_tp1" / "iter_0000010"}
DCP = "torch.distributed.checkpoint"


# ------------------------------------------------------------------------------ no DCP import
_READ_ALL = """
import sys
from ckptconv.formats.megatron_dist import MegatronDistReader
for root in sys.argv[1:]:
    with MegatronDistReader(root) as r:
        names = list(r.tensors())
        assert names, root
        for n in names:
            r.read(n)
        r.common
bad = sorted(k for k in sys.modules if k.startswith(("torch.distributed.checkpoint", "torch.distributed.tensor")))
assert not bad, bad
print("read", "ok")
"""


def test_reading_never_imports_torch_distributed_checkpoint():
    roots = [str(p.parent) for p in FIXTURES.values()]
    out = subprocess.run([sys.executable, "-c", _READ_ALL, *roots], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and "read ok" in out.stdout, out.stderr[-3000:]


# ------------------------------------------------------------------------------ same as torch's reader
def _norm(x):
    """A plain-data view of a metadata object tree, whichever classes (torch's or ours) built it."""
    if isinstance(x, enum.Enum):
        return (type(x).__name__, x.name, x.value)
    if isinstance(x, torch.Size):
        return ("Size", tuple(x))
    if isinstance(x, (torch.dtype, torch.layout, torch.memory_format, str, int, float, bool, type(None))):
        return x
    if isinstance(x, dict):
        return {_norm(k): _norm(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_norm(v) for v in x)
    if dataclasses.is_dataclass(x):
        names = sorted({f.name for f in dataclasses.fields(x)} | set(vars(x)))
        return (type(x).__name__, tuple((n, _norm(getattr(x, n))) for n in names))
    raise AssertionError(f"unexpected {type(x)} in metadata")


@pytest.fixture(scope="module")
def written_checkpoint(hf_model_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("dcp-light") / "mg"
    hf_to_megatron(hf_model_dir("llama-tied", torch.bfloat16), dst, tp=2, pp=2, ckpt_format="torch_dist",
                   show_progress=False)
    return dst / "release"


@pytest.mark.parametrize("which", [*FIXTURES, "written"])
def test_loads_what_torchs_reader_loads(which, written_checkpoint):
    it = written_checkpoint if which == "written" else FIXTURES[which]
    theirs = dcp.FileSystemReader(str(it)).read_metadata()
    ours = load_metadata(it)
    assert isinstance(ours, dt.Metadata) and not isinstance(ours, dcp_md.Metadata)
    tensors = {k: v for k, v in theirs.state_dict_metadata.items() if isinstance(v, dcp_md.TensorStorageMetadata)}
    assert tensors and len(tensors) < len(theirs.state_dict_metadata)        # tensors and bytes items
    assert list(ours.state_dict_metadata) == list(theirs.state_dict_metadata)
    for fqn, t in tensors.items():
        o = ours.state_dict_metadata[fqn]
        assert isinstance(o, dt.TensorStorageMetadata)
        assert (tuple(o.size), o.properties.dtype) == (tuple(t.size), t.properties.dtype)
        assert [(tuple(c.offsets), tuple(c.sizes)) for c in o.chunks] == \
            [(tuple(c.offsets), tuple(c.sizes)) for c in t.chunks]
    for key, info in theirs.storage_data.items():
        mine = ours.storage_data[dt.MetadataIndex(key.fqn, None if key.offset is None else tuple(key.offset))]
        assert (mine.relative_path, mine.offset, mine.length) == (info.relative_path, info.offset, info.length)
    assert len(ours.storage_data) == len(theirs.storage_data)
    assert ours.storage_meta.load_id is None
    theirs.storage_meta.load_id = None          # torch's read_metadata stamps its reader's id here
    assert _norm(ours) == _norm(theirs)             # everything else too: plans, storage_meta, version


# ------------------------------------------------------------------------------ pieces
def _unpickle(data: bytes):
    return _MetadataUnpickler(io.BytesIO(data), Path("x/.metadata")).load()


def _raw(module: str, name: str, state) -> bytes:
    """A protocol-2 pickle of `module.name` rebuilt by NEWOBJ + BUILD(state), without that class."""
    return (b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")\x81"
            + pickle.dumps(state, protocol=2)[2:-1] + b"b.")


def _write(it: Path, data: bytes) -> Path:
    it.mkdir(parents=True, exist_ok=True)
    (it / ".metadata").write_bytes(data)
    return it


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last, torch.preserve_format])
def test_tensor_properties_tuple_state(fmt):
    props = _unpickle(pickle.dumps(dcp_md.TensorProperties(dtype=torch.bfloat16, memory_format=fmt,
                                                           requires_grad=True)))
    assert isinstance(props, dt.TensorProperties)
    assert (props.dtype, props.layout, props.requires_grad, props.memory_format, props.pin_memory) == \
        (torch.bfloat16, torch.strided, True, fmt, False)


def test_index_lookup_ignores_hint_and_offset_type():
    key = _unpickle(pickle.dumps(dcp_md.MetadataIndex("w", torch.Size([4, 0]), index=3)))
    assert isinstance(key.offset, torch.Size) and key.index == 3
    table = {key: 1}
    assert dt.MetadataIndex("w", (4, 0)) in table and dt.MetadataIndex("w", [4, 0], index=7) in table
    assert dt.MetadataIndex("w", (0, 4)) not in table and dt.MetadataIndex("w") not in table
    with pytest.raises(dataclasses.FrozenInstanceError):
        key.fqn = "v"


def test_storage_info_defaults_and_slot_state():
    info = _unpickle(pickle.dumps(_StorageInfo("__0_0.distcp", 8, 16)))      # None fields are not pickled
    assert (info.relative_path, info.offset, info.length, info.transform_descriptors) == ("__0_0.distcp", 8, 16, None)
    info = _unpickle(_raw(f"{DCP}.filesystem", "_StorageInfo",
                          (None, {"relative_path": "a", "offset": 0, "length": 1})))
    assert isinstance(info, dt._StorageInfo) and info.relative_path == "a"


def test_enums_by_value_only(tmp_path):
    from torch.distributed.checkpoint.planner import WriteItemType
    assert _unpickle(pickle.dumps(WriteItemType.BYTE_IO)) is dt.WriteItemType.BYTE_IO
    assert _unpickle(pickle.dumps(dcp_md._MEM_FORMAT_ENCODING.TORCH_CHANNELS_LAST)) \
        is dt._MEM_FORMAT_ENCODING.TORCH_CHANNELS_LAST
    # REDUCE(enum, ("X", "A B")) would be Enum's functional API; ours takes exactly one value
    data = b"\x80\x02c" + f"{DCP}.planner\nWriteItemType\n".encode() + b"X\x01\x00\x00\x00XX\x03\x00\x00\x00A B\x86R."
    with pytest.raises(CorruptCheckpoint, match="TypeError"):
        load_metadata(_write(tmp_path / "ck", data))


@pytest.mark.parametrize("module,name,state,needle", [
    (f"{DCP}.filesystem", "_StorageInfo", {"relative_path": "a", "offset": 0, "length": 1, "compressed": True},
     "unknown fields ['compressed']"),
    (f"{DCP}.metadata", "ChunkStorageMetadata", {"offsets": (0,)}, "required field 'sizes'"),
    (f"{DCP}.metadata", "Metadata", {"state_dict_metadata": {}, "__class__": "x"}, "unknown fields"),
    (f"{DCP}.metadata", "Metadata", [("state_dict_metadata", {})], "not a dict of fields"),
])
def test_bad_state_is_corrupt(tmp_path, module, name, state, needle):
    it = _write(tmp_path / "ck", _raw(module, name, state))
    with pytest.raises(CorruptCheckpoint, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_metadata(it)


def test_unknown_public_field_of_metadata_is_kept(tmp_path):
    """Megatron adds `all_local_plans` to DCP's Metadata; a plain attribute is kept, like pickle would."""
    it = _write(tmp_path / "ck", _raw(f"{DCP}.metadata", "Metadata",
                                      {"state_dict_metadata": {}, "storage_data": {}, "mcore_note": [1]}))
    md = load_metadata(it)
    assert md.mcore_note == [1] and md.planner_data is None and md.storage_meta is None


# ------------------------------------------------------------------------------ still strict
class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ckptconv-pwned-by-light-metadata",))


@pytest.mark.parametrize("payload", [
    lambda: pickle.dumps(_Evil()),
    lambda: pickle.dumps({"state_dict_metadata": _Evil()}),
    lambda: b"\x80\x02c" + f"{DCP}.planner\nLoadPlan\n".encode() + b")\x81.",          # a DCP class not listed
    lambda: b"\x80\x02c" + f"{DCP}.metadata\ntorch\n".encode() + b".",               # a module attribute
    lambda: b"\x80\x02cbuiltins\ngetattr\n.",
])
def test_unlisted_globals_are_refused_not_run(tmp_path, payload):
    marker = Path("/tmp/ckptconv-pwned-by-light-metadata")
    marker.unlink(missing_ok=True)
    it = _write(tmp_path / "ck", payload())
    with pytest.raises(UnsafeCheckpoint, match="not a torch.distributed.checkpoint metadata class"):
        load_metadata(it)
    assert not marker.exists()


def test_tampered_types_are_corrupt(tmp_path):
    md = dcp.FileSystemReader(str(FIXTURES["tp1"])).read_metadata()
    md.state_dict_metadata["embedding.word_embeddings.weight"].properties.dtype = "float32"
    it = _write(tmp_path / "ck", pickle.dumps(md))
    with pytest.raises(CorruptCheckpoint, match="malformed metadata"):
        load_metadata(it)
