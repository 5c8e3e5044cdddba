"""Moving a synthetic stream (topic, key, value) to files or to Kafka, optionally paced."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import msgspec

from streamrecall.consumers.clients import make_producer
from streamrecall.settings import Settings

Event = tuple[str, str, dict[str, Any]]
_encode = msgspec.json.Encoder().encode


def write_jsonl(events: Iterable[Event], out_dir: Path) -> dict[str, int]:
    """Write ``items.jsonl`` and ``clicks.jsonl`` under out_dir; returns counts per topic."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    counts: Counter[str] = Counter()
    try:
        for topic, _key, value in events:
            f = files.get(topic)
            if f is None:
                f = files[topic] = open(out_dir / f"{topic}.jsonl", "wb")
            f.write(_encode(value) + b"\n")
            counts[topic] += 1
    finally:
        for f in files.values():
            f.close()
    return dict(counts)


def produce_stream(settings: Settings, events: Iterable[Event], rate_per_s: float | None = None,
                   stop: threading.Event | None = None, counts: Counter[str] | None = None,
                   restamp: bool = False) -> dict[str, int]:
    """Produce events to their topics. ``rate_per_s`` paces clicks in wall time; ``restamp`` rewrites
    event times to now (a live demo: freshness is measured from event time)."""
    producer = make_producer(settings)
    physical = {"items": settings.topics.items, "clicks": settings.topics.clicks}
    counts = counts if counts is not None else Counter()
    started = time.monotonic()
    clicks = 0
    try:
        for topic, key, value in events:
            if stop is not None and stop.is_set():
                break
            if restamp:
                value = dict(value)
                value["created_at" if topic == "items" else "ts"] = int(time.time() * 1000)
            producer.send(physical[topic], key=key.encode(), value=_encode(value))
            counts[topic] += 1
            if topic == "clicks":
                clicks += 1
                if rate_per_s:
                    ahead = clicks / rate_per_s - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(min(ahead, 1.0))
        producer.flush(timeout=60)
    finally:
        producer.close(timeout=10)
    return dict(counts)
