"""The poll loop's own logic on the in-memory client pair (tests/consumers/fakes.py): batch
isolation, retries of transient errors, pausing on a failing flush and resuming, commits only
after a durable flush. The same behaviour against a real broker: tests/integration/test_runtime.py."""

from __future__ import annotations


import pytest
from kafka import TopicPartition
from kafka.errors import KafkaError, MessageSizeTooLargeError, TopicAuthorizationFailedError
from prometheus_client import CollectorRegistry

from fakes import FakeConsumer, FakeProducer
from streamrecall.consumers.offsets import Offsets
from streamrecall.consumers.deadletter import (HEADER_ORIGINAL_KEY_SIZE, HEADER_ORIGINAL_SIZE, HEADER_REASON,
                                              DeadLetterSink)
from streamrecall.consumers.handler import HandlerBase, Record
from streamrecall.consumers.runtime import Runtime
from streamrecall.errors import StreamrecallError, TransientError
from streamrecall.events import InvalidEvent
from streamrecall.metrics import RuntimeMetrics

TP = TopicPartition("t", 0)


def decode(value: bytes | None) -> int:
    if value is None or not value.isdigit():
        raise InvalidEvent("invalid", f"not a number: {value!r}")
    return int(value)


class Recorder(HandlerBase):
    """Keeps values; ``poison`` values raise; ``transient`` times the next handle raises TransientError;
    ``flush_failures`` times flush raises."""

    def __init__(self, poison: set[int] = frozenset(), transient: int = 0, flush_failures: int = 0) -> None:
        self.poison, self.transient, self.flush_failures = set(poison), transient, flush_failures
        self.handled: list[int] = []
        self.batches: list[int] = []
        self.flushed: list[Offsets] = []

    def handle(self, records: list[Record]) -> None:
        if self.transient:
            self.transient -= 1
            raise TransientError("broker blip")
        if any(r.value in self.poison for r in records):
            raise StreamrecallError(f"poison in {[r.value for r in records]}")
        self.batches.append(len(records))
        self.handled += [r.value for r in records]

    def flush(self, offsets: Offsets) -> None:
        if self.flush_failures:
            self.flush_failures -= 1
            raise TransientError("sink down")
        self.flushed.append(offsets)


@pytest.fixture(autouse=True)
def clock(monkeypatch):
    """Every monotonic reading is a second later and sleeps return at once: a flush (and a flush
    retry) is due at every step, and back-offs cost no time."""
    now = [1000.0]

    def tick() -> float:
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr("streamrecall.consumers.runtime.time.monotonic", tick)
    monkeypatch.setattr("streamrecall.consumers.runtime.time.sleep", lambda s: None)
    return now


@pytest.fixture
def make_runtime():
    def make(handler: Recorder, values: list[bytes | None], **kwargs) -> tuple[Runtime, FakeConsumer, FakeProducer]:
        consumer, producer = FakeConsumer({"t": 1}), FakeProducer()
        consumer.append("t", 0, values)
        metrics = RuntimeMetrics(CollectorRegistry())
        runtime = Runtime(role="test", consumer=consumer, handler=handler, topics={"t": ("clicks", decode)},
                          deadletters=DeadLetterSink(producer, "dl", "test", metrics), assign_all=True,
                          flush_interval_ms=1, metrics=metrics, **kwargs)
        return runtime, consumer, producer
    return make


def reasons(producer: FakeProducer) -> list[str]:
    return [dict(m["headers"])[HEADER_REASON].decode() for m in producer.sent]


def test_a_poison_record_is_isolated_and_dead_lettered_and_its_batch_goes_on(make_runtime):
    handler = Recorder(poison={3})
    runtime, consumer, producer = make_runtime(handler, [b"1", b"2", b"3", b"4", b"x"])
    runtime.run(max_records=5)
    assert handler.handled == [1, 2, 4], "the batch failed, then each record was handed over alone"
    assert reasons(producer) == ["invalid", "handler-error"]  # b"x" at decode, 3 in the handler
    assert dict(producer.sent[1]["headers"])["streamrecall.source.offset"] == b"2"
    assert consumer.committed == {TP: 5}, "poison records are committed past once dead-lettered"


def test_a_dead_letter_the_broker_refuses_holds_the_commit_until_it_is_written(make_runtime):
    # No write access to the dead-letter topic (an ACL): the send's future fails, the flush itself
    # returns. Committing then lost the bad record with nothing in the dead-letter topic.
    handler = Recorder()
    runtime, consumer, producer = make_runtime(handler, [b"1", b"x", b"3"])
    producer.refusals = [TopicAuthorizationFailedError("dl"), TopicAuthorizationFailedError("dl")]
    runtime._subscribe()
    runtime.step()  # handled, the dead letter refused: paused, nothing committed
    assert handler.handled == [1, 3] and producer.sent == []
    assert consumer.committed == {} and consumer.paused() == {TP}
    runtime.step()  # sent again, refused again
    assert consumer.committed == {} and producer.sent == []
    runtime.step()  # the access is granted: written, then committed, resumed
    assert reasons(producer) == ["invalid"] and dict(producer.sent[0]["headers"])["streamrecall.source.offset"] == b"1"
    assert producer.sent[0]["value"] == b"x"
    assert consumer.committed == {TP: 3} and consumer.paused() == set()
    assert runtime.metrics.deadletters_unwritten.labels("test")._value.get() == 2


def test_a_dead_letter_refused_as_too_large_goes_again_without_its_value(make_runtime):
    handler = Recorder()
    big_key = b"k" * 5000
    runtime, consumer, producer = make_runtime(handler, [])
    consumer.append("t", 0, [b"y" * 3000], key=big_key)
    producer.refusals = [MessageSizeTooLargeError("over the topic's max.message.bytes")]
    runtime._subscribe()
    runtime.step()
    assert consumer.committed == {} and producer.sent == []
    runtime.step()
    [letter] = producer.sent
    headers = dict(letter["headers"])
    assert letter["value"] == b"" and letter["key"] == big_key[:1024]
    assert headers[HEADER_ORIGINAL_SIZE] == b"3000" and headers[HEADER_ORIGINAL_KEY_SIZE] == b"5000"
    assert headers[HEADER_REASON] == b"invalid"
    assert consumer.committed == {TP: 1}


def test_a_transient_error_is_retried_not_dead_lettered(make_runtime):
    handler = Recorder(transient=2)
    runtime, consumer, producer = make_runtime(handler, [b"1", b"2"])
    runtime.run(max_records=2)
    assert handler.handled == [1, 2] and handler.batches == [2]
    assert producer.sent == []
    assert runtime.metrics.transient_retries.labels("test")._value.get() == 2


def test_a_failing_flush_pauses_commits_nothing_then_resumes(make_runtime):
    handler = Recorder(flush_failures=2)
    runtime, consumer, producer = make_runtime(handler, [b"1", b"2", b"3"])
    runtime._subscribe()
    runtime.step()  # polls the three, the flush fails: paused, nothing committed
    assert handler.handled == [1, 2, 3]
    assert consumer.paused() == {TP} and consumer.committed == {}
    consumer.append("t", 0, [b"4"])
    runtime.step()  # retry fails again: still paused, the new record is not read
    assert handler.handled == [1, 2, 3] and consumer.committed == {}
    runtime.step()  # the flush succeeds: committed, resumed
    assert consumer.committed == {TP: 3} and consumer.paused() == set()
    runtime.step()
    assert handler.handled == [1, 2, 3, 4]


def test_without_pausing_a_failing_flush_keeps_consuming_but_commits_nothing(make_runtime):
    handler = Recorder(flush_failures=1)
    runtime, consumer, _ = make_runtime(handler, [b"1", b"2"], pause_on_flush_failure=False)
    runtime._subscribe()
    runtime.step()
    assert consumer.committed == {} and consumer.paused() == set()
    consumer.append("t", 0, [b"3"])
    runtime.step()  # read on while failing; this flush (its retry is due) succeeds
    assert handler.handled == [1, 2, 3] and consumer.committed == {TP: 3}


def test_a_failed_commit_is_retried_at_the_next_flush(make_runtime):
    handler = Recorder()
    runtime, consumer, _ = make_runtime(handler, [b"1"])
    consumer.commit_error = KafkaError("coordinator moved")
    runtime._subscribe()
    runtime.step()
    assert consumer.committed == {}
    runtime.step()
    assert consumer.committed == {TP: 1}
    assert runtime.metrics.commits.labels("test", "failed")._value.get() == 1
