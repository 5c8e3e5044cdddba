"""The publisher's durable state: partitions of ``user-vectors`` read back, the latest vector per user."""

from __future__ import annotations

from kafka import KafkaConsumer

from streamrecall.consumers.deadletter import DeadLetterSink
from streamrecall.consumers.handler import Record
from streamrecall.consumers.table import TopicReader
from streamrecall.errors import TransientError
from streamrecall.events import UserVector, user_vector_decoder


class VectorTable:
    """Reads partitions of the compacted user-vectors topic: the latest vector per user in each."""

    def __init__(self, consumer: KafkaConsumer, topic: str, deadletters: DeadLetterSink, max_value_bytes: int,
                 max_ahead_ms: int, timeout_s: float) -> None:
        self.consumer = consumer
        self.topic = topic
        self.deadletters = deadletters
        self.decode = user_vector_decoder(max_value_bytes, max_ahead_ms)  # None: a tombstone deletes the user
        self.timeout_s = timeout_s

    def load(self, partitions: list[int]) -> dict[int, list[UserVector]]:
        latest: dict[int, dict[str, UserVector]] = {p: {} for p in partitions}

        def on_record(r: Record) -> None:
            if r.value is not None:
                latest[r.partition][r.value.user_id] = r.value
            elif r.key is not None:
                latest[r.partition].pop(r.key.decode("utf-8", "replace"), None)

        if not partitions:
            return {}
        reader = TopicReader(self.consumer, self.topic, "user-vectors", self.decode, on_record, self.deadletters,
                             partitions=partitions)
        reader.start()
        if not reader.catch_up(self.timeout_s):
            raise TransientError(f"could not read {self.topic}{partitions} to their end in {self.timeout_s:.0f}s")
        return {p: list(users.values()) for p, users in latest.items()}

    def close(self) -> None:
        self.consumer.close(autocommit=False)
