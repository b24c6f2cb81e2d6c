"""`ckptconv dcp-to-hf SRC DST`"""
from __future__ import annotations

import click

from ..engine.dcp_convert import dcp_to_hf
from .common import (debug_option, dtype_arg, dtype_option, emit, handle_errors, human_bytes, json_option,
                     nonfinite_option, overwrite_option,
                     launcher_option, silent_rank, workers_option)

step_option = click.option("--step", default=None, help="torchtitan: which step-N/ (default: the highest).")
hf_config_option = click.option("--hf-config", type=click.Path(exists=True), default=None,
                                help="HF config.json (or its directory); default: the config.json in SRC.")


def dcp_text(s: dict) -> str:
    where = s["dcp_layout"] + (f" step {s['step']}" if s.get("step") is not None else "")
    lines = [f"dcp ({where}, {s['naming']} names, wrapper {s['wrapper'] or 'none'!r}) -> {s['format']}: "
             f"model from {s['model_dir']}"]
    if "tensors_written" in s and "bytes_written" in s:
        lines.append(f"  write {s['tensors_written']} tensors, {human_bytes(s['bytes_written'])}")
    if s.get("skipped_state"):
        lines.append("  skipped training state: " + ", ".join(f"{g} ({n} tensors)" for g, n in s["skipped_state"].items())
                     + (f", {s['bytes_items']} pickled items (not read)" if s.get("bytes_items") else ""))
    if s.get("dropped_aliases"):
        lines.append(f"  tied copies not written (config ties them): {', '.join(s['dropped_aliases'])}")
    return "\n".join(lines)


@click.command("dcp-to-hf")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("dst", type=click.Path())
@step_option
@hf_config_option
@dtype_option
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--dry-run", is_flag=True, help="Print what would be written; read and write no tensor.")
@overwrite_option
@nonfinite_option
@workers_option
@launcher_option
@json_option
@debug_option
@handle_errors
def command(src, dst, step, hf_config, dtype, max_shard_size, dry_run, overwrite, allow_nonfinite, workers, launcher, as_json):
    """Convert a torch DCP training checkpoint (FSDP2, accelerate save_state, torchtitan) to HF safetensors."""
    summary = dcp_to_hf(src, dst, step=step, hf_config=hf_config, dtype=dtype_arg(dtype), max_shard_size=max_shard_size,
                        overwrite=overwrite, dry_run=dry_run, allow_nonfinite=allow_nonfinite,
                        show_progress=not as_json, workers=workers, launcher=launcher)
    if silent_rank(launcher):
        return
    emit(summary, as_json, dcp_text(summary) + ("" if dry_run else f"\nwrote {dst}"))
