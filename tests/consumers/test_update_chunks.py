"""Model updates in chunks, without a broker: splitting, the one assembler (through
ModelUpdateStream, as every reader uses it), and each way a sequence can break — one dead letter,
nothing applied, and the next good version still applies."""

from __future__ import annotations

from typing import Any

import pytest

from streamrecall.consumers.deadletter import DeadLetter
from streamrecall.consumers.update_chunks import (HEADER_CHUNK, MAX_RECORD_BYTES, ChunkAssembler, Complete,
                                                  read_chunk, split_update)
from streamrecall.consumers.updates import ModelUpdateStream
from streamrecall.consumers.update_codec import sign_update
from streamrecall.events import InvalidEvent
from streamrecall.model import ModelConfig, ModelUpdate, OnlineTrainer
from streamrecall.settings import MODEL_UPDATE_CHUNK_BYTES, Secret

KEY = Secret("chunk-signing-key-0123456789")
CONFIG = ModelConfig(dim=8, hidden=8, id_buckets=64, token_buckets=64, estimator_buckets=64,
                     tower="two_tower")  # its dense layers make even an untrained full update several chunks
CHUNK = 1024  # a full update of CONFIG is a few KiB: several chunks


Record = tuple[bytes, list[tuple[str, bytes]]]


def records(trainer: OnlineTrainer, full: bool = False, key: Secret | None = KEY, epoch: int = 1,
            chunk: int = CHUNK) -> list[Record]:
    data = trainer.export_update(full=full, trainer_epoch=epoch)
    kind = "full" if full or trainer.version == 1 else "delta"
    return split_update(data, kind, trainer.version, epoch, chunk, sign_update(key, data) if key else None)


class Stream:
    """A ModelUpdateStream with its applied updates and dead letters kept in lists."""

    def __init__(self, max_bytes: int = 1 << 20, key: Secret | None = KEY) -> None:
        self.applied: list[tuple[int, int]] = []   # (version, first offset)
        self.letters: list[DeadLetter] = []
        self.stream = ModelUpdateStream("mu", self._apply, self.letters.append, max_bytes=max_bytes, signing_key=key)
        self.offset = 0

    def _apply(self, update: ModelUpdate, offset: int) -> None:
        self.applied.append((update.version, offset))

    def feed(self, recs: list[Record]) -> None:
        for value, headers in recs:
            self.stream.add(self.offset, read_chunk(value, headers))
            self.offset += 1


@pytest.fixture
def trainer() -> OnlineTrainer:
    return OnlineTrainer(CONFIG)


def test_a_big_update_is_cut_into_bounded_chunks_and_reassembled(trainer: OnlineTrainer) -> None:
    recs = records(trainer, full=True)
    assert len(recs) > 2 and all(len(v) <= CHUNK for v, _ in recs)
    assert [dict(h)[HEADER_CHUNK] for _, h in recs] == [f"{i}/{len(recs)}".encode() for i in range(len(recs))]
    assert sum("streamrecall.model.signature" == k for _, h in recs for k, _ in h) == 1, "on the commit only"
    s = Stream()
    s.feed(recs[:-1])
    assert s.applied == [] and s.stream.resume_offset(len(recs) - 1) == 0, "a restart re-reads from the first"
    s.feed(recs[-1:])
    assert s.applied == [(1, 0)] and not s.letters
    assert s.stream.resume_offset(len(recs)) == len(recs)


def test_a_small_update_is_one_record_and_a_record_without_chunk_headers_reads_as_one(trainer: OnlineTrainer) -> None:
    data = trainer.export_update()
    assert len(split_update(data, "full", 1, 1, MODEL_UPDATE_CHUNK_BYTES)) == 1
    chunk = read_chunk(data, [("streamrecall.model.kind", b"full"), ("streamrecall.model.version", b"1")])
    assert (chunk.index, chunk.count, chunk.size) == (0, 1, len(data))


def test_the_default_chunk_leaves_room_for_headers_within_one_mebibyte() -> None:
    assert MODEL_UPDATE_CHUNK_BYTES + 8 * 1024 == MAX_RECORD_BYTES == 1 << 20


def _bad(case: str, trainer: OnlineTrainer) -> tuple[list[Record], str]:
    recs = records(trainer, full=True)
    if case == "missing":
        return recs[:1] + recs[2:], "out-of-order"
    if case == "duplicate":
        return recs[:2] + recs[1:], "out-of-order"
    if case == "interleaved":  # the next version's first chunk before this one's commit
        nxt = records(trainer)
        return recs[:-1] + nxt, "incomplete"
    if case == "oversized":
        return recs, "oversized"
    if case == "corrupt":  # bytes of one chunk flipped, the sequence otherwise intact, unsigned
        value, headers = recs[1]
        return [recs[0], (bytes(b ^ 0xFF for b in value), headers), *recs[2:]], "invalid"
    if case == "bad-signature":  # one chunk altered by a forger who cannot sign: the commit's signature fails
        value, headers = recs[1]
        return [recs[0], (value[:-4] + b"\x00\x00\x80\x7f", headers), *recs[2:]], "bad-signature"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "duplicate", "interleaved", "oversized", "corrupt", "bad-signature"])
def test_a_broken_sequence_is_dead_lettered_once_never_applied_and_the_next_version_applies(
        case: str, trainer: OnlineTrainer) -> None:
    recs, reason = _bad(case, trainer)
    size = sum(len(v) for v, _ in records(OnlineTrainer(CONFIG), full=True))
    s = Stream(max_bytes=size - 1 if case == "oversized" else 1 << 20, key=None if case == "corrupt" else KEY)
    s.feed(recs)
    if case == "interleaved":  # the interrupting version is whole and applies; the interrupted one never
        assert [v for v, _ in s.applied] == [trainer.version]
    else:
        assert s.applied == []
    assert [(letter.reason, letter.offset) for letter in s.letters] == [(reason, 0)], \
        [(letter.reason, letter.error) for letter in s.letters]
    good = records(trainer, full=True, key=None if case == "corrupt" else KEY,
                   chunk=size if case == "oversized" else CHUNK)
    if case == "oversized":  # the same limit: a smaller update of the next version goes through
        good = records(trainer, key=None)
        s.stream.decode.signing_key = None
    first = s.offset
    s.feed(good)
    assert s.applied[-1] == (trainer.version, first), [(letter.reason, letter.error) for letter in s.letters]
    assert len(s.letters) == 1


def test_a_chunk_without_its_first_is_one_dead_letter_for_its_whole_sequence(trainer: OnlineTrainer) -> None:
    recs = records(trainer, full=True)
    s = Stream()
    s.offset = 10
    s.feed(recs[1:])  # a reader that started mid-sequence
    assert s.applied == [] and [(letter.reason, letter.offset) for letter in s.letters] == [("incomplete", 10)]
    s.feed(records(trainer, full=True))
    assert [v for v, _ in s.applied] == [trainer.version] and len(s.letters) == 1


def test_records_read_again_are_ignored(trainer: OnlineTrainer) -> None:
    """The runtime retries a failed batch record by record: the stream has read those already."""
    recs = records(trainer, full=True)
    s = Stream()
    for offset, (value, headers) in enumerate(recs):
        s.stream.add(offset, read_chunk(value, headers))
        s.stream.add(offset, read_chunk(value, headers))
    assert s.applied == [(1, 0)] and not s.letters


def test_chunk_headers_that_lie_are_refused_by_the_reader() -> None:
    for chunk, size, value in (("3/2", "10", b"x"), ("0/2", "1", b"xx"), ("a/b", "1", b"x"), ("1/2", "5", b"")):
        with pytest.raises(InvalidEvent) as info:
            read_chunk(value, [(HEADER_CHUNK, chunk.encode()), ("streamrecall.model.size", size.encode())])
        assert info.value.reason == "invalid"
    with pytest.raises(InvalidEvent):
        read_chunk(None, [])


def test_the_assembler_holds_one_sequence_of_at_most_max_bytes(trainer: OnlineTrainer) -> None:
    recs = records(trainer, full=True)
    assembler = ChunkAssembler(max_bytes=10 * CHUNK)
    out: list[Any] = []
    for offset, (value, headers) in enumerate(recs):
        out += assembler.add(offset, read_chunk(value, headers))
        assert assembler.open_since in (0, None)
    assert len(out) == 1 and isinstance(out[0], Complete) and out[0].first == 0 and out[0].last == len(recs) - 1
