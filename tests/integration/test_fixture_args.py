"""Issue 18.7: the args in every Megatron fixture real megatron-core wrote are what Megatron-LM's
own ``parse_args`` gives (fixtures/megatron_args/): every field of Megatron-LM's parser for that
megatron-core release, at its default unless the fixture's command line sets it, and no field
Megatron-LM does not have. Hand-built args (a Namespace of the ~70 fields a script thought of,
``norm_epsilon`` instead of 0.16's ``layernorm_epsilon``) fail this.

The args are read with torch's own DCP reader and ``torch.load(weights_only=True)``, not ckptconv."""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import pytest
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
