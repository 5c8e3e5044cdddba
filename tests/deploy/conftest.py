"""Fixtures for the deploy/ checks: the files under deploy/, the metric families of
streamrecall/metrics.py read from a fresh registry, and a PromQL name extractor.

Helpers are handed out as fixtures (tests run with ``--import-mode=importlib``, where test
modules cannot import each other or this file).
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

import streamrecall.consumers.roles.indexer.metrics
import streamrecall.consumers.roles.publisher.metrics
import streamrecall.consumers.roles.trainer.metrics
import streamrecall.metrics

#: Where metric groups are defined: the shared ones, then each role's own.
METRIC_MODULES = (streamrecall.metrics, streamrecall.consumers.roles.trainer.metrics,
                  streamrecall.consumers.roles.indexer.metrics, streamrecall.consumers.roles.publisher.metrics)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

#: Suffixes each metric type adds to its family name in the exposition format.
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}

_PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "inf", "nan",
    # aggregation operators, which may stand before their `by (...)` clause instead of a parenthesis
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile",
}


@dataclass(frozen=True)
class Family:
    """One metric family as streamrecall/metrics.py defines it."""

    name: str  # as exposed: counters end in _total
    type: str
    labels: tuple[str, ...]
    help: str
    group: str  # the class in streamrecall/metrics.py that defines it

    @property
    def samples(self) -> set[str]:
        base = self.name[: -len("_total")] if self.type == "counter" else self.name
        return {base + suffix for suffix in SAMPLE_SUFFIXES[self.type]}


def _families() -> dict[str, Family]:
    """Build every metrics group (streamrecall/metrics.py and each role's metrics.py) on its own
    registry and read it back."""
    out: dict[str, Family] = {}
    groups = [(name, cls) for module in METRIC_MODULES for name, cls in inspect.getmembers(module, inspect.isclass)
              if cls.__module__ == module.__name__ and "registry" in inspect.signature(cls).parameters]
    for cls_name, cls in groups:
        registry = CollectorRegistry()
        group = cls(registry=registry)
        declared = {m._name for m in vars(group).values() if isinstance(m, MetricWrapperBase)}
        for metric in vars(group).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            name = metric._name + ("_total" if metric._type == "counter" else "")
            out[name] = Family(name, metric._type, tuple(metric._labelnames), metric._documentation, cls_name)
        # The registry must hold exactly what the group's attributes say (nothing hidden).
        collected = {fam.name for fam in registry.collect()}
        assert collected == declared, f"{cls_name}: registry {sorted(collected)} != attributes {sorted(declared)}"
    return out


@pytest.fixture(scope="session")
def families() -> dict[str, Family]:
    fams = _families()
    assert fams, "found no metrics groups in streamrecall/metrics.py"
    return fams


@pytest.fixture(scope="session")
def sample_names(families: dict[str, Family]) -> dict[str, Family]:
    """Every series name the families expose (``_bucket``, ``_total``...) → its family."""
    return {sample: fam for fam in families.values() for sample in fam.samples}


def strip_promql(expr: str) -> str:
    """The expression without strings, label matchers, ranges and grouping label lists."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    expr = re.sub(r"\{[^{}]*\}", "", expr)
    expr = re.sub(r"\[[^\[\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", r"\1", expr)
    return expr


def promql_names(expr: str) -> set[str]:
    """Metric (series) names an expression selects. Not a full parser: enough for our rules."""
    names = set()
    for match in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?", strip_promql(expr)):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


@pytest.fixture(scope="session")
def promql_names_of() -> Callable[[str], set[str]]:
    return promql_names


def _load_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="session")
def recording_rules() -> list[dict[str, Any]]:
    doc = _load_yaml(DEPLOY / "prometheus" / "recording_rules.yml")
    return [rule for group in doc["groups"] for rule in group["rules"]]


@pytest.fixture(scope="session")
def alert_rules() -> list[dict[str, Any]]:
    doc = _load_yaml(DEPLOY / "prometheus" / "alert_rules.yml")
    return [rule for group in doc["groups"] for rule in group["rules"]]


@pytest.fixture(scope="session")
def dashboard() -> dict[str, Any]:
    with open(DEPLOY / "grafana" / "dashboards" / "streamrecall.json", encoding="utf-8") as f:
        return json.load(f)


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # panels inside collapsed rows
    return out


@pytest.fixture(scope="session")
def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that shows data (rows left out)."""
    return [p for p in _panels(dashboard) if p.get("type") != "row"]


@pytest.fixture(scope="session")
def panel_queries(panels: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) for every query of every panel."""
    return [(p["title"], t.get("refId", "?"), t.get("expr", "")) for p in panels for t in p.get("targets", [])]
