"""Where user vectors go: the compacted ``user-vectors`` topic, into the clicks partition's number."""

from __future__ import annotations

import logging
from typing import Protocol

from kafka import KafkaProducer

from streamrecall.events import UserVector, encode

log = logging.getLogger(__name__)


class VectorSink(Protocol):
    def send(self, vector: UserVector, partition: int) -> None: ...

    def flush(self) -> list[tuple[int, str]]:
        """Wait until everything sent is durable; returns the (partition, user_id) sends that failed."""


class KafkaVectorSink:
    """Sends vectors to ``user-vectors`` keyed by user id, into the clicks partition's number."""

    def __init__(self, producer: KafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self._sent: list[tuple[object, int, str]] = []

    def send(self, vector: UserVector, partition: int) -> None:
        future = self.producer.send(self.topic, key=vector.user_id.encode(), value=encode(vector),
                                    partition=partition)
        self._sent.append((future, partition, vector.user_id))

    def flush(self) -> list[tuple[int, str]]:
        self.producer.flush(timeout=30)
        sent, self._sent = self._sent, []
        failed = [(p, u) for f, p, u in sent if not f.is_done or f.failed()]  # type: ignore[attr-defined]
        if failed:
            log.error("%d user vectors were not published; they will be sent again", len(failed))
        return failed
