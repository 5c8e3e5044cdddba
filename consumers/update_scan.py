"""Finding where to start in ``model-updates``: the last full update, the last version published.

A fresh reader starts at the **last full update** (the first record of the newest complete one,
found by scanning the topic backwards in windows of :data:`SCAN_WINDOW` records, doubling, and
assembling what it reads); a starting trainer needs the last version and fencing epoch
published. Only verified records count (with ``model_signing_key`` set, a signature that checks)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from kafka import KafkaConsumer, TopicPartition

from streamrecall.consumers.deadletter import header_int, headers_dict

# The header names are re-exported here: this module is where readers and writers find them.
from streamrecall.consumers.update_chunks import HEADER_KIND, HEADER_VERSION, ChunkAssembler, Complete, read_chunk
from streamrecall.consumers.update_codec import check_signature
from streamrecall.errors import TransientError
from streamrecall.events import InvalidEvent
from streamrecall.model.safeio import SafeIOError, read_layout
from streamrecall.model.update import DEFAULT_MAX_UPDATE_BYTES
from streamrecall.settings import Secret

#: Records per backwards step when scanning for the last full update (grows by doubling).
SCAN_WINDOW = 64


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
