"""Consumer lag, read from the runtime's gauges, and the one readiness rule on it (the indexer's
and the router's ``/healthz``: ready when every assigned partition's lag is measured and the total is
at most ``ready_max_lag``)."""

from __future__ import annotations

from typing import Iterable

from streamrecall.metrics import RUNTIME, RuntimeMetrics


def measured_lag(role: str, partitions: Iterable[tuple[str, int]],
                 metrics: RuntimeMetrics = RUNTIME) -> dict[str, int] | None:
    """Records behind the high watermark per logical topic over ``partitions`` ((logical topic,
    partition) pairs), from ``role``'s lag gauge; None until every one of them was measured."""
    seen: dict[tuple[str, str], float] = {}
    for metric in metrics.lag.collect():
        for sample in metric.samples:
            if sample.labels.get("role") == role:
                seen[(sample.labels["topic"], sample.labels["partition"])] = sample.value
    out: dict[str, int] = {}
    partitions = list(partitions)
    for topic, partition in partitions:
        value = seen.get((topic, str(partition)))
        if value is None:
            return None
        out[topic] = out.get(topic, 0) + int(value)
    return out if partitions else None


def lag_reasons(lag: dict[str, int] | None, max_lag: int) -> tuple[int | None, list[str]]:
    """(total lag, why a role is not ready on it): not measured yet, or above ``max_lag`` records."""
    if lag is None:
        return None, ["lag not measured yet"]
    total = sum(lag.values())
    return total, [f"lag {total} records is above {max_lag}"] if total > max_lag else []
