"""Benchmarks: `streamrecall bench NAME`.

Every benchmark module exposes a click command named ``command`` that measures,
then calls :func:`report` with a list of :class:`Result`. Throughputs carry a
``ratio_to_raw`` against the raw library measured in the same run, since absolute
numbers on shared machines drift.
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Iterable, TypedDict

import click


class _ResultBase(TypedDict):
    name: str
    unit: str
    value: float


class Result(_ResultBase, total=False):
    """One figure, in the format github-action-benchmark reads."""

    ratio_to_raw: float
    extra: str


def result(name: str, unit: str, value: float, *, ratio_to_raw: float | None = None,
           extra: str | None = None) -> Result:
    r: Result = {"name": name, "unit": unit, "value": float(value)}
    if ratio_to_raw is not None:
        r["ratio_to_raw"] = round(float(ratio_to_raw), 4)
    if extra is not None:
        r["extra"] = extra
    return r


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def report(results: Iterable[Result], as_json: bool) -> None:
    """Print results as a table, or as the JSON array docs/architecture.md specifies."""
    rows = list(results)
    if as_json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    width = max((len(r["name"]) for r in rows), default=4)
    click.echo(f"{'name':<{width}}  {'value':>14}  {'unit':<12} {'ratio':>7}  extra")
    for r in rows:
        ratio = f"{r['ratio_to_raw']:.3f}" if "ratio_to_raw" in r else ""
        click.echo(f"{r['name']:<{width}}  {_fmt(r['value']):>14}  {r['unit']:<12} {ratio:>7}  {r.get('extra', '')}")


def _fmt(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


json_option = click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
