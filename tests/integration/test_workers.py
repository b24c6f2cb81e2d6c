"""`--workers N` and `--launcher torchrun` for every converting command (engine/workers.py).

For each command the output of ``--workers 2`` is compared with ``--workers 1``: byte-identical
for per-rank torch and HF safetensors output (every file, the merged manifest included);
tensor-identical for torch_dist / DCP (the record files are named by the rank that wrote them,
so ``.metadata`` and ``integrity.json`` differ; every other file is byte-identical). Each output
also passes ``verify`` against its source. A worker that fails (a NaN only one share reads)
fails the command: exit 2, one line, no output. Two local torchrun ranks on gloo write the same
output as one process. The 2x speed-up is measured in bench/bench_workers.py, not here.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptconv.formats.detect import detect_format
from ckptconv.formats.megatron import READERS
from helpers import one_line_error, run

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "fixtures"
TINY = FIX / "tiny-llama"
DS = FIX / "deepspeed" / "z2_bf16_tied"
SMALL_SHARDS = ["--max-shard-size", "40KB"]       # several safetensors files to share out


@pytest.fixture(scope="module")
def dcp_src(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp") / "dcp"
    assert run("hf-to-dcp", TINY, out).exit_code == 0
    return out


def cases(dcp: Path) -> dict[str, tuple[list, str]]:
    """id -> (command line without DST, output kind)."""
    mg = ["--tp", "2", "--pp", "2"]
    return {
        "hf-to-megatron-torch": (["hf-to-megatron", TINY, *mg, "--ckpt-format", "torch"], "torch"),
        "hf-to-megatron-dist": (["hf-to-megatron", TINY, *mg, "--ckpt-format", "torch_dist"], "torch_dist"),
        "megatron-torch-to-hf": (["megatron-to-hf", FIX / "megatron_torch_tp2pp2", *SMALL_SHARDS], "hf"),
        "megatron-dist-to-hf": (["megatron-to-hf", FIX / "megatron_dist_tp2pp2", *SMALL_SHARDS], "hf"),
        "deepspeed-to-hf": (["deepspeed-to-hf", DS / "checkpoint", "--hf-config", DS, *SMALL_SHARDS], "hf"),
        "deepspeed-to-megatron": (["deepspeed-to-megatron", DS / "checkpoint", "--hf-config", DS, *mg,
                                   "--ckpt-format", "torch"], "torch"),
        "dcp-to-hf": (["dcp-to-hf", dcp, *SMALL_SHARDS], "hf"),
        "dcp-to-megatron": (["dcp-to-megatron", dcp, *mg, "--ckpt-format", "torch_dist"], "torch_dist"),
        "hf-to-dcp": (["hf-to-dcp", TINY], "dcp"),
    }


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def logical(root: Path) -> dict[str, torch.Tensor]:
    if (root / ".metadata").is_file():     # plain DCP: torch's own reader
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        dcp_to_torch_save(root, root.parent / f"{root.name}.pt")
        return torch.load(root.parent / f"{root.name}.pt", weights_only=True)
    with READERS[detect_format(root)](root) as r:
        return {n: r.read(n) for n in r.tensors()}


def assert_same_output(kind: str, one: Path, two: Path) -> None:
    a, b = files(one), files(two)
    if kind not in ("torch_dist", "dcp"):
        assert sorted(a) == sorted(b) and a
        for name in a:
            assert a[name] == b[name], name                 # byte-identical, the manifest included
        return
    data = lambda fs: {n for n in fs if n.endswith(".distcp")}      # noqa: E731
    assert {n.split("/")[-1].split("_")[2] for n in data(b)} == {"0", "1"}      # both ranks wrote records
    differ = {"release/.metadata", "release/integrity.json", ".metadata"}
    rest = set(a) - data(a) - differ
    assert rest == set(b) - data(b) - differ
    for name in rest:
        assert a[name] == b[name], name
    ta, tb = logical(one), logical(two)
    assert sorted(ta) == sorted(tb) and ta
    for n in ta:
        assert ta[n].dtype == tb[n].dtype and torch.equal(ta[n], tb[n]), n


@pytest.mark.parametrize("case", ["hf-to-megatron-torch", "hf-to-megatron-dist", "megatron-torch-to-hf",
                                  "megatron-dist-to-hf", "deepspeed-to-hf", "deepspeed-to-megatron", "dcp-to-hf",
                                  "dcp-to-megatron", "hf-to-dcp"])
def test_two_workers_write_what_one_writes(case, dcp_src, tmp_path):
    argv, kind = cases(dcp_src)[case]
    out = {}
    for w in (1, 2):
        res = run(argv[0], argv[1], tmp_path / f"w{w}", *argv[2:], "--workers", w, "--json")
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["workers"] == w
        out[w] = tmp_path / f"w{w}"
    assert_same_output(kind, out[1], out[2])
    assert (out[2] / "ckptconv-manifest.json").is_file() or kind == "dcp"     # DCP output carries none
    for manifest in out[2].rglob("integrity.json"):     # digests the workers took while writing
        files = json.loads(manifest.read_text())["files"]
        assert {p.name for p in manifest.parent.glob("__1_*.distcp")} <= set(files)
        assert all(hashlib.sha256((manifest.parent / f).read_bytes()).hexdigest() == d for f, d in files.items())
    res = run("verify", argv[1], out[2], "--no-logits", *(["--hf-config", DS] if "deepspeed" in case else []))
    assert res.exit_code == 0, res.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def nan_source(tmp_path: Path) -> Path:
    """tiny-llama with one NaN in layer 3 (pipeline stage 1 of 2)."""
    src = tmp_path / "src"
    shutil.copytree(TINY, src)
    f = next(p for p in src.glob("*.safetensors") if "model.layers.3.mlp.down_proj.weight" in load_file(p))
    tensors = load_file(f)
    tensors["model.layers.3.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, f, metadata={"format": "pt"})
    return src


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_a_failing_worker_fails_the_command_and_leaves_nothing(tmp_path, fmt):
    """A NaN in layer 3 is read only by the worker of pipeline stage 1 (torch) or of that tensor's
    share (torch_dist): its typed error is the command's (exit 2, one line), nothing is left behind."""
    src = nan_source(tmp_path)
    dst = tmp_path / "out"
    res = run("hf-to-megatron", src, dst, "--tp", 2, "--pp", 2, "--ckpt-format", fmt, "--workers", 2)
    one_line_error(res, "model.layers.3.mlp.down_proj.weight")
    assert "NaN" in res.output or "nan" in res.output.lower()
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_workers_are_capped_at_the_output_files_and_checked(tmp_path):
    res = run("megatron-to-hf", FIX / "megatron_torch_tp2pp2", tmp_path / "hf", "--workers", 2, "--dry-run", "--json")
    assert json.loads(res.output)["workers"] == 1         # one safetensors file: nothing to share
    one_line_error(run("hf-to-megatron", TINY, tmp_path / "mg", "--workers", 0), "--workers 0")
    assert run("hf-to-megatron", TINY, tmp_path / "mg", "--workers", "x").exit_code == 2      # click's usage error
    assert not (tmp_path / "mg").exists()


# ------------------------------------------------------------------------------------ torchrun
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(argv: list, dst: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "ckptconv", argv[0], str(argv[1]), str(dst), *map(str, argv[2:]), "--launcher", "torchrun", "--json"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("case", ["hf-to-megatron-dist",
                                  "megatron-torch-to-hf",
                                  pytest.param("deepspeed-to-hf", marks=pytest.mark.slow),
                                  pytest.param("dcp-to-megatron", marks=pytest.mark.slow)])
def test_torchrun_two_ranks_write_what_one_process_writes(case, dcp_src, tmp_path):
    argv, kind = cases(dcp_src)[case]
    assert run(argv[0], argv[1], tmp_path / "w1", *argv[2:], "--workers", 1).exit_code == 0
    p = torchrun(argv, tmp_path / "tr")
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(p.stdout)["workers"] == 2           # rank 0 prints the summary, rank 1 nothing
    assert_same_output(kind, tmp_path / "w1", tmp_path / "tr")
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")]


def test_jobs_pickle_for_spawned_workers(tmp_path):
    """With more than one thread per worker the workers are spawned, not forked: the job (the
    command itself and its arguments) must survive pickling and name the same function."""
    import pickle

    from ckptconv import hf_to_megatron, megatron_to_hf
    from ckptconv.engine.dcp_convert import dcp_to_hf, hf_to_dcp
    from ckptconv.engine.deepspeed_convert import deepspeed_to_hf
    from ckptconv.engine.reshard import reshard
    from ckptconv.engine.workers import WorkerJob

    for fn in (hf_to_megatron, megatron_to_hf, dcp_to_hf, hf_to_dcp, deepspeed_to_hf, reshard):
        job = WorkerJob.of(fn, TINY, dtype=torch.bfloat16, workers=2, overwrite=True, tp=2)
        back = pickle.loads(pickle.dumps(job))
        assert back.fn is fn and back.kwargs == {"dtype": torch.bfloat16, "tp": 2} and back.args == (TINY,)


def test_torchrun_a_failing_rank_fails_every_rank_and_leaves_nothing(tmp_path):
    """Under torchrun the rank that reads the NaN fails the collective torch_dist save: every rank
    exits 2 with the same one-line error (one line per rank), no output and no temporary directory."""
    src = nan_source(tmp_path)
    p = torchrun(["hf-to-megatron", src, "--tp", 2, "--pp", 2, "--ckpt-format", "torch_dist"], tmp_path / "out")
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode != 0 and len(lines) == 2 and all("model.layers.3.mlp.down_proj.weight" in ln for ln in lines)
    assert "exitcode  : 2" in p.stderr
    assert sorted(q.name for q in tmp_path.iterdir()) == ["src"]
