"""The read-ahead child that verify / fingerprint start before importing torch."""
import os
import time
from contextlib import nullcontext

import pytest

from ckptconv.cli.common import DTYPE_CHOICES
from ckptconv.prefetch import Prefetch, data_files, plan, prefetch
from ckptconv.types import DTYPE_NAMES


@pytest.fixture
def two_ckpts(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b" / "iter_0000001" / "mp_rank_00"
    a.mkdir()
    b.mkdir(parents=True)
    for name, size in (("model-00001-of-00002.safetensors", 300), ("model-00002-of-00002.safetensors", 100),
                       ("config.json", 10)):
        (a / name).write_bytes(b"x" * size)
    (b / "model_optim_rng.pt").write_bytes(b"y" * 200)
    (tmp_path / "b" / ".hidden-tmp").mkdir()
    (tmp_path / "b" / ".hidden-tmp" / "x.pt").write_bytes(b"z")
    return a, tmp_path / "b"


def test_plan_interleaves_data_files_within_budget(two_ckpts):
    a, b = two_ckpts
    assert [f.name for f in data_files(a)] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert [f.name for f in data_files(b)] == ["model_optim_rng.pt"]          # hidden dirs skipped
    full = plan([a, b], budget=10**6)
    assert [(f.name, n) for f, n in full] == [("model-00001-of-00002.safetensors", 300), ("model_optim_rng.pt", 200),
                                              ("model-00002-of-00002.safetensors", 100)]
    cut = plan([a, b], budget=400)
    assert [(f.name, n) for f, n in cut] == [("model-00001-of-00002.safetensors", 300), ("model_optim_rng.pt", 100)]
    assert plan([a / "missing"], budget=100) == []


def test_prefetch_child_reads_and_is_reaped(two_ckpts):
    a, b = two_ckpts
    with prefetch([a, b]) as p:
        assert isinstance(p, Prefetch)
        assert p.proc.wait(timeout=30) == 0           # read every planned file and exited
    assert p.proc.returncode == 0
    assert isinstance(prefetch([a / "missing"]), nullcontext)


def test_prefetch_child_is_stopped_when_the_command_ends(tmp_path):
    """A child still reading (here: blocked opening a FIFO) is killed and reaped on exit."""
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with prefetch([tmp_path]) as p:
        time.sleep(0.3)
        assert p.proc.poll() is None
    assert p.proc.returncode is not None and p.proc.returncode < 0


def test_cli_dtype_choices_match_the_library():
    assert set(DTYPE_CHOICES) == set(DTYPE_NAMES)
