"""DeepSpeed checkpoints written by real DeepSpeed 0.19.8 (fixtures/deepspeed/, see its README):
consolidation equals DeepSpeed's own zero_to_fp32 bit for bit, the HF output gives the trained
model's logits in transformers, module weights equal the engine's, and bad or malicious input
gets a one-line error without output. DeepSpeed itself is never needed (nor importable here)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptconv.formats.detect import detect_format
from tiny_models import hf_logits
from helpers import one_line_error, run, tree_hash

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "fixtures" / "deepspeed"
CASES = sorted(p.name for p in FIX.iterdir() if (p / "case.json").is_file())
INFO = {c: json.loads((FIX / c / "case.json").read_text()) for c in CASES}
ZERO = [c for c in CASES if not (INFO[c].get("pipe") or INFO[c].get("megatron") or INFO[c].get("mixtral"))]
MOE = [c for c in CASES if INFO[c].get("mixtral")]     # engine names: packed experts; HF output: hub layout
MEGATRON_DS = [c for c in CASES if INFO[c].get("pipe") or INFO[c].get("megatron")]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """case -> HF directory written by `deepspeed-to-hf --weights master` (once per case)."""
    out, cache = tmp_path_factory.mktemp("ds-hf"), {}

    def get(case: str) -> Path:
        if case not in cache:
            d = FIX / case
            before = tree_hash(d)
            r = run("deepspeed-to-hf", d / "checkpoint", out / case, "--hf-config", d / "config.json", "--json")
            assert r.exit_code == 0, r.output
            assert tree_hash(d) == before          # inputs are never modified
            cache[case] = out / case
        return cache[case]
    return get


def test_fixture_set_covers_the_issue():
    opts = [INFO[c] for c in CASES]
    assert {o.get("stage") for o in opts} >= {1, 2, 3} and {o["dtype"] for o in opts} == {"bf16", "fp32"}
    for flag in ("tie", "freeze", "two_groups", "grad_accum_fp32", "pipe", "megatron"):
        assert any(o.get(flag) for o in opts), flag
    assert any(o.get("size") == "odd" for o in opts) and all(o["world_size"] >= 2 for o in opts)
    assert sum(f.stat().st_size for f in FIX.rglob("*") if f.is_file()) < 10_000_000


@pytest.mark.parametrize("case", [c for c in ZERO if INFO[c]["zero_to_fp32"]["produced"]])
def test_master_equals_deepspeed_zero_to_fp32_bit_for_bit(converted, case):
    ours = load_file(converted(case) / "model.safetensors")
    theirs = load_file(FIX / case / "zero_to_fp32" / "model.safetensors")
    tied = {"lm_head.weight"} if INFO[case].get("tie") else set()
    assert set(theirs) - set(ours) == tied and set(ours) <= set(theirs)
    for name, t in ours.items():
        assert t.dtype == theirs[name].dtype and torch.equal(t, theirs[name]), name


def test_bf16_optimizer_which_zero_to_fp32_refuses(converted):
    info = INFO["bf16_optimizer"]
    assert info["optimizer"] == "BF16_Optimizer" and not info["zero_to_fp32"]["produced"]
    assert "is not a zero checkpoint" in info["zero_to_fp32"]["runs"][0]["last_line"]
    ours = load_file(converted("bf16_optimizer") / "model.safetensors")
    engine = load_file(FIX / "bf16_optimizer" / "master_weights.safetensors")   # safe_get_full_fp32_param
    assert set(ours) == set(engine) and all(torch.equal(ours[n], engine[n]) for n in ours)


@pytest.mark.parametrize("case", CASES)
def test_hf_output_loads_and_gives_the_trained_logits(converted, case):
    ref = load_file(FIX / case / "reference_logits.safetensors")
    logits = hf_logits(converted(case), ref["tokens"])
    assert logits.shape == ref["logits"].shape
    assert (logits - ref["logits"]).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", [c for c in ZERO if INFO[c]["stage"] != 3])
def test_module_weights_equal_the_engines(tmp_path, case):
    d = FIX / case
    r = run("deepspeed-to-hf", d / "checkpoint", tmp_path / "hf", "--weights", "module", "--hf-config", d)
    assert r.exit_code == 0, r.output
    ours = load_file(tmp_path / "hf" / "model.safetensors")
    engine = load_file(d / "module_weights.safetensors")
    tied = {"lm_head.weight"} if INFO[case].get("tie") else set()
    assert set(engine) - set(ours) == tied
    assert all(ours[n].dtype == engine[n].dtype and torch.equal(ours[n], engine[n]) for n in ours)


@pytest.mark.parametrize("case", [c for c in ZERO if INFO[c]["stage"] == 3])
def test_stage3_module_weights_are_what_deepspeed_gathers(tmp_path, converted, case):
    """Stage 3 saves no module weights; --weights module gives the fp32 masters rounded to the
    engine's dtype, bit-equal to DeepSpeed's own _zero3_consolidated_16bit_state_dict."""
    d = FIX / case
    r = run("deepspeed-to-hf", d / "checkpoint", tmp_path / "hf", "--weights", "module", "--hf-config", d)
    assert r.exit_code == 0, r.output
    dtype = {"bf16": "bfloat16", "fp32": "float32"}[INFO[case]["dtype"]]
    assert f"fp32 masters rounded to {dtype}" in r.output
    ours = load_file(tmp_path / "hf" / "model.safetensors")
    engine = load_file(d / "module_weights.safetensors")          # _zero3_consolidated_16bit_state_dict
    tied = {"lm_head.weight"} if INFO[case].get("tie") else set()
    assert set(engine) - set(ours) == tied and set(ours) <= set(engine)
    assert all(ours[n].dtype == engine[n].dtype and torch.equal(ours[n], engine[n]) for n in ours)
    masters = load_file(converted(case) / "model.safetensors")     # --weights master stays exact fp32
    assert all(m.dtype == torch.float32 for m in masters.values())
    assert any(not torch.equal(masters[n], ours[n].float()) for n in ours) == (dtype != "float32")


def test_stage3_fp16_module_weights_follow_the_rounding_rule(tmp_path, converted):
    """fp16 does not run on CPU, so no real fp16 stage-3 save exists here: the same bf16 save with
    its ds_config switched to fp16 gives the masters rounded to nearest-even fp16 (what
    DeepSpeed's fp32 -> fp16 partition copy does)."""
    case = tmp_path / "z3_fp16"
    shutil.copytree(FIX / "z3_bf16", case)
    for f in (case / "checkpoint" / "global_step2").glob("zero_pp_rank_*_model_states.pt"):
        sd = torch.load(f, weights_only=True)
        sd["ds_config"] = {**sd["ds_config"], "bf16": {"enabled": False}, "fp16": {"enabled": True}}
        torch.save(sd, f)
    r = run("deepspeed-to-hf", case / "checkpoint", tmp_path / "hf", "--weights", "module", "--hf-config", case)
    assert r.exit_code == 0 and "fp32 masters rounded to float16" in r.output, r.output
    ours = load_file(tmp_path / "hf" / "model.safetensors")
    masters = load_file(converted("z3_bf16") / "model.safetensors")
    for n, t in ours.items():
        assert t.dtype == torch.float16 and torch.equal(t, masters[n].to(torch.float16)), n
        assert torch.equal(t.view(torch.int16), masters[n].half().view(torch.int16))


@pytest.mark.parametrize("case", MEGATRON_DS)
def test_megatron_deepspeed_master_and_module(tmp_path, converted, case):
    """Pipeline (TP x PP layer files) and GPTModel (TP x DP, ZeRO-1) checkpoints of the fork,
    which DeepSpeed's zero_to_fp32 cannot read."""
    d, info = FIX / case, INFO[case]
    assert not info["zero_to_fp32"]["produced"]
    r = run("deepspeed-to-hf", d / "checkpoint", tmp_path / "module", "--weights", "module", "--hf-config", d)
    assert r.exit_code == 0, r.output
    master = load_file(converted(case) / "model.safetensors")
    module = load_file(tmp_path / "module" / "model.safetensors")
    assert all(torch.equal(master[n].to(module[n].dtype), module[n]) for n in master)
    # without an HF config the architecture comes from the fork's args; the padded vocab is kept
    r = run("deepspeed-to-hf", d / "checkpoint", tmp_path / "from_args", "--json")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "from_args" / "config.json").read_text())
    assert cfg["vocab_size"] == info["padded_vocab_size"] and cfg["model_type"] == "llama"
    ref = load_file(d / "reference_logits.safetensors")
    logits = hf_logits(tmp_path / "from_args", ref["tokens"])[..., :ref["logits"].shape[-1]]
    assert (logits - ref["logits"]).abs().max().item() < 1e-4


def test_verify_inspect_and_detection(tmp_path, converted):
    ckpt = FIX / "z3_bf16_frozen_2groups" / "checkpoint"
    assert detect_format(ckpt) == "deepspeed" and detect_format(ckpt / "global_step2") == "deepspeed"
    r = run("inspect", ckpt, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert (info["format"], info["stage"], info["world_size"], info["dtype"]) == ("deepspeed", 3, 2, "bf16")
    assert info["frozen_params"] == ["model.embed_tokens.weight"] and len(info["param_groups"]) == 2
    assert info["tags"] == ["global_step2"] and info["family"] == "llama" and not info["has_module_weights"]
    assert run("verify", ckpt, converted("z3_bf16_frozen_2groups")).exit_code == 0
    # an HF Trainer checkpoint-N/ with both HF weights and a DeepSpeed tag: autodetect prefers HF,
    # deepspeed-to-hf reads the DeepSpeed part when asked
    trainer = tmp_path / "checkpoint-2"
    shutil.copytree(FIX / "z2_bf16_tied" / "checkpoint", trainer)
    shutil.copy(converted("z2_bf16_tied") / "model.safetensors", trainer)
    assert detect_format(trainer) == "hf"
    assert run("deepspeed-to-hf", trainer, tmp_path / "hf").exit_code == 0
    assert run("verify", trainer, tmp_path / "hf").exit_code == 0
    pipe = json.loads(run("inspect", FIX / "pipe_tp2pp2" / "checkpoint", "--json").output)
    assert (pipe["tp"], pipe["pp"], pipe["layout"]) == (2, 2, "megatron_deepspeed pipeline")


def test_to_megatron_and_back_is_exact(tmp_path, converted):
    d = FIX / "z2_fp32"
    r = run("deepspeed-to-megatron", d / "checkpoint", tmp_path / "mg", "--tp", 2, "--pp", 2, "--hf-config", d)
    assert r.exit_code == 0, r.output
    assert run("megatron-to-hf", tmp_path / "mg", tmp_path / "hf").exit_code == 0
    back, ours = load_file(tmp_path / "hf" / "model.safetensors"), load_file(converted("z2_fp32") / "model.safetensors")
    assert set(back) == set(ours) and all(torch.equal(back[n], ours[n]) for n in ours)


def test_reads_every_fixture_with_deepspeed_and_megatron_unimportable(tmp_path):
    runs = [(c, w) for c in CASES for w in ("master", "module") if w == "master" or INFO[c].get("stage") != 3]
    script = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("deepspeed", "megatron"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
for m in ("deepspeed", "megatron"):
    try:
        __import__(m)
        raise SystemExit(m + " importable")
    except ImportError:
        pass
from pathlib import Path
from ckptconv.engine.deepspeed_convert import open_deepspeed
n = 0
for case, weights in {runs!r}:
    d = Path({str(FIX)!r}) / case
    with open_deepspeed(d / "checkpoint", weights=weights, hf_config=d / "config.json") as src:
        for name in src.tensors():
            src.read(name)
            n += 1
assert not [m for m in sys.modules if m.split(".")[0] in ("deepspeed", "megatron")]
print("read", n)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) > 14 * len(runs)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, victim):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIX / "z2_fp32" / "checkpoint", ckpt)
    marker = tmp_path / "pwned"
    torch.save({"module": {}, "optimizer_state_dict": _Payload(marker)}, ckpt / "global_step2" / victim)
    one_line_error(run("deepspeed-to-hf", ckpt, tmp_path / "hf", "--hf-config", FIX / "z2_fp32"),
                   "forbidden global", victim)
    assert not marker.exists() and not (tmp_path / "hf").exists()
    one_line_error(run("inspect", ckpt), "forbidden global")
    assert not marker.exists()


def test_bad_inputs_exit_2_with_one_line(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIX / "z2_fp32" / "checkpoint", ckpt)
    cfg = FIX / "z2_fp32" / "config.json"
    out = tmp_path / "hf"
    one_line_error(run("deepspeed-to-hf", ckpt, out), "config.json", "--hf-config")
    (ckpt / "latest").write_text("global_step9")
    one_line_error(run("deepspeed-to-hf", ckpt, out, "--hf-config", cfg), "global_step9", "Fix:")
    one_line_error(run("deepspeed-to-hf", ckpt, out, "--hf-config", cfg, "--tag", "global_step7"), "global_step7")
    assert run("deepspeed-to-hf", ckpt, out, "--hf-config", cfg, "--tag", "2").exit_code == 0
    (ckpt / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    one_line_error(run("deepspeed-to-hf", ckpt, tmp_path / "hf2", "--hf-config", cfg, "--tag", "global_step2"),
                   "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rank 1")
    r = run("deepspeed-to-hf", ckpt, tmp_path / "hf3", "--hf-config", cfg, "--tag", "global_step2",
            "--weights", "module")
    assert r.exit_code == 0, r.output                         # the module weights do not need the optimizer files
    r = run("deepspeed-to-hf", FIX / "z1_bf16" / "checkpoint", tmp_path / "dry", "--dry-run", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["stage"] == 1 and not (tmp_path / "dry").exists()
    assert not (tmp_path / "hf2").exists()


def test_gpt_style_megatron_deepspeed_is_refused_by_name(tmp_path):
    """A fork checkpoint with learned position embeddings (GPT-2 / BLOOM style) has no family table:
    exit 2 naming the tensor, nothing written."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIX / "pipe_pp2_tied" / "checkpoint", ckpt)
    layer = ckpt / "global_step2" / "layer_01-model_states.pt"
    sd = torch.load(layer, weights_only=True)
    sd["position_embeddings.weight"] = torch.zeros(64, 32)
    torch.save(sd, layer)
    one_line_error(run("deepspeed-to-hf", ckpt, tmp_path / "hf"), "position embeddings", "position_embeddings.weight")
    assert not (tmp_path / "hf").exists()


def _with_fork_args(tmp_path, case: str, **fields) -> Path:
    """A copy of a Megatron-DeepSpeed fixture whose args carry ``fields`` in every rank's file."""
    from safe_load import load_megatron_file, save_megatron_file

    ckpt = tmp_path / f"ckpt-{case}"
    shutil.copytree(FIX / case / "checkpoint", ckpt)
    for f in sorted((ckpt / "global_step2").glob("mp_rank_*_model_states.pt")):
        state = load_megatron_file(f)
        for k, v in fields.items():
            setattr(state["args"], k, v)
        save_megatron_file(state, f)
    return ckpt


@pytest.mark.parametrize("case", ["pipe_pp2_tied", "megatron_tp2dp2_bf16"])
def test_fork_dense_encodings_are_read_as_dense(tmp_path, case):
    """The fork's validate_args sets encoder_num_layers = num_layers and its --num-experts default is
    [1] (no MoE): real fork checkpoints carry both. They convert exactly as the fixture without them
    (which was refused with exit 2 before: encoder_num_layers must be None, num_experts a number)."""
    layers = INFO[case].get("num_layers") or json.loads((FIX / case / "config.json").read_text())["num_hidden_layers"]
    ckpt = _with_fork_args(tmp_path, case, encoder_num_layers=layers, num_experts=[1])
    r = run("deepspeed-to-hf", ckpt, tmp_path / "hf")
    assert r.exit_code == 0, r.output
    r = run("deepspeed-to-hf", FIX / case / "checkpoint", tmp_path / "ref")
    assert r.exit_code == 0, r.output
    got, ref = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_fork_moe_args_are_still_refused(tmp_path):
    """A fork checkpoint whose --num-experts says MoE ([4]) is not a dense model: exit 2, nothing written."""
    ckpt = _with_fork_args(tmp_path, "pipe_pp2_tied", num_experts=[4])
    r = run("deepspeed-to-hf", ckpt, tmp_path / "hf")
    assert r.exit_code == 2 and "num_experts" in r.output, r.output
    assert not (tmp_path / "hf").exists()
