"""Dead-letter routing: every bad record goes to one topic with its reason.

The record keeps its original key and value bytes; headers name the reason, the
error message, and where it came from. Nothing bad is dropped silently: the
runtime flushes this producer before it commits the offsets that cover the records.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kafka import KafkaProducer

from streamrecall.metrics import RUNTIME, RuntimeMetrics

log = logging.getLogger(__name__)

#: Headers on every dead-letter record.
HEADER_REASON = "streamrecall.reason"
HEADER_ERROR = "streamrecall.error"
HEADER_TOPIC = "streamrecall.source.topic"
HEADER_PARTITION = "streamrecall.source.partition"
HEADER_OFFSET = "streamrecall.source.offset"
HEADER_ROLE = "streamrecall.role"
HEADER_ORIGINAL_SIZE = "streamrecall.original.size"
#: Values above this are cut to this size in the dead letter (Kafka's default message limit is 1 MB),
#: with the original size in a header.
MAX_DEAD_LETTER_VALUE = 256 * 1024


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str
    error: str

    @property
    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


class DeadLetterSink:
    """Sends dead letters to the dead-letter topic; ``flush`` makes them durable."""

    def __init__(self, producer: KafkaProducer, topic: str, role: str,
                 metrics: RuntimeMetrics = RUNTIME) -> None:
        self.producer = producer
        self.topic = topic
        self.role = role
        self.metrics = metrics

    def send(self, letter: DeadLetter, logical_topic: str | None = None) -> None:
        """Queue a dead letter; ``logical_topic`` ("clicks", ...) labels the metric."""
        log.warning("dead-lettered %s (%s): %s", letter.where, letter.reason, letter.error[:500])
        headers = [
            (HEADER_REASON, letter.reason.encode()),
            (HEADER_ERROR, letter.error[:1000].encode("utf-8", "replace")),
            (HEADER_TOPIC, letter.topic.encode()),
            (HEADER_PARTITION, str(letter.partition).encode()),
            (HEADER_OFFSET, str(letter.offset).encode()),
            (HEADER_ROLE, self.role.encode()),
        ]
        value = letter.value
        if value is not None and len(value) > MAX_DEAD_LETTER_VALUE:
            headers.append((HEADER_ORIGINAL_SIZE, str(len(value)).encode()))
            value = value[:MAX_DEAD_LETTER_VALUE]
        self.producer.send(self.topic, key=letter.key, value=value, headers=headers)
        self.metrics.deadlettered.labels(self.role, logical_topic or letter.topic, letter.reason).inc()

    def flush(self, timeout_s: float) -> None:
        self.producer.flush(timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        self.producer.close(timeout=timeout_s)


def headers_dict(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    """Decode a dead-letter record's headers (for tools and tests)."""
    return {k: v.decode("utf-8", "replace") for k, v in (headers or [])}
