"""The model-update stream as Kafka sees it: record headers, finding where to start, applying in order.

Every record the trainer writes to ``model-updates`` (one partition, so one order) carries
two headers besides its safetensors payload, so a reader can find its way without
decoding payloads:

- ``streamrecall.model.kind``: ``full`` or ``delta``
- ``streamrecall.model.version``: the update's version, decimal

A fresh reader starts at the **last full update** (found by scanning the topic backwards
in windows, headers only) and applies everything after it in order: a full update resets
a replica, deltas chain on it by ``base_version``. Records before that full update are
superseded and not decoded. Duplicates (version ≤ the replica's) are skipped; a delta that
does not chain (a gap) is skipped until the next full update heals it; a payload that is
malformed, unsafe or made for another model is dead-lettered, and reading goes on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from kafka import KafkaConsumer, TopicPartition

from streamrecall.consumers.deadletter import DeadLetterSink, header_int, headers_dict
from streamrecall.consumers.runtime import Record
from streamrecall.consumers.table import TopicReader
from streamrecall.errors import StreamrecallError, TransientError
from streamrecall.events import InvalidEvent
from streamrecall.model import Applied, ModelUpdate, ModelUpdateError, TowerReplica, decode_update
from streamrecall.model.safeio import SafeIOError, read_layout

log = logging.getLogger(__name__)

HEADER_KIND = "streamrecall.model.kind"
HEADER_VERSION = "streamrecall.model.version"
#: Kafka's message limit for the topic (topics.py sets max.message.bytes to this).
MAX_UPDATE_BYTES = 64 << 20
#: Records per backwards step when scanning for the last full update.
SCAN_WINDOW = 64
#: Updates applied per tick(): decoding one can take tens of ms for big models.
UPDATES_PER_TICK = 4


def decode_model_update(value: bytes | None, max_bytes: int = MAX_UPDATE_BYTES) -> ModelUpdate:
    """The one decoder of the model-updates topic, for every reader of it (indexer, publisher):
    an update, or :class:`InvalidEvent` with a reason (``null``, ``invalid``) to dead-letter."""
    if value is None:
        raise InvalidEvent("null", "model update is null")
    try:
        return decode_update(value, max_bytes=max_bytes)
    except ModelUpdateError as exc:
        raise InvalidEvent("invalid", f"model update: {exc}") from None


def update_headers(kind: str, version: int) -> list[tuple[str, bytes]]:
    return [(HEADER_KIND, kind.encode()), (HEADER_VERSION, str(version).encode())]


@dataclass(frozen=True)
class UpdateMark:
    """What the headers of one record say (kind None: no or unreadable headers)."""

    offset: int
    kind: str | None
    version: int | None


def _mark(m: Any) -> UpdateMark:
    """What the record's headers claim, kept only if the payload's own JSON header (read without
    materialising tensors) says the same: a garbage record carrying update headers is unmarked,
    so it can neither pose as the last full update nor set the version a trainer resumes past."""
    headers = headers_dict(m.headers)
    kind = headers.get(HEADER_KIND) or None
    version = header_int(headers.get(HEADER_VERSION))
    if kind is None and version is None:
        return UpdateMark(m.offset, None, None)
    try:
        _, payload = read_layout(m.value) if m.value is not None else (None, {})
    except SafeIOError:
        payload = {}
    if payload.get("kind") != kind or payload.get("version") != version:
        return UpdateMark(m.offset, None, None)
    return UpdateMark(m.offset, kind if kind in ("full", "delta") else None, version)


def _read_range(consumer: KafkaConsumer, tp: TopicPartition, lo: int, hi: int | None,
                timeout_s: float) -> tuple[list[UpdateMark], int]:
    """Headers of records in [lo, hi) (hi None: to the high watermark); returns them and the end read."""
    consumer.assign([tp])
    consumer.seek(tp, lo)
    marks: list[UpdateMark] = []
    deadline = time.monotonic() + timeout_s
    while True:
        for messages in consumer.poll(timeout_ms=100, max_records=500).values():
            marks.extend(_mark(m) for m in messages if hi is None or m.offset < hi)
        end = hi if hi is not None else consumer.highwater(tp)
        if end is not None and consumer.position(tp) >= end:
            return marks, end
        if time.monotonic() > deadline:
            raise TransientError(f"could not read {tp.topic}[{tp.partition}] in {timeout_s:.0f}s")


def scan_back(consumer: KafkaConsumer, topic: str, want: Callable[[list[UpdateMark]], bool],
              timeout_s: float = 60.0) -> list[UpdateMark]:
    """Headers of the topic's newest records, read backwards in growing windows until ``want``
    says the marks read so far (oldest first) suffice or the beginning is reached."""
    tp = TopicPartition(topic, 0)
    # end_offsets may under-count by one record batch on some brokers; the first window
    # reads on to the fetch's high watermark, which is right.
    end = consumer.end_offsets([tp])[tp]
    lo, hi, window = max(0, end - SCAN_WINDOW), None, SCAN_WINDOW
    marks: list[UpdateMark] = []
    while True:
        newer, end = _read_range(consumer, tp, lo, hi, timeout_s)
        marks = newer + marks
        if want(marks) or lo == 0:
            return marks
        hi, window = lo, window * 2
        lo = max(0, lo - window)


def last_version(consumer: KafkaConsumer, topic: str) -> int:
    """The highest version named on the topic (0 if none): a restarted trainer goes past it."""
    marks = scan_back(consumer, topic, lambda ms: any(m.version is not None for m in ms))
    return max((m.version for m in marks if m.version is not None), default=0)


def last_full_offset(consumer: KafkaConsumer, topic: str) -> int:
    """Offset of the newest full update (the beginning when there is none)."""
    marks = scan_back(consumer, topic, lambda ms: any(m.kind == "full" for m in ms))
    fulls = [m.offset for m in marks if m.kind == "full"]
    return fulls[-1] if fulls else 0


class ModelUpdateFeed:
    """Keeps a :class:`TowerReplica` current from the model-updates topic.

    ``on_applied(update, applied)`` runs after each applied update (the publisher queues
    re-encodes there). :meth:`start` catches up from the last full update before the role's
    loop starts; :meth:`poll` applies what arrived since, a few updates per call.
    """

    def __init__(self, consumer: KafkaConsumer, topic: str, replica: TowerReplica, deadletters: DeadLetterSink,
                 on_applied: Callable[[ModelUpdate, Applied], None] = lambda u, a: None,
                 max_bytes: int = MAX_UPDATE_BYTES) -> None:
        partitions = consumer.partitions_for_topic(topic) or set()
        if len(partitions) > 1:
            raise StreamrecallError(f"{topic} has {len(partitions)} partitions; model updates need exactly one "
                                    "(their order is the version order)")
        self.consumer = consumer
        self.topic = topic
        self.replica = replica
        self.on_applied = on_applied
        self.reader = TopicReader(consumer, topic, "model-updates", lambda v: decode_model_update(v, max_bytes),
                                  self._apply, deadletters, partitions=[0])
        self.counts = {"applied": 0, "duplicate": 0, "gap": 0}

    def start(self, timeout_s: float) -> bool:
        offset = last_full_offset(self.consumer, self.topic)
        log.info("model updates: starting at %s[0]@%d (the last full update)", self.topic, offset)
        self.reader.start({0: offset})
        return self.reader.catch_up(timeout_s)

    def poll(self) -> int:
        return self.reader.poll(timeout_ms=0, max_records=UPDATES_PER_TICK)

    def _apply(self, record: Record) -> None:
        update: ModelUpdate = record.value
        applied = self.replica.apply(update)  # ModelUpdateError (another model): dead-lettered by the reader
        self.counts[applied.status] += 1
        if applied.status == "gap":
            log.warning("model update v%d (delta on v%d) at %s[0]@%d does not chain onto v%d; "
                        "waiting for the next full update", update.version, update.base_version, self.topic,
                        record.offset, self.replica.version)
            return
        if applied.status == "duplicate":
            log.debug("model update v%d skipped: already at v%d", update.version, self.replica.version)
            return
        log.info("model update v%d (%s) applied", update.version, update.kind)
        self.on_applied(update, applied)

    def close(self) -> None:
        self.reader.close()
