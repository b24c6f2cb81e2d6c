"""The bundled runtime on Mixture-of-Experts checkpoints, against code nobody here wrote:
transformers' logits on the HF source (Mixtral, Qwen2-MoE with its gated shared expert and
dense + sparse layers, Qwen3-MoE), at EP 2 with TP / PP / ETP, both Megatron formats and HF
itself; checkpoints real megatron-core 0.16.1 saved at EP 2 against transformers on their HF
export and against the logits megatron computed. Calibration: each routing rule, the shared
expert's gate and experts swapped on disk move the logits far beyond the 1e-4 accepted.
Memory: a rank asks only for its own experts, one expert (slice) per read."""
from __future__ import annotations

import argparse
import functools
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptconv import hf_to_megatron, megatron_to_hf
from ckptconv.errors import LayoutError
from ckptconv.plan.experts import expert_index
from ckptconv.runtime import logits, prepare_run, run_local
from ckptconv.runtime.loader import weight_getter
from ckptconv.runtime.parallel import Parallel
from ckptconv.runtime.pipeline import build_chunks
from helpers import run
from tiny_models import hf_logits, tokens

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
IDS = tokens(vocab=250, batch=2, seq=64, seed=0)          # the shape verify --logits uses
TOL = 1e-4


@pytest.fixture(scope="module")
def ref(hf_model_dir):
    """ref(variant): transformers' logits on IDS (computed once per variant)."""
    return functools.lru_cache(maxsize=None)(lambda variant: hf_logits(hf_model_dir(variant), IDS))


@pytest.fixture(scope="module")
def converted(hf_model_dir, tmp_path_factory):
    cache = {}

    def get(variant: str, fmt: str = "torch", **kw) -> Path:
        key = (variant, fmt, tuple(sorted(kw.items())))
        if key not in cache:
            dst = tmp_path_factory.mktemp(f"moe-{variant}-{fmt}") / "mg"
            hf_to_megatron(hf_model_dir(variant), dst, ckpt_format=fmt, show_progress=False, **kw)
            cache[key] = dst
        return cache[key]
    return get


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# ------------------------------------------------------------------ logits == transformers
FAST = [
    ("mixtral", "torch", dict(ep=2), 2),
    ("mixtral", "torch_dist", dict(tp=2, pp=2, ep=2), 4),
    ("qwen2-moe", "torch", dict(tp=2, pp=2, ep=2), 4),
    ("qwen2-moe", "torch_dist", dict(ep=2), 2),
    ("qwen3-moe", "torch_dist", dict(tp=2, ep=2, etp=2), 4),
    ("qwen3-moe", "torch", dict(tp=2, ep=2, moe_grouped_gemm=True), 2),
]
SLOW = [
    ("mixtral", "torch", dict(tp=2, ep=2, etp=2), 4),
    ("mixtral", "torch", dict(pp=2, ep=4), 8),
    ("qwen2-moe", "torch", dict(tp=2, pp=2, ep=2, etp=2, moe_grouped_gemm=True), 8),
    ("qwen2-moe", "torch_dist", dict(tp=2, pp=2, ep=2), 4),
    ("qwen3-moe", "torch", dict(tp=2, pp=2, ep=2), 4),
    ("qwen3-moe", "torch_dist", dict(pp=2, vpp=2, ep=2), 4),
]


@pytest.mark.parametrize("variant,fmt,kw,ranks", FAST + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW],
                         ids=lambda x: str(x))
def test_moe_checkpoint_matches_transformers(converted, ref, variant, fmt, kw, ranks):
    path = converted(variant, fmt, **kw)
    spec = prepare_run(path)
    lay = spec.layout
    assert (lay.tp, lay.pp, lay.ep, lay.etp) == (kw.get("tp", 1), kw.get("pp", 1), kw["ep"], kw.get("etp", 1))
    assert spec.world == ranks and spec.native == (fmt == "torch")      # one rank per rank file
    assert diff(logits(path, IDS, timeout_s=300), ref(variant)) <= TOL


@pytest.mark.parametrize("variant,kw", [("qwen2-moe", dict(ep=2)), ("mixtral", dict(tp=2, ep=2, etp=2)),
                                        ("qwen3-moe", dict(ep=4))])
def test_hf_source_runs_at_ep(hf_model_dir, ref, variant, kw):
    """The HF directory itself, sharded on load (rows of each expert read straight from the file)."""
    assert diff(logits(hf_model_dir(variant), IDS, timeout_s=300, **kw), ref(variant)) <= TOL


def test_reshard_on_load_across_ep(converted, ref):
    path = converted("mixtral", "torch", tp=2, pp=2, ep=2)
    spec = prepare_run(path, ep=4, pp=1)
    assert (spec.layout.tp, spec.layout.pp, spec.layout.ep, spec.world, spec.native) == (2, 1, 4, 4, False)
    assert diff(logits(path, IDS, ep=4, pp=1, timeout_s=300), ref("mixtral")) <= TOL
    assert diff(logits(path, IDS, tp=1, pp=1, ep=1), ref("mixtral")) <= TOL          # in-process


def test_bf16_execution_is_close(converted, ref):
    r = ref("qwen2-moe")
    got = logits(converted("qwen2-moe", "torch", tp=2, pp=2, ep=2), IDS, dtype=torch.bfloat16, timeout_s=300)
    a, b = r.double().log_softmax(-1), got.double().log_softmax(-1)
    assert 0 < diff(got, r) <= 0.02 * r.abs().max().item()
    assert (a.exp() * (a - b)).sum(-1).mean().item() <= 1e-5


# ------------------------------------------------------------------ real megatron-core at EP 2
@pytest.mark.parametrize("ckpt,ref_dir,ranks", [
    ("megatron_moe_torch_ep2", "megatron_moe_torch_ep2", 2),
    ("megatron_moe_tp2pp2ep2/torch", "megatron_moe_tp2pp2ep2", 4),
    ("megatron_moe_tp2pp2ep2/torch_dist", "megatron_moe_tp2pp2ep2", 4),
])
def test_checkpoint_real_megatron_saved_at_ep2(tmp_path, ckpt, ref_dir, ranks):
    """Saved by megatron-core 0.16.1 (args only, no HF config): the runtime, at the checkpoint's
    own layout, against transformers on its HF export and against megatron's own logits."""
    r = load_file(FIXTURES / ref_dir / "reference_logits.safetensors")
    spec = prepare_run(FIXTURES / ckpt)
    assert spec.cfg.family == "mixtral" and spec.layout.ep == 2 and spec.world == ranks
    got = logits(FIXTURES / ckpt, r["tokens"], timeout_s=300)
    megatron_to_hf(FIXTURES / ckpt, tmp_path / "hf", show_progress=False)
    assert diff(got, hf_logits(tmp_path / "hf", r["tokens"])) <= TOL
    assert diff(got, r["logits"]) <= TOL


def test_real_deepspeed_zero2_mixtral_runs_at_ep2():
    """ZeRO-2 checkpoint of a tiny Mixtral saved by real DeepSpeed 0.19.8 (experts packed as
    transformers 5 holds them, ``mlp.experts.gate_up_proj``): the runtime at EP 2 against
    transformers' forward of the engine's fp32 masters."""
    case = FIXTURES / "deepspeed" / "z2_mixtral_fp32"
    r = load_file(case / "reference_logits.safetensors")
    for kw in (dict(ep=2), dict(tp=2, ep=2)):
        assert diff(logits(case / "checkpoint", r["tokens"], timeout_s=300, **kw), r["logits"]) <= TOL


def test_packed_hf_experts_run_at_ep2(hf_model_dir, ref, tmp_path):
    """An HF file with transformers' in-memory packed expert tensors (not the hub layout)."""
    import transformers
    from safetensors.torch import save_file
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_model_dir("qwen3-moe"), dtype=torch.float32)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in sd
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(hf_model_dir("qwen3-moe") / "config.json", tmp_path / "config.json")
    assert diff(logits(tmp_path, IDS, ep=2, timeout_s=300), ref("qwen3-moe")) <= TOL


# ------------------------------------------------------------------ calibration: each rule shows
@pytest.mark.parametrize("variant,change", [
    ("qwen2-moe", dict(moe_norm_topk=True)),          # norm_topk_prob False in the model
    ("qwen3-moe", dict(moe_norm_topk=False)),         # norm_topk_prob True in the model
    ("mixtral", dict(moe_norm_topk=False)),           # Mixtral always renormalises
    ("mixtral", dict(moe_topk=1)),
    ("qwen2-moe", dict(shared_expert_gate=False)),    # the shared expert without its sigmoid gate
])
def test_each_moe_rule_changes_the_logits(converted, ref, variant, change):
    """Running the same weights with one rule changed moves the logits by > 10x the tolerance
    (so the tests above can fail; measured 6.8e-3 to 0.26, docs/runtime.md)."""
    spec = prepare_run(converted(variant, "torch", ep=2))
    bad = replace(spec, cfg=replace(spec.cfg, **change))
    got = diff(run_local(bad, IDS, timeout_s=300), ref(variant))
    print(f"{variant} {change}: max |diff| {got:.3g}")
    assert got > 10 * TOL


def _edit_rank_files(root: Path, fn) -> None:
    for f in sorted(root.glob("*/mp_rank_*/model_optim_rng.pt")):
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(f, weights_only=True)
        if fn(f.parent.name, obj["model"]):
            torch.save(obj, f)


def _swap_experts(name: str, sd: dict, params=(".linear_fc1.", ".linear_fc2.")) -> bool:
    """In EP rank 0's files, local experts 0 and 1 of every layer trade places (the same
    function as swapping router rows 0 and 1: measured identical logits)."""
    if not name.endswith("_000"):
        return False
    for k in [k for k in sd if ".local_experts.0." in k and any(p in k for p in params)]:
        o = k.replace(".local_experts.0.", ".local_experts.1.")
        sd[k], sd[o] = sd[o], sd[k]
    return True


def _swap_fc2_only(name: str, sd: dict) -> bool:
    """Only the down projections of experts 0 and 1 trade places (fc1 stays)."""
    return _swap_experts(name, sd, (".linear_fc2.",))


@pytest.mark.parametrize("edit", [_swap_experts, _swap_fc2_only], ids=["experts-swapped", "expert-fc2-swapped"])
def test_negative_control_caught_by_the_logits(converted, ref, hf_model_dir, tmp_path, edit):
    bad = tmp_path / "bad"
    shutil.copytree(converted("mixtral", "torch", tp=2, ep=2), bad)
    _edit_rank_files(bad, edit)
    assert diff(logits(bad, IDS, timeout_s=300), ref("mixtral")) > 100 * TOL
    r = run("verify", hf_model_dir("mixtral"), bad, "--logits", "--json", "-")
    report = json.loads(r.stdout)
    assert r.exit_code == 1 and not report["logits"]["ok"], r.output
    assert report["logits"]["kl"] > 1000 * report["logits"]["thresholds"]["kl"]


# ------------------------------------------------------------------ CLI: run and verify --logits
def test_cli_run_and_verify_logits_on_moe(converted, hf_model_dir, ref, tmp_path):
    mg = converted("qwen2-moe", "torch", tp=2, pp=2, ep=2)
    out = tmp_path / "logits.safetensors"
    text = "; ".join(" ".join(str(int(x)) for x in row) for row in IDS)
    r = run("run", mg, "--tokens", text, "--save-logits", out)
    assert r.exit_code == 0, r.output
    assert "TP=2 PP=2 VPP=None EP=2 ETP=1 (4 experts, top-2) on 4 rank(s)" in r.output
    assert diff(load_file(out)["logits"], ref("qwen2-moe")) <= TOL
    r = run("verify", hf_model_dir("qwen2-moe"), mg, "--json", "-")       # cross-framework: logits run by itself
    report = json.loads(r.stdout)
    assert r.exit_code == 0 and report["logits"]["ok"], r.output
    assert report["logits"]["runner"]["b"] == "bundled runtime (float32, sharded)"
    assert report["logits"]["max_abs"] <= TOL


def test_cli_verify_logits_real_megatron_ep2_checkpoint_vs_its_hf_export(tmp_path):
    ckpt = FIXTURES / "megatron_moe_tp2pp2ep2" / "torch"
    megatron_to_hf(ckpt, tmp_path / "hf", show_progress=False)
    r = run("verify", ckpt, tmp_path / "hf", "--logits", "--json", "-")
    report = json.loads(r.stdout)
    assert r.exit_code == 0 and report["logits"]["ok"], r.output
    assert report["logits"]["runner"]["a"] == "bundled runtime (float32, sharded)"


def test_too_few_ranks_names_the_expert_layout(converted):
    path = converted("mixtral", "torch", tp=2, pp=2, ep=2)
    with pytest.raises(LayoutError, match=r"needs PP x lcm\(TP, ETP x EP\) = 2 x lcm\(2, 1 x 2\) = 4 ranks, "
                                          r"but --nproc is 2"):
        logits(path, [[1, 2, 3]], nproc=2)
    with pytest.raises(LayoutError, match="not divisible by EP=3"):
        prepare_run(path, ep=3)


# ------------------------------------------------------------------ memory: one expert per read
HF_EXPERT = re.compile(r"\.experts\.(\d+)\.")


class Recording:
    """A reader that records every read: (name, elements returned)."""

    def __init__(self, reader):
        self.reader, self.reads = reader, []

    def __getattr__(self, attr):
        return getattr(self.reader, attr)

    def read_slice(self, name, *a, **k):
        t = self.reader.read_slice(name, *a, **k)
        self.reads.append((name, t.numel()))
        return t

    def read(self, name):
        t = self.reader.read(name)
        self.reads.append((name, t.numel()))
        return t


def _expert_of(name: str) -> int | None:
    e = expert_index(name)
    m = HF_EXPERT.search(name)
    return e if e is not None else int(m.group(1)) if m else None


@pytest.mark.parametrize("source", ["torch_dist", "hf"])
def test_a_rank_reads_only_its_own_experts_one_at_a_time(converted, hf_model_dir, source):
    """EP rank 1 of 2 (TP 2, ETP 2: TP rank 1) builds its model: it reads from the checkpoint
    experts 2 and 3 of each MoE layer and nothing of 0 and 1, each read at most one weight of
    one expert (torch_dist: its ETP slice only)."""
    kw = dict(tp=2, ep=2, etp=2)
    path = converted("qwen2-moe", "torch_dist", **kw) if source == "torch_dist" else hf_model_dir("qwen2-moe")
    spec = prepare_run(path, **({} if source == "torch_dist" else kw))
    par = Parallel(2, 1, 3, torch.device("cpu"), ep=2, etp=2)            # stage rank 3: TP 1, ETP 1, EP 1
    assert (par.tp_rank, par.etp_rank, par.ep_rank) == (1, 1, 1)
    shards = spec.open_shards(par.tp_rank, par.pp_rank, par.ep_rank)
    if source == "torch_dist":                   # the torch_dist reader itself reads only the boxes asked for
        shards.reader = rec = Recording(shards.reader)
    else:                                        # the HF files under the family table's view
        shards.reader.source = rec = Recording(shards.reader.source)
    try:
        build_chunks(spec, par, weight_getter(shards, spec.cfg, spec.layout, spec.padded_vocab, torch.float32, "cpu"))
    finally:
        shards.close()
    cfg = spec.cfg
    one_weight = cfg.moe_ffn_hidden_size * cfg.hidden_size                  # w1, w3 or w2 of one expert
    expert_reads = [(n, k) for n, k in rec.reads if _expert_of(n) is not None]
    assert [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)] == [1, 2, 3]
    assert {_expert_of(n) for n, _ in expert_reads} == {2, 3}
    assert len({n for n, _ in expert_reads}) == 3 * 2 * (2 if source == "torch_dist" else 3)   # fc1, fc2 | w1 w3 w2
    limit = one_weight * 2 // 2 if source == "torch_dist" else one_weight    # fc1 [2F/etp, H], fc2 [H, F/etp]
    assert max(k for _, k in expert_reads) <= limit


def test_runtime_ranks_are_the_rank_files():
    """Stage rank q runs the per-rank file (TP rank, EP rank) that megatron-core writes for q."""
    from ckptconv.plan.experts import rank_grid
    for tp, ep, etp in [(1, 2, 1), (2, 2, 1), (2, 2, 2), (2, 4, 1), (4, 2, 2), (1, 1, 1), (2, 1, 1)]:
        stage = Parallel(tp, 1, 0, torch.device("cpu"), ep=ep, etp=etp).stage
        pairs = [(p.tp_rank, p.ep_rank) for p in (Parallel(tp, 1, q, torch.device("cpu"), ep=ep, etp=etp)
                                                  for q in range(stage))]
        assert sorted(pairs) == rank_grid(tp, ep, etp) and len(set(pairs)) == stage, (tp, ep, etp)


@pytest.mark.slow
def test_real_megatron_ep2_checkpoint_under_torchrun(tmp_path):
    """The torchrun entry point at TP2 PP2 EP2: 4 processes, one per rank file."""
    import subprocess
    import sys
    ckpt = FIXTURES / "megatron_moe_tp2pp2ep2" / "torch"
    ref = load_file(FIXTURES / "megatron_moe_tp2pp2ep2" / "reference_logits.safetensors")
    bindir = Path(sys.executable).parent
    text = "; ".join(" ".join(str(int(x)) for x in row) for row in ref["tokens"])
    out = tmp_path / "logits.safetensors"
    r = subprocess.run([str(bindir / "torchrun"), "--standalone", "--nproc-per-node", "4", "--no-python",
                        str(bindir / "ckptconv"), "run", str(ckpt), "--launcher", "torchrun", "--tokens", text,
                        "--save-logits", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("ran mixtral") == 1 and "EP=2" in r.stdout
    assert diff(load_file(out)["logits"], ref["logits"]) <= TOL
