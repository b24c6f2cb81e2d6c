"""A conversion killed with SIGKILL leaves no complete-looking output and a rerun succeeds;
a conversion into a full filesystem fails cleanly (exit 2, one line) and leaves nothing."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckptconv.formats.hf import HFWriter
from ckptconv.types import TensorMeta

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "tiny-llama"
CLI = [sys.executable, "-m", "ckptconv"]


def synthetic_llama(path: Path, hidden=512, ffn=1536, layers=8, vocab=32000) -> Path:
    """~180 MB fp32 Llama written tensor by tensor (no transformers model in memory)."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (128, hidden),
                       p + "self_attn.v_proj.weight": (128, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                       p + "mlp.down_proj.weight": (hidden, ffn)})
    metas = [TensorMeta(n, s, torch.float32) for n, s in shapes.items()]
    path.mkdir()
    g = torch.Generator().manual_seed(0)
    with HFWriter(path, metas, 50_000_000) as w:
        for m in metas:
            w.write(m.name, torch.randn(m.shape, generator=g) * 0.02)
        w.write_config({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
                        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": 8,
                        "num_key_value_heads": 2, "vocab_size": vocab, "rms_norm_eps": 1e-5})
    return path


def leftovers(dst: Path) -> list[str]:
    return sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}"))


# A conversion that stops at a kill point and waits there: after the writer's Nth write (N >= 0:
# just before write N + 1), or (N = -1) after the writer has closed its complete files but before
# the output is renamed into place. It says where it is on stdout and blocks reading stdin, so
# the test kills it at exactly that point (no timing). Test-only: the hooks live in this driver.
KILL_DRIVER = r"""
import os, sys
from ckptconv.formats import megatron_torch_write as mt
point, argv = int(sys.argv[1]), sys.argv[2:]
write, close, count = mt.MegatronTorchWriter.write, mt.MegatronTorchWriter.close, [0]

def stop(where):
    os.write(1, f"{where} {count[0]}\n".encode())
    os.read(0, 1)                       # the test SIGKILLs us while we wait here

def write_then_maybe_stop(self, name, t):
    write(self, name, t)
    count[0] += 1
    if count[0] == point:
        stop("wrote")

def close_then_maybe_stop(self):
    close(self)
    if point == -1:
        stop("closed")

mt.MegatronTorchWriter.write, mt.MegatronTorchWriter.close = write_then_maybe_stop, close_then_maybe_stop
from ckptconv.cli.main import cli
cli(argv, prog_name="ckptconv")
"""


def run_until_killed(point: int, argv: list[str]) -> str:
    proc = subprocess.Popen([sys.executable, "-c", KILL_DRIVER, str(point), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    where = proc.stdout.readline().strip()          # blocks until the kill point is reached
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert where, f"kill point {point} never reached: {err}"
    assert proc.returncode == -signal.SIGKILL
    return where


def test_sigkill_at_several_points_then_rerun(tmp_path):
    """Killed after the 1st, 2nd, 10th and last tensor write and after the files are complete
    but not yet renamed into place: never a DST, only a hidden temporary directory; then a rerun
    cleans those up and gives a checkpoint that verifies."""
    src, dst = FIXTURE, tmp_path / "mg"
    argv = ["hf-to-megatron", str(src), str(dst), "--tp", "2", "--pp", "2", "--ckpt-format", "torch"]
    total = int(run_until_killed(-1, argv).split()[1])       # closed after `total` writes
    assert total > 10
    for point in (1, 2, 10, total, -1):
        where = run_until_killed(point, argv)
        assert where == (f"wrote {point}" if point > 0 else f"closed {total}")
        assert not dst.exists(), where
        left = leftovers(dst)
        assert left and all(".ckptconv-tmp-" in n for n in left), (where, left)
    rerun = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert rerun.returncode == 0, rerun.stderr
    assert leftovers(dst) == []      # stale temp dirs of killed runs were cleaned up
    check = subprocess.run([*CLI, "verify", str(src), str(dst), "--no-logits"], capture_output=True, text=True,
                           timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 130)])
def test_ctrl_c_and_sigterm_clean_up(tmp_path, sig, code):
    src = synthetic_llama(tmp_path / "src")
    dst = tmp_path / "mg"
    interrupted = 0
    for _ in range(3):      # a run that finishes before the signal lands is retried
        # as in a terminal: a job started in the background by a non-interactive shell (as CI
        # runs us) inherits SIGINT ignored, and a Unix program keeps an ignored SIGINT ignored
        proc = subprocess.Popen([*CLI, "hf-to-megatron", str(src), str(dst), "--tp", "2"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 60
        while not leftovers(dst) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            assert dst.is_dir() and leftovers(dst) == []     # finished first: complete output
            shutil.rmtree(dst)
            continue
        interrupted += 1
        assert proc.returncode == code, err
        assert "interrupted" in err and "Traceback" not in err
        assert not dst.exists() and leftovers(dst) == []
    assert interrupted >= 1


def _full_disk_shell(mnt: Path, cmd: list[str]) -> list[str] | None:
    """Run cmd with a 512 KiB tmpfs mounted at mnt (private mount namespace); None if impossible."""
    script = ('mount -t tmpfs -o size=512k tmpfs "$0" || exit 99; "$@"; rc=$?; '
              'echo "LEFT:$(ls -A "$0" | tr "\\n" " ")"; exit $rc')
    for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        if shutil.which(prefix[0]) is None:
            continue
        probe = subprocess.run([*prefix, "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"', str(mnt)],
                               capture_output=True)
        if probe.returncode == 0:
            return [*prefix, "sh", "-c", script, str(mnt), *cmd]
    return None


@pytest.mark.parametrize("direction", ["hf-to-megatron:torch", "hf-to-megatron:torch_dist", "megatron-to-hf"])
def test_disk_full_fails_cleanly(tmp_path, direction):
    direction, _, fmt = direction.partition(":")
    mnt = tmp_path / "small"
    mnt.mkdir()
    src = FIXTURE
    if direction == "megatron-to-hf":
        src = tmp_path / "mg"
        subprocess.run([*CLI, "hf-to-megatron", str(FIXTURE), str(src), "--ckpt-format", "torch"], check=True,
                       capture_output=True, stdin=subprocess.DEVNULL)
    cmd = [*CLI, direction, str(src), str(mnt / "out"), *(["--ckpt-format", fmt] if fmt else [])]
    wrapped = _full_disk_shell(mnt, cmd)
    if wrapped is None:   # no mount namespace: simulate with a file-size limit (EFBIG instead of ENOSPC)
        import resource
        wrapped = cmd
        limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))  # noqa: E731
        proc = subprocess.run(wrapped, capture_output=True, text=True, timeout=300, preexec_fn=limit,
                              stdin=subprocess.DEVNULL)
        left = sorted(p.name for p in mnt.iterdir())
    else:
        proc = subprocess.run(wrapped, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert proc.returncode != 99, proc.stderr
        left = proc.stdout.rsplit("LEFT:", 1)[1].split()
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Fix:" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert left == [], left
