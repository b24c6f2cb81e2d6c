"""Issue 18.8: every field of Megatron-LM's own argument parser is mapped, neutral or refused
unless at its default; refused fields are refused (exit 2 naming the field), mapped ones are read.

The field list is generated from Megatron-LM's megatron/training/arguments.py by
fixtures/megatron_args/generate.py (see fixtures/README.md)."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from ckptconv.errors import CkptError, UnsupportedFamily
from ckptconv.formats.detect import detect_format
from ckptconv.formats.megatron import open_megatron_reader
from ckptconv.formats.megatron_args import config_from_args
from ckptconv.formats.megatron_args_fields import MAPPED, NEUTRAL, REFUSED_UNLESS

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
LISTED = json.loads((FIXTURES / "megatron_args" / "megatron_lm_args.json").read_text())
FIELDS = LISTED["fields"]
# every Megatron-LM release ckptconv claims: core_v0.16.1 (megatron-core 0.16.1) and core_v0.19.0 (0.19.2)
LISTS = {"0.16": LISTED,
         "0.19": json.loads((FIXTURES / "megatron_args" / "megatron_lm_args_0.19.json").read_text())}


def test_field_list_is_megatrons_own():
    assert LISTED["source"].startswith("NVIDIA/Megatron-LM megatron/training/arguments.py")
    assert LISTED["tag"].startswith("core_v") and len(LISTED["commit"]) == 40
    # a few fields every Megatron-LM of this generation defines, with its own defaults
    assert FIELDS["rotary_percent"]["default"] == 1.0 and FIELDS["normalization"]["default"] == "LayerNorm"
    assert FIELDS["layernorm_epsilon"]["default"] == 1e-5 and "norm_epsilon" not in FIELDS
    assert len(FIELDS) > 500


def test_both_lists_are_megatrons_own():
    assert [LISTS[k]["tag"] for k in LISTS] == ["core_v0.16.1", "core_v0.19.0"]
    assert LISTS["0.19"]["megatron_core"] == "0.19.2" and len(LISTS["0.19"]["fields"]) > len(FIELDS)
    assert "use_mup" in LISTS["0.19"]["fields"] and "use_mup" not in FIELDS


@pytest.mark.parametrize("release", LISTS)
def test_every_megatron_field_is_mapped_neutral_or_refused(release):
    tables = {"mapped": MAPPED, "neutral": NEUTRAL, "refused": set(REFUSED_UNLESS)}
    every = [*LISTS[release]["fields"], *LISTS[release]["derived_by_parse_and_validate_args"]]
    unclassified = sorted(f for f in every if not any(f in t for t in tables.values()))
    assert not unclassified, f"classify these Megatron-LM args fields in megatron_args_fields.py: {unclassified}"
    twice = sorted(f for f in every if sum(f in t for t in tables.values()) > 1)
    assert not twice, twice


@pytest.mark.parametrize("release,field", [(r, f) for r in LISTS
                                           for f in sorted(set(REFUSED_UNLESS) & set(LISTS[r]["fields"]))])
def test_refused_default_is_accepted_or_a_supported_value(release, field):
    """The accepted values of a refused field include Megatron's default, unless the readers
    need another value there (a Megatron default ckptconv does not support is refused)."""
    default = LISTS[release]["fields"][field]["default"]
    accepted = [list(a) if isinstance(a, tuple) else a for a in REFUSED_UNLESS[field]]
    assert default in accepted or field in {"position_embedding_type"}, (field, default, accepted)


@pytest.fixture(scope="module")
def real_args():
    root = FIXTURES / "megatron_torch_tp2pp2"       # written by real megatron-core
    with open_megatron_reader(root, detect_format(root), "latest") as r:
        return r.args


def _other(v):
    """A value different from ``v`` of a plausible type."""
    if isinstance(v, bool):
        return not v
    if v is None:
        return 3
    if isinstance(v, (int, float)):
        return v * 2 + 1
    if isinstance(v, str):
        return v + "_other"
    if isinstance(v, (list, tuple)):
        return [7, 7]
    return "other"


@pytest.mark.parametrize("field", sorted(REFUSED_UNLESS))
def test_refused_field_is_refused_naming_it(real_args, field):
    args = argparse.Namespace(**vars(real_args))
    setattr(args, field, _other(REFUSED_UNLESS[field][0]))
    with pytest.raises(UnsupportedFamily, match=field) as ei:
        config_from_args(args)
    assert "Fix:" in str(ei.value)
    with pytest.raises(UnsupportedFamily, match=field):     # a carried HF config does not hide it
        config_from_args(args, {"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    setattr(args, field, REFUSED_UNLESS[field][0])
    config_from_args(args)


MODEL_FIELDS = sorted(MAPPED - {"tensor_model_parallel_size", "pipeline_model_parallel_size",
                                "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
                                "num_layers_per_virtual_pipeline_stage", "num_virtual_stages_per_pipeline_rank",
                                "virtual_pipeline_model_parallel_size", "transformer_impl", "padded_vocab_size",
                                "group_query_attention", "use_rope_scaling"})


# fields that act only together with another one (Megatron-Core ignores them otherwise)
_GPT2 = {"swiglu": False, "normalization": "LayerNorm", "add_bias_linear": True,
         "position_embedding_type": "learned_absolute", "openai_gelu": True, "gated_linear_unit": False}
COMPANIONS = {"gated_linear_unit": _GPT2, "openai_gelu": _GPT2, "window_attn_skip_freq": {"window_size": (4, 0)}}


@pytest.mark.parametrize("field", MODEL_FIELDS)
def test_mapped_field_is_read(real_args, field):
    """Changing a mapped model field changes the config read, or is refused: it is not ignored.
    (The layout fields are exercised by every reshard test; group_query_attention and
    use_rope_scaling gate num_query_groups / rope_scaling_factor, perturbed with them.)"""
    args = argparse.Namespace(**{**vars(real_args), "use_rope_scaling": True, "group_query_attention": True,
                                 **COMPANIONS.get(field, {})})
    if field == "rope_scaling_factor":
        args.rope_scaling_factor = 8.0
    base = asdict(config_from_args(args))
    value = getattr(args, field, None)
    if field == "norm_epsilon":          # older Megatron-LM's name (0.16 names it layernorm_epsilon)
        vars(args).pop("layernorm_epsilon", None)
    setattr(args, field, _other(value) if field != "normalization" else "LayerNorm")
    try:
        got = asdict(config_from_args(args))
    except CkptError:
        return
    assert got != base, f"args.{field} {value!r} -> {getattr(args, field)!r} left the config unchanged"
