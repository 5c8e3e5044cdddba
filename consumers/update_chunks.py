"""Model updates in bounded chunks: how one update is cut into Kafka records and put back together.

Real clusters keep ``message.max.bytes`` near 1 MB, so no record on ``model-updates`` is larger
than :data:`MAX_RECORD_BYTES` (1 MiB, headers included). An update's payload (``model/update.py``)
is cut into ``count`` consecutive records, chunk ``0`` to ``count - 1``, each at most
``chunk_bytes`` of the payload. Every record of a sequence carries the same headers, so a reader
can tell sequences apart without decoding anything:

- ``streamrecall.model.kind``, ``streamrecall.model.version``, ``streamrecall.model.epoch``
- ``streamrecall.model.chunk``: ``INDEX/COUNT``, e.g. ``0/3``, ``1/3``, ``2/3``
- ``streamrecall.model.size``: the whole payload's bytes (so a reader refuses an oversized
  update at its first chunk, before buffering any of it)

The last chunk is the **commit**: with ``model_signing_key`` set it alone carries
``streamrecall.model.signature``, the HMAC of the *whole assembled payload*, so a chunk spliced
in from elsewhere (or forged) changes the assembled bytes and fails the signature. A small update
is one record, ``0/1``, both first chunk and commit: the common delta path stays one record, and
a record without a chunk header (written before chunking existed) reads as ``0/1``.

:class:`ChunkAssembler` is the one state machine every reader uses. It holds at most one open
sequence, at most ``max_bytes`` of it, and emits a :class:`Complete` payload when the commit
arrives, or a :class:`Broken` sequence (once, at the offset of its first record) when a chunk is
missing or repeated, a new update starts before the open one committed (interleaved), a chunk
arrives without its first chunk, or the declared size is too large or does not match. The chunks
of a broken sequence that follow are absorbed without another dead letter. Its reasons are
``deadletter.CHUNK_REASONS`` (``incomplete``, ``out-of-order``), ``oversized`` and ``invalid``. Nothing is applied
from a sequence until it is complete, so a version applies atomically or not at all.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Union

from streamrecall.consumers.deadletter import header_int, headers_dict
from streamrecall.events import InvalidEvent
from streamrecall.settings import MODEL_UPDATE_CHUNK_BYTES, MODEL_UPDATE_RECORD_BYTES

HEADER_KIND = "streamrecall.model.kind"
HEADER_VERSION = "streamrecall.model.version"
HEADER_EPOCH = "streamrecall.model.epoch"
HEADER_SIGNATURE = "streamrecall.model.signature"
HEADER_CHUNK = "streamrecall.model.chunk"
HEADER_SIZE = "streamrecall.model.size"

#: No record on model-updates is larger than this, headers and record framing included; a chunk
#: holds at most DEFAULT_CHUNK_BYTES of payload (the setting model_update_chunk_bytes, at most this).
MAX_RECORD_BYTES = MODEL_UPDATE_RECORD_BYTES
DEFAULT_CHUNK_BYTES = MODEL_UPDATE_CHUNK_BYTES

_CHUNK = re.compile(r"([0-9]{1,9})/([0-9]{1,9})")


def chunk_headers(kind: str, version: int, trainer_epoch: int, index: int, count: int, size: int,
                  signature: str | None = None) -> list[tuple[str, bytes]]:
    """The headers of chunk ``index`` of ``count`` of a payload of ``size`` bytes."""
    headers = [(HEADER_KIND, kind.encode()), (HEADER_VERSION, str(version).encode()),
               (HEADER_EPOCH, str(trainer_epoch).encode()), (HEADER_CHUNK, f"{index}/{count}".encode()),
               (HEADER_SIZE, str(size).encode())]
    if signature is not None:
        headers.append((HEADER_SIGNATURE, signature.encode()))
    return headers


def split_update(data: bytes, kind: str, version: int, trainer_epoch: int, chunk_bytes: int,
                 signature: str | None = None) -> list[tuple[bytes, list[tuple[str, bytes]]]]:
    """``data`` as (value, headers) records of at most ``chunk_bytes`` each; the signature goes on
    the last (the commit)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    count = max(1, -(-len(data) // chunk_bytes))
    return [(data[i * chunk_bytes:(i + 1) * chunk_bytes],
             chunk_headers(kind, version, trainer_epoch, i, count, len(data),
                           signature if i == count - 1 else None))
            for i in range(count)]


@dataclass(frozen=True)
class Chunk:
    """One model-updates record as its headers describe it (``kind``/``version`` None: not given)."""

    kind: str | None
    version: int | None
    trainer_epoch: int | None
    index: int
    count: int
    size: int
    value: bytes
    headers: list[tuple[str, bytes | None]] = field(repr=False, default_factory=list)

    @property
    def identity(self) -> tuple[object, ...]:
        """What every chunk of one sequence shares."""
        return (self.kind, self.version, self.trainer_epoch, self.count, self.size)

    def describe(self) -> str:
        return f"chunk {self.index}/{self.count} of v{self.version} ({self.kind})"


class ChunkReader:
    """The per-record decoder of model-updates: a record's chunk headers, checked. Every reader
    (the runtime's, side readers', scans') reads records through it before assembling."""

    uses_headers = True

    def __call__(self, value: bytes | None, headers: list[tuple[str, bytes | None]] | None = None) -> Chunk:
        return read_chunk(value, headers)


def read_chunk(value: bytes | None, headers: list[tuple[str, bytes | None]] | None) -> Chunk:
    """Parse a record's chunk headers; :class:`InvalidEvent` (``null``/``invalid``) if unusable.
    No chunk header: one record holding the whole update (``0/1``)."""
    if value is None:
        raise InvalidEvent("null", "model update is null")
    data = bytes(value)
    h = headers_dict(headers)
    raw_chunk = h.get(HEADER_CHUNK)
    if raw_chunk is None:
        index, count, size = 0, 1, len(data)
    else:
        match = _CHUNK.fullmatch(raw_chunk)
        size_h = header_int(h.get(HEADER_SIZE))
        if match is None or size_h is None:
            raise InvalidEvent("invalid", f"model update chunk header {raw_chunk[:40]!r} / size "
                                          f"{h.get(HEADER_SIZE, '')[:40]!r} is not INDEX/COUNT and a byte count")
        index, count, size = int(match.group(1)), int(match.group(2)), size_h
        if not 0 <= index < count or len(data) > size or (count > 1 and not data):
            raise InvalidEvent("invalid", f"model update chunk {index}/{count} of {len(data)} bytes does not fit a "
                                          f"payload of {size} bytes")
    kind = h.get(HEADER_KIND) or None
    return Chunk(kind, header_int(h.get(HEADER_VERSION)), header_int(h.get(HEADER_EPOCH)), index, count, size, data,
                 list(headers or []))


@dataclass(frozen=True)
class Complete:
    """A whole payload: its chunks were ``first``..``last``; ``headers`` are the commit's. The chunks
    are joined when ``payload`` is first read: at a million rows that is ~200 MB, which the model-update
    stream has its staging worker join, off the reader's loop."""

    first: int
    last: int
    parts: tuple[bytes, ...] = field(repr=False)
    headers: list[tuple[str, bytes | None]] = field(repr=False)
    kind: str | None = None
    version: int | None = None

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.parts)

    @functools.cached_property
    def payload(self) -> bytes:
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)


@dataclass(frozen=True)
class Broken:
    """A sequence that will not be applied: dead-letter it once, at ``first``, with ``value``
    (its first record's bytes) and ``reason``."""

    first: int
    reason: str
    error: str
    value: bytes = field(repr=False, default=b"")


Outcome = Union[Complete, Broken]


@dataclass
class _Open:
    first: int
    identity: tuple[object, ...]
    head: Chunk
    next_index: int
    parts: list[bytes]
    size: int = 0
    broken: bool = False  # dead-lettered already: the rest of its chunks are absorbed


class ChunkAssembler:
    """Puts chunk sequences back together in offset order, holding at most one open sequence of at
    most ``max_bytes``. Pure: records in, :data:`Outcome` out (see the module docstring)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._open: _Open | None = None

    @property
    def open_since(self) -> int | None:
        """Offset of the first record of the sequence still being read (None: between sequences)."""
        return self._open.first if self._open is not None else None

    def resume_offset(self, next_offset: int) -> int:
        """The next offset to read that loses nothing: the first record of an open sequence (so a
        restart re-reads the whole version), else ``next_offset``."""
        return self._open.first if self._open is not None else next_offset

    def add(self, offset: int, chunk: Chunk) -> list[Outcome]:
        out: list[Outcome] = []
        current = self._open
        if chunk.index == 0:
            if current is not None and not current.broken:
                out.append(self._broken(current, "incomplete",
                                        f"{current.next_index} of {current.head.count} chunks read when v{chunk.version} "
                                        f"started at @{offset} (interleaved or abandoned)"))
            self._open = current = _Open(offset, chunk.identity, chunk, 0, [])
            if chunk.size > self.max_bytes:
                current.broken = True
                out.append(Broken(offset, "oversized", f"model update v{chunk.version} declares {chunk.size} bytes; "
                                                       f"the limit is {self.max_bytes}", chunk.value))
        elif current is None or current.identity != chunk.identity:
            if current is not None and not current.broken:
                out.append(self._broken(current, "incomplete", f"{current.next_index} of {current.head.count} chunks "
                                                               f"read when {chunk.describe()} came at @{offset}"))
            # a stray: its sequence's first chunk was never read. One dead letter, the rest absorbed.
            self._open = current = _Open(offset, chunk.identity, chunk, chunk.index, [], broken=True)
            out.append(Broken(offset, "incomplete", f"{chunk.describe()} at @{offset} without the chunks before it",
                              chunk.value))
        elif chunk.index != current.next_index and not current.broken:
            current.broken = True
            out.append(self._broken(current, "out-of-order", f"{chunk.describe()} at @{offset} where chunk "
                                                             f"{current.next_index} was due (missing or repeated)"))
        if current.broken:
            if chunk.index == chunk.count - 1:
                self._open = None  # its commit (or last chunk): the broken sequence is over
            else:
                current.next_index = chunk.index + 1
            return out
        current.parts.append(chunk.value)
        current.size += len(chunk.value)
        current.next_index += 1
        if current.size > chunk.size:
            current.broken = True
            out.append(self._broken(current, "invalid", f"chunks hold more than the declared {chunk.size} bytes"))
        elif current.next_index == chunk.count:
            self._open = None
            if current.size != chunk.size:
                out.append(self._broken(current, "invalid", f"{current.size} bytes assembled, {chunk.size} declared"))
            else:
                out.append(Complete(current.first, offset, tuple(current.parts), chunk.headers, chunk.kind,
                                    chunk.version))
        return out

    def _broken(self, current: _Open, reason: str, why: str) -> Broken:
        current.broken = True
        return Broken(current.first, reason, f"model update v{current.head.version} ({current.head.kind}, "
                                             f"{current.head.count} chunks from @{current.first}): {why}",
                      current.head.value)
