"""`ckptconv reshard`: bit-exact round trips A -> B -> A over TP/PP/VPP/uneven layouts in both
formats, layout errors (exit 2, one line, no output), --workers 2 == --workers 1, and the same
partition run by two torchrun ranks on gloo."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckptconv import hf_to_megatron
from ckptconv.engine.reshard import reshard
from ckptconv.formats.megatron import READERS
from ckptconv.formats.detect import detect_format
from helpers import assert_same_rank_models, one_line_error as exit_2, rank_models, run

REPO = Path(__file__).resolve().parents[2]
FORMATS = ["torch", "torch_dist"]
# (tp, pp, vpp) of the matrix for a 4-layer model; the uneven case has its own 3-layer model
LAYOUTS = [(1, 1, None), (2, 2, None), (4, 1, None), (1, 4, None), (2, 2, 2)]


def lid(lay):
    return "tp{}pp{}".format(*lay) + (f"vpp{lay[2]}" if lay[2] else "")


def logical(root):
    """(layout, args, {name: tensor}) as any Megatron reader exposes them."""
    with READERS[detect_format(Path(root))](Path(root)) as r:
        return r.layout, r.args, {n: r.read(n) for n in r.tensors()}


def assert_same_logical(a, b, vocab=None):
    """Equal logical tensors; vocab rows compared up to ``vocab`` (padding differs with TP)."""
    _, _, ta = logical(a)
    _, _, tb = logical(b)
    assert sorted(ta) == sorted(tb) and ta
    for n, t in ta.items():
        u = tb[n]
        if vocab and n in ("embedding.word_embeddings.weight", "output_layer.weight"):
            assert torch.equal(t[:vocab], u[:vocab]) and not t[vocab:].any() and not u[vocab:].any(), n
        else:
            assert torch.equal(t, u), n


def assert_same(fmt, a, b):
    if fmt == "torch":
        assert_same_rank_models(a, b)
    else:
        assert_same_logical(a, b)


def assert_manifest_of(src, out, summary=None):
    """The reshard output carries the manifest of its values (the source's fingerprint, which does
    not depend on TP/PP/format), no worker part files, and verifies against it."""
    from ckptconv.verify.equivalence import verify_checkpoints
    from ckptconv.verify.fingerprint import fingerprint_checkpoint
    from ckptconv.verify.manifest import MANIFEST_NAME, load_manifest

    written = load_manifest(Path(out) / MANIFEST_NAME)
    assert written.tensors == fingerprint_checkpoint(src).tensors and written.tensors
    assert not list(Path(out).glob(".ckptconv-manifest.part-*"))
    if summary is not None:
        assert summary["manifest"] == str(Path(out) / MANIFEST_NAME)
    assert verify_checkpoints(out, Path(out) / MANIFEST_NAME).equivalent


@pytest.fixture(scope="module")
def sources(hf_model_dir, tmp_path_factory):
    """hf_to_megatron output per (variant, format, layout), built once."""
    cache = {}

    def get(variant, fmt, lay, first=None):
        key = (variant, fmt, lay, first)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"src-{variant}-{fmt}-{lid(lay)}") / "mg"
            hf_to_megatron(hf_model_dir(variant), out, tp=lay[0], pp=lay[1], vpp=lay[2], ckpt_format=fmt,
                           first_stage_layers=first, show_progress=False)
            cache[key] = out
        return cache[key]

    return get


# ------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("mid_fmt", FORMATS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_matrix_is_bit_exact(sources, tmp_path, fmt, mid_fmt):
    """A -> B -> A for every B of the matrix from A = (2,2,-) (and from (1,1,-) when A and B share a
    format), A in ``fmt``, B in ``mid_fmt``; B holds exactly A's logical tensors (vocab re-padded
    for its TP)."""
    for a in [(2, 2, None), (1, 1, None)] if fmt == mid_fmt else [(2, 2, None)]:
        src = sources("llama-gqa", fmt, a)
        for b in [lay for lay in LAYOUTS if lay != a]:
            mid, back = tmp_path / f"{lid(a)}-{lid(b)}", tmp_path / f"{lid(a)}-{lid(b)}-back"
            s = reshard(src, mid, ckpt_format=mid_fmt, tp=b[0], pp=b[1], vpp=b[2] or 1, show_progress=False)
            layout, args, _ = logical(mid)
            assert (layout.tp, layout.pp, layout.vpp) == b and s["layers_per_stage"] == layout.stage_layer_counts()
            assert args.padded_vocab_size == 128 * b[0] * ((250 + 128 * b[0] - 1) // (128 * b[0]))
            assert_same_logical(src, mid, vocab=250)
            reshard(mid, back, ckpt_format=fmt, tp=a[0], pp=a[1], vpp=a[2] or 1, show_progress=False)  # 1: no VPP
            assert_same(fmt, src, back)


@pytest.mark.parametrize("fmt", FORMATS)
def test_uneven_pipeline_round_trip(sources, tmp_path, fmt):
    """PP 2 with 1 of 3 layers on the first stage <-> (1,1) / (4,1) / (1,3) / the 2-of-3 split."""
    src = sources("llama-3layer", fmt, (1, 2, None), first=1)
    layout, args, _ = logical(src)
    assert layout.stage_layer_counts() == [1, 2] and args.decoder_first_pipeline_num_layers == 1
    for i, (tp, pp, first, last, counts) in enumerate([(1, 1, None, None, [3]), (4, 1, None, None, [3]),
                                                       (1, 3, None, None, [1, 1, 1]), (2, 2, None, 1, [2, 1])]):
        mid = tmp_path / f"mid{i}"
        reshard(src, mid, ckpt_format="torch" if i % 2 else "torch_dist", tp=tp, pp=pp, first_stage_layers=first,
                last_stage_layers=last, show_progress=False)
        layout, args, _ = logical(mid)
        assert layout.stage_layer_counts() == counts and args.decoder_last_pipeline_num_layers == last
        assert_same_logical(src, mid, vocab=250)
        r = run("reshard", mid, tmp_path / f"back{i}", "--ckpt-format", fmt, "--tp", 1, "--pp", 2,
                "--decoder-first-pipeline-num-layers", 1, "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["layers_per_stage"] == [1, 2]
        assert_same(fmt, src, tmp_path / f"back{i}")


def test_hf_to_megatron_cli_takes_the_uneven_split(sources, hf_model_dir, tmp_path):
    r = run("hf-to-megatron", hf_model_dir("llama-3layer"), tmp_path / "mg", "--pp", 2, "--ckpt-format", "torch",
            "--decoder-first-pipeline-num-layers", 1, "--json")
    assert r.exit_code == 0, r.output
    assert_same_rank_models(sources("llama-3layer", "torch", (1, 2, None), first=1), tmp_path / "mg")


def test_uneven_source_keeps_its_split_when_only_tp_changes(sources, tmp_path):
    src = sources("llama-3layer", "torch", (1, 2, None), first=1)
    s = reshard(src, tmp_path / "x", ckpt_format="torch", tp=2, dry_run=True, show_progress=False)
    assert s["layers_per_stage"] == [1, 2] and not (tmp_path / "x").exists()


def test_extra_state_and_tied_output_survive(sources, tmp_path):
    """Tied embeddings at PP 2 (output copy on the last stage) and TE `_extra_state` entries."""
    src = sources("llama-tied", "torch", (1, 2, None))
    reshard(src, tmp_path / "d", ckpt_format="torch_dist", tp=2, pp=1, show_progress=False)
    reshard(tmp_path / "d", tmp_path / "t", ckpt_format="torch", tp=1, pp=2, show_progress=False)
    assert_same_rank_models(src, tmp_path / "t")
    last = rank_models(tmp_path / "t")["mp_rank_00_001/model"]
    assert "output_layer.weight" in last and any(k.endswith("_extra_state") for k in last)
    assert_manifest_of(src, tmp_path / "t")             # tied: lm_head is not a logical parameter


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("flags,needles", [
    (["--tp", 3], ["num_query_groups=4", "TP=3"]),
    (["--tp", 8], ["num_query_groups=4", "TP=8"]),
    (["--pp", 3], ["PP x VPP"]),
    (["--pp", 2, "--vpp", 4], ["PP x VPP = 8"]),
    (["--pp", 1, "--vpp", 2], ["virtual pipeline needs PP > 1"]),
    (["--pp", 2, "--vpp", 2, "--decoder-first-pipeline-num-layers", 1], ["uneven"]),
    (["--pp", 3, "--decoder-first-pipeline-num-layers", 1], ["3 layers cannot be split evenly over the 2"]),
    (["--pp", 2, "--decoder-first-pipeline-num-layers", 5], ["cannot be split as [5, -1]"]),
    (["--workers", 0], ["--workers 0"]),
])
def test_layout_errors_exit_2_without_output(sources, tmp_path, flags, needles):
    src = sources("llama-gqa", "torch", (2, 2, None))
    exit_2(run("reshard", src, tmp_path / "out", *flags), *needles)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------ workers

@pytest.mark.parametrize("fmt,lay", [("torch", (1, 4, None)), ("torch", (4, 1, None)), ("torch_dist", (2, 2, 2))])
def test_two_workers_write_the_same_checkpoint(sources, tmp_path, fmt, lay):
    src = sources("llama-gqa", "torch", (2, 2, None))
    kw = dict(ckpt_format=fmt, tp=lay[0], pp=lay[1], vpp=lay[2], show_progress=False)
    one = reshard(src, tmp_path / "w1", **kw)
    two = reshard(src, tmp_path / "w2", workers=2, **kw)
    assert two["workers"] == 2 and len(two["worker_shares"]) == 2 and one["tensors_written"] == two["tensors_written"]
    assert_same(fmt, tmp_path / "w1", tmp_path / "w2")
    assert_manifest_of(src, tmp_path / "w1", one)
    assert_manifest_of(src, tmp_path / "w2", two)        # merged from the two workers' parts
    assert_same_logical(src, tmp_path / "w2", vocab=250)
    if fmt == "torch_dist":     # each worker wrote its own record files into the one DCP checkpoint
        names = {p.name.split("_")[2] for p in (tmp_path / "w2" / "release").glob("__*_*.distcp")}
        assert names == {"0", "1"}
        assert {p.name for p in (tmp_path / "w2" / "release").iterdir() if not p.name.endswith(".distcp")} == \
            {p.name for p in (tmp_path / "w1" / "release").iterdir() if not p.name.endswith(".distcp")}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_worker_error_is_typed_and_leaves_no_output(sources, tmp_path):
    """A damaged tensor record is only seen by the worker that reads it: its typed error reaches the
    CLI (exit 2, file named) and nothing is left behind."""
    import shutil
    import zipfile

    src = sources("llama-gqa", "torch", (2, 2, None))
    broken = tmp_path / "src"
    shutil.copytree(src, broken)
    f = broken / "release" / "mp_rank_01_001" / "model_optim_rng.pt"
    with zipfile.ZipFile(f) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 1000)
    with open(f, "r+b") as fh:
        fh.seek(info.header_offset)
        fh.write(b"XXXX")                  # the pickle and zip directory still parse
    exit_2(run("reshard", broken, tmp_path / "out", "--ckpt-format", "torch", "--tp", 1, "--pp", 4, "--workers", 2),
           "bad zip local header", "mp_rank_01_001")
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fmt", ["torch_dist", pytest.param("torch", marks=pytest.mark.slow)])
def test_torchrun_two_ranks_write_the_partition(sources, tmp_path, fmt):
    src = sources("llama-gqa", "torch", (2, 2, None))
    flags = ["--ckpt-format", fmt, "--tp", "4", "--pp", "1"]
    reshard(src, tmp_path / "w1", ckpt_format=fmt, tp=4, pp=1, show_progress=False)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "ckptconv", "reshard", str(src), str(tmp_path / "tr"), *flags, "--launcher", "torchrun", "--json"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(p.stdout)["workers"] == 2         # rank 0 prints the summary, rank 1 nothing
    assert_same(fmt, tmp_path / "w1", tmp_path / "tr")
    assert_manifest_of(src, tmp_path / "tr")
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")]
