"""Unit tests for ckptconv.formats.safe_pickle: reading torch.save files without running code."""
from __future__ import annotations

import argparse
import collections
import gc
import io
import os
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ckptconv.errors import CorruptCheckpoint, UnsafeCheckpoint
from ckptconv.formats.safe_pickle import (LazyTensor, Placeholder, TorchFile, iter_lazy, load_tree,
                                          materialize)


def _rezip(src: Path, dst: Path, replace: dict[str, bytes | None]) -> None:
    """Copy a torch zip, replacing (bytes) or dropping (None) members named by their suffix."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        prefix = zin.namelist()[0].split("/")[0] + "/"
        for info in zin.infolist():
            rel = info.filename[len(prefix):]
            if rel in replace:
                if replace[rel] is not None:
                    zout.writestr(info.filename, replace[rel])
            else:
                zout.writestr(info.filename, zin.read(info.filename))


def _member(path: Path, suffix: str) -> str:
    with zipfile.ZipFile(path) as z:
        return next(n for n in z.namelist() if n.endswith("/" + suffix))


@pytest.fixture()
def saved(tmp_path):
    """A torch.save'd tree with shared-storage views, transposes, Parameter, numpy RNG, ..."""
    torch.manual_seed(0)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = collections.OrderedDict(
        full=base, rows=base[1:3], row=base[2], col=base[:, 3], tr=base.t(),
        param=torch.nn.Parameter(torch.randn(3, 2)), bf16=torch.randn(5, 3).bfloat16(),
        fp16=torch.randn(7).half(), i64=torch.arange(-3, 5), flag=torch.tensor([True, False]),
        scalar=torch.tensor(2.5, dtype=torch.float64), empty=torch.empty(0, 4),
        expanded=torch.randn(3, 1).expand(3, 4), cplx=torch.randn(3, dtype=torch.complex64))
    obj = {"model": tensors, "iteration": 7, "nested": {"list": [1, (2, 3), None], "b": b"xy",
                                                        "empty_b": b"", "set": {1, 2}},
           "args": argparse.Namespace(tp=2, name="llama", dt=torch.bfloat16, flag=True, none=None),
           "rng": np.random.get_state(), "dev": torch.device("cpu"), "size": torch.Size([2, 3]),
           "dtype": torch.float16}
    path = tmp_path / "model_optim_rng.pt"
    torch.save(obj, path)
    return path, obj


def test_reads_torch_save_tree(saved):
    path, obj = saved
    with TorchFile(path) as tf:
        tree = tf.obj
        model = tree["model"]
        assert type(model) is collections.OrderedDict and list(model) == list(obj["model"])
        for name, ref in obj["model"].items():
            lazy = model[name]
            assert isinstance(lazy, LazyTensor) and lazy.name == f"model.{name}"
            assert lazy.shape == tuple(ref.shape) and lazy.dtype == ref.dtype
            got = lazy.load()
            assert type(got) is torch.Tensor and got.is_contiguous() and not got.requires_grad
            assert torch.equal(got, ref.detach()), name
        # views keep the saved offsets/strides of the shared storage
        assert (model["rows"].storage_offset, model["row"].storage_offset) == (6, 12)
        assert model["tr"].stride == (1, 6) and model["col"].stride == (6,)
        assert model["expanded"].stride == (1, 0)
        assert tree["iteration"] == 7 and tree["nested"] == obj["nested"]
        assert tree["args"] == obj["args"] and type(tree["args"]) is argparse.Namespace
        assert tree["dev"] == torch.device("cpu") and tree["size"] == torch.Size([2, 3])
        assert tree["dtype"] is torch.float16
        kind, arr, pos, has_gauss, cached = tree["rng"]
        assert (kind, pos, has_gauss, cached) == ("MT19937", obj["rng"][2], 0, 0.0)
        assert isinstance(arr, Placeholder) and arr.qualname.endswith("multiarray._reconstruct")
        assert arr.state[1] == (624,) and arr.state[2].qualname == "numpy.dtype"
        assert np.array_equal(np.frombuffer(arr.state[4], dtype="<u4"), obj["rng"][1])
        assert sorted(n for n, _ in tf.tensors()) == sorted(f"model.{n}" for n in obj["model"])


def test_load_slice_and_materialize(saved):
    path, obj = saved
    with TorchFile(path) as tf:
        tr = tf.obj["model"]["tr"]
        assert torch.equal(tr.load_slice(1, 1, 3), obj["model"]["tr"][:, 1:3])
        assert torch.equal(tf.obj["model"]["full"].load_slice(0, 2, 4), obj["model"]["full"][2:])
        with pytest.raises(IndexError):
            tr.load_slice(0, 2, 9)
        mat = materialize(tf.obj)
    assert torch.equal(mat["model"]["bf16"], obj["model"]["bf16"])
    assert mat["args"] == obj["args"] and mat["nested"] == obj["nested"]
    assert not list(iter_lazy(mat))


def test_closed_file_and_load_tree(saved):
    path, obj = saved
    with TorchFile(path) as tf:
        lazy = tf.obj["model"]["fp16"]
    with pytest.raises(ValueError, match="closed"):
        lazy.load()
    tree = load_tree(path)
    gc.collect()
    assert torch.equal(tree["model"]["fp16"].load(), obj["model"]["fp16"])


def test_lazy_tensor_is_read_only(saved):
    with TorchFile(saved[0]) as tf:
        lazy = tf.obj["model"]["full"]
        with pytest.raises(AttributeError):
            lazy.shape = (1,)
        with pytest.raises(AttributeError):
            lazy.__dict__  # noqa: B018 - slots only: pickle BUILD cannot inject attributes


class CountingFile(io.FileIO):
    """Records (position, nbytes) of every read: a deterministic read meter."""

    def __init__(self, path):
        super().__init__(path, "rb")
        self.reads: list[tuple[int, int]] = []

    def read(self, n=-1):
        pos = self.tell()
        data = super().read(n)
        self.reads.append((pos, len(data)))
        return data

    def readinto(self, b):
        pos = self.tell()
        n = super().readinto(b)
        self.reads.append((pos, n or 0))
        return n


@pytest.mark.parametrize("big_first", [True, False])
def test_loading_small_tensor_never_reads_big_one(tmp_path, big_first):
    big = torch.randn(4 * 1024 * 1024)  # 16 MB
    small = torch.arange(10, dtype=torch.int64)
    path = tmp_path / "big.pt"
    torch.save({"big": big, "small": small} if big_first else {"small": small, "big": big}, path)
    reader = torch._C.PyTorchFileReader(str(path))
    rec = _member(path, "data/0" if big_first else "data/1")
    rec = rec.split("/", 1)[1]
    lo = reader.get_record_offset(rec)
    hi = lo + big.numel() * 4
    files = []

    def opener(p):
        files.append(CountingFile(p))
        return files[0]

    with TorchFile(path, opener=opener) as tf:
        assert torch.equal(tf.obj["small"].load(), small)
        reads = list(files[0].reads)
        assert sum(n for _, n in reads) < 64 * 1024
        assert all(pos + n <= lo or pos >= hi for pos, n in reads if n), (lo, hi, reads)
        before = len(files[0].reads)
        assert torch.equal(tf.obj["big"].load(), big)  # the meter does see the big read
        assert sum(n for _, n in files[0].reads[before:]) >= big.numel() * 4


# -- malicious pickles -------------------------------------------------------------------------

class _Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _global_call(module: str, name: str, *args: str) -> bytes:
    """Protocol-2 pickle of ``module.name(*args)`` (hand-written opcodes)."""
    body = b"".join(pickle.dumps(a, protocol=2)[2:-1] for a in args)
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"(" + body + b"tR."


@pytest.fixture()
def valid_zip(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(3)}, path)
    return path


@pytest.mark.parametrize("make,global_name", [
    (lambda m: pickle.dumps({"w": _Evil(os.system, f"touch {m}")}, protocol=2), f"{os.name}.system"),
    (lambda m: _global_call("os", "system", f"touch {m}"), "os.system"),
    (lambda m: _global_call("builtins", "eval", f"open({str(m)!r}, 'w')"), "builtins.eval"),
    (lambda m: _global_call("__builtin__", "exec", f"open({str(m)!r}, 'w')"), "__builtin__.exec"),
    (lambda m: pickle.dumps(_Evil(__import__("subprocess").Popen, ["touch", str(m)]), protocol=2),
     "subprocess.Popen"),
    (lambda m: _global_call("builtins", "getattr", "os", "system"), "builtins.getattr"),
    (lambda m: b"(S'touch " + str(m).encode() + b"'\nios\nsystem\n.", "os.system"),  # INST, proto 0
    (lambda m: _global_call("torch", "load", str(m)), "torch.load"),
    (lambda m: _global_call("functools", "partial", "x"), "functools.partial"),
    (lambda m: _global_call("torch.jit", "load", str(m)), "torch.jit.load"),
])
def test_malicious_pickle_is_refused(tmp_path, valid_zip, make, global_name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    bad = tmp_path / "bad.pt"
    _rezip(valid_zip, bad, {"data.pkl": make(marker)})
    with pytest.raises(UnsafeCheckpoint) as ei:
        TorchFile(bad)
    msg = str(ei.value)
    assert global_name in msg and str(bad) in msg and "\n" not in msg
    assert not marker.exists()


def test_build_cannot_patch_allowlisted_classes(tmp_path, valid_zip):
    # BUILD with slot-state on the Namespace global would setattr() on the class itself
    op = lambda x: pickle.dumps(x, protocol=2)[2:-1]  # noqa: E731 - one value, no PROTO/STOP
    slotstate = b"N}" + op("pwned") + op("y") + b"s\x86b."  # (None, {'pwned': 'y'}) BUILD
    payload = b"\x80\x02cargparse\nNamespace\n" + slotstate
    bad = tmp_path / "build.pt"
    _rezip(valid_zip, bad, {"data.pkl": payload})
    TorchFile(bad).close()
    assert not hasattr(argparse.Namespace, "pwned")
    payload = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n" + slotstate
    _rezip(valid_zip, bad, {"data.pkl": payload})
    with pytest.raises(CorruptCheckpoint, match="cannot be unpickled"):
        TorchFile(bad)


def test_unknown_class_becomes_placeholder(tmp_path, monkeypatch):
    pkg = tmp_path / "mods" / "fakemegatron"
    pkg.mkdir(parents=True)
    side_effect = tmp_path / "IMPORTED"
    (pkg / "__init__.py").write_text(f"open({str(side_effect)!r}, 'w').close()\n")
    (pkg / "enums.py").write_text(
        "import enum\n"
        "class ModelType(enum.Enum):\n    encoder_or_decoder = 1\n    encoder_and_decoder = 2\n"
        "class Scaler:\n    def __init__(self):\n        self.cur_scale = 4096.0\n        self.hysteresis = 2\n"
        "class Bag(list):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    from fakemegatron.enums import Bag, ModelType, Scaler  # noqa: PLC0415
    bag = Bag([1, 2])
    path = tmp_path / "third_party.pt"
    torch.save({"model_type": ModelType.encoder_and_decoder, "scaler": Scaler(), "bag": bag,
                "w": torch.ones(2)}, path)
    for mod in [m for m in sys.modules if m.startswith("fakemegatron")]:
        del sys.modules[mod]
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path / "mods")])
    side_effect.unlink()

    with TorchFile(path) as tf:
        mt, sc, bg = tf.obj["model_type"], tf.obj["scaler"], tf.obj["bag"]
        assert isinstance(mt, Placeholder) and mt.qualname == "fakemegatron.enums.ModelType"
        assert mt.args == (2,)
        assert sc.qualname == "fakemegatron.enums.Scaler"
        assert sc.state == {"cur_scale": 4096.0, "hysteresis": 2}
        assert bg.qualname == "fakemegatron.enums.Bag" and bg.items == [1, 2]
        with pytest.raises(AttributeError):
            sc.cur_scale  # noqa: B018 - inert: no attribute magic
        assert torch.equal(tf.obj["w"].load(), torch.ones(2))
    assert "fakemegatron" not in sys.modules and not side_effect.exists()


# -- corrupt files -----------------------------------------------------------------------------

def test_truncated_file(valid_zip, tmp_path):
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(valid_zip.read_bytes()[: valid_zip.stat().st_size // 2])
    with pytest.raises(CorruptCheckpoint) as ei:
        TorchFile(bad)
    assert str(bad) in str(ei.value) and "Fix:" in str(ei.value)


def test_not_a_zip(tmp_path):
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CorruptCheckpoint, match="not a torch.save zip") as ei:
        TorchFile(bad)
    assert str(bad) in str(ei.value)


def test_legacy_format_refused(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CorruptCheckpoint, match="legacy") as ei:
        TorchFile(path)
    assert str(path) in str(ei.value)


def test_missing_data_pkl(valid_zip, tmp_path):
    bad = tmp_path / "nopkl.pt"
    _rezip(valid_zip, bad, {"data.pkl": None})
    with pytest.raises(CorruptCheckpoint, match="data.pkl") as ei:
        TorchFile(bad)
    assert str(bad) in str(ei.value)


def test_missing_and_short_data_record(valid_zip, tmp_path):
    bad = tmp_path / "norec.pt"
    _rezip(valid_zip, bad, {"data/0": None})
    with TorchFile(bad) as tf:
        with pytest.raises(CorruptCheckpoint) as ei:
            tf.obj["w"].load()
    msg = str(ei.value)
    assert str(bad) in msg and "data/0" in msg and "tensor: w" in msg and "missing" in msg
    _rezip(valid_zip, bad, {"data/0": b"\x00" * 8})  # 3 floats need 12 bytes
    with TorchFile(bad) as tf:
        with pytest.raises(CorruptCheckpoint, match="has 8 bytes") as ei:
            tf.obj["w"].load()
    assert str(bad) in str(ei.value)


def test_view_beyond_storage_is_corrupt(valid_zip, tmp_path):
    with zipfile.ZipFile(valid_zip) as z:
        pkl = z.read(_member(valid_zip, "data.pkl"))
    bad = tmp_path / "oob.pt"
    _rezip(valid_zip, bad, {"data.pkl": pkl.replace(b"K\x03\x85", b"K\x09\x85", 1)})  # size 3 -> 9
    with pytest.raises(CorruptCheckpoint, match="exceeds storage"):
        TorchFile(bad)


def test_big_endian_file(tmp_path):
    tensors = {"f": torch.randn(3, 2), "b": torch.randn(4).bfloat16(), "i": torch.arange(5),
               "c": torch.randn(2, dtype=torch.complex64), "u": torch.arange(3, dtype=torch.uint8)}
    path = tmp_path / "le.pt"
    torch.save(tensors, path)
    replace: dict[str, bytes | None] = {"byteorder": b"big"}
    with TorchFile(path) as tf:
        for name, lazy in tf.tensors():
            t = tensors[name]
            unit = t.element_size() // 2 if t.is_complex() else t.element_size()
            raw = t.reshape(-1).view(torch.uint8).view(-1, unit).flip(-1).reshape(-1)
            replace[f"data/{lazy._ref.key}"] = raw.numpy().tobytes()
    big = tmp_path / "be.pt"
    _rezip(path, big, replace)
    with TorchFile(big) as tf:
        for name, lazy in tf.tensors():
            assert torch.equal(lazy.load(), tensors[name]), name


def test_tensors_with_python_state(tmp_path):
    """Tensors/Parameters carrying attributes pickle via _rebuild_from_type_v2 /
    _rebuild_parameter_with_state; they load as plain LazyTensor leaves."""
    t = torch.arange(4.0)
    t.tensor_model_parallel = True
    p = torch.nn.Parameter(torch.ones(2, 2))
    p.partition_dim = 0
    path = tmp_path / "attrs.pt"
    torch.save({"t": t, "p": p}, path)
    with zipfile.ZipFile(path) as z:
        pkl = z.read(_member(path, "data.pkl"))
    assert b"_rebuild_from_type_v2" in pkl and b"_rebuild_parameter_with_state" in pkl
    with TorchFile(path) as tf:
        assert isinstance(tf.obj["t"], LazyTensor) and isinstance(tf.obj["p"], LazyTensor)
        assert torch.equal(tf.obj["t"].load(), t.detach()) and torch.equal(tf.obj["p"].load(), p.detach())


def test_load_slice_into_out_buffer(tmp_path):
    """load_slice(out=) puts exactly the slice's values into a caller's buffer (direct read for
    contiguous slices, a copy for strided ones) and refuses a mismatched buffer."""
    a, b = torch.randn(100), torch.randn(10, 7)
    torch.save({"a": a, "b": b, "bt": b.t()}, tmp_path / "x.pt")
    with TorchFile(tmp_path / "x.pt") as f:
        big = torch.zeros(60)
        f.obj["a"].load_slice(0, 20, 50, out=big[10:40])
        assert torch.equal(big[10:40], a[20:50]) and not big[:10].any() and not big[40:].any()
        rows = torch.empty(3, 7)
        assert torch.equal(f.obj["b"].load_slice(0, 2, 5, out=rows), b[2:5])
        cols = torch.empty(7, 3)
        assert torch.equal(f.obj["bt"].load_slice(1, 2, 5, out=cols), b.t()[:, 2:5])
        with pytest.raises(ValueError):
            f.obj["a"].load_slice(0, 0, 5, out=torch.empty(4))


def test_load_box_direct_and_strided(tmp_path):
    """load_box fills ``out`` with exactly the box: contiguous runs of a row-major record (leading
    size-1 dims, one partial dim, full dims after) are read straight from the file, anything else
    is copied; every case equals plain indexing and bad boxes are refused."""
    x = torch.randn(4, 6, 5)
    torch.save({"x": x, "xt": x.transpose(1, 2)}, tmp_path / "x.pt")
    cases = [((0, 0, 0), (4, 6, 5)), ((2, 0, 0), (1, 6, 5)), ((1, 2, 0), (1, 3, 5)), ((0, 2, 0), (4, 3, 5)),
             ((3, 5, 1), (1, 1, 3)), ((1, 0, 2), (2, 6, 2))]
    with TorchFile(tmp_path / "x.pt") as f:
        for lazy, ref in ((f.obj["x"], x), (f.obj["xt"], x.transpose(1, 2))):
            for off, size in cases:
                size = tuple(min(s, r - o) for o, s, r in zip(off, size, ref.shape))
                out = torch.full(size, float("nan"))
                want = ref[tuple(slice(o, o + s) for o, s in zip(off, size))]
                assert torch.equal(lazy.load_box(off, size, out), want), (off, size)
                wide = torch.full((size[0], size[1], size[2] + 2), float("nan"))      # a strided out
                lazy.load_box(off, size, wide[..., 1:-1])
                assert torch.equal(wide[..., 1:-1], want) and wide[..., 0].isnan().all()
        with pytest.raises(IndexError):
            f.obj["x"].load_box((3, 0, 0), (2, 6, 5), torch.empty(2, 6, 5))
        with pytest.raises(ValueError):
            f.obj["x"].load_box((0, 0, 0), (1, 6, 5), torch.empty(1, 6, 4))


def test_view_box_maps_runs_without_touching_the_file(tmp_path):
    """view_box gives a zero-copy view equal to load_box for contiguous runs, None for boxes that
    are not one run, and a write through the view never reaches the file (private mapping)."""
    x = torch.randn(4, 6, 5)
    path = tmp_path / "x.pt"
    torch.save({"x": x, "xt": x.transpose(1, 2)}, path)
    before = path.read_bytes()
    with TorchFile(path) as f:
        lazy = f.obj["x"]
        for off, size in [((0, 0, 0), (4, 6, 5)), ((2, 0, 0), (1, 6, 5)), ((1, 2, 0), (1, 3, 5)), ((0, 2, 0), (4, 3, 5))]:
            want = x[tuple(slice(o, o + s) for o, s in zip(off, size))]
            v = lazy.view_box(off, size)
            if size[0] > 1 and size[1] < 6:
                assert v is None, (off, size)         # rows of several blocks: not one run
                continue
            assert v is not None and torch.equal(v, want), (off, size)
        assert f.obj["xt"].view_box((0, 0, 0), (4, 5, 6)) is None      # not row-major on disk
        v = lazy.view_box((0, 0, 0), (4, 6, 5))
        v.fill_(7.0)
        assert torch.equal(lazy.load(), x)
    assert path.read_bytes() == before


def test_map_region_refuses_regions_outside_the_file(tmp_path):
    from ckptconv.formats.mapped import map_region

    p = tmp_path / "b"
    p.write_bytes(bytes(range(256)) * 40)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert torch.equal(map_region(fd, 5000, 20), torch.arange(5000, 5020) % 256)
        assert map_region(fd, 10230, 20) is None and map_region(fd, 0, 0) is None and map_region(fd, -1, 4) is None
    finally:
        os.close(fd)
