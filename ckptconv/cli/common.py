"""Shared CLI plumbing: error -> one-line message + exit code 2, --debug, --json output."""
from __future__ import annotations

import functools
import json
import signal
import sys

import click

from ..errors import CkptError, os_error_in_chain

EXIT_INPUT_ERROR = 2

debug_option = click.option("--debug", is_flag=True, help="Show full tracebacks.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON summary.")
overwrite_option = click.option("--overwrite", is_flag=True,
                                help="Replace DST (only after the new output is complete).")
nonfinite_option = click.option("--allow-nonfinite", is_flag=True, help="Convert even if weights contain NaN/Inf.")
# the names of ckptconv.types.DTYPE_NAMES, spelled out so that loading a command imports no torch
DTYPE_CHOICES = ("fp32", "bf16", "fp16", "float32", "bfloat16", "float16")
dtype_option = click.option("--dtype", type=click.Choice(["auto", *DTYPE_CHOICES]), default="auto",
                            show_default=True, help="Output dtype; auto keeps each tensor's source dtype.")


def _sigterm(*_):
    raise KeyboardInterrupt


def handle_errors(fn):
    """Run a command; typed input errors become `error: ...` on stderr and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        signal.signal(signal.SIGTERM, _sigterm)
        try:
            return fn(*args, **kwargs)
        except CkptError as e:
            if debug:
                raise
            click.echo(f"error: {e.one_line()}", err=True)
            sys.exit(EXIT_INPUT_ERROR)
        except Exception as e:
            io_error = os_error_in_chain(e)
            if debug or io_error is None:
                raise
            where = f"; file: {io_error.filename}" if io_error.filename else ""
            click.echo(f"error: {io_error.strerror or io_error}{where}. Fix: check the path, permissions "
                       f"and free disk space", err=True)
            sys.exit(EXIT_INPUT_ERROR)
        except KeyboardInterrupt:
            click.echo("interrupted: no output was left behind", err=True)
            sys.exit(130)
    return wrapper


def emit(summary: dict, as_json: bool, text: str) -> None:
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))
    else:
        click.echo(text)


def dtype_arg(name: str):
    from ..types import parse_dtype
    return parse_dtype(name)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n}"


def human_seconds(t: float) -> str:
    if t < 60:
        return f"{t:.1f} s"
    return f"{t / 60:.1f} min" if t < 3600 else f"{t / 3600:.2f} h"


def plan_text(s: dict) -> str:
    lines = [
        f"{s['direction']}: {s['family']}  TP={s['tp']} PP={s['pp']} VPP={s['vpp']}"
        + (f" EP={s['ep']} ETP={s['etp']}" if s.get("num_experts") else "") + f"  layers/stage {s['layers_per_stage']}",
        f"  vocab {s['vocab_size']} -> padded {s['padded_vocab_size']}",
        f"  read  {s['tensors_read']} tensors, {human_bytes(s['bytes_read'])}",
        f"  write {s['tensors_written']} tensors, {human_bytes(s['bytes_written'])}",
        f"  largest tensor {human_bytes(s['largest_tensor_bytes'])}; memory forecast "
        f"~{human_bytes(s['memory_forecast_bytes'])} of tensor data",
    ]
    if "time_forecast_s" in s:
        parts = s["time_forecast"]["parts_s"]
        lines.append(f"  time forecast ~{human_seconds(s['time_forecast_s'])} on this machine now ("
                     + ", ".join(f"{k} {human_seconds(v)}" for k, v in parts.items()) + ")")
    for f in s.get("files", []):
        ep = f" ep={f['ep_rank']}" if "ep_rank" in f else ""
        lines.append(f"  rank tp={f['tp_rank']} pp={f['pp_rank']}{ep}: {f['tensors']} tensors, {human_bytes(f['bytes'])}")
    if s.get("workers", 1) > 1 and "worker_shares" not in s:
        lines.append(f"  workers: {s['workers']}")
    lines += [f"  check ok: {c}" for c in s["checks"]]
    if s.get("ignored_source_tensors"):
        lines.append(f"  ignored (tied copies / derived buffers): {', '.join(s['ignored_source_tensors'])}")
    return "\n".join(lines)


class WorkersType(click.ParamType):
    """``--workers``: a positive number of processes, or ``auto``."""
    name = "N|auto"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, int):
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'auto'", param, ctx)


workers_option = click.option(
    "--workers", type=WorkersType(), default="auto", show_default=True,
    help="Local processes writing the output files in parallel, each reading only what its files need "
         "(auto: 1 below 2 GiB of output, else min(CPUs / 2, output files, what fits in memory); docs/cli.md).")
launcher_option = click.option(
    "--launcher", type=click.Choice(["local", "torchrun"]), default="local", show_default=True,
    help="torchrun: this process is one rank of a torchrun job and writes its share of the output "
         "(multi-node: DST on a shared filesystem).")


def silent_rank(launcher: str) -> bool:
    """A torchrun rank other than 0 prints nothing (rank 0 reports for the job)."""
    if launcher != "torchrun":
        return False
    from ..engine.workers import env_rank
    return env_rank()[0] != 0
