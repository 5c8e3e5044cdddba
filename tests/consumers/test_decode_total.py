"""Every decode path is total: whatever bytes arrive, each topic's one decoder returns a value or
raises the project's error with a reason, never another exception (a corpus, property-style).

The decoders are the ones every reader of the topic uses: ``Decoder(Item)`` and ``Decoder(Click)``,
``user_vector_decoder`` (indexer and publisher), ``decode_model_update`` (indexer and publisher),
plus the header-only scans of model-updates (``_mark``) and of the dead-letter topic.
"""

from __future__ import annotations

import json
import random
import struct
from collections import namedtuple
from typing import Any, Callable

import msgspec
import pytest
import torch

from streamrecall.consumers.deadletter import HEADER_OFFSET, HEADER_PARTITION, header_int, headers_dict
from streamrecall.consumers.handler import DecoderBug, decode_value
from streamrecall.consumers.update_chunks import HEADER_KIND, HEADER_VERSION
from streamrecall.consumers.update_scan import UpdateMark, _mark
from streamrecall.consumers.update_codec import decode_model_update
from streamrecall.errors import StreamrecallError
from streamrecall.events import Click, Decoder, InvalidEvent, Item, UserVector, user_vector_decoder
from streamrecall.model.safeio import META_KEY, SafeIOError, read_layout
from streamrecall.model.update import FORMAT, FORMAT_VERSION, ModelUpdate, dense_shapes, encode_update

MODEL = {"dim": 4, "hidden": 4, "id_buckets": 8, "token_buckets": 8, "max_tokens": 4, "seed": 0}
REASONS = {"undecodable", "invalid", "oversized", "null", "future"}
DEEP = 100_000
HUGE_INT = "9" * 5000  # over json's 4,300-digit limit for int()


def valid_update(version: int = 1) -> bytes:
    dense = {k: torch.zeros(shape) for k, shape in dense_shapes(MODEL).items()}
    return encode_update(ModelUpdate(version=version, base_version=0, kind="full", dense_changed=True, model=MODEL,
                                     dense=dense, trending=[("i1", 0.5)]))


VALID: dict[str, bytes] = {
    "items": msgspec.json.encode({"item_id": "i1", "created_at": 1, "title": "t", "categories": ["c"],
                                  "tags": ["x"], "features": {"p": 1.5}}),
    "clicks": msgspec.json.encode({"user_id": "u1", "item_id": "i1", "ts": 1, "weight": 2.0}),
    "user-vectors": msgspec.json.encode({"user_id": "u1", "vector": [0.5, 0.5], "model_version": 1, "event_ts": 1,
                                         "published_at": 2, "recent_items": ["i1"]}),
    "model-updates": valid_update(),
}
DECODERS: dict[str, Callable[[Any], Any]] = {
    "items": Decoder(Item).decode,
    "clicks": Decoder(Click).decode,
    "user-vectors": user_vector_decoder(),
    "model-updates": decode_model_update,
}


def safetensors_bytes(table_json: str) -> bytes:
    """A payload whose safetensors header is ``table_json`` (8-byte length, then the JSON)."""
    raw = table_json.encode()
    return struct.pack("<Q", len(raw)) + raw


def with_metadata(meta: str) -> bytes:
    return safetensors_bytes(json.dumps({"__metadata__": {META_KEY: meta}}))


def header_json(**changes: Any) -> str:
    h = {"format": FORMAT, "format_version": FORMAT_VERSION, "version": 2, "base_version": 1, "kind": "delta",
         "dense_changed": False, "model": MODEL, "steps": 0, "created_at_ms": 0, "trending": []}
    return json.dumps(h | changes)


def poison_json() -> list[bytes]:
    """JSON documents that json.loads or msgspec trip over in ways beyond a syntax error."""
    return [
        b"[" * DEEP,
        b'{"a":' * DEEP,
        b'{"user_id":' + b"[" * DEEP,
        b'{"item_id":"i","created_at":1,"features":' + b"[" * DEEP,
        b'{"item_id":"i","created_at":1,"x":' + b"[" * DEEP + b"]" * DEEP + b"}",
        b'{"user_id":"u","item_id":"i","ts":' + HUGE_INT.encode() + b"}",
        b'{"item_id":"i","created_at":' + HUGE_INT.encode() + b"}",
        b'{"item_id":"i","created_at":1,"features":{"p":' + HUGE_INT.encode() + b"}}",
        b'{"user_id":"u","vector":[' + HUGE_INT.encode() + b'],"model_version":1,"event_ts":1,"published_at":1}',
        b'{"user_id":"u","vector":[1e999],"model_version":1,"event_ts":1,"published_at":1}',
        b'{"user_id":"u","item_id":"i","ts":1,"weight":NaN}',
        '{"user_id":"²","item_id":"i","ts":"²"}'.encode(),
        b'"\\ud800"',  # a lone surrogate escape
    ]


def poison_updates() -> list[bytes]:
    """Safetensors-shaped payloads whose JSON is poison: the holes that were in read_layout."""
    return [
        safetensors_bytes('{"x":' + HUGE_INT + "}"),
        safetensors_bytes("[" * DEEP),
        safetensors_bytes('{"__metadata__":' * DEEP),
        with_metadata('{"version":' + HUGE_INT + "}"),
        with_metadata("[" * DEEP),
        with_metadata(header_json(version=10**400)),
        with_metadata(header_json(version=2**63)),
        with_metadata(header_json(trending=[["i1", 10**400]])),
        with_metadata(header_json(trending=[["i1", "x" * 10_000]])),
        with_metadata(header_json(model={**MODEL, "dim": 10**300})),
        with_metadata(header_json(kind="x" * 100_000)),
        safetensors_bytes(json.dumps({"__metadata__": {META_KEY: header_json()},
                                      "dense/x": {"dtype": "F32", "shape": [10**300], "data_offsets": [0, 4]}})),
        safetensors_bytes(json.dumps({"__metadata__": {META_KEY: header_json()},
                                      "rows/item_id": {"dtype": "I64", "shape": [True], "data_offsets": [0, 8]}})),
        struct.pack("<Q", 2**64 - 1) + b"{}",
        "{}".encode("utf-16"),
        b"\x80\x04\x95pickle",
    ]


def corpus(topic: str) -> list[Any]:
    rng = random.Random(15)
    valid = VALID[topic]
    values: list[Any] = [valid[:n] for n in range(len(valid))]  # every truncation, the empty value included
    values += [valid + b"\x00", valid[::-1], valid.replace(b"1", b"\xb2")]
    values += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(200)]
    values += [bytearray(valid), memoryview(valid), None, "a string", 5, 1.5, [1, 2], {"a": 1}, object()]
    values += [b"x" * (10 << 20), b"{" + b" " * (10 << 20) + b"}"]
    values += poison_json() + poison_updates()
    return values


def assert_total(decode: Callable[[Any], Any], value: Any) -> None:
    try:
        decode(value)
    except StreamrecallError as exc:
        assert getattr(exc, "reason", None) in REASONS, (type(exc), exc)
        assert str(exc), "the error must say why"


@pytest.mark.parametrize("topic", sorted(DECODERS))
def test_every_decoder_is_total_over_a_hostile_corpus(topic: str) -> None:
    decode = DECODERS[topic]
    decode(VALID[topic])  # the valid record decodes
    for value in corpus(topic):
        assert_total(decode, value)


@pytest.mark.parametrize("value", [b'{"user_id":' + b"[" * DEEP, b'{"item_id":"i","created_at":1,"features":' + b"[" * DEEP])
def test_deep_nesting_is_refused_by_every_event_decoder(value: bytes) -> None:
    for event_type in (Item, Click, UserVector):  # msgspec refuses a wrong type early, or recurses and stops
        with pytest.raises(InvalidEvent) as info:
            Decoder(event_type).decode(value)
        assert info.value.reason in ("invalid", "undecodable")


@pytest.mark.parametrize("value,reason", [
    ("a string", "undecodable"),
    (5, "undecodable"),
    (b"", "undecodable"),
    (None, "null"),
    (b"x" * (10 << 20), "oversized"),
])
def test_event_decoders_give_the_reason(value: Any, reason: str) -> None:
    for event_type in (Item, Click, UserVector):
        with pytest.raises(InvalidEvent) as info:
            Decoder(event_type).decode(value)
        assert info.value.reason == reason


def test_a_user_vector_tombstone_decodes_to_none() -> None:
    assert user_vector_decoder()(None) is None


@pytest.mark.parametrize("value", poison_updates())
def test_poison_model_updates_are_invalid_with_a_message(value: bytes) -> None:
    with pytest.raises(InvalidEvent) as info:
        decode_model_update(value)
    assert info.value.reason == "invalid"
    assert str(info.value).startswith("model update: ")


def test_a_null_model_update_is_null_for_every_reader() -> None:
    with pytest.raises(InvalidEvent) as info:
        decode_model_update(None)
    assert info.value.reason == "null"


@pytest.mark.parametrize("value", [None, "str", 5] + poison_updates())
def test_read_layout_raises_only_its_own_error(value: Any) -> None:
    try:
        read_layout(value)
    except SafeIOError as exc:
        assert str(exc)


def test_a_valid_update_still_decodes() -> None:
    update = decode_model_update(valid_update(version=3))
    assert (update.version, update.kind, update.trending) == (3, "full", [("i1", 0.5)])


Message = namedtuple("Message", "offset headers value")


@pytest.mark.parametrize("headers", [
    [(HEADER_KIND, b"full"), (HEADER_VERSION, "²".encode())],
    [(HEADER_KIND, b"full"), (HEADER_VERSION, "١٢".encode())],  # Arabic-Indic digits: isdigit() too
    [(HEADER_KIND, b"full"), (HEADER_VERSION, HUGE_INT.encode())],
    [(HEADER_KIND, b"full"), (HEADER_VERSION, None)],
    [(HEADER_KIND, None), (HEADER_VERSION, b"1")],
    [(HEADER_KIND, b"\xff\xfe"), (HEADER_VERSION, b"\xff")],
    [(HEADER_VERSION, b"-1")],
    [],
    None,
])
@pytest.mark.parametrize("value", [None, b"", valid_update(), *poison_updates()[:6]])
def test_the_header_scan_never_raises(headers: Any, value: Any) -> None:
    mark = _mark(Message(7, headers, value))
    assert isinstance(mark, UpdateMark) and mark.offset == 7
    assert mark.kind is None  # none of these is a real full update


def test_the_header_scan_keeps_a_real_update() -> None:
    mark = _mark(Message(3, [(HEADER_KIND, b"full"), (HEADER_VERSION, b"1")], valid_update(version=1)))
    assert (mark.kind, mark.version) == ("full", 1)


@pytest.mark.parametrize("text,expected", [("12", 12), ("0", 0), ("²", None), ("١٢", None), ("-1", None),
                                           (" 1", None), ("", None), (None, None), ("9" * 20, None)])
def test_header_int_reads_ascii_decimals_only(text: str | None, expected: int | None) -> None:
    assert header_int(text) == expected


def test_headers_dict_reads_any_header_bytes() -> None:
    h = headers_dict([(HEADER_PARTITION, "²".encode()), (HEADER_OFFSET, None), ("x", b"\xff")])
    assert h == {HEADER_PARTITION: "²", HEADER_OFFSET: "", "x": "\ufffd"}
    assert header_int(h[HEADER_PARTITION]) is None


@pytest.mark.parametrize("error", [ValueError("x"), RecursionError(), OverflowError(), KeyError("k"), TypeError()])
def test_decode_value_turns_a_decoder_bug_into_an_invalid_dead_letter(error: Exception,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    def buggy(value: bytes | None) -> Any:
        raise error

    with pytest.raises(DecoderBug) as info:
        decode_value(buggy, b"{}", "clicks[3]@42")
    assert info.value.reason == "invalid"
    assert str(info.value).startswith(type(error).__name__)
    assert "clicks[3]@42" in caplog.text


def test_decode_value_passes_the_projects_errors_through() -> None:
    with pytest.raises(InvalidEvent) as info:
        decode_value(Decoder(Click).decode, b"{", "clicks[0]@0")
    assert info.value.reason == "undecodable"
