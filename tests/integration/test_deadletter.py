"""Dead-lettering a corpus of malformed records interleaved with valid ones, on the real broker."""

from __future__ import annotations

import random
import time

import msgspec
import pytest
from kafka import TopicPartition

from streamrecall.consumers.clients import make_consumer, make_producer
from streamrecall.consumers.deadletter import (HEADER_OFFSET, HEADER_ORIGINAL_KEY_SIZE, HEADER_ORIGINAL_SIZE,
                                              HEADER_REASON, DeadLetterSink, headers_dict)
from streamrecall.consumers.handler import HandlerBase, Record
from streamrecall.consumers.runtime import Runtime
from streamrecall.events import Click, Decoder
from streamrecall.metrics import RuntimeMetrics
from prometheus_client import CollectorRegistry

pytestmark = pytest.mark.integration


def malformed_corpus(rng: random.Random, n: int) -> list[tuple[str, bytes | None]]:
    """(kind, value) pairs that each break the clicks contract in one way."""
    good = b'{"user_id":"u1","item_id":"i1","ts":1700000000000}'
    makers = [
        ("truncated", lambda i: good[: rng.randrange(1, len(good) - 1)]),
        ("wrong-type", lambda i: msgspec.json.encode({"user_id": i, "item_id": "x", "ts": 1})),
        ("wrong-type-ts", lambda i: msgspec.json.encode({"user_id": "u", "item_id": "x", "ts": "yesterday"})),
        ("missing", lambda i: msgspec.json.encode({"user_id": f"u{i}", "ts": 1})),
        ("nan", lambda i: b'{"user_id":"u","item_id":"x","ts":1,"weight":NaN}'),
        ("inf", lambda i: b'{"user_id":"u","item_id":"x","ts":1,"weight":1e999}'),
        ("negative", lambda i: b'{"user_id":"u","item_id":"x","ts":-5}'),
        ("garbage", lambda i: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))),
        ("null-json", lambda i: b"null"),
        ("array", lambda i: b"[1,2,3]"),
        ("empty-id", lambda i: b'{"user_id":"","item_id":"x","ts":1}'),
        ("tombstone", lambda i: None),
        ("future", lambda i: msgspec.json.encode({"user_id": "u", "item_id": "x",
                                                  "ts": int(time.time() * 1000) + 30 * 86_400_000})),
        ("year-10000", lambda i: b'{"user_id":"u","item_id":"x","ts":253402300800000}'),
    ]
    out = [makers[i % len(makers)][0:1] + (makers[i % len(makers)][1](i),) for i in range(n)]
    out += [("oversized", b'{"user_id":"u","item_id":"x","ts":1,"pad":"' + b"x" * (10 << 20) + b'"}')
            for _ in range(3)]
    return out


class Collect(HandlerBase):
    def __init__(self) -> None:
        self.users: list[str] = []

    def handle(self, records: list[Record]) -> None:
        self.users.extend(r.value.user_id for r in records)


def read_clicks(s, group: str, max_seconds: float) -> tuple[Collect, RuntimeMetrics]:
    """Run a runtime over the clicks topic (as group ``group``) until it has caught up."""
    metrics = RuntimeMetrics(CollectorRegistry())
    handler = Collect()
    rt = Runtime(role="test", consumer=make_consumer(s, s.group_id(group)),
                 deadletters=DeadLetterSink(make_producer(s), s.topics.deadletter, "test", metrics), handler=handler,
                 topics={s.topics.clicks: ("clicks", Decoder(Click, s.max_value_bytes, s.max_event_ahead_ms).decode)},
                 metrics=metrics)
    rt.run(max_seconds=max_seconds, until=rt.caught_up)
    return handler, metrics


def test_malformed_records_are_deadlettered_and_valid_ones_all_handled(settings_factory):
    s = settings_factory()
    rng = random.Random(3)
    bad = malformed_corpus(rng, 600)
    producer = make_producer(s, max_request_size=16 << 20)
    valid = 0
    sent_bad = 0
    for i, (kind, value) in enumerate(bad):
        producer.send(s.topics.clicks, key=f"bad{i}".encode(), value=value)
        sent_bad += 1
        for _ in range(2):
            producer.send(s.topics.clicks, key=f"v{valid}".encode(),
                          value=msgspec.json.encode({"user_id": f"v{valid}", "item_id": "i", "ts": 1}))
            valid += 1
    producer.flush()

    handler, metrics = read_clicks(s, "dl", max_seconds=90)

    assert sorted(handler.users) == sorted(f"v{i}" for i in range(valid))
    letters = read_all(s, s.topics.deadletter, expected=sent_bad)
    assert len(letters) == sent_bad
    keys = {m.key.decode() for m in letters}
    assert keys == {f"bad{i}" for i in range(sent_bad)}
    reasons = {}
    for m in letters:
        h = headers_dict(m.headers)
        assert h[HEADER_REASON] in ("undecodable", "invalid", "oversized", "null", "future")
        assert int(h[HEADER_OFFSET]) >= 0
        reasons[m.key.decode()] = h[HEADER_REASON]
        if h[HEADER_REASON] == "oversized":
            assert int(h[HEADER_ORIGINAL_SIZE]) > 10 << 20
    by_kind = {kind: reasons[f"bad{i}"] for i, (kind, _) in enumerate(bad)}
    assert by_kind["oversized"] == "oversized"
    assert by_kind["tombstone"] == "null"
    assert by_kind["truncated"] == "undecodable"
    assert by_kind["missing"] == "invalid"
    assert by_kind["future"] == "future" and by_kind["year-10000"] == "invalid"
    counted = sum(metrics.deadlettered.labels("test", "clicks", r)._value.get()
                  for r in ("undecodable", "invalid", "oversized", "null", "future"))
    assert counted == sent_bad


def test_a_bad_record_with_a_key_too_large_to_send_is_dead_lettered_and_the_role_goes_on(settings_factory):
    # The embedded broker takes a 9 MB key, but the dead letter carrying it is above the producer's
    # max_request_size (8 MB): send() raised out of the poll loop, and the restarted role met the
    # same record again.
    s = settings_factory()
    producer = make_producer(s, max_request_size=32 << 20)
    producer.send(s.topics.clicks, key=b"u1", value=b'{"user_id":"u1","item_id":"i","ts":1}', partition=0)
    producer.send(s.topics.clicks, key=b"K" * (9 << 20), value=b"not json", partition=0)
    producer.send(s.topics.clicks, key=b"u2", value=b'{"user_id":"u2","item_id":"i","ts":1}', partition=0)
    producer.flush()
    handler, metrics = read_clicks(s, "bigkey", max_seconds=60)
    assert handler.users == ["u1", "u2"]
    assert metrics.deadletters_unwritten.labels("test")._value.get() == 1
    group = make_consumer(s, s.group_id("bigkey"))
    assert group.committed(TopicPartition(s.topics.clicks, 0)) == 3, "committed past the bad record"
    group.close()
    [letter] = read_all(s, s.topics.deadletter, expected=1)
    h = headers_dict(letter.headers)
    assert h[HEADER_REASON] == "undecodable" and h[HEADER_OFFSET] == "1"
    assert letter.key == b"K" * 1024 and h[HEADER_ORIGINAL_KEY_SIZE] == str(9 << 20)
    assert letter.value == b"" and h[HEADER_ORIGINAL_SIZE] == "8"


def read_all(s, topic: str, expected: int, timeout_s: float = 30.0) -> list:
    c = make_consumer(s, None)
    tps = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic)]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    out = []
    deadline = time.monotonic() + timeout_s
    while len(out) < expected and time.monotonic() < deadline:
        for msgs in c.poll(timeout_ms=200).values():
            out.extend(msgs)
    c.close()
    return out


def test_a_decoder_bug_dead_letters_the_record_and_the_role_goes_on(settings_factory, caplog):
    """A decoder that lets a foreign exception out (a bug) must not stop the role."""
    s = settings_factory()
    clicks = Decoder(Click, max_value_bytes=s.max_value_bytes)

    def buggy(value: bytes | None) -> Click:
        if value == b"boom":
            raise RecursionError("maximum recursion depth exceeded")
        return clicks.decode(value)

    producer = make_producer(s)
    for i in range(20):
        value = b"boom" if i % 5 == 0 else msgspec.json.encode({"user_id": f"v{i}", "item_id": "i", "ts": 1})
        producer.send(s.topics.clicks, key=f"k{i}".encode(), value=value, partition=0)
    producer.flush()

    metrics = RuntimeMetrics(CollectorRegistry())
    handler = Collect()
    rt = Runtime(role="test", consumer=make_consumer(s, s.group_id("bug")),
                 deadletters=DeadLetterSink(make_producer(s), s.topics.deadletter, "test", metrics), handler=handler,
                 topics={s.topics.clicks: ("clicks", buggy)}, metrics=metrics)
    rt.run(max_seconds=60, until=rt.caught_up)

    assert sorted(handler.users) == sorted(f"v{i}" for i in range(20) if i % 5)
    letters = read_all(s, s.topics.deadletter, expected=4)
    assert sorted(m.key.decode() for m in letters) == ["k0", "k10", "k15", "k5"]
    for m in letters:
        h = headers_dict(m.headers)
        assert h[HEADER_REASON] == "invalid" and h["streamrecall.error"].startswith("RecursionError")
    assert f"{s.topics.clicks}[0]@0" in caplog.text
