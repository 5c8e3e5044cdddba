"""Loading events into topics: `streamrecall produce TOPIC FILE.jsonl` and the live generator."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterable, Iterator

import msgspec
from kafka import KafkaProducer

log = logging.getLogger(__name__)

#: Which JSON field keys each topic's records (docs/architecture.md: items by item_id, clicks and vectors by user_id).
KEY_FIELD = {"items": "item_id", "clicks": "user_id", "user-vectors": "user_id"}


def read_jsonl(path: Path) -> Iterator[bytes]:
    """Yield each non-blank line of a JSONL file as raw bytes (validated by the consumers, not here)."""
    with open(path, "rb") as f:
        for line in f:
            line = line.strip()
            if line:
                yield line


def key_of(value: bytes, key_field: str | None) -> bytes | None:
    """The record key: the value's ``key_field``, or None when it is absent or the line is not JSON
    (bad lines are still produced, so the consumers dead-letter them with a reason)."""
    if key_field is None:
        return None
    try:
        obj = msgspec.json.decode(value)
    except msgspec.DecodeError:
        return None
    if isinstance(obj, dict) and isinstance(obj.get(key_field), str):
        return obj[key_field].encode()
    return None


def produce_values(producer: KafkaProducer, topic: str, values: Iterable[bytes], key_field: str | None,
                   rate_per_s: float | None = None) -> int:
    """Produce values (keyed by ``key_field``) and flush; returns the count. ``rate_per_s`` paces sends."""
    n = 0
    started = time.monotonic()
    for value in values:
        producer.send(topic, key=key_of(value, key_field), value=value)
        n += 1
        if rate_per_s is not None:
            ahead = n / rate_per_s - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    producer.flush(timeout=60)
    return n
