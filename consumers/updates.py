"""The model-update stream as Kafka sees it: chunks, the one assembler, finding where to start.

Every update the trainer writes to ``model-updates`` (one partition, so one order) is a sequence
of chunk records (``consumers/update_chunks.py``: no record above 1 MiB; a small update is one
record), whose headers let a reader find its way without decoding payloads:

- ``streamrecall.model.kind``: ``full`` or ``delta``
- ``streamrecall.model.version``: the update's version, decimal
- ``streamrecall.model.epoch``: the writing trainer process's fencing epoch, decimal
- ``streamrecall.model.chunk`` / ``streamrecall.model.size``: ``INDEX/COUNT`` and the payload's bytes
- ``streamrecall.model.signature``: with ``model_signing_key`` set, on the last chunk (the commit),
  the hex HMAC-SHA256 of the whole assembled payload (which holds kind, version and epoch in its
  JSON header). Replicas with the key refuse an update without it (``unsigned``) or with a wrong
  one (``bad-signature``), and the start-up scans below count only updates whose signature
  verifies (docs/security.md).

:class:`ModelUpdateStream` is the one path from records to applied updates, used by every
reader (the publisher's :class:`ModelUpdateFeed`, the indexer's poll loop and its replay): it
assembles chunks (bounded by ``max_bytes``), decodes the whole payload once, applies it, and
dead-letters a broken sequence or refused update once, at the offset of its first record.

A fresh reader starts at the **last full update** (the first record of the newest complete one,
found by scanning the topic backwards in windows and assembling what it reads) and applies
everything after it in order: a full update resets a replica, deltas chain on it by
``base_version``. Records before that full update are superseded and not decoded. Duplicates
(version ≤ the replica's) are skipped; a delta that does not chain (a gap) is skipped until the
next full update heals it; a payload that is malformed, unsafe or made for another model is
dead-lettered, and reading goes on.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from kafka import KafkaConsumer, TopicPartition

from streamrecall.consumers.deadletter import DeadLetter, DeadLetterSink, header_int, headers_dict
from streamrecall.consumers.runtime import decode_value
from streamrecall.consumers.table import TopicReader
# The header names are re-exported here: this module is where readers and writers find them.
from streamrecall.consumers.update_chunks import (HEADER_EPOCH, HEADER_KIND, HEADER_SIGNATURE, HEADER_VERSION,
                                                  Broken, Chunk, ChunkAssembler, ChunkReader, Complete, read_chunk)
from streamrecall.errors import StreamrecallError, TransientError
from streamrecall.events import InvalidEvent
from streamrecall.model import Applied, ModelConfig, ModelUpdate, ModelUpdateError, TowerReplica, decode_update
from streamrecall.model.safeio import SafeIOError, read_layout
from streamrecall.model.update import DEFAULT_MAX_UPDATE_BYTES, max_update_bytes
from streamrecall.settings import Secret, Settings

log = logging.getLogger(__name__)

#: Dead-letter reasons (and streamrecall_model_updates_refused_total labels) of the signature check.
SIGNATURE_REASONS = ("unsigned", "bad-signature")
#: Records per backwards step when scanning for the last full update (grows by doubling).
SCAN_WINDOW = 64
#: Records read per tick() by a side reader: at most this many MiB copied, and the few updates
#: they complete decoded (decoding a big one takes tens of ms or more).
RECORDS_PER_TICK = 16


def update_max_bytes(settings: Settings, config: ModelConfig) -> int:
    """The most bytes a reader assembles of one update: ``model_update_max_bytes``, by default the
    largest update ``config``'s model can produce (so every genuine update fits)."""
    if settings.model_update_max_bytes is not None:
        return settings.model_update_max_bytes
    return max_update_bytes(config.structural())


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


def decode_model_update(value: bytes | None, max_bytes: int = DEFAULT_MAX_UPDATE_BYTES, *,
                        headers: list[tuple[str, bytes | None]] | None = None,
                        signing_key: Secret | None = None) -> ModelUpdate:
    """The one decoder of an assembled model-update payload (:class:`ModelUpdateStream` calls it for
    every reader): an update, or :class:`InvalidEvent` with a reason (``null``, ``invalid``, and
    with a ``signing_key`` ``unsigned``/``bad-signature``, checked before any parsing) to
    dead-letter. ``headers`` are the commit record's (the signature)."""
    if value is None:
        raise InvalidEvent("null", "model update is null")
    if signing_key is not None:
        check_signature(signing_key, bytes(value), headers)
    try:
        return decode_update(value, max_bytes=max_bytes)
    except ModelUpdateError as exc:
        raise InvalidEvent("invalid", f"model update: {exc}") from None


class ModelUpdateDecoder:
    """:func:`decode_model_update` bound to a size limit and signing key, called with the commit
    record's headers (``uses_headers``, as :func:`~streamrecall.consumers.runtime.decode_value` does)."""

    uses_headers = True

    def __init__(self, signing_key: Secret | None = None, max_bytes: int = DEFAULT_MAX_UPDATE_BYTES) -> None:
        self.signing_key = signing_key
        self.max_bytes = max_bytes

    def __call__(self, value: bytes | None, headers: list[tuple[str, bytes | None]] | None = None) -> ModelUpdate:
        return decode_model_update(value, self.max_bytes, headers=headers, signing_key=self.signing_key)


def update_headers(kind: str, version: int, trainer_epoch: int = 0,
                   signature: str | None = None) -> list[tuple[str, bytes]]:
    """The headers of an update sent as one record without chunk headers (read as chunk ``0/1``)."""
    headers = [(HEADER_KIND, kind.encode()), (HEADER_VERSION, str(version).encode()),
               (HEADER_EPOCH, str(trainer_epoch).encode())]
    if signature is not None:
        headers.append((HEADER_SIGNATURE, signature.encode()))
    return headers


@dataclass(frozen=True)
class UpdateMark:
    """What the headers of one update say; ``offset`` is its first record's (kind None: no or
    unreadable headers)."""

    offset: int
    kind: str | None
    version: int | None
    trainer_epoch: int = 0


def _mark(m: Any, signing_key: Secret | None = None) -> UpdateMark:
    """What an assembled update's (commit) headers claim (``m``: offset, headers, value), kept only
    if the payload's own JSON header (read without materialising tensors) says the same and, with a
    ``signing_key``, the signature verifies: a garbage or forged update carrying update headers is
    unmarked, so it can neither pose as the last full update nor set the version and epoch a
    trainer resumes past."""
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


@dataclass(frozen=True)
class _Assembled:
    """A complete update as :func:`_mark` reads it."""

    offset: int
    headers: list[tuple[str, bytes | None]]
    value: bytes


def _read_range(consumer: KafkaConsumer, tp: TopicPartition, lo: int, hi: int | None, timeout_s: float,
                signing_key: Secret | None, max_bytes: int) -> tuple[list[UpdateMark], int | None]:
    """Marks of the updates whose chunks all lie in [lo, hi) (hi None: to the high watermark),
    assembled one at a time, and the offset of the first update that starts in the range (None:
    none does; the chunks read belong to one that started before ``lo``)."""
    consumer.assign([tp])
    consumer.seek(tp, lo)
    assembler = ChunkAssembler(max_bytes)
    marks: list[UpdateMark] = []
    first_start: int | None = None
    deadline = time.monotonic() + timeout_s
    while True:
        for messages in consumer.poll(timeout_ms=100, max_records=64).values():
            for m in messages:
                if hi is not None and m.offset >= hi:
                    continue
                try:
                    chunk = read_chunk(m.value, m.headers)
                except InvalidEvent:
                    continue
                if chunk.index == 0 and first_start is None:
                    first_start = m.offset
                for outcome in assembler.add(m.offset, chunk):
                    if isinstance(outcome, Complete):
                        marks.append(_mark(_Assembled(outcome.first, outcome.headers, outcome.payload), signing_key))
        end = hi if hi is not None else consumer.highwater(tp)
        if end is not None and consumer.position(tp) >= end:
            return marks, first_start
        if time.monotonic() > deadline:
            raise TransientError(f"could not read {tp.topic}[{tp.partition}] in {timeout_s:.0f}s")


def scan_back(consumer: KafkaConsumer, topic: str, want: Callable[[list[UpdateMark]], bool],
              timeout_s: float = 60.0, signing_key: Secret | None = None,
              max_bytes: int = DEFAULT_MAX_UPDATE_BYTES) -> list[UpdateMark]:
    """Marks of the topic's newest complete updates, read backwards in growing windows until
    ``want`` says the marks read so far (oldest first) suffice or the beginning is reached. With a
    ``signing_key`` only updates whose signature verifies are marked."""
    tp = TopicPartition(topic, 0)
    # end_offsets may under-count by one record batch on some brokers; the first window
    # reads on to the fetch's high watermark, which is right.
    end = consumer.end_offsets([tp])[tp]
    lo, hi, window = max(0, end - SCAN_WINDOW), None, SCAN_WINDOW
    marks: list[UpdateMark] = []
    while True:
        newer, first_start = _read_range(consumer, tp, lo, hi, timeout_s, signing_key, max_bytes)
        marks = newer + marks
        if want(marks) or lo == 0:
            return marks
        # Chunks before the first update that starts in the window belong to one that began
        # earlier: the next window reads them again, with their beginning.
        if first_start is not None:
            hi = first_start
        window *= 2
        lo = max(0, lo - window)


@dataclass(frozen=True)
class Published:
    """The newest version and the highest trainer epoch named on the topic (0 if none)."""

    version: int
    trainer_epoch: int


def last_published(consumer: KafkaConsumer, topic: str, signing_key: Secret | None = None,
                   max_bytes: int = DEFAULT_MAX_UPDATE_BYTES) -> Published:
    """What a starting trainer goes past: it publishes above ``version``, as epoch ``trainer_epoch + 1``.
    Read from the newest window holding a complete (verified, with a key) update."""
    marks = [m for m in scan_back(consumer, topic, lambda ms: any(m.version is not None for m in ms),
                                  signing_key=signing_key, max_bytes=max_bytes) if m.version is not None]
    return Published(max((m.version for m in marks if m.version is not None), default=0),
                     max((m.trainer_epoch for m in marks), default=0))


def last_full_offset(consumer: KafkaConsumer, topic: str, signing_key: Secret | None = None,
                     max_bytes: int = DEFAULT_MAX_UPDATE_BYTES) -> int:
    """Offset of the first record of the newest complete full update (the beginning when there is
    none); with a ``signing_key`` the newest one whose signature verifies."""
    marks = scan_back(consumer, topic, lambda ms: any(m.kind == "full" for m in ms), signing_key=signing_key,
                      max_bytes=max_bytes)
    fulls = [m.offset for m in marks if m.kind == "full"]
    return fulls[-1] if fulls else 0


class ModelUpdateStream:
    """Records of model-updates in, applied updates out: the one path every reader takes.

    :meth:`add` takes each record's :class:`Chunk` (read by :class:`ChunkReader`) in offset order;
    a record at an offset already read is ignored (a retried batch). A complete sequence is
    decoded once (signature, then payload) and handed to ``apply(update, first_offset)``; a broken
    sequence, an undecodable payload and an update ``apply`` refuses (a
    :class:`StreamrecallError`: another model, a stale epoch, a version jump) each become one
    :class:`DeadLetter` at the offset of the sequence's first record, given to ``deadletter``.
    :meth:`resume_offset` is the next offset to read that loses nothing (see
    :meth:`ChunkAssembler.resume_offset`)."""

    def __init__(self, topic: str, apply: Callable[[ModelUpdate, int], None],
                 deadletter: Callable[[DeadLetter], None], *, max_bytes: int,
                 signing_key: Secret | None = None, partition: int = 0) -> None:
        self.topic = topic
        self.partition = partition
        self.apply = apply
        self.deadletter = deadletter
        self.decode = ModelUpdateDecoder(signing_key, max_bytes)
        self.assembler = ChunkAssembler(max_bytes)
        self._next: int | None = None  # next offset not yet read

    def add(self, offset: int, chunk: Chunk, key: bytes | None = None) -> None:
        if self._next is not None and offset < self._next:
            return
        self._next = offset + 1
        for outcome in self.assembler.add(offset, chunk):
            if isinstance(outcome, Broken):
                self._refuse(outcome.first, key, outcome.value, outcome.reason, outcome.error)
            else:
                self._complete(outcome, key)

    def resume_offset(self, next_offset: int) -> int:
        return self.assembler.resume_offset(next_offset)

    def _complete(self, done: Complete, key: bytes | None) -> None:
        where = f"{self.topic}[{self.partition}]@{done.first}"
        try:
            update = decode_value(self.decode, done.payload, where, done.headers)
            self.apply(update, done.first)
        except StreamrecallError as exc:
            self._refuse(done.first, key, done.payload, getattr(exc, "reason", "invalid"),
                         f"{type(exc).__name__}: {exc}")

    def _refuse(self, offset: int, key: bytes | None, value: bytes, reason: str, error: str) -> None:
        self.deadletter(DeadLetter(self.topic, self.partition, offset, key, value, reason, error))


class ModelUpdateFeed:
    """Keeps a :class:`TowerReplica` current from the model-updates topic (a side reader).

    ``on_applied(update, applied)`` runs after each applied update (the publisher queues
    re-encodes there). :meth:`start` catches up from the last full update before the role's
    loop starts; :meth:`poll` applies what arrived since, a few records per call.
    """

    def __init__(self, consumer: KafkaConsumer, topic: str, replica: TowerReplica, deadletters: DeadLetterSink,
                 on_applied: Callable[[ModelUpdate, Applied], None] = lambda u, a: None, *,
                 max_bytes: int, signing_key: Secret | None = None) -> None:
        partitions = consumer.partitions_for_topic(topic) or set()
        if len(partitions) > 1:
            raise StreamrecallError(f"{topic} has {len(partitions)} partitions; model updates need exactly one "
                                    "(their order is the version order)")
        self.consumer = consumer
        self.topic = topic
        self.replica = replica
        self.on_applied = on_applied
        self.signing_key = signing_key
        self.max_bytes = max_bytes
        self.stream = ModelUpdateStream(topic, self._apply, lambda letter: deadletters.send(letter, "model-updates"),
                                        max_bytes=max_bytes, signing_key=signing_key)
        self.reader = TopicReader(consumer, topic, "model-updates", ChunkReader(),
                                  lambda r: self.stream.add(r.offset, r.value, r.key), deadletters, partitions=[0])
        self.counts = {"applied": 0, "duplicate": 0, "gap": 0}

    def start(self, timeout_s: float) -> bool:
        offset = last_full_offset(self.consumer, self.topic, self.signing_key, self.max_bytes)
        log.info("model updates: starting at %s[0]@%d (the last full update)", self.topic, offset)
        self.reader.start({0: offset})
        return self.reader.catch_up(timeout_s)

    def poll(self) -> int:
        return self.reader.poll(timeout_ms=0, max_records=RECORDS_PER_TICK)

    def _apply(self, update: ModelUpdate, offset: int) -> None:
        # ModelUpdateError (another model) and ModelUpdateRefused (stale epoch, version jump):
        # dead-lettered by the stream with their reason
        applied = self.replica.apply(update)
        self.counts[applied.status] += 1
        if applied.status == "gap":
            log.warning("model update v%d (delta on v%d) at %s[0]@%d does not chain onto v%d; "
                        "waiting for the next full update", update.version, update.base_version, self.topic,
                        offset, self.replica.version)
            return
        if applied.status == "duplicate":
            log.debug("model update v%d skipped: already at v%d", update.version, self.replica.version)
            return
        log.info("model update v%d (%s) applied", update.version, update.kind)
        self.on_applied(update, applied)

    def close(self) -> None:
        self.reader.close()
