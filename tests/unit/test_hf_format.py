"""Unit tests for ckptconv.formats.hf (reader, streaming writer) and hf_hub resolution."""
from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptconv.errors import CorruptCheckpoint, LayoutError, MissingTensors, UnknownFormat
from ckptconv.formats.hf import HFReader, HFWriter
from ckptconv.formats.hf_hub import resolve_hf_source
from ckptconv.types import TensorMeta

TOKENS = torch.tensor([[1, 5, 17, 42, 99, 3, 0, 64]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama (seed 0) saved unsharded and sharded (20KB) with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    root = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(TOKENS).logits
    return {"model": model, "sd": sd, "root": root, "logits": logits}


def _assert_reads_back(reader: HFReader, sd: dict[str, torch.Tensor]) -> None:
    metas = reader.tensors()
    assert set(metas) == set(sd)
    for name, t in sd.items():
        assert metas[name] == TensorMeta(name, tuple(t.shape), t.dtype)
        got = reader.read(name)
        assert torch.equal(got, t), name
        if t.dim() >= 1 and t.shape[0] >= 3:
            assert torch.equal(reader.read_slice(name, 1, 3), t[1:3]), name


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- reader ---------------------------------------------------------------------------------
def test_read_unsharded(tiny):
    with HFReader(tiny["root"] / "single") as r:
        _assert_reads_back(r, tiny["sd"])
        assert r.config()["hidden_size"] == 64
        assert [p.name for p in r.asset_files()] == ["generation_config.json"]


def test_read_sharded(tiny):
    d = tiny["root"] / "sharded"
    assert len(list(d.glob("model-*-of-*.safetensors"))) > 2
    with HFReader(d) as r:
        _assert_reads_back(r, tiny["sd"])
        assert len(r._handles) > 2  # one cached handle per shard ...
    assert not r._handles          # ... all closed on exit


def test_read_slice_bounds(tiny):
    with HFReader(tiny["root"] / "single") as r:
        name = "model.embed_tokens.weight"
        assert r.read_slice(name, 5, 5).shape == (0, 64)
        assert torch.equal(r.read_slice(name, 90, 100), tiny["sd"][name][90:])
        with pytest.raises(LayoutError, match="out of range"):
            r.read_slice(name, 90, 101)
        with pytest.raises(MissingTensors, match="nope"):
            r.read("nope")


def _save_bin(tiny, d: Path, sharded: bool) -> None:
    d.mkdir()
    shutil.copy(tiny["root"] / "single" / "config.json", d)
    sd = tiny["sd"]
    if not sharded:
        torch.save(tiny["model"].state_dict(), d / "pytorch_model.bin")
        return
    names = list(sd)
    parts = [names[: len(names) // 2], names[len(names) // 2:]]
    wm = {}
    for i, part in enumerate(parts, 1):
        fname = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({n: sd[n] for n in part}, d / fname)
        wm.update({n: fname for n in part})
    (d / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))


@pytest.mark.parametrize("sharded", [False, True])
def test_read_legacy_bin(tiny, tmp_path, sharded):
    pytest.importorskip("ckptconv.formats.safe_pickle")
    d = tmp_path / "bin"
    _save_bin(tiny, d, sharded)
    with HFReader(d) as r:
        _assert_reads_back(r, tiny["sd"])


def test_bin_never_uses_torch_load(tiny, tmp_path, monkeypatch):
    pytest.importorskip("ckptconv.formats.safe_pickle")
    d = tmp_path / "bin"
    _save_bin(tiny, d, sharded=False)

    def boom(*a, **k):
        raise AssertionError("torch.load must not be used")
    monkeypatch.setattr(torch, "load", boom)
    with HFReader(d) as r:
        name = "lm_head.weight"
        assert torch.equal(r.read(name), tiny["sd"][name])


# -- writer ---------------------------------------------------------------------------------
def _write_all(tiny, out: Path, **kw) -> None:
    sd = tiny["sd"]
    metas = [TensorMeta(n, tuple(t.shape), t.dtype) for n, t in sd.items()]
    names = list(sd)
    random.Random(0).shuffle(names)
    with HFWriter(out, metas, **kw) as w:
        for n in names:
            w.write(n, sd[n])
        w.write_config(tiny["model"].config.to_dict())
        w.copy_assets([tiny["root"] / "single" / "generation_config.json"])


@pytest.mark.parametrize("max_shard_size, n_files", [(5 * 10**9, 1), (60_000, None)])
def test_writer_round_trip(tiny, tmp_path, max_shard_size, n_files):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    out.mkdir()
    _write_all(tiny, out, max_shard_size=max_shard_size)
    files = sorted(out.glob("*.safetensors"))
    index = out / "model.safetensors.index.json"
    if n_files == 1:
        assert [f.name for f in files] == ["model.safetensors"] and not index.exists()
    else:
        assert len(files) >= 3
        idx = json.loads(index.read_text())
        assert list(idx["weight_map"]) == sorted(tiny["sd"])
        assert idx["metadata"]["total_size"] == sum(
            t.numel() * t.element_size() for t in tiny["sd"].values())
        assert {f.name for f in files} == set(idx["weight_map"].values())
    got = {}
    for f in files:
        part = load_file(f)
        assert not set(part) & set(got)
        got.update(part)
    assert set(got) == set(tiny["sd"])
    for n, t in tiny["sd"].items():
        assert torch.equal(got[n], t), n
    assert (out / "generation_config.json").read_bytes() == \
        (tiny["root"] / "single" / "generation_config.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, tiny["logits"])
    with HFReader(out) as r:  # and our own reader agrees
        _assert_reads_back(r, tiny["sd"])


def test_writer_bf16_and_mixed_dtypes_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"a.bf16": torch.randn(7, 3, generator=g).to(torch.bfloat16),   # odd byte count
          "b.f32": torch.randn(5, generator=g),
          "c.f16": torch.randn(3, 3, generator=g).half(),
          "d.bf16.t": torch.randn(4, 6, generator=g).to(torch.bfloat16).t(),  # non-contiguous
          "e.i64": torch.arange(5), "f.scalar": torch.tensor(2.5, dtype=torch.bfloat16),
          "g.empty": torch.zeros(0, 4, dtype=torch.bfloat16)}
    for limit in (10**9, 40):
        out = tmp_path / f"o{limit}"
        out.mkdir()
        with HFWriter(out, [TensorMeta(n, tuple(t.shape), t.dtype) for n, t in sd.items()],
                      max_shard_size=limit) as w:
            for n in reversed(list(sd)):
                w.write(n, sd[n])
        got = {}
        for f in out.glob("*.safetensors"):
            raw = f.read_bytes()
            assert (8 + struct.unpack("<Q", raw[:8])[0]) % 8 == 0   # header padded to 8
            got.update(load_file(f))
        with HFReader(out, config_path=_write_config(tmp_path)) as r:
            for n, t in sd.items():
                assert got[n].dtype == t.dtype and torch.equal(got[n], t), n
                assert torch.equal(r.read(n), t), n


def _write_config(tmp_path: Path) -> Path:
    p = tmp_path / "cfg.json"
    p.write_text("{}")
    return p


def _metas():
    return [TensorMeta("x", (2, 3), torch.float32), TensorMeta("y", (4,), torch.bfloat16)]


def test_writer_missing_tensor_on_close(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    w = HFWriter(a, _metas())
    w.write("x", torch.zeros(2, 3))
    with pytest.raises(MissingTensors, match="tensor: y"):
        w.close()
    assert list(a.iterdir()) == [a / "model.safetensors"]  # plain close() does not delete
    w.abort()
    assert list(a.iterdir()) == []
    with pytest.raises(MissingTensors, match="tensor: x"):
        with HFWriter(b, _metas()) as w2:
            w2.write("y", torch.zeros(4, dtype=torch.bfloat16))
    assert list(b.iterdir()) == []  # the context manager aborted


def test_writer_rejects_bad_writes(tmp_path):
    with HFWriter(tmp_path, _metas()) as w:
        presized = (tmp_path / "model.safetensors").stat().st_size
        with pytest.raises(LayoutError, match=r"\[3, 2\].*model.safetensors.*tensor: x"):
            w.write("x", torch.zeros(3, 2))
        with pytest.raises(LayoutError, match="bfloat16"):
            w.write("y", torch.zeros(4))
        with pytest.raises(MissingTensors, match="not in the output plan"):
            w.write("z", torch.zeros(1))
        w.write("x", torch.zeros(2, 3))
        with pytest.raises(LayoutError, match="twice"):
            w.write("x", torch.zeros(2, 3))
        w.write("y", torch.zeros(4, dtype=torch.bfloat16))
    assert set(load_file(tmp_path / "model.safetensors")) == {"x", "y"}
    assert (tmp_path / "model.safetensors").stat().st_size == presized  # header + 32 data bytes
    assert (presized - 32) % 8 == 0


def test_writer_aborts_on_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with HFWriter(tmp_path, _metas(), max_shard_size=8) as w:
            w.write("x", torch.zeros(2, 3))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# -- reader errors --------------------------------------------------------------------------
def _bad_dir(tmp_path: Path, payload: bytes, name: str = "model.safetensors") -> Path:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / name).write_bytes(payload)
    return d


def _header(h: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(h).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("case, match", [
    ("short", "shorter than the 8-byte"),
    ("truncated", "out of range"),
    ("hlen", "runs past the end"),
    ("json", "not valid JSON"),
    ("offsets", "out of range"),
    ("inconsistent", "needs 24"),
    ("gap", "gap or overlap"),
])
def test_reader_corrupt_safetensors(tiny, tmp_path, case, match):
    good = (tiny["root"] / "single" / "model.safetensors").read_bytes()
    payload = {
        "short": good[:5],
        "truncated": good[: len(good) - 100],
        "hlen": struct.pack("<Q", 10**6) + b"{}",
        "json": struct.pack("<Q", 9) + b"not json!",
        "offsets": _header({"w": {"dtype": "F32", "shape": [10, 10], "data_offsets": [0, 400]}},
                           bytes(16)),
        "inconsistent": _header({"w": {"dtype": "F32", "shape": [2, 3],
                                       "data_offsets": [0, 16]}}, bytes(16)),
        "gap": _header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
                       bytes(16)),
    }[case]
    d = _bad_dir(tmp_path, payload)
    with pytest.raises(CorruptCheckpoint, match=match) as ei:
        HFReader(d)
    assert "model.safetensors" in str(ei.value)
    if case in ("offsets", "inconsistent", "gap"):
        assert "tensor: w" in str(ei.value)


def test_reader_index_names_missing_shard(tiny, tmp_path):
    d = _copy(tiny["root"] / "sharded", tmp_path / "s")
    (d / "model-00002-of-00014.safetensors").unlink()
    with pytest.raises(MissingTensors) as ei:
        HFReader(d)
    msg = str(ei.value)
    assert "model.safetensors.index.json" in msg and "model-00002-of-00014.safetensors" in msg
    assert "tensor: " in msg


def _edit_index(d: Path, fn) -> None:
    p = d / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    fn(idx["weight_map"])
    p.write_text(json.dumps(idx))


def test_reader_shard_tensor_not_in_index(tiny, tmp_path):
    d = _copy(tiny["root"] / "sharded", tmp_path / "s")
    _edit_index(d, lambda wm: wm.pop("model.norm.weight"))
    with pytest.raises(MissingTensors, match="does not list") as ei:
        HFReader(d)
    assert "tensor: model.norm.weight" in str(ei.value) and ".safetensors" in str(ei.value)


def test_reader_shard_tensor_mapped_elsewhere(tiny, tmp_path):
    d = _copy(tiny["root"] / "sharded", tmp_path / "s")
    moved = "model.norm.weight"

    def move(wm):
        wm[moved] = next(f for f in wm.values() if f != wm[moved])
    _edit_index(d, move)
    with pytest.raises(LayoutError, match="maps to") as ei:
        HFReader(d)
    assert f"tensor: {moved}" in str(ei.value)


def test_reader_index_lists_tensor_absent_from_shard(tiny, tmp_path):
    d = _copy(tiny["root"] / "sharded", tmp_path / "s")
    _edit_index(d, lambda wm: wm.update({"ghost.weight": "model-00001-of-00014.safetensors"}))
    with pytest.raises(MissingTensors, match="does not hold it") as ei:
        HFReader(d)
    assert "model-00001-of-00014.safetensors" in str(ei.value)


def test_reader_same_tensor_in_two_shards(tmp_path):
    d = tmp_path / "dup"
    d.mkdir()
    (d / "config.json").write_text("{}")
    save_file({"a": torch.zeros(2), "x": torch.ones(3)}, d / "model-00001-of-00002.safetensors")
    save_file({"x": torch.ones(3)}, d / "model-00002-of-00002.safetensors")
    with pytest.raises(LayoutError, match="stored twice") as ei:
        HFReader(d)
    assert "model-00002-of-00002.safetensors" in str(ei.value)


def test_reader_no_config_or_weights(tiny, tmp_path):
    d = _copy(tiny["root"] / "single", tmp_path / "s")
    (d / "config.json").unlink()
    with pytest.raises(UnknownFormat, match="config.json.*--hf-config"):
        HFReader(d)
    with HFReader(d, config_path=tiny["root"] / "single" / "config.json") as r:
        assert r.config()["vocab_size"] == 100
    (d / "model.safetensors").unlink()
    with pytest.raises(UnknownFormat, match="no weights"):
        HFReader(d, config_path=tiny["root"] / "single" / "config.json")


# -- hub resolution -------------------------------------------------------------------------
def _fake_cache(tiny, cache: Path, repo="org/tiny", commit="a" * 40) -> Path:
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny["root"] / "single" / f, snap / f)
    return snap


def test_resolve_local_path(tmp_path):
    assert resolve_hf_source(str(tmp_path)) == tmp_path


def test_resolve_cached_repo_offline(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = _fake_cache(tiny, tmp_path / "cache")
    got = resolve_hf_source("hf://org/tiny", cache_dir=tmp_path / "cache")
    assert got.resolve() == snap.resolve()
    assert resolve_hf_source("hf://org/tiny@" + "a" * 40,
                             cache_dir=str(tmp_path / "cache")).resolve() == snap.resolve()
    with HFReader(got) as r:
        w = "model.layers.1.mlp.down_proj.weight"
        assert torch.equal(r.read(w), tiny["sd"][w])


def test_resolve_unknown_repo_offline(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fake_cache(tiny, tmp_path / "cache")
    for src in ("hf://org/does-not-exist", "hf://org/tiny@v9.9"):
        with pytest.raises(UnknownFormat, match="offline mode is on") as ei:
            resolve_hf_source(src, cache_dir=tmp_path / "cache", download=True)
        assert src in str(ei.value) and "Fix:" in str(ei.value)
    with pytest.raises(UnknownFormat, match="not a Hugging Face repo id"):
        resolve_hf_source("hf://not a/valid/repo id", cache_dir=tmp_path / "cache")


@pytest.fixture
def download_calls(monkeypatch):
    """Record every snapshot_download that is not a cache look-up (and never reach the network)."""
    import huggingface_hub

    calls, real = [], huggingface_hub.snapshot_download

    def fake(repo_id, *, local_files_only=False, **kw):
        if local_files_only:
            return real(repo_id, local_files_only=True, **kw)
        calls.append(repo_id)
        raise OSError("network disabled in this test")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


def test_mistyped_local_path_never_downloads(tmp_path, download_calls):
    """Issue 18.6: a path that does not exist is an error naming the path, whatever it looks like
    (org/name, a bare name); nothing is looked up on the hub."""
    for src in ("org/tiny-lama", "tiny-lama", str(tmp_path / "missing")):
        with pytest.raises(UnknownFormat, match="no such file or directory") as ei:
            resolve_hf_source(src, cache_dir=tmp_path / "cache")
        assert src in str(ei.value) and "hf://" in str(ei.value)
    assert download_calls == []


def test_hub_id_downloads_only_when_asked(tiny, tmp_path, download_calls):
    snap = _fake_cache(tiny, tmp_path / "cache")
    assert resolve_hf_source("hf://org/tiny", cache_dir=tmp_path / "cache").resolve() == snap.resolve()
    with pytest.raises(UnknownFormat, match="downloading is off") as ei:
        resolve_hf_source("hf://org/other", cache_dir=tmp_path / "cache")
    assert "--download" in str(ei.value)
    assert download_calls == []
    with pytest.raises(UnknownFormat, match="could not be downloaded"):
        resolve_hf_source("hf://org/other", cache_dir=tmp_path / "cache", download=True)
    assert download_calls == ["org/other"]


def test_read_slice_into_out(tiny):
    """read_slice(out=) puts the rows into the caller's buffer (safetensors and legacy .bin) and
    refuses a buffer of the wrong shape."""
    name = "model.embed_tokens.weight"
    with HFReader(tiny["root"] / "single") as r:
        buf = torch.empty(8, 64, dtype=r.tensors()[name].dtype)
        got = r.read_slice(name, 10, 18, out=buf)
        assert got.data_ptr() == buf.data_ptr() and torch.equal(buf, tiny["sd"][name][10:18])
        with pytest.raises(ValueError):
            r.read_slice(name, 10, 17, out=buf)


def test_view_rows_is_a_zero_copy_view(tiny):
    """view_rows equals read_slice for safetensors, is None for legacy .bin, never writes the file."""
    name = "model.embed_tokens.weight"
    d = tiny["root"] / "single"
    before = {p.name: p.read_bytes() for p in d.glob("*.safetensors")}
    with HFReader(d) as r:
        v = r.view_rows(name, 10, 18)
        assert v is not None and torch.equal(v, tiny["sd"][name][10:18])
        v.zero_()
        assert torch.equal(r.read_slice(name, 10, 18), tiny["sd"][name][10:18])
        assert r.view_rows(name, 5, 5) is None
    assert {p.name: p.read_bytes() for p in d.glob("*.safetensors")} == before
