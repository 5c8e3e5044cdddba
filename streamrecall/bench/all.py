"""`streamrecall bench all`: every benchmark at its defaults, each in its own process.

Separate processes keep one benchmark's memory and threads out of the next one's
figures (peak RSS is per process). The results are one table, or one JSON array.
"""

from __future__ import annotations

import json
import subprocess
import sys

import click

from streamrecall.bench import Result, json_option, report

BENCHES = ("ingest", "index", "train", "model-eval", "query", "freshness")


@click.command("all")
@click.option("--only", default=",".join(BENCHES), show_default=True, help="Comma-separated benchmarks to run.")
@json_option
def command(only: str, as_json: bool) -> None:
    """Run every benchmark at its defaults (tens of minutes on two cores)."""
    wanted = [b for b in only.split(",") if b]
    unknown = set(wanted) - set(BENCHES)
    if unknown:
        raise click.UsageError(f"--only: unknown {sorted(unknown)}; choose from {', '.join(BENCHES)}")
    results: list[Result] = []
    for name in wanted:
        click.echo(f"bench {name} ...", err=True)
        proc = subprocess.run([sys.executable, "-m", "streamrecall", "bench", name, "--json"],
                              stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise click.ClickException(f"bench {name} failed with status {proc.returncode}")
        for row in json.loads(proc.stdout):
            row["name"] = f"{name}: {row['name']}"
            results.append(row)
    report(results, as_json)
