"""An in-memory consumer and producer with the parts of kafka-python's API the runtime uses, for
fast unit tests of the poll loop (batch isolation, retries, pausing on a failing flush). The
integration tests run the same runtime against a real broker; these only make the loop's own
logic testable in milliseconds.

Only assigned partitions (``Runtime(assign_all=True)``) are modelled: group subscription and
rebalances need a real broker (tests/integration/test_runtime.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from kafka import TopicPartition
from kafka.errors import KafkaError


@dataclass(frozen=True)
class FakeMessage:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int = 0
    headers: list[tuple[str, bytes]] = field(default_factory=list)


class FakeConsumer:
    """Partitions of records in memory; ``poll`` hands out what lies past each position."""

    def __init__(self, partitions: dict[str, int]) -> None:
        self.log: dict[TopicPartition, list[FakeMessage]] = {
            TopicPartition(t, p): [] for t, n in partitions.items() for p in range(n)}
        self._assigned: list[TopicPartition] = []
        self._position: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self.committed: dict[TopicPartition, int] = {}
        self.commit_error: KafkaError | None = None  # raised by the next commit, then cleared
        self.polls = 0
        self.closed = False

    # --- test side ---------------------------------------------------------------------------
    def append(self, topic: str, partition: int, values: Iterable[bytes | None], key: bytes | None = None) -> None:
        records = self.log[TopicPartition(topic, partition)]
        for value in values:
            records.append(FakeMessage(topic, partition, len(records), key, value, timestamp=len(records)))

    # --- what the runtime calls -------------------------------------------------------------
    def partitions_for_topic(self, topic: str) -> set[int]:
        return {tp.partition for tp in self.log if tp.topic == topic}

    def assign(self, partitions: list[TopicPartition]) -> None:
        self._assigned = list(partitions)
        for tp in partitions:
            self._position.setdefault(tp, self.committed.get(tp, 0))

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._position[tp] = offset

    def seek_to_beginning(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self._position[tp] = 0

    def seek_to_end(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self._position[tp] = len(self.log[tp])

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[FakeMessage]]:
        self.polls += 1
        out: dict[TopicPartition, list[FakeMessage]] = {}
        budget = max_records if max_records is not None else 1 << 30
        for tp in self._assigned:
            if tp in self._paused or budget <= 0:
                continue
            pos = self._position.get(tp, 0)
            batch = self.log[tp][pos:pos + budget]
            if batch:
                out[tp] = batch
                self._position[tp] = pos + len(batch)
                budget -= len(batch)
        return out

    def position(self, tp: TopicPartition, timeout_ms: int | None = None) -> int:
        return self._position.get(tp, 0)

    def highwater(self, tp: TopicPartition) -> int:
        return len(self.log[tp])

    def pause(self, *tps: TopicPartition) -> None:
        self._paused |= set(tps)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def resume(self, *tps: TopicPartition) -> None:
        self._paused -= set(tps)

    def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        if self.commit_error is not None:
            error, self.commit_error = self.commit_error, None
            raise error
        self.committed.update({tp: om.offset for tp, om in offsets.items()})

    def close(self, autocommit: bool = False) -> None:
        self.closed = True


class FakeFuture:
    """A send's outcome, known at once: acknowledged, or refused with ``exception``."""

    def __init__(self, exception: Exception | None = None) -> None:
        self.is_done = True
        self.exception = exception

    def failed(self) -> bool:
        return self.exception is not None


class FakeProducer:
    """Keeps what was sent; ``flush`` succeeds unless told to fail. A send is refused (its future
    fails, as when the broker refuses a record) with the next of ``refusals``, while any are left;
    refused sends are not kept in ``sent``."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.flush_error: Exception | None = None
        self.refusals: list[Exception] = []

    def send(self, topic: str, **kwargs: Any) -> FakeFuture:
        if self.refusals:
            return FakeFuture(self.refusals.pop(0))
        self.sent.append({"topic": topic, **kwargs})
        return FakeFuture()

    def flush(self, timeout: float | None = None) -> None:
        if self.flush_error is not None:
            raise self.flush_error
