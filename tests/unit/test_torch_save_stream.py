"""Unit tests for ckptconv.formats.torch_save_stream: torch.save-compatible streaming writes."""
from __future__ import annotations

import argparse
import collections
import random
import zipfile

import pytest
import torch
import torch.utils.serialization  # noqa: F401 - makes torch.utils.serialization.config reachable

from ckptconv.errors import LayoutError, MissingTensors
from ckptconv.formats.safe_pickle import LazyTensor, TorchFile
from ckptconv.formats.torch_save_stream import StreamingTorchSave, TensorSlot, contiguous_stride


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "emb": torch.randn(11, 8, generator=g),
        "qkv": torch.randn(3, 4, 5, generator=g).bfloat16(),
        "norm": torch.randn(8, generator=g).half(),
        "steps": torch.arange(-4, 9, dtype=torch.int64),
        "scalar": torch.tensor(3.25),
        "scalar_bf16": torch.tensor(-1.5, dtype=torch.bfloat16),
        "empty": torch.empty(0, 8),
        "empty2": torch.empty(4, 0, dtype=torch.float16),
        "mask": torch.tensor([True, False, True]),
        "fp8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
    }


def _args() -> argparse.Namespace:
    return argparse.Namespace(tensor_model_parallel_size=2, model_type="gpt", seq=None,
                              params_dtype=torch.float32, bf16=True, layers=[1, 2, 3])


def _tree(leaf):
    """The same nested structure with ``leaf(name, tensor)`` at the tensor positions."""
    t = _tensors()
    return {
        "iteration": 10, "checkpoint_version": 3.0, "args": _args(),
        "model": {"language_model": collections.OrderedDict(
            (n, leaf(n, t[n])) for n in ("emb", "qkv", "norm", "scalar", "empty"))},
        "optimizer": {"steps": leaf("steps", t["steps"]), "pairs": (leaf("scalar_bf16", t["scalar_bf16"]),
                                                                    [leaf("empty2", t["empty2"]), None])},
        "extra": [leaf("mask", t["mask"]), leaf("fp8", t["fp8"]), b"raw", "text"],
    }


def _slot(name, t):
    return TensorSlot(name, tuple(t.shape), t.dtype)


def _write(path, order=None):
    """Write ``_tree`` slot by slot in ``order`` (default: key order)."""
    t = _tensors()
    with StreamingTorchSave(path, _tree(_slot)) as w:
        for name in order or w.slot_names:
            w.write(name, t[name])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _assert_tree_equal(got, want):
    if isinstance(want, torch.Tensor):
        got = got.load() if isinstance(got, LazyTensor) else got
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(_bits(got), _bits(want))  # bitwise (fp8 has no torch.equal)
    elif isinstance(want, dict):
        assert type(got) is type(want) and list(got) == list(want)
        for k in want:
            _assert_tree_equal(got[k], want[k])
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want)
        for a, b in zip(got, want):
            _assert_tree_equal(a, b)
    else:
        assert got == want and type(got) is type(want)


def test_contiguous_stride_matches_torch():
    for shape in [(), (0,), (3,), (2, 3, 4), (3, 0), (0, 3), (2, 0, 5), (1, 1, 7)]:
        assert contiguous_stride(shape) == torch.empty(shape).stride(), shape


def test_round_trip_shuffled(tmp_path):
    path = tmp_path / "model_optim_rng.pt"
    order = list(_tensors())
    random.Random(1).shuffle(order)
    _write(path, order)
    want = _tree(lambda n, t: t)
    with torch.serialization.safe_globals([argparse.Namespace]):
        _assert_tree_equal(torch.load(path, weights_only=True), want)
        _assert_tree_equal(torch.load(path, weights_only=True, mmap=True), want)
    with TorchFile(path) as tf:
        _assert_tree_equal(tf.obj, want)


def test_pickle_is_byte_identical_to_torch_save(tmp_path):
    ours, ref = tmp_path / "ckpt.pt", tmp_path / "ref" / "ckpt.pt"
    ref.parent.mkdir()
    _write(ours)
    with open(ref, "wb") as f:   # we write through a file object too: archive prefix "archive/"
        torch.save(_tree(lambda n, t: t.clone()), f)
    a, b = _records(ours), _records(ref)
    assert a["archive/data.pkl"] == b["archive/data.pkl"]
    assert a["archive/byteorder"] == b["archive/byteorder"]
    assert a["archive/.storage_alignment"] == b["archive/.storage_alignment"]
    assert sorted(a) == sorted(b)
    for name in a:
        if name.startswith("archive/data/"):
            assert a[name] == b[name], name


def _records(path) -> dict[str, bytes]:
    """Every stored record of a zip file, read at its offset (we write no CRC-32, as torch's
    compute_crc32=False, so zipfile.read would refuse; torch.load does not check it)."""
    out = {}
    with open(path, "rb") as f, zipfile.ZipFile(f) as z:
        for info in z.infolist():
            f.seek(info.header_offset)
            head = f.read(30)
            f.seek(info.header_offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little"))
            out[info.filename] = f.read(info.file_size)
    return out


@pytest.mark.parametrize("in_order", [True, False])
def test_format_version_only_when_records_are_in_key_order(tmp_path, in_order):
    """torch may *compute* record offsets when .format_version is present (they must be
    consecutive in key order); out-of-order writes must omit it to load correctly."""
    path = tmp_path / "x.pt"
    keys = ["emb", "qkv", "norm", "scalar", "empty", "steps", "scalar_bf16", "empty2", "mask", "fp8"]
    _write(path, keys if in_order else keys[::-1])
    with zipfile.ZipFile(path) as z:
        assert ("archive/.format_version" in z.namelist()) == in_order
    cfg = torch.utils.serialization.config.load
    old = cfg.calculate_storage_offsets
    cfg.calculate_storage_offsets = True
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            _assert_tree_equal(torch.load(path, weights_only=True, mmap=True), _tree(lambda n, t: t))
    finally:
        cfg.calculate_storage_offsets = old


def test_views_and_non_contiguous_inputs(tmp_path):
    base = torch.arange(40, dtype=torch.float32).reshape(5, 8)
    inputs = {"t": base.t(), "rows": base[2:4], "col": base[:, 1], "exp": torch.ones(3, 1).expand(3, 4)}
    path = tmp_path / "views.pt"
    with StreamingTorchSave(path, {n: _slot(n, v) for n, v in inputs.items()}) as w:
        for n, v in inputs.items():
            w.write(n, v)
    with zipfile.ZipFile(path) as z:  # a view writes only its own bytes, not the whole storage
        assert z.getinfo("archive/data/1").file_size == 2 * 8 * 4
    loaded = torch.load(path, weights_only=True)
    for n, v in inputs.items():
        assert torch.equal(loaded[n], v) and loaded[n].is_contiguous(), n


def test_missing_slot_on_close(tmp_path):
    path = tmp_path / "missing.pt"
    t = _tensors()
    w = StreamingTorchSave(path, _tree(_slot))
    w.write("emb", t["emb"])
    assert path.exists()
    with pytest.raises(MissingTensors) as ei:
        w.close()
    msg = str(ei.value)
    assert "9 of 10" in msg and "qkv" in msg and "(+4 more)" in msg and "emb" not in msg
    assert not path.exists()


def test_missing_slot_in_with_block(tmp_path):
    path = tmp_path / "missing2.pt"
    with pytest.raises(MissingTensors, match="scalar"):
        with StreamingTorchSave(path, {"a": TensorSlot("a", (2,), torch.float32),
                                       "s": TensorSlot("scalar", (), torch.float32)}) as w:
            w.write("a", torch.ones(2))
    assert not path.exists()


@pytest.mark.parametrize("tensor", [torch.ones(3, 4), torch.ones(4, 3, dtype=torch.float16),
                                    torch.ones(4, 3).reshape(12), torch.tensor(1.0)])
def test_wrong_shape_or_dtype(tmp_path, tensor):
    path = tmp_path / "wrong.pt"
    with StreamingTorchSave(path, {"w": TensorSlot("layer.w", (4, 3), torch.float32)}) as w:
        with pytest.raises(LayoutError) as ei:
            w.write("layer.w", tensor)
        assert "tensor: layer.w" in str(ei.value) and "(4, 3)" in str(ei.value)
        w.write("layer.w", torch.zeros(4, 3))
        with pytest.raises(LayoutError, match="written twice"):
            w.write("layer.w", torch.zeros(4, 3))
        with pytest.raises(LayoutError, match="no TensorSlot"):
            w.write("other", torch.zeros(4, 3))
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(4, 3))


def test_exception_inside_with_leaves_no_file(tmp_path):
    path = tmp_path / "boom.pt"
    with pytest.raises(RuntimeError, match="boom"):
        with StreamingTorchSave(path, {"a": TensorSlot("a", (2,), torch.float32)}) as w:
            w.write("a", torch.ones(2))  # even with every slot written
            raise RuntimeError("boom")
    assert not path.exists()


def test_abort_deletes_partial_file(tmp_path):
    path = tmp_path / "partial.pt"
    w = StreamingTorchSave(path, {"a": TensorSlot("a", (2,), torch.float32)})
    assert path.exists()
    w.abort()
    assert not path.exists()
    with pytest.raises(LayoutError, match="after close"):
        w.write("a", torch.ones(2))


def test_bad_templates(tmp_path):
    path = tmp_path / "t.pt"
    with pytest.raises(LayoutError, match="real tensor"):
        StreamingTorchSave(path, {"a": torch.ones(2)})
    with pytest.raises(LayoutError, match="share a name"):
        StreamingTorchSave(path, [TensorSlot("a", (2,), torch.float32),
                                  TensorSlot("a", (3,), torch.float32)])
    assert not path.exists()


def test_same_slot_object_twice_is_one_tensor(tmp_path):
    path = tmp_path / "shared.pt"
    slot = TensorSlot("tied", (2, 2), torch.float32)
    with StreamingTorchSave(path, {"emb": slot, "head": slot}) as w:
        w.write("tied", torch.eye(2))
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["emb"], torch.eye(2)) and loaded["emb"] is loaded["head"]
