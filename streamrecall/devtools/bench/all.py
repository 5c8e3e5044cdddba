"""`streamrecall bench all`: every benchmark at its defaults, each in its own process.

Separate processes keep one benchmark's memory and threads out of the next one's
figures (peak RSS is per process). The results are one table, or one JSON array.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click

from streamrecall.devtools.bench import Result, json_option, report
from streamrecall.devtools.bench.plots import plot_option

BENCHES = ("ingest", "index", "train", "model-eval", "query", "freshness")
#: The benchmarks that draw pictures with ``--plot DIR``.
PLOTTING = ("index", "freshness")


@click.command("all")
@click.option("--only", default=",".join(BENCHES), show_default=True, help="Comma-separated benchmarks to run.")
@plot_option
@json_option
def command(only: str, plot_dir: Path | None, as_json: bool) -> None:
    """Run every benchmark at its defaults (tens of minutes on two cores)."""
    wanted = [b for b in only.split(",") if b]
    unknown = set(wanted) - set(BENCHES)
    if unknown:
        raise click.UsageError(f"--only: unknown {sorted(unknown)}; choose from {', '.join(BENCHES)}")
    results: list[Result] = []
    failed: list[str] = []
    started = time.monotonic()
    for n, name in enumerate(wanted, 1):
        click.echo(f"[{n}/{len(wanted)}] bench {name} ... (its log follows)", err=True)
        t = time.monotonic()
        plot = ["--plot", str(plot_dir)] if plot_dir is not None and name in PLOTTING else []
        proc = subprocess.run([sys.executable, "-m", "streamrecall", "bench", name, "--json", *plot],
                              stdout=subprocess.PIPE, text=True)
        try:
            rows = json.loads(proc.stdout) if proc.returncode == 0 else None
        except ValueError:
            rows = None
        if rows is None:  # keep going: one failed benchmark must not lose the others' results
            failed.append(name)
            click.echo(f"[{n}/{len(wanted)}] bench {name} FAILED (status {proc.returncode}) after "
                       f"{time.monotonic() - t:.0f} s", err=True)
            continue
        for row in rows:
            row["name"] = f"{name}: {row['name']}"
            results.append(row)
            click.echo(f"    {row['name']}: {row['value']:.4g} {row['unit']}"
                       + (f" (ratio to raw {row['ratio_to_raw']:.3g})" if "ratio_to_raw" in row else ""), err=True)
        click.echo(f"[{n}/{len(wanted)}] bench {name} done in {time.monotonic() - t:.0f} s "
                   f"({time.monotonic() - started:.0f} s so far)", err=True)
    report(results, as_json)
    if failed:
        raise click.ClickException(f"failed: {', '.join(failed)} (the results above are those of the others)")
