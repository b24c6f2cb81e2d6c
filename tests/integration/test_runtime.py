"""The bundled parallel runtime (ckptconv.runtime) against code nobody here wrote:
transformers' logits on the HF source, and the logits real Megatron-Core stored with the
fixture it wrote. Also: broken conversions differ clearly (calibration for verify --logits),
bf16 execution, errors, the CLI, and no megatron/TE/apex imports.

Multi-rank runs fork gloo ranks (~1 s each here); the full family x layout matrix is `slow`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ckptconv import hf_to_megatron
from ckptconv.cli.main import cli
from ckptconv.errors import LayoutError, MissingTensors
from ckptconv.formats.hf import HFReader
from ckptconv.plan.megatron_layout import MegatronLayout, pad_vocab_size, tp_kind, tp_pieces
from ckptconv.runtime import RankFailure, logits, prepare_run, run_local
from ckptconv.runtime.loader import HFAsMegatron
from tiny_models import BASE, hf_logits, tokens
from helpers import tree_hash

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "megatron_torch_tp2pp2"
FAMILIES = ["llama-gqa", "qwen2", "llama-tied", "mistral"]
PARALLEL = [(2, 1), (1, 2), (2, 2)]
DEFAULT_PARALLEL = {("qwen2", 2, 2), ("llama-tied", 1, 2), ("mistral", 2, 1)}
IDS = tokens(vocab=250, batch=2, seq=64, seed=0)          # the shape verify --logits uses


def stats(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """max |diff|, KL(ref || got) per token (mean), top-1 agreement."""
    a, b = ref.double(), got.double()
    pa, pb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    return {"max_abs": float((a - b).abs().max()), "kl": float((pa.exp() * (pa - pb)).sum(-1).mean()),
            "top1": float((a.argmax(-1) == b.argmax(-1)).double().mean())}


def passes(s: dict, ref: torch.Tensor) -> bool:
    """The fp32 acceptance rule (no dtype cast involved): verify --logits' thresholds."""
    return s["max_abs"] <= max(1e-4 * float(ref.abs().max()), 1e-6) and s["kl"] <= 1e-9 and s["top1"] >= 0.98


@pytest.fixture(scope="module")
def ref(hf_model_dir):
    cache = {}

    def get(variant: str) -> torch.Tensor:
        if variant not in cache:
            cache[variant] = hf_logits(hf_model_dir(variant), IDS)
        return cache[variant]
    return get


@pytest.fixture(scope="module")
def converted(hf_model_dir, tmp_path_factory):
    cache = {}

    def get(variant: str, tp: int = 1, pp: int = 1, vpp: int | None = None, fmt: str = "torch") -> Path:
        key = (variant, tp, pp, vpp, fmt)
        if key not in cache:
            dst = tmp_path_factory.mktemp(f"rt-{variant}-{tp}{pp}{vpp}-{fmt}") / "mg"
            hf_to_megatron(hf_model_dir(variant), dst, tp=tp, pp=pp, vpp=vpp, ckpt_format=fmt, show_progress=False)
            cache[key] = dst
        return cache[key]
    return get


# ------------------------------------------------------------------ logits == transformers
@pytest.mark.parametrize("variant", [*FAMILIES, "llama3-rope", "qwen2-tied"])
def test_tp1_matches_transformers_for_every_family(converted, hf_model_dir, ref, variant):
    got = logits(converted(variant), IDS)
    assert got.shape == (2, 64, 250) and got.dtype == torch.float32
    assert (got - ref(variant)).abs().max().item() < 1e-4
    direct = logits(hf_model_dir(variant), IDS)                       # the HF source itself
    assert (direct - ref(variant)).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant,tp,pp", [
    pytest.param(v, t, p, marks=() if (v, t, p) in DEFAULT_PARALLEL else pytest.mark.slow)
    for v in FAMILIES for t, p in PARALLEL], ids=lambda x: str(x))
def test_sharded_checkpoint_matches_transformers(converted, ref, variant, tp, pp):
    spec = prepare_run(converted(variant, tp, pp))
    assert (spec.layout.tp, spec.layout.pp, spec.world, spec.native) == (tp, pp, tp * pp, True)
    got = logits(converted(variant, tp, pp), IDS, timeout_s=300)
    assert (got - ref(variant)).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant,tp", [("qwen2", 1), pytest.param("llama-tied", 2, marks=pytest.mark.slow)])
def test_virtual_pipeline(converted, ref, variant, tp):
    path = converted(variant, tp, 2, vpp=2)
    assert prepare_run(path).layout.chunks == 2
    assert (logits(path, IDS, timeout_s=300) - ref(variant)).abs().max().item() < 1e-4


@pytest.mark.slow
def test_uneven_pipeline_stages(hf_model_dir, ref, tmp_path):
    hf_to_megatron(hf_model_dir("llama-gqa"), tmp_path / "mg", pp=3, first_stage_layers=1, last_stage_layers=1,
                   ckpt_format="torch", show_progress=False)
    assert prepare_run(tmp_path / "mg").layout.stage_layer_counts() == [1, 2, 1]
    assert (logits(tmp_path / "mg", IDS, timeout_s=300) - ref("llama-gqa")).abs().max().item() < 1e-4


def test_real_megatron_checkpoint_matches_megatron_logits():
    """Written by real megatron-core (TP2 PP2, local spec, padded vocab, numpy RNG state)."""
    ref = load_file(FIXTURE / "reference_logits.safetensors")
    native = logits(FIXTURE, ref["tokens"], timeout_s=300)                 # 4 ranks, one file each
    assert native.shape == ref["logits"].shape
    assert (native - ref["logits"]).abs().max().item() < 1e-4
    resharded = logits(FIXTURE, ref["tokens"], tp=1, pp=1)                 # in-process, re-sharded
    assert (resharded - ref["logits"]).abs().max().item() < 1e-4


@pytest.mark.slow
def test_spawned_ranks():
    """The start method used for CUDA and for multi-threaded CPU ranks."""
    ref = load_file(FIXTURE / "reference_logits.safetensors")
    got = run_local(prepare_run(FIXTURE), ref["tokens"], timeout_s=600, start_method="spawn")
    assert (got - ref["logits"]).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant,tp,pp", [("llama-tied", 2, 2), pytest.param("qwen2", 2, 1, marks=pytest.mark.slow)])
def test_torch_dist_checkpoint_each_rank_reads_its_slices(converted, ref, variant, tp, pp):
    path = converted(variant, tp, pp, fmt="torch_dist")
    spec = prepare_run(path)
    assert spec.fmt == "megatron_torch_dist" and (spec.layout.tp, spec.layout.pp) == (tp, pp)
    assert (logits(path, IDS, timeout_s=300) - ref(variant)).abs().max().item() < 1e-4


def test_hf_checkpoint_at_tp2(hf_model_dir, ref):
    got = logits(hf_model_dir("qwen2"), IDS, tp=2, timeout_s=300)
    assert (got - ref("qwen2")).abs().max().item() < 1e-4


@pytest.mark.parametrize("tp", [2, 4])
def test_hf_slice_reads_equal_full_reads(hf_model_dir, tp):
    """Each rank's rows come straight from the HF file and equal a slice of the full tensor."""
    with HFReader(hf_model_dir("qwen2")) as src:
        from ckptconv.families import config_from_hf
        cfg = config_from_hf(src.config())
        padded = pad_vocab_size(cfg.vocab_size, 1, tp)                     # 252 at TP 4: 2 padding rows
        view = HFAsMegatron(src, cfg, MegatronLayout(tp, 1, cfg.num_layers), padded)
        for name, meta in view.tensors().items():
            full = view.read(name)
            for r in range(tp):
                for d, a, b in tp_pieces(tp_kind(name), meta.shape, tp, r, name):
                    assert torch.equal(view.read_slice(name, d, a, b), full.narrow(d, a, b - a)), (name, r)


@pytest.mark.parametrize("family,extra", [
    ("MistralConfig", {"sliding_window": 4}),
    ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2})])
def test_sliding_window_attention(tmp_path, family, extra):
    import transformers
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, family)(**BASE, **extra)).eval()
    model.save_pretrained(tmp_path)
    ids = tokens(250, seq=16)
    assert (logits(tmp_path, ids) - hf_logits(model, ids)).abs().max().item() < 1e-4


# ------------------------------------------------------------------ bf16
def test_bf16_execution_is_close_to_fp32(converted, ref):
    """bf16 weights and activations (norms and softmax statistics in fp32, like transformers):
    documented bound on these models: max |diff| <= 2% of max |logit|, KL <= 1e-5."""
    r = ref("llama-gqa")
    s = stats(r, logits(converted("llama-gqa"), IDS, dtype=torch.bfloat16))
    assert 0 < s["max_abs"] <= 0.02 * r.abs().max().item() and s["kl"] <= 1e-5, s
    fx = load_file(FIXTURE / "reference_logits.safetensors")                 # 4 ranks, bf16 collectives
    s = stats(fx["logits"], logits(FIXTURE, fx["tokens"], dtype=torch.bfloat16, timeout_s=300))
    assert 0 < s["max_abs"] <= 0.02 * fx["logits"].abs().max().item() and s["kl"] <= 1e-5, s


# ------------------------------------------------------------------ broken conversions
def edit_ranks(root: Path, fn) -> None:
    for f in sorted(root.glob("*/mp_rank_*/model_optim_rng.pt")):
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(f, weights_only=True)
        fn(obj["model"], obj["args"])
        torch.save(obj, f)


def kv_swap(sd, args):
    d, n = args.kv_channels, args.num_attention_heads // args.num_query_groups
    for k, w in sd.items():
        if "linear_qkv" in k and torch.is_tensor(w):
            g = w.reshape(-1, (n + 2) * d, *w.shape[1:]).clone()
            g[:, n * d:(n + 2) * d] = torch.cat([g[:, (n + 1) * d:], g[:, n * d:(n + 1) * d]], dim=1)
            sd[k] = g.reshape(w.shape)


def gate_up_swap(sd, args):
    for k, w in sd.items():
        if k.endswith("linear_fc1.weight"):
            gate, up = w.chunk(2)
            sd[k] = torch.cat([up, gate])


def vocab_padding_first(sd, args):
    """A converter that puts Megatron's vocab padding rows first: every id is shifted (TP=1 file)."""
    v = args.vocab_size
    for k in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if torch.is_tensor(sd.get(k)):
            sd[k] = torch.cat([sd[k][v:], sd[k][:v]])


BREAKS = {"kv_swap": kv_swap, "gate_up_swap": gate_up_swap, "vocab_padding_first": vocab_padding_first}


@pytest.mark.parametrize("variant", [  # the tiny mistral has llama-gqa's weights: same numbers
    *(v for v in FAMILIES if v != "mistral"), pytest.param("mistral", marks=pytest.mark.slow)])
def test_broken_conversions_differ_clearly(hf_model_dir, ref, tmp_path, variant):
    r = ref(variant)
    table = {}
    for name, fn in {"correct": None, **BREAKS}.items():
        dst = tmp_path / name
        hf_to_megatron(hf_model_dir(variant), dst, ckpt_format="torch", show_progress=False)
        if fn:
            edit_ranks(dst, fn)
        table[name] = stats(r, logits(dst, IDS))
    print(f"\n{variant} (max |logit| {r.abs().max().item():.3g}):\n" +
          "\n".join(f"  {k:20s} max_abs {v['max_abs']:.3g}  kl {v['kl']:.3g}  top1 {v['top1']:.3f}"
                    for k, v in table.items()))
    assert passes(table["correct"], r)
    for name in BREAKS:
        s = table[name]
        assert not passes(s, r), (name, s)
        # clearly: at least 100x over the max-abs threshold and 1000x over the KL threshold
        assert s["max_abs"] > 100 * 1e-4 * r.abs().max().item() and s["kl"] > 1e-6, (name, s)


def test_broken_conversion_at_tp2_differs(converted, ref, tmp_path):
    dst = tmp_path / "mg"
    shutil.copytree(converted("qwen2", 2, 1), dst)
    edit_ranks(dst, kv_swap)
    assert not passes(stats(ref("qwen2"), logits(dst, IDS, timeout_s=300)), ref("qwen2"))


# ------------------------------------------------------------------ errors
def test_more_ranks_than_nproc_is_a_clear_error():
    with pytest.raises(LayoutError, match=r"needs TP x PP = 2 x 2 = 4 ranks, but --nproc is 2"):
        logits(FIXTURE, [[1, 2, 3]], nproc=2)
    r = CliRunner().invoke(cli, ["run", str(FIXTURE), "--tokens", "1 2 3", "--nproc", "3"])
    assert r.exit_code == 2
    err = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "--nproc 4" in err[0] and str(FIXTURE) in err[0], r.output


def test_rank_errors_come_back_typed(tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, root)
    spec = prepare_run(root)
    with pytest.raises(RankFailure, match="did not finish"):
        run_local(spec, torch.tensor([[1, 2, 3]]), timeout_s=0.01)
    victim = root / "iter_0000010" / "mp_rank_01_001" / "model_optim_rng.pt"
    victim.unlink()                                            # only rank (tp 1, pp 1) notices
    with pytest.raises(MissingTensors) as e:
        run_local(spec, torch.tensor([[1, 2, 3]]), timeout_s=120)
    assert str(victim) in str(e.value)


def test_token_ids_are_checked(converted):
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        logits(converted("llama-gqa"), [[1, 250]])
    r = CliRunner().invoke(cli, ["run", str(FIXTURE), "--tokens", "1 x"])
    assert r.exit_code == 2 and "integers" in r.output


# ------------------------------------------------------------------ CLI


def test_cli_run_summary_json_and_saved_logits(tmp_path):
    ref = load_file(FIXTURE / "reference_logits.safetensors")
    before = tree_hash(FIXTURE)
    text = "; ".join(" ".join(str(int(x)) for x in row) for row in ref["tokens"])
    out, js = tmp_path / "logits.safetensors", tmp_path / "run.json"
    r = CliRunner().invoke(cli, ["run", str(FIXTURE), "--tokens", text, "--save-logits", str(out), "--json", str(js)])
    assert r.exit_code == 0, r.output
    assert "TP=2 PP=2" in r.output and "4 rank(s)" in r.output
    saved = load_file(out)
    assert torch.equal(saved["tokens"], ref["tokens"])
    assert (saved["logits"] - ref["logits"]).abs().max().item() < 1e-4
    summary = json.loads(js.read_text())
    assert summary["ranks"] == 4 and summary["logits"]["shape"] == [2, 8, 250]
    assert summary["logits"]["argmax"] == ref["logits"].argmax(-1).tolist()
    assert tree_hash(FIXTURE) == before


def test_cli_random_tokens_are_seeded():
    args = ["run", str(FIXTURE), "--random-tokens", "6", "--batch", "2", "--seed", "3", "--tp", "1", "--pp", "1",
            "--json", "-"]
    a, b = (CliRunner().invoke(cli, args) for _ in range(2))
    assert a.exit_code == 0, a.output
    sa, sb = json.loads(a.output), json.loads(b.output)
    assert sa["tokens_shape"] == [2, 6] and sa["ranks"] == 1 and sa["logits"] == sb["logits"]


# ------------------------------------------------------------------ no framework imports
BLOCKER = """
import importlib.abc, sys
BLOCKED = ("megatron", "transformer_engine", "apex")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked import of {name}")
sys.meta_path.insert(0, Block())
import pkgutil, importlib, torch, ckptconv.runtime, ckptconv.cli.run
from safetensors.torch import load_file
for m in pkgutil.walk_packages(ckptconv.runtime.__path__, "ckptconv.runtime."):
    importlib.import_module(m.name)
ref = load_file(sys.argv[1] + "/reference_logits.safetensors")
got = ckptconv.runtime.logits(sys.argv[1], ref["tokens"], timeout_s=300)   # forked ranks inherit the block
assert (got - ref["logits"]).abs().max().item() < 1e-4
bad = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not bad, bad
print("OK")
"""


def test_runtime_does_not_import_megatron_te_or_apex():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-c", BLOCKER, str(FIXTURE)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-3000:]


# ------------------------------------------------------------------ torchrun
@pytest.mark.slow
def test_same_entry_point_under_torchrun(tmp_path):
    ref = load_file(FIXTURE / "reference_logits.safetensors")
    torchrun = Path(sys.executable).parent / "torchrun"
    ckptconv = Path(sys.executable).parent / "ckptconv"
    text = "; ".join(" ".join(str(int(x)) for x in row) for row in ref["tokens"])
    out = tmp_path / "logits.safetensors"
    r = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "4", "--no-python", str(ckptconv), "run",
                        str(FIXTURE), "--launcher", "torchrun", "--tokens", text, "--save-logits", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("ran llama") == 1                  # only rank 0 reports
    assert (load_file(out)["logits"] - ref["logits"]).abs().max().item() < 1e-4
