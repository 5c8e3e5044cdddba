"""`streamrecall status`: committed offset and lag per partition for every role's group.

Lag uses the fetch high watermark (``KafkaConsumer.highwater``), not ListOffsets,
because some brokers (Tansu) under-count "latest" by up to one record batch.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Mapping

import click
from kafka import TopicPartition

from streamrecall.consumers.clients import make_consumer
from streamrecall.settings import Settings

#: The topics each role's group consumes and commits (logical names). The trainer's items
#: table and the publisher's model updates are side readers (no group, nothing committed,
#: re-read at every start), so they have no committed offset to report.
ROLE_TOPICS: dict[str, tuple[str, ...]] = {
    "trainer": ("clicks",),
    "indexer": ("items", "model_updates", "user_vectors"),
    "publisher": ("clicks",),
}


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int | None
    high: int

    @property
    def lag(self) -> int:
        # The watermark is read before the group's commit: a commit made in between may pass it.
        return max(0, self.high - (self.committed or 0))


def high_watermarks(settings: Settings, topics: list[str], timeout_s: float = 15.0) -> dict[TopicPartition, int]:
    """High watermark per partition, learnt from a fetch at the end of each partition."""
    c = make_consumer(settings, None)
    try:
        tps = [TopicPartition(t, p) for t in topics for p in sorted(c.partitions_for_topic(t) or ())]
        c.assign(tps)
        # Start one record before the (possibly under-counted) end so every fetch returns a watermark.
        ends = c.end_offsets(tps)
        for tp in tps:
            c.seek(tp, max(0, ends.get(tp, 0) - 1))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(c.highwater(tp) is None for tp in tps):
            c.poll(timeout_ms=100, max_records=1)
        return {tp: (c.highwater(tp) or 0) for tp in tps}
    finally:
        c.close()


def group_lags(settings: Settings) -> list[PartitionLag]:
    all_topics = settings.topics.all()
    physical = sorted({all_topics[t] for ts in ROLE_TOPICS.values() for t in ts})
    highs = high_watermarks(settings, physical)
    rows = []
    for role, logical in ROLE_TOPICS.items():
        group = settings.group_id(role)
        c = make_consumer(settings, group)
        try:
            for topic in (all_topics[t] for t in logical):
                for tp in sorted((tp for tp in highs if tp.topic == topic), key=lambda tp: tp.partition):
                    rows.append(PartitionLag(group, topic, tp.partition, c.committed(tp), highs[tp]))
        finally:
            c.close()
    return rows


def print_status(settings: Settings, wait: bool = False, timeout_s: float = 300.0,
                 ports: Mapping[str, int] | None = None) -> bool:
    """Print lag per group and partition, then whether the system is settled; with ``wait`` poll
    until all lags are zero. True when caught up. ``ports``: where each role serves HTTP."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = group_lags(settings)
        total = sum(r.lag for r in rows)
        if not wait or total == 0 or time.monotonic() > deadline:
            break
        click.echo(f"waiting: total lag {total:,}", err=True)
        time.sleep(1.0)
    click.echo(f"{'group':<32} {'topic':<28} {'part':>4} {'committed':>10} {'high':>10} {'lag':>8}")
    for r in rows:
        committed = "-" if r.committed is None else str(r.committed)
        click.echo(f"{r.group:<32} {r.topic:<28} {r.partition:>4} {committed:>10} {r.high:>10} {r.lag:>8}")
    click.echo(f"total lag: {total:,}")
    click.echo(settled_line(settings, total, ports))
    return total == 0


def indexer_health(settings: Settings, timeout_s: float = 2.0) -> dict[str, Any] | None:
    """The indexer's /healthz body at the configured address (None when it does not answer)."""
    url = f"http://{settings.http_host}:{settings.port_for('indexer')}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # 503 while not ready: the body still says what it serves
        try:
            return json.loads(e.read())
        except ValueError:
            return None
    except (OSError, ValueError):
        return None


def role_versions(settings: Settings, ports: Mapping[str, int] | None = None,
                  timeout_s: float = 2.0) -> dict[str, int | None]:
    """``streamrecall_model_version`` of each role, read from its /metrics (None: no answer).
    ``ports`` overrides where each role serves (default: ``settings.port_for(role)``)."""
    out: dict[str, int | None] = {}
    for role in ROLE_TOPICS:
        port = (ports or {}).get(role, settings.port_for(role))
        url = f"http://{settings.http_host}:{port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                text = r.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            out[role] = None
            continue
        prefix = f'streamrecall_model_version{{role="{role}"}} '
        line = next((ln for ln in text.splitlines() if ln.startswith(prefix)), None)
        out[role] = int(float(line[len(prefix):])) if line else None
    return out


def settled_line(settings: Settings, total_lag: int, ports: Mapping[str, int] | None = None) -> str:
    """Whether the whole system serves what the trainer knows: every group at zero lag (the
    trainer commits a click once the update that learned from it is acknowledged), every role
    that answers at the same model version, and the indexer settled (every update applied,
    re-encode done)."""
    health = indexer_health(settings)
    if health is None:
        return f"settled: unknown (no indexer answers at {settings.http_host}:{settings.port_for('indexer')})"
    versions = role_versions(settings, ports)
    versions["indexer"] = health.get("model_version")  # the version its answers are scored by
    known = {v for v in versions.values() if v is not None}
    settled = total_lag == 0 and bool(health.get("settled")) and len(known) <= 1
    shown = ", ".join(f"{role} v{v}" if v is not None else f"{role} ?" for role, v in versions.items())
    return (f"settled: {'yes' if settled else 'no'} (model versions: {shown}; "
            f"indexer re-encode pending {health.get('reencode_pending')}, total lag {total_lag:,})")
