"""`ckptconv verify A B`: exit 0 equivalent, 1 not equivalent, 2 input error."""
from __future__ import annotations

import json
import sys

import click

from ..verify.compare import compare_checkpoints
from .common import debug_option, handle_errors


@click.command("verify")
@click.argument("a")
@click.argument("b")
@click.option("--json", "json_file", type=click.Path(), default=None, help="Write the JSON report here ('-' = stdout).")
@click.option("--atol", type=float, default=None, help="Accept differences within this absolute tolerance.")
@click.option("--rtol", type=float, default=None, help="Accept differences within this relative tolerance.")
@click.option("--iteration", default="latest", show_default=True)
@debug_option
@handle_errors
def command(a, b, json_file, atol, rtol, iteration):
    """Compare two checkpoints (HF or Megatron, any TP/PP) parameter by parameter."""
    report = compare_checkpoints(a, b, atol=atol, rtol=rtol, iteration=iteration)
    data = report.to_dict()
    if json_file == "-":
        click.echo(json.dumps(data, indent=2))
    elif json_file:
        with open(json_file, "w") as f:
            json.dump(data, f, indent=2)
    if json_file != "-":
        for r in report.results:
            if not r.ok:
                click.echo(f"DIFFERS {r.name}: {r.status} {r.rule} max_abs={r.max_abs:.3g} "
                           f"n_diff={r.n_diff} {r.detail}".rstrip())
        verdict = "equivalent" if report.equivalent else "NOT equivalent"
        click.echo(f"{verdict}: {len(report.results)} tensors compared, "
                   f"{sum(not r.ok for r in report.results)} failed")
    sys.exit(0 if report.equivalent else 1)
