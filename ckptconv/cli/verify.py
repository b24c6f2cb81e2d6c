"""`ckptconv verify A B`: exit 0 equivalent, 1 not equivalent, 2 usage or input error."""
from __future__ import annotations

import json
import sys

import click

from ..prefetch import prefetch
from .common import debug_option, handle_errors


def _write(dest: str, text: str) -> None:
    if dest == "-":
        click.echo(text, nl=False)
    else:
        with open(dest, "w", encoding="utf-8") as f:
            f.write(text)


@click.command("verify")
@click.argument("a")
@click.argument("b")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Write the JSON report here ('-' = stdout).")
@click.option("--junit", "junit_file", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Write a JUnit XML report (one test case per parameter) here ('-' = stdout).")
@click.option("--logits/--no-logits", default=None,
              help="Run both models on fixed tokens and compare logits: always / never. Default: when A and "
                   "B are of different frameworks, their tensors agree and the run fits --logits-budget.")
@click.option("--logits-budget", type=float, default=120.0, show_default=True,
              help="Seconds the automatic logits check may be estimated to take.")
@click.option("--atol", type=float, default=None, help="Accept differences within this absolute tolerance.")
@click.option("--rtol", type=float, default=None, help="Accept differences within this relative tolerance.")
@click.option("--iteration", default="latest", show_default=True, help="Megatron iteration: latest|release|N.")
@click.option("--hf-config", type=click.Path(exists=True), default=None,
              help="HF config.json (or its directory) for Megatron checkpoints that carry none.")
@debug_option
@handle_errors
def command(a, b, json_file, junit_file, logits, logits_budget, atol, rtol, iteration, hf_config):
    """Compare checkpoint B against A (HF or Megatron at any TP/PP, or a fingerprint manifest as
    B) parameter by parameter; explain any difference."""
    if json_file == "-" and junit_file == "-":
        raise click.UsageError("--json - and --junit - cannot both write to stdout")
    for v, flag in ((atol, "--atol"), (rtol, "--rtol")):
        if v is not None and v < 0:
            raise click.UsageError(f"{flag} must be >= 0")
    with prefetch([a, b]):          # the disk reads while torch imports (cold cache)
        from ..engine.convert import load_hf_config_arg
        from ..verify.equivalence import verify_checkpoints
        from ..verify.junit import junit_xml

        report = verify_checkpoints(a, b, atol=atol, rtol=rtol, iteration=iteration,
                                    hf_config=load_hf_config_arg(hf_config), logits=logits,
                                    logits_budget=logits_budget)
    if json_file:
        _write(json_file, json.dumps(report.to_dict(), indent=2) + "\n")
    if junit_file:
        _write(junit_file, junit_xml(report))
    if "-" not in (json_file, junit_file):
        click.echo(report.text())
    sys.exit(0 if report.equivalent else 1)
