"""The model-update stream as Kafka sees it: record headers, finding where to start, applying in order.

Every record the trainer writes to ``model-updates`` (one partition, so one order) carries
headers besides its safetensors payload, so a reader can find its way without decoding
payloads:

- ``streamrecall.model.kind``: ``full`` or ``delta``
- ``streamrecall.model.version``: the update's version, decimal
- ``streamrecall.model.epoch``: the writing trainer process's fencing epoch, decimal
- ``streamrecall.model.signature``: with ``model_signing_key`` set, the hex HMAC-SHA256 of the
  payload's bytes (which hold kind, version and epoch in their JSON header). Replicas with the
  key refuse a record without it (``unsigned``) or with a wrong one (``bad-signature``), and
  the start-up scans below count only records whose signature verifies (docs/security.md).

A fresh reader starts at the **last full update** (found by scanning the topic backwards
in windows, headers only) and applies everything after it in order: a full update resets
a replica, deltas chain on it by ``base_version``. Records before that full update are
superseded and not decoded. Duplicates (version ≤ the replica's) are skipped; a delta that
does not chain (a gap) is skipped until the next full update heals it; a payload that is
malformed, unsafe or made for another model is dead-lettered, and reading goes on.
"""

from __future__ import annotations

import hashlib
import hmac
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
from streamrecall.settings import Secret

log = logging.getLogger(__name__)

HEADER_KIND = "streamrecall.model.kind"
HEADER_VERSION = "streamrecall.model.version"
HEADER_EPOCH = "streamrecall.model.epoch"
HEADER_SIGNATURE = "streamrecall.model.signature"
#: Dead-letter reasons (and streamrecall_model_updates_refused_total labels) of the signature check.
SIGNATURE_REASONS = ("unsigned", "bad-signature")
#: Kafka's message limit for the topic (topics.py sets max.message.bytes to this).
MAX_UPDATE_BYTES = 64 << 20
#: Records per backwards step when scanning for the last full update.
SCAN_WINDOW = 64
#: Updates applied per tick(): decoding one can take tens of ms for big models.
UPDATES_PER_TICK = 4


def sign_update(key: Secret, data: bytes) -> str:
    """The hex HMAC-SHA256 of an update's payload bytes under ``key``."""
    return hmac.new(key.reveal().encode(), data, hashlib.sha256).hexdigest()


def check_signature(key: Secret, data: bytes, headers: list[tuple[str, bytes | None]] | None) -> None:
    """Raise :class:`InvalidEvent` (``unsigned`` or ``bad-signature``) unless the record's signature
    header is the HMAC of ``data`` under ``key``. Compared in constant time."""
    given = headers_dict(headers).get(HEADER_SIGNATURE)
    if not given:
        raise InvalidEvent("unsigned", "model update has no signature header; model_signing_key is set, so "
                                       "only updates signed with it are applied")
    if not hmac.compare_digest(given.encode("utf-8", "replace"), sign_update(key, data).encode()):
        raise InvalidEvent("bad-signature", "model update signature does not match its bytes under "
                                            "model_signing_key (forged, corrupted, or signed with another key)")


def decode_model_update(value: bytes | None, max_bytes: int = MAX_UPDATE_BYTES, *,
                        headers: list[tuple[str, bytes | None]] | None = None,
                        signing_key: Secret | None = None) -> ModelUpdate:
    """The one decoder of the model-updates topic, for every reader of it (indexer, publisher):
    an update, or :class:`InvalidEvent` with a reason (``null``, ``invalid``, and with a
    ``signing_key`` ``unsigned``/``bad-signature``, checked before any parsing) to dead-letter."""
    if value is None:
        raise InvalidEvent("null", "model update is null")
    if signing_key is not None:
        check_signature(signing_key, bytes(value), headers)
    try:
        return decode_update(value, max_bytes=max_bytes)
    except ModelUpdateError as exc:
        raise InvalidEvent("invalid", f"model update: {exc}") from None


class ModelUpdateDecoder:
    """:func:`decode_model_update` bound to a size limit and signing key. It reads the record's
    headers (the signature), so the runtime and side readers hand them over (``uses_headers``)."""

    uses_headers = True

    def __init__(self, signing_key: Secret | None = None, max_bytes: int = MAX_UPDATE_BYTES) -> None:
        self.signing_key = signing_key
        self.max_bytes = max_bytes

    def __call__(self, value: bytes | None, headers: list[tuple[str, bytes | None]] | None = None) -> ModelUpdate:
        return decode_model_update(value, self.max_bytes, headers=headers, signing_key=self.signing_key)


def update_headers(kind: str, version: int, trainer_epoch: int = 0,
                   signature: str | None = None) -> list[tuple[str, bytes]]:
    headers = [(HEADER_KIND, kind.encode()), (HEADER_VERSION, str(version).encode()),
               (HEADER_EPOCH, str(trainer_epoch).encode())]
    if signature is not None:
        headers.append((HEADER_SIGNATURE, signature.encode()))
    return headers


@dataclass(frozen=True)
class UpdateMark:
    """What the headers of one record say (kind None: no or unreadable headers)."""

    offset: int
    kind: str | None
    version: int | None
    trainer_epoch: int = 0


def _mark(m: Any, signing_key: Secret | None = None) -> UpdateMark:
    """What the record's headers claim, kept only if the payload's own JSON header (read without
    materialising tensors) says the same and, with a ``signing_key``, the signature verifies: a
    garbage or forged record carrying update headers is unmarked, so it can neither pose as the
    last full update nor set the version and epoch a trainer resumes past."""
    headers = headers_dict(m.headers)
    kind = headers.get(HEADER_KIND) or None
    version = header_int(headers.get(HEADER_VERSION))
    unmarked = UpdateMark(m.offset, None, None)
    if kind is None and version is None:
        return unmarked
    if signing_key is not None:
        try:
            check_signature(signing_key, bytes(m.value or b""), m.headers)
        except InvalidEvent:
            return unmarked
    try:
        _, payload = read_layout(m.value) if m.value is not None else (None, {})
    except SafeIOError:
        payload = {}
    if payload.get("kind") != kind or payload.get("version") != version:
        return unmarked
    # The epoch counts as the payload says (it is what the signature covers); absent: 0.
    epoch = payload.get("trainer_epoch", 0)
    epoch = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) and 0 <= epoch < 2**63 else 0
    return UpdateMark(m.offset, kind if kind in ("full", "delta") else None, version, epoch)


def _read_range(consumer: KafkaConsumer, tp: TopicPartition, lo: int, hi: int | None,
                timeout_s: float, signing_key: Secret | None) -> tuple[list[UpdateMark], int]:
    """Headers of records in [lo, hi) (hi None: to the high watermark); returns them and the end read."""
    consumer.assign([tp])
    consumer.seek(tp, lo)
    marks: list[UpdateMark] = []
    deadline = time.monotonic() + timeout_s
    while True:
        for messages in consumer.poll(timeout_ms=100, max_records=500).values():
            marks.extend(_mark(m, signing_key) for m in messages if hi is None or m.offset < hi)
        end = hi if hi is not None else consumer.highwater(tp)
        if end is not None and consumer.position(tp) >= end:
            return marks, end
        if time.monotonic() > deadline:
            raise TransientError(f"could not read {tp.topic}[{tp.partition}] in {timeout_s:.0f}s")


def scan_back(consumer: KafkaConsumer, topic: str, want: Callable[[list[UpdateMark]], bool],
              timeout_s: float = 60.0, signing_key: Secret | None = None) -> list[UpdateMark]:
    """Headers of the topic's newest records, read backwards in growing windows until ``want``
    says the marks read so far (oldest first) suffice or the beginning is reached. With a
    ``signing_key`` only records whose signature verifies are marked."""
    tp = TopicPartition(topic, 0)
    # end_offsets may under-count by one record batch on some brokers; the first window
    # reads on to the fetch's high watermark, which is right.
    end = consumer.end_offsets([tp])[tp]
    lo, hi, window = max(0, end - SCAN_WINDOW), None, SCAN_WINDOW
    marks: list[UpdateMark] = []
    while True:
        newer, end = _read_range(consumer, tp, lo, hi, timeout_s, signing_key)
        marks = newer + marks
        if want(marks) or lo == 0:
            return marks
        hi, window = lo, window * 2
        lo = max(0, lo - window)


@dataclass(frozen=True)
class Published:
    """The newest version and the highest trainer epoch named on the topic (0 if none)."""

    version: int
    trainer_epoch: int


def last_published(consumer: KafkaConsumer, topic: str, signing_key: Secret | None = None) -> Published:
    """What a starting trainer goes past: it publishes above ``version``, as epoch ``trainer_epoch + 1``.
    Read from the newest window holding a (verified, with a key) update."""
    marks = [m for m in scan_back(consumer, topic, lambda ms: any(m.version is not None for m in ms),
                                  signing_key=signing_key) if m.version is not None]
    return Published(max((m.version for m in marks if m.version is not None), default=0),
                     max((m.trainer_epoch for m in marks), default=0))


def last_full_offset(consumer: KafkaConsumer, topic: str, signing_key: Secret | None = None) -> int:
    """Offset of the newest full update (the beginning when there is none); with a ``signing_key``
    the newest one whose signature verifies."""
    marks = scan_back(consumer, topic, lambda ms: any(m.kind == "full" for m in ms), signing_key=signing_key)
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
                 max_bytes: int = MAX_UPDATE_BYTES, signing_key: Secret | None = None) -> None:
        partitions = consumer.partitions_for_topic(topic) or set()
        if len(partitions) > 1:
            raise StreamrecallError(f"{topic} has {len(partitions)} partitions; model updates need exactly one "
                                    "(their order is the version order)")
        self.consumer = consumer
        self.topic = topic
        self.replica = replica
        self.on_applied = on_applied
        self.signing_key = signing_key
        self.reader = TopicReader(consumer, topic, "model-updates", ModelUpdateDecoder(signing_key, max_bytes),
                                  self._apply, deadletters, partitions=[0])
        self.counts = {"applied": 0, "duplicate": 0, "gap": 0}

    def start(self, timeout_s: float) -> bool:
        offset = last_full_offset(self.consumer, self.topic, self.signing_key)
        log.info("model updates: starting at %s[0]@%d (the last full update)", self.topic, offset)
        self.reader.start({0: offset})
        return self.reader.catch_up(timeout_s)

    def poll(self) -> int:
        return self.reader.poll(timeout_ms=0, max_records=UPDATES_PER_TICK)

    def _apply(self, record: Record) -> None:
        update: ModelUpdate = record.value
        # ModelUpdateError (another model) and ModelUpdateRefused (stale epoch, version jump):
        # dead-lettered by the reader with their reason
        applied = self.replica.apply(update)
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
