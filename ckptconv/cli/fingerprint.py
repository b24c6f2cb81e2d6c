"""`ckptconv fingerprint CKPT`: a manifest of per-logical-parameter hashes (independent of
format and TP/PP) that `ckptconv verify CKPT2 manifest.json` checks against."""
from __future__ import annotations

import click

from ..prefetch import prefetch
from .common import debug_option, handle_errors


@click.command("fingerprint")
@click.argument("ckpt")
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), default="-", show_default=True,
              help="Write the manifest here ('-' = stdout).")
@click.option("--iteration", default="latest", show_default=True, help="Megatron iteration: latest|release|N.")
@click.option("--hf-config", type=click.Path(exists=True), default=None,
              help="HF config.json (or its directory) for Megatron checkpoints that carry none.")
@debug_option
@handle_errors
def command(ckpt, output, iteration, hf_config):
    """Fingerprint every logical parameter of CKPT (HF names, SHA-256 of the values)."""
    with prefetch([ckpt]):          # the disk reads while torch imports (cold cache)
        from ..engine.convert import load_hf_config_arg
        from ..verify.fingerprint import fingerprint_checkpoint

        manifest = fingerprint_checkpoint(ckpt, iteration=iteration, hf_config=load_hf_config_arg(hf_config))
    if output == "-":
        click.echo(manifest.dumps(), nl=False)
    else:
        manifest.write(output)
        click.echo(f"wrote {output}: {len(manifest.tensors)} parameters fingerprinted")
