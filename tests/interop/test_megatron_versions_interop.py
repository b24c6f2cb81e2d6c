"""torch_dist across megatron-core versions, against the megatron-core of this run (.ci/run runs the
suite once in a 0.16.1 venv and once in a 0.19.x venv; what each version must do is data here,
never a skip):

* the common state real megatron-core saved (0.16: common.pt, 0.19: the common_state item) reads
  in our reader exactly as megatron's own ``load_common_state_dict`` returns it, and megatron reads
  ours back as we wrote it;
* every real fixture, whichever version wrote it, resharded by us loads strictly in this version
  (with ``verify_integrity=True`` where the version has it) and reproduces the logits of the model
  that saved it: a 0.16 save made loadable in 0.19 and a 0.19 save made loadable in 0.16;
* a real save loads as-is exactly where megatron-core's own rules say (0.19 loads 0.16's common.pt,
  0.16 cannot load a 0.19 save), and a changed file fails megatron's integrity check (0.19).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", exc_type=ImportError)

from safetensors.torch import load_file  # noqa: E402

from ckptconv import hf_to_megatron  # noqa: E402
from ckptconv.engine.reshard import reshard  # noqa: E402
from ckptconv.formats.megatron_dist import MegatronDistReader  # noqa: E402
from ckptconv.formats.safe_pickle import LazyTensor  # noqa: E402
from mcore_dist_harness import (dist_iteration_dir, has_integrity_check, mcore_version,  # noqa: E402
                                megatron_dist_logits, read_dist_common)
from mcore_harness import MegatronHarnessError  # noqa: E402
from safe_load import comparable  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
MCORE = mcore_version()
HAS_INTEGRITY_CHECK = has_integrity_check()      # load(..., verify_integrity=True): 0.17.1+
# real fixture -> (megatron-core version that wrote it, TP/PP it is loaded at / resharded to here)
REAL = {
    "megatron_dist_tp2pp2": ((0, 16), (1, 1), (1, 2)),
    "megatron_dist_tp1": ((0, 16), (2, 2), (2, 1)),
    "megatron019_dist_tp2pp2": ((0, 19), (1, 2), (2, 1)),
    "megatron019_dist_tp1": ((0, 19), (2, 1), (1, 1)),       # 1 layer: PP 1 only
}
# megatron-core's rule: 0.19 reads common.pt when present, else the item; <= 0.18 needs common.pt
# (checked by hand in 0.17.1 and 0.18.2 venvs too)
LOADS_AS_IS = {name: MCORE >= (0, 19) or made_by < (0, 19) for name, (made_by, *_) in REAL.items()}


def same(a, b) -> bool:
    """Recursive equality of common-state values (tensors exactly, Namespaces by their fields)."""
    a = a.load() if isinstance(a, LazyTensor) else a          # our reader's tensors load on demand
    if isinstance(a, argparse.Namespace) and isinstance(b, argparse.Namespace):
        return same(vars(a), vars(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if comparable(a) is not a or comparable(b) is not b:     # a megatron-core object (AttnBackend.auto in
        return comparable(a) == comparable(b)                # args): ours an inert placeholder, theirs real
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("name", [n for n, ok in LOADS_AS_IS.items() if ok])
def test_common_state_reads_as_megatron_reads_it(name):
    theirs = read_dist_common(dist_iteration_dir(FIXTURES / name))
    with MegatronDistReader(FIXTURES / name) as r:
        assert set(theirs) <= set(r.common)
        for key in theirs:
            assert same(r.common[key], theirs[key]), key


def test_megatron_reads_our_common_state(hf_model_dir, tmp_path):
    hf_to_megatron(hf_model_dir("llama-gqa"), tmp_path / "mg", tp=2, pp=2, show_progress=False)
    theirs = read_dist_common(tmp_path / "mg" / "release")
    with MegatronDistReader(tmp_path / "mg") as r:
        assert same(dict(r.common), theirs)
        assert theirs["args"].tensor_model_parallel_size == 2 and theirs["checkpoint_version"] == 3.0


@pytest.mark.parametrize("name", REAL)
def test_real_save_loads_here_exactly_as_megatron_core_rules_say(name):
    _, (tp, pp), _ = REAL[name]
    ref = load_file(FIXTURES / name / "reference_logits.safetensors")
    if LOADS_AS_IS[name]:
        integrity = HAS_INTEGRITY_CHECK and (dist_iteration_dir(FIXTURES / name) / "integrity.json").is_file()
        got = megatron_dist_logits(FIXTURES / name, ref["tokens"], tp=tp, pp=pp, verify_integrity=integrity)
        assert (got - ref["logits"]).abs().max().item() < 1e-4
    else:
        with pytest.raises(MegatronHarnessError, match="common.pt"):
            megatron_dist_logits(FIXTURES / name, ref["tokens"], tp=tp, pp=pp)


@pytest.mark.parametrize("name", REAL)
def test_resharded_real_save_loads_here(name, tmp_path):
    """Whichever version saved it: our reshard output loads strictly in this megatron-core (with its
    integrity check where it has one) at yet another layout, with the saving model's logits."""
    _, (load_tp, load_pp), (tp, pp) = REAL[name]
    reshard(FIXTURES / name, tmp_path / "mg", ckpt_format="torch_dist", tp=tp, pp=pp, show_progress=False)
    ref = load_file(FIXTURES / name / "reference_logits.safetensors")
    got = megatron_dist_logits(tmp_path / "mg", ref["tokens"], tp=load_tp, pp=load_pp,
                               verify_integrity=HAS_INTEGRITY_CHECK)
    assert (got - ref["logits"]).abs().max().item() < 1e-4


def test_changed_file_fails_megatrons_integrity_check(hf_model_dir, tmp_path):
    """Our manifest is megatron's: a flipped bit in one data file fails its verify_integrity load
    (0.17.1+); versions without the check have no such load option."""
    from megatron.core import dist_checkpointing
    import inspect

    assert ("verify_integrity" in inspect.signature(dist_checkpointing.load).parameters) == HAS_INTEGRITY_CHECK
    if not HAS_INTEGRITY_CHECK:
        return
    hf_to_megatron(hf_model_dir("llama-gqa"), tmp_path / "mg", show_progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "mg", bad)
    data = max((bad / "release").glob("*.distcp"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[-100] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(MegatronHarnessError, match=data.name):
        megatron_dist_logits(bad, torch.tensor([[1, 2, 3]]), verify_integrity=True)
