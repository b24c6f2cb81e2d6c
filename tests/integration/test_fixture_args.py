"""Issue 18.7: the args in every Megatron fixture real megatron-core wrote are what Megatron-LM's
own ``parse_args`` gives (fixtures/megatron_args/): every field of Megatron-LM's parser for that
megatron-core release, at its default unless the fixture's command line sets it, and no field
Megatron-LM does not have. Hand-built args (a Namespace of the ~70 fields a script thought of,
``norm_epsilon`` instead of 0.16's ``layernorm_epsilon``) fail this.

The same for the Megatron-DeepSpeed fixtures (fixtures/deepspeed/, made by
fixtures/make_megatron_deepspeed_fixture.py): their args are what the fork's own ``parse_args``
gives (its parser + DeepSpeed's ``add_config_arguments``, megatron_deepspeed_args.json); the old
hand-built Namespace (~30 fields and a ``position_embedding_type`` the fork does not have) fails.

The args are read with torch's own DCP reader and ``torch.load(weights_only=True)``, not ckptconv."""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from safe_load import MegatronObject, load_megatron_file

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
LISTS = FIXTURES / "megatron_args"
# fixture -> (file holding rank 0's args, generated list of the Megatron-LM it was saved with)
REAL = {
    "megatron_torch_tp2pp2": ("iter_0000010/mp_rank_00_000/model_optim_rng.pt", "megatron_lm_args.json"),
    "megatron_dist_tp2pp2": ("iter_0000010/common.pt", "megatron_lm_args.json"),
    "megatron_dist_tp1": ("iter_0000010/common.pt", "megatron_lm_args.json"),
    "megatron_moe_torch_ep2": ("iter_0000010/mp_rank_00_000/model_optim_rng.pt", "megatron_lm_args.json"),
    "megatron_moe_tp2pp2ep2/torch": ("iter_0000010/mp_rank_00_000_000/model_optim_rng.pt", "megatron_lm_args.json"),
    "megatron_moe_tp2pp2ep2/torch_dist": ("iter_0000010/common.pt", "megatron_lm_args.json"),
    "megatron019_dist_tp2pp2": ("iter_0000010", "megatron_lm_args_0.19.json"),
    "megatron019_dist_tp1": ("iter_0000010", "megatron_lm_args_0.19.json"),
}
# the fields the fixtures' command lines set (fixtures/make_megatron_*_fixture.py) and the parser
# fields Megatron-LM fills in itself (padded_vocab_size: the tokenizer's padding); every other parser
# field must hold Megatron-LM's default
FLAGS = {"padded_vocab_size",
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels",
    "group_query_attention", "num_query_groups", "max_position_embeddings", "seq_length",
    "position_embedding_type", "normalization", "swiglu", "add_bias_linear", "add_qkv_bias",
    "untie_embeddings_and_output_weights", "hidden_dropout", "attention_dropout", "init_method_std",
    "use_cpu_initialization", "vocab_size", "make_vocab_size_divisible_by", "tokenizer_type",
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "transformer_impl", "seed",
    "micro_batch_size", "global_batch_size", "train_iters", "ckpt_format", "save", "no_save_optim",
    "lr", "min_lr", "weight_decay", "clip_grad", "lr_decay_style", "verify_integrity",
    "num_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_token_dispatcher_type",
    "moe_aux_loss_coeff", "expert_model_parallel_size", "expert_tensor_parallel_size",
}


class _RawBytes(dcp.DefaultLoadPlanner):
    """Keeps a BYTES item's bytes (the default planner unpickles them with weights_only=False)."""
    raw: dict = {}

    def load_bytes(self, read_item, value) -> None:
        self.raw = {**self.raw, read_item.dest_index.fqn: value.read()}


def fixture_args(name: str):
    where, _ = REAL[name]
    path = FIXTURES / name / where
    if path.is_file():
        return load_megatron_file(path)["args"]
    planner = _RawBytes()                                  # megatron-core 0.19: no common.pt
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({"common_state/shard_0_1": io.BytesIO()}, storage_reader=dcp.FileSystemReader(str(path)),
                 planner=planner, no_dist=True)
    (common,) = load_megatron_file(io.BytesIO(planner.raw["common_state/shard_0_1"]))
    return common["args"]


@pytest.mark.parametrize("name", REAL)
def test_fixture_args_are_megatron_lms_parse_args(name):
    listed = json.loads((LISTS / REAL[name][1]).read_text())
    fields = listed["fields"]
    args = vars(fixture_args(name))
    missing = sorted(set(fields) - set(args))
    assert not missing, f"{name}: {len(missing)} Megatron-LM parser fields absent, e.g. {missing[:5]}"
    known = set(fields) | set(listed["derived_by_parse_and_validate_args"]) | {"iteration"}
    assert not sorted(set(args) - known), f"{name}: not Megatron-LM fields: {sorted(set(args) - known)}"
    changed = sorted(k for k, f in fields.items() if k not in FLAGS and not _is_default(args[k], f["default"]))
    assert not changed, f"{name}: fields off Megatron-LM's default without a flag: {changed}"
    # what only Megatron-LM's parser defaults give: its own enum object and 0.16's names
    assert isinstance(args["attention_backend"], MegatronObject)
    assert args["attention_backend"].qualname == "megatron.core.transformer.enums.AttnBackend"
    assert args["layernorm_epsilon"] == 1e-5 and "norm_epsilon" not in args
    assert args["use_dist_ckpt"] == (args["ckpt_format"] != "torch")


def _is_default(value, default) -> bool:
    if isinstance(default, dict) and "enum" in default:
        return isinstance(value, MegatronObject) and value.qualname == default["enum"].replace(":", ".")
    if isinstance(value, tuple):
        value = list(value)
    return value == default or (isinstance(default, str) and default == repr(value))


# Megatron-DeepSpeed fixtures: rank 0's DeepSpeed model-states file holds client_state["args"]
FORK = ["megatron_tp2dp2_bf16", "pipe_pp2_tied", "pipe_tp2pp2"]
# what make_megatron_deepspeed_fixture.megatron_args sets on the fork's parser fields
FORK_FLAGS = {
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "num_key_value_heads", "kv_channels", "seq_length", "encoder_seq_length", "max_position_embeddings",
    "make_vocab_size_divisible_by", "swiglu", "normalization", "add_bias_linear", "use_rotary_position_embeddings",
    "apply_query_key_layer_scaling", "attention_dropout", "hidden_dropout",
    "add_position_embedding", "untie_embeddings_and_output_weights", "tokenizer_type",
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "no_pipeline_parallel", "micro_batch_size",
    "global_batch_size", "lr", "bf16", "accumulate_allreduce_grads_in_fp32", "deepspeed", "zero_stage", "seed",
    "num_experts",   # None instead of the fork's [1] (refused when the fixtures were made; the script says why)
}


@pytest.mark.parametrize("name", FORK)
def test_megatron_deepspeed_fixture_args_are_the_forks_parse_args(name):
    listed = json.loads((LISTS / "megatron_deepspeed_args.json").read_text())
    fields = listed["fields"]
    case = json.loads((FIXTURES / "deepspeed" / name / "case.json").read_text())
    args = vars(load_megatron_file(FIXTURES / "deepspeed" / name / "checkpoint" / "global_step2"
                                   / "mp_rank_00_model_states.pt")["args"])
    missing = sorted(set(fields) - set(args))
    assert not missing, f"{name}: {len(missing)} Megatron-DeepSpeed parser fields absent, e.g. {missing[:5]}"
    known = set(fields) | {"iteration"} | {k for key in ("derived_by_parse_and_validate_args",
                                                         "set_by_build_tokenizer", "set_by_training")
                                           for k in listed[key]}
    assert not sorted(set(args) - known), f"{name}: not Megatron-DeepSpeed fields: {sorted(set(args) - known)}"
    changed = sorted(k for k, f in fields.items() if k not in FORK_FLAGS and not _is_default(args[k], f["default"]))
    assert not changed, f"{name}: fields off the fork's default without a flag: {changed}"
    # DeepSpeed's own config arguments, and what validate_args / the tokenizer / get_model set
    assert set(listed["added_by_deepspeed_add_config_arguments"]) >= {"deepspeed", "deepspeed_config"}
    assert args["deepspeed"] is True and args["deepspeed_config"] is None
    assert (args["tensor_model_parallel_size"], args["pipeline_model_parallel_size"]) == (case["tp"], case.get("pp", 1))
    assert args["ds_pipeline_enabled"] == (not args["no_pipeline_parallel"]) == bool(case.get("pipe"))
    assert args["data_parallel_size"] * case["tp"] * case.get("pp", 1) == args["world_size"] == case["world_size"]
    assert args["params_dtype"] == (torch.bfloat16 if case["dtype"] == "bf16" else torch.float32)
    assert args["bf16"] == args["accumulate_allreduce_grads_in_fp32"] == (case["dtype"] == "bf16")
    assert args["padded_vocab_size"] == case["padded_vocab_size"]
    assert isinstance(args["model_type"], MegatronObject)
    assert (args["model_type"].qualname, args["model_type"].args) == ("megatron.core.enums.ModelType", (1,))
    assert "position_embedding_type" not in args and args["rope_theta"] == 10000
