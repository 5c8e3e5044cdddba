"""Side readers: a topic read whole by every replica of a role, beside its group subscription.

A role's main input is split across its consumer group (clicks by user); some inputs are
not: every trainer needs the whole ``items`` table, every publisher every model update.
:class:`TopicReader` reads such a topic with its own manually assigned consumer (no group,
nothing committed: the table is rebuilt from the beginning at each start), decodes each
record, and hands it to a callback. Bad records take the one dead-letter path.

Reading is done in two ways: :meth:`TopicReader.catch_up` at start, before the role's
poll loop runs (bounded by a timeout), then :meth:`TopicReader.poll` with a zero timeout
from the role's ``tick()``, so it never delays the main loop.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable, Mapping

from kafka import KafkaConsumer, TopicPartition

from streamrecall.consumers.deadletter import DeadLetter, DeadLetterSink
from streamrecall.consumers.handler import Decode, Record, decode_value
from streamrecall.errors import StreamrecallError
from streamrecall.model.catalog import DEFAULT_MAX_ITEMS, ItemCatalog

log = logging.getLogger(__name__)

#: Records taken per non-blocking poll in tick(): bounds the time one tick spends here.
TICK_MAX_RECORDS = 500


class TopicReader:
    """Reads ``partitions`` of ``topic`` (default: all) and calls ``on_record`` for each good record.

    ``decode`` raises a :class:`~streamrecall.errors.StreamrecallError` (with a ``reason``) for a
    bad value; ``on_record`` may raise one too (an update that does not fit the model). Both
    become dead letters, and reading goes on.
    """

    def __init__(self, consumer: KafkaConsumer, topic: str, logical: str, decode: Decode,
                 on_record: Callable[[Record], None], deadletters: DeadLetterSink,
                 partitions: Iterable[int] | None = None) -> None:
        self.consumer = consumer
        self.topic = topic
        self.logical = logical
        self.decode = decode
        self.on_record = on_record
        self.deadletters = deadletters
        if partitions is None:
            partitions = consumer.partitions_for_topic(topic) or ()
        self.partitions = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not self.partitions:
            raise StreamrecallError(f"topic {topic} has no partitions; run `streamrecall topics create`")
        self.records_read = 0
        deadletters.declare([logical])

    def start(self, offsets: Mapping[int, int] | None = None) -> None:
        """Assign the partitions and seek: to ``offsets[partition]`` where given, else the beginning."""
        self.consumer.assign(self.partitions)
        offsets = offsets or {}
        for tp in self.partitions:
            if tp.partition in offsets:
                self.consumer.seek(tp, offsets[tp.partition])
            else:
                self.consumer.seek_to_beginning(tp)

    def poll(self, timeout_ms: int = 0, max_records: int = TICK_MAX_RECORDS) -> int:
        """One poll; applies what came back and returns how many records that was."""
        polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        n = 0
        for tp, messages in polled.items():
            for m in messages:
                self._apply(tp, m)
            n += len(messages)
        self.records_read += n
        return n

    def _apply(self, tp: TopicPartition, m: Any) -> None:
        try:
            value = decode_value(self.decode, m.value, f"{tp.topic}[{tp.partition}]@{m.offset}", m.headers)
            self.on_record(Record(self.logical, tp.partition, m.offset, m.key, value, m.timestamp, m.value))
        except StreamrecallError as exc:
            letter = DeadLetter(tp.topic, tp.partition, m.offset, m.key, m.value,
                                getattr(exc, "reason", "invalid"), f"{type(exc).__name__}: {exc}")
            self.deadletters.send(letter, self.logical)

    def caught_up(self) -> bool:
        """True when every partition was read up to the high watermark of the last fetch."""
        for tp in self.partitions:
            high = self.consumer.highwater(tp)
            if high is None or self.consumer.position(tp) < high:
                return False
        return True

    def catch_up(self, timeout_s: float) -> bool:
        """Read until caught up or ``timeout_s`` passed (then the rest arrives through :meth:`poll`)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll(timeout_ms=100, max_records=5000)
            if self.caught_up():
                return True
        log.warning("%s: not caught up after %.0fs (%d records read); reading on in the background",
                    self.topic, timeout_s, self.records_read)
        return False

    def close(self) -> None:
        self.consumer.close(autocommit=False)


class ItemTable:
    """The ``items`` topic as a table: an :class:`ItemCatalog` of the latest event per item id
    (``deleted: true`` removes it), read whole by :class:`TopicReader`."""

    def __init__(self, max_items: int = DEFAULT_MAX_ITEMS) -> None:
        self.catalog = ItemCatalog(max_items)

    def apply(self, record: Record) -> None:
        item = record.value
        if item.deleted:
            self.catalog.delete(item.item_id)
        else:
            self.catalog.upsert(item)

