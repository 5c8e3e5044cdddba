"""Dead-letter routing: every bad record goes to one topic with its reason.

The record keeps its original key and value bytes; headers name the reason, the
error message, and where it came from. Nothing bad is dropped silently: the
runtime flushes this sink before it commits the offsets that cover the records, and
the flush fails while any dead letter is not acknowledged (the broker refused it: no
write access to the topic, a record above its size limit), so nothing is committed past
a record whose dead letter is not written. The refused letters are sent again at the
next flush; one refused as too large goes again without its value (and with its key cut),
its source coordinates in its headers as always.

**Once per role.** A role re-reads records after a crash (at-least-once) and its side
readers re-read whole topics at every start, so the same bad record would be refused
again. A sink given ``already_sent`` (the source coordinates this role dead-lettered
before, read back from the dead-letter topic at start by :func:`sent_by_role`) skips
those: each bad record is dead-lettered once per role, identified by
(role, source topic, partition, offset). Should that read time out, a record may be
dead-lettered twice; those coordinates still identify the duplicate.

**Bounded.** The set remembers at most ``deadletter_dedup_max`` coordinates (a setting, 100,000 by
default: about 20 MB), the oldest dead-lettered forgotten first. What that costs: a bad record
older than the last 100,000 dead letters, re-read (a side reader's start, a replay), is
dead-lettered again; the duplicate carries the same source coordinates.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError, MessageSizeTooLargeError, RecordListTooLargeError

from streamrecall.bounded import LRUMap
from streamrecall.errors import StreamrecallError
from streamrecall.events import InvalidEvent
from streamrecall.metrics import RUNTIME, STATE, RuntimeMetrics, StateMetrics
from streamrecall.model.errors import ModelUpdateRefused

log = logging.getLogger(__name__)

#: Headers on every dead-letter record.
HEADER_REASON = "streamrecall.reason"
HEADER_ERROR = "streamrecall.error"
HEADER_TOPIC = "streamrecall.source.topic"
HEADER_PARTITION = "streamrecall.source.partition"
HEADER_OFFSET = "streamrecall.source.offset"
HEADER_ROLE = "streamrecall.role"
HEADER_ORIGINAL_SIZE = "streamrecall.original.size"
HEADER_ORIGINAL_KEY_SIZE = "streamrecall.original.key.size"  # only on a letter whose key was cut
#: Source coordinates (topic, partition, offset) of records a role dead-lettered, oldest first.
SentSet = LRUMap[tuple[str, int, int], None]
DEFAULT_DEDUP_MAX = 100_000

#: Values above this are cut to this size in the dead letter (Kafka's default message limit is 1 MB),
#: with the original size in a header.
MAX_DEAD_LETTER_VALUE = 256 * 1024
#: A dead letter the broker refused as too large goes again with no value and its key cut to this.
MAX_RETRIED_KEY = 1024
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)


class DeadLetterNotWritten(StreamrecallError):
    """The broker refused dead letters: the records they refuse must not be committed yet."""


#: Why a model update is refused beyond being malformed: the signature check (with
#: model_signing_key) and the replica's fencing (docs/security.md). Each also counts in
#: streamrecall_model_updates_refused_total.
UPDATE_REFUSALS: tuple[str, ...] = ("unsigned", "bad-signature", *ModelUpdateRefused.REASONS)
#: Why a model update's chunk sequence (consumers/update_chunks.py) cannot be assembled, beside
#: ``oversized`` and ``invalid``: a chunk missing, repeated or out of order, or a sequence that never
#: committed (interleaved with the next update, or a chunk without its first).
CHUNK_REASONS: tuple[str, ...] = ("incomplete", "out-of-order")


def reasons_for(logical_topic: str) -> tuple[str, ...]:
    """Every dead-letter reason a record of ``logical_topic`` can get (the metric's label values)."""
    base = (*InvalidEvent.REASONS, "handler-error")
    return (*base, *UPDATE_REFUSALS, *CHUNK_REASONS) if logical_topic == "model-updates" else base


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


@dataclass(frozen=True)
class _Sent:
    """One dead-letter record as sent, and its send's future."""
    future: Any
    where: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    original_size: int

    def shrunk(self) -> _Sent:
        headers = [h for h in self.headers if h[0] != HEADER_ORIGINAL_SIZE]
        headers.append((HEADER_ORIGINAL_SIZE, str(self.original_size).encode()))
        key = self.key
        if key is not None and len(key) > MAX_RETRIED_KEY:
            headers.append((HEADER_ORIGINAL_KEY_SIZE, str(len(key)).encode()))
            key = key[:MAX_RETRIED_KEY]
        return replace(self, key=key, value=b"", headers=headers)

    def refused(self, exc: BaseException) -> _Sent:
        """What to send again after ``exc``: this letter, or without its value when it was too large."""
        return self.shrunk() if isinstance(exc, _TOO_LARGE) else self


class DeadLetterSink:
    """Sends dead letters to the dead-letter topic; ``flush`` makes them durable."""

    def __init__(self, producer: KafkaProducer, topic: str, role: str,
                 metrics: RuntimeMetrics = RUNTIME, already_sent: SentSet | None = None,
                 states: StateMetrics = STATE) -> None:
        self.producer = producer
        self.topic = topic
        self.role = role
        self.metrics = metrics
        self.states = states
        #: (source topic, partition, offset) this role dead-lettered already; shared by a role's sinks
        self.already_sent = already_sent if already_sent is not None else LRUMap(DEFAULT_DEDUP_MAX)
        self._lock = threading.Lock()  # side readers send from their own threads
        self._sent: list[_Sent] = []    # since the last flush
        self._refused: list[_Sent] = []  # refused by the broker: sent again at the next flush
        self._fill()

    def send(self, letter: DeadLetter, logical_topic: str | None = None) -> None:
        """Queue a dead letter, unless this role sent one for the same source record before;
        ``logical_topic`` ("clicks", ...) labels the metric."""
        source = (letter.topic, letter.partition, letter.offset)
        if source in self.already_sent:
            log.debug("%s was dead-lettered before; not again", letter.where)
            return
        self.already_sent.put(source, None)
        self._fill()
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
        self._send(_Sent(None, letter.where, letter.key, value, headers, len(letter.value or b"")))
        self.metrics.deadlettered.labels(self.role, logical_topic or letter.topic, letter.reason).inc()
        if logical_topic == "model-updates" and letter.reason in UPDATE_REFUSALS:
            self.metrics.updates_refused.labels(self.role, letter.reason).inc()

    def declare(self, logical_topics: list[str]) -> None:
        """Initialise this role's dead-letter (and refusal) series for ``logical_topics`` at 0."""
        refusals = UPDATE_REFUSALS if "model-updates" in logical_topics else ()
        self.metrics.declare(self.role, {t: reasons_for(t) for t in logical_topics}, refusals)
        self.states.declare(self.role)

    def _fill(self) -> None:
        self.states.fill(self.role, "deadletter_dedup", len(self.already_sent), self.already_sent.capacity)

    def _send(self, letter: _Sent) -> None:
        try:
            future = self.producer.send(self.topic, key=letter.key, value=letter.value, headers=letter.headers)
        except KafkaError as exc:  # refused before it left: above max_request_size (a 9 MB key), no metadata
            log.warning("dead letter for %s not sent (%s: %s); it goes again at the flush", letter.where,
                        type(exc).__name__, exc)
            with self._lock:
                self._refused.append(letter.refused(exc))
            self.metrics.deadletters_unwritten.labels(self.role).inc()
            return
        with self._lock:
            self._sent.append(replace(letter, future=future))

    def flush(self, timeout_s: float) -> None:
        """Make every dead letter sent so far durable; raises :class:`DeadLetterNotWritten` when
        the broker refused some (they go again at the next flush)."""
        with self._lock:
            again, self._refused = self._refused, []
        for letter in again:
            self._send(letter)
        with self._lock:
            unsent = len(self._refused)  # refused again before they left
        self.producer.flush(timeout=timeout_s)  # raises when a send is still pending at the timeout
        with self._lock:  # a side reader's letter sent since the flush began waits for the next one
            done = [letter for letter in self._sent if letter.future.is_done]
            self._sent = [letter for letter in self._sent if not letter.future.is_done]
        refused = [letter for letter in done if letter.future.failed()]
        if not refused and not unsent:
            return
        self.metrics.deadletters_unwritten.labels(self.role).inc(len(refused))
        with self._lock:
            self._refused += [letter.refused(letter.future.exception) for letter in refused]
            first = refused[0].where if refused else self._refused[0].where
            error = refused[0].future.exception if refused else "refused before it was sent"
        raise DeadLetterNotWritten(f"{len(refused) + unsent} dead letter(s) to {self.topic} were not written "
                                   f"(first: {first}, {error}); they are sent again, and what they refuse stays "
                                   "uncommitted until they are written")

    def close(self, timeout_s: float = 10.0) -> None:
        self.producer.close(timeout=timeout_s)


def headers_dict(headers: list[tuple[str, bytes | None]] | None) -> dict[str, str]:
    """A record's headers as text, whatever bytes they hold: a null header value reads as ''
    and bytes that are not UTF-8 are replaced, so reading headers never raises."""
    out: dict[str, str] = {}
    for key, value in headers or []:
        out[str(key)] = bytes(value).decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else ""
    return out


_DECIMAL = re.compile(r"[0-9]{1,19}")  # ASCII only: str.isdigit() is true for '²', which int() refuses


def header_int(text: str | None) -> int | None:
    """A non-negative decimal header value (at most 19 digits), or None for anything else."""
    return int(text) if text is not None and _DECIMAL.fullmatch(text) else None


def sent_by_role(consumer: KafkaConsumer, topic: str, role: str, timeout_s: float = 60.0,
                 capacity: int = DEFAULT_DEDUP_MAX) -> SentSet:
    """Source coordinates of the last ``capacity`` dead letters ``role`` wrote to ``topic``, read to
    its end (headers only matter). Bounded by ``timeout_s``: what was read by then is returned."""
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    sent: SentSet = LRUMap(capacity)
    if not tps:
        return sent
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    deadline = time.monotonic() + timeout_s
    while True:
        for messages in consumer.poll(timeout_ms=100, max_records=5000).values():
            for m in messages:
                h = headers_dict(m.headers)
                partition, offset = header_int(h.get(HEADER_PARTITION)), header_int(h.get(HEADER_OFFSET))
                if h.get(HEADER_ROLE) == role and partition is not None and offset is not None:
                    sent.put((h.get(HEADER_TOPIC, ""), partition, offset), None)
        if all(consumer.highwater(tp) is not None and consumer.position(tp) >= consumer.highwater(tp)
               for tp in tps):
            return sent
        if time.monotonic() > deadline:
            log.warning("%s: read %d earlier dead letters of %s in %.0fs, not all; some may be repeated",
                        topic, len(sent), role, timeout_s)
            return sent
