"""torch_dist checkpoints of megatron-core 0.16 and 0.19 as they lie (fixtures written by real
megatron-core 0.16.1 and 0.19.2): the layout is found from the files, integrity manifests are
checked, our writer's output holds both layouts and a manifest that torch's own DCP reader and
hashlib agree with, and reshard moves checkpoints between the layouts bit-exactly."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from ckptconv import hf_to_megatron, inspect_checkpoint, megatron_to_hf
from ckptconv.engine.reshard import reshard
from ckptconv.formats.megatron_dist import MegatronDistReader
from ckptconv.formats.megatron_dist_layout import COMMON_ITEM, LAYOUTS, WRITE_LAYOUT
from helpers import one_line_error as exit_2, run, tree_hash
from safe_load import comparable, load_megatron_file
from tiny_models import hf_logits

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
# fixture -> (layout name prefix, has integrity.json): what real megatron-core wrote
REAL = {
    "megatron_dist_tp2pp2": (LAYOUTS[0].name, False),
    "megatron_dist_tp1": (LAYOUTS[0].name, False),
    "megatron019_dist_tp2pp2": (LAYOUTS[1].name, True),
    "megatron019_dist_tp1": (LAYOUTS[1].name, False),
}


def torch_bytes_item(iter_dir: Path, key: str):
    """A BYTES item read by torch's own DCP reader, then torch.load(weights_only) as megatron does."""
    state = {key: io.BytesIO()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(iter_dir)), no_dist=True)
    loaded = state[key]
    if isinstance(loaded, io.BytesIO):      # as megatron-core 0.19's load_common_state_dict
        loaded.seek(0)
        loaded = load_megatron_file(loaded)
    return loaded


@pytest.mark.parametrize("name", REAL)
def test_layout_found_from_the_files(name):
    layout, integrity = REAL[name]
    info = inspect_checkpoint(FIXTURES / name)
    assert info["dist_layout"] == layout
    assert (info["integrity_manifest"] is not None) == integrity
    assert info["extra_state"] is True
    out = run("inspect", FIXTURES / name).output
    assert f"layout: {layout}" in out


def test_019_common_state_is_the_item_torch_reads():
    """The common dict we read from a 0.19 save equals the item read by torch DCP + torch.load."""
    it = FIXTURES / "megatron019_dist_tp1" / "iter_0000010"
    (theirs,) = torch_bytes_item(it, COMMON_ITEM)
    with MegatronDistReader(FIXTURES / "megatron019_dist_tp1") as r:
        assert comparable(r.args) == comparable(theirs["args"])       # AttnBackend.auto included
        assert r.iteration == theirs["iteration"] == 10
        assert r.common["opt_param_scheduler"] == theirs["opt_param_scheduler"]
        assert r.common["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]
        assert "common_state" not in r.sharded_state


def test_our_output_has_both_layouts_and_a_valid_manifest(hf_model_dir, tmp_path):
    hf_to_megatron(hf_model_dir("llama-gqa"), tmp_path / "mg", tp=2, pp=2, show_progress=False)
    it = tmp_path / "mg" / "release"
    with torch.serialization.safe_globals([__import__("argparse").Namespace]):
        common_pt = torch.load(it / "common.pt", weights_only=True)
    (item,) = torch_bytes_item(it, COMMON_ITEM)
    assert vars(item["args"]) == vars(common_pt["args"]) and item.keys() == common_pt.keys()
    manifest = json.loads((it / "integrity.json").read_text())
    assert manifest["algorithm"] == "sha256"
    files = sorted(p.name for p in it.iterdir() if p.name != "integrity.json")
    assert sorted(manifest["files"]) == files
    for f in files:
        assert manifest["files"][f] == hashlib.sha256((it / f).read_bytes()).hexdigest()
    assert json.loads((it / "metadata.json").read_text()) == WRITE_LAYOUT.config
    assert inspect_checkpoint(tmp_path / "mg")["dist_layout"] == WRITE_LAYOUT.name


@pytest.mark.parametrize("name", ["megatron019_dist_tp2pp2", "megatron019_dist_tp1"])
def test_real_019_checkpoint_reshards_bit_exactly_and_back(tmp_path, name):
    """0.19 save -> our torch_dist at another layout (0.16 + 0.19 layout) -> per-rank torch -> HF:
    every tensor equal to the source's, and the HF model reproduces megatron's logits."""
    src = FIXTURES / name
    reshard(src, tmp_path / "d", ckpt_format="torch_dist", tp=1, pp=1, show_progress=False)
    reshard(tmp_path / "d", tmp_path / "t", ckpt_format="torch", tp=2, pp=1, show_progress=False)
    with MegatronDistReader(src) as a, MegatronDistReader(tmp_path / "d") as b:
        assert b.dist_layout == WRITE_LAYOUT and a.tensors() == b.tensors()
        for n in a.tensors():
            assert torch.equal(a.read(n), b.read(n)), n
        assert b.iteration == a.iteration
    megatron_to_hf(tmp_path / "t", tmp_path / "hf", show_progress=False)
    ref = load_file(src / "reference_logits.safetensors")
    assert (hf_logits(tmp_path / "hf", ref["tokens"]) - ref["logits"]).abs().max().item() < 1e-4


# ------------------------------------------------------------------------------------ bad input
@pytest.fixture
def integrity_copy(tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(FIXTURES / "megatron019_dist_tp2pp2", dst)
    return dst, dst / "iter_0000010"


def test_changed_file_is_exit_2_naming_it(integrity_copy, tmp_path):
    root, it = integrity_copy
    data = it / "__2_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[-100] ^= 0x01                 # one bit of the last record's tensor bytes
    data.write_bytes(bytes(raw))
    before = tree_hash(root)
    exit_2(run("megatron-to-hf", root, tmp_path / "hf"), "__2_0.distcp", "integrity.json", "Fix:")
    exit_2(run("verify", root, FIXTURES / "megatron019_dist_tp2pp2"), "__2_0.distcp", "sha256")
    assert not (tmp_path / "hf").exists() and tree_hash(root) == before
    assert run("inspect", root).exit_code == 0          # inspect reads no tensor bytes


def test_missing_listed_file_and_bad_manifests(integrity_copy, tmp_path):
    root, it = integrity_copy
    manifest = json.loads((it / "integrity.json").read_text())
    (it / "integrity.json").write_text(json.dumps({**manifest, "files": {**manifest["files"], "gone.distcp": "00"}}))
    exit_2(run("megatron-to-hf", root, tmp_path / "a"), "gone.distcp", "missing")
    (it / "integrity.json").write_text(json.dumps({**manifest, "algorithm": "md5"}))
    exit_2(run("inspect", root), "'md5'", "integrity.json")
    (it / "integrity.json").write_text(json.dumps({**manifest, "files": {"../../etc/passwd": "00"}}))
    exit_2(run("inspect", root), "../../etc/passwd", "tampered")
    (it / "integrity.json").write_text("{not json")
    exit_2(run("inspect", root), "integrity.json", "not JSON")
    assert not (tmp_path / "a").exists()


def test_no_common_state_anywhere(tmp_path):
    """A 0.19 save whose .metadata lost the common_state item, and no common.pt: exit 2."""
    import pickle

    root = tmp_path / "ck"
    shutil.copytree(FIXTURES / "megatron019_dist_tp1", root)
    it = root / "iter_0000010"
    md = dcp.FileSystemReader(str(it)).read_metadata()
    del md.state_dict_metadata[COMMON_ITEM]
    md.storage_data = {k: v for k, v in md.storage_data.items() if k.fqn != COMMON_ITEM}
    (it / ".metadata").write_bytes(pickle.dumps(md))
    exit_2(run("inspect", root), "common.pt", COMMON_ITEM, "Fix:")


def test_019_reads_without_importing_dcp_or_megatron():
    """Reading a 0.19 save (common item, integrity check, every tensor and extra state) imports
    neither torch.distributed.checkpoint nor megatron."""
    import os
    import subprocess
    import sys

    code = ("import sys\n"
            "from ckptconv.formats.megatron_dist import MegatronDistReader\n"
            f"with MegatronDistReader({str(FIXTURES / 'megatron019_dist_tp2pp2')!r}) as r:\n"
            "    [r.read(n) for n in r.tensors()]\n"
            "    [r.read_extra_state(n) for n in r.extra_state]\n"
            "    assert r.common['iteration'] == 10 and r.integrity\n"
            "bad = [m for m in sys.modules if m.startswith(('torch.distributed.checkpoint', 'megatron'))]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(FIXTURES.parent)})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_workers_split_the_integrity_check_and_still_check_every_file(integrity_copy, tmp_path):
    """Each of 2 workers hashes its share of the listed files (together: each file once), and a
    changed file fails the 2-worker conversion whichever worker's share it is in."""
    from ckptconv.formats.megatron_dist_integrity import share_of_files

    root, it = integrity_copy
    listed = json.loads((it / "integrity.json").read_text())["files"]
    shares = [share_of_files(it, listed, r, 2) for r in range(2)]
    assert sorted(n for s in shares for n in s) == sorted(listed) and all(shares)
    sizes = [sum((it / n).stat().st_size for n in s) for s in shares]
    assert max(sizes) - min(sizes) <= max((it / n).stat().st_size for n in listed)   # balanced by bytes
    assert run("megatron-to-hf", root, tmp_path / "ok", "--workers", 2, "--max-shard-size", "300KB").exit_code == 0
    assert len(list((tmp_path / "ok").glob("*.safetensors"))) >= 2          # so 2 workers did run
    for k, name in enumerate(sorted(n for n in listed if n.endswith(".distcp"))):
        copy = tmp_path / f"ck{k}"
        shutil.copytree(root, copy)
        data = copy / it.name / name
        raw = bytearray(data.read_bytes())
        raw[-100] ^= 0x01
        data.write_bytes(bytes(raw))
        # the reader checks exactly its share: the changed file fails the one worker holding it
        failed = []
        for r in range(2):
            with MegatronDistReader(copy) as reader:
                reader.check_integrity_in_background((r, 2))
                try:
                    reader.verify_integrity()
                except Exception as e:  # noqa: BLE001 - the type is checked below
                    failed.append((r, type(e).__name__))
        assert failed == [(next(r for r in range(2) if name in shares[r]), "CorruptCheckpoint")], name
        exit_2(run("megatron-to-hf", copy, tmp_path / f"hf{k}", "--workers", 2, "--max-shard-size", "300KB"),
               name, "integrity.json")
        assert not (tmp_path / f"hf{k}").exists()
