"""`streamrecall bench ingest`: the runtime's consume path against raw kafka-python, same run.

Produces N clicks to a fresh topic, then reads them back three ways:
raw ``KafkaConsumer`` iteration (the ceiling), raw consume + ``json.loads`` (what a
hand-written consumer does), and the streamrecall runtime (poll → msgspec decode and
validation → a no-op handler → flush → commit). Ratios are against the raw consume.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import ExitStack

import click
import msgspec
from kafka import TopicPartition
from prometheus_client import CollectorRegistry

from streamrecall.devtools.bench import Result, json_option, peak_rss_mb, report, result
from streamrecall.devtools.broker import EmbeddedBroker
from streamrecall.consumers.clients import make_consumer, make_producer
from streamrecall.consumers.deadletter import DeadLetterSink
from streamrecall.consumers.handler import HandlerBase, Record
from streamrecall.consumers.runtime import Runtime
from streamrecall.events import Click, Decoder
from streamrecall.metrics import RuntimeMetrics
from streamrecall.settings import Settings
from streamrecall.consumers.topics import create_topics


class _Count(HandlerBase):
    def __init__(self) -> None:
        self.n = 0

    def handle(self, records: list[Record]) -> None:
        self.n += len(records)


def _produce(settings: Settings, n: int) -> float:
    producer = make_producer(settings, linger_ms=20)
    values = [msgspec.json.encode({"user_id": f"u{i % 50_000}", "item_id": f"i{i % 20_000}",
                                   "ts": 1_700_000_000_000 + i}) for i in range(n)]
    started = time.perf_counter()
    for i, v in enumerate(values):
        producer.send(settings.topics.clicks, key=f"u{i % 50_000}".encode(), value=v)
    producer.flush()
    elapsed = time.perf_counter() - started
    producer.close()
    return n / elapsed


def _raw_consume(settings: Settings, n: int, parse: bool) -> float:
    c = make_consumer(settings, None)
    tps = [TopicPartition(settings.topics.clicks, p) for p in c.partitions_for_topic(settings.topics.clicks)]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    seen = 0
    started = time.perf_counter()
    while seen < n and time.perf_counter() - started < 300:
        for msgs in c.poll(timeout_ms=100, max_records=2000).values():
            seen += len(msgs)
            if parse:
                for m in msgs:
                    json.loads(m.value)
    elapsed = time.perf_counter() - started
    c.close()
    return seen / elapsed


def _runtime_consume(settings: Settings, n: int) -> float:
    metrics = RuntimeMetrics(CollectorRegistry())
    handler = _Count()
    consumer = make_consumer(settings, settings.group_id("bench"))
    producer = make_producer(settings)
    runtime = Runtime(role="bench", consumer=consumer, handler=handler,
                      deadletters=DeadLetterSink(producer, settings.topics.deadletter, "bench", metrics),
                      topics={settings.topics.clicks: ("clicks", Decoder(Click).decode)}, metrics=metrics,
                      assign_all=True)
    started = time.perf_counter()
    runtime.run(max_seconds=300, until=lambda: handler.n >= n)
    elapsed = time.perf_counter() - started
    producer.close()
    return handler.n / elapsed


@click.command("ingest")
@click.option("--records", default=200_000, show_default=True, help="Clicks to produce and consume.")
@click.option("--bootstrap-servers", default=None, envvar="STREAMRECALL_BOOTSTRAP_SERVERS",
              help="Use this broker instead of an embedded one.")
@json_option
def command(records: int, bootstrap_servers: str | None, as_json: bool) -> None:
    """Consume throughput of the runtime vs raw kafka-python on the same topic."""
    with ExitStack() as stack:
        if bootstrap_servers is None:
            bootstrap_servers = stack.enter_context(EmbeddedBroker()).bootstrap_servers
        tag = uuid.uuid4().hex[:8]
        settings = Settings(bootstrap_servers=bootstrap_servers, topic_prefix=f"bench-{tag}.",
                            group_prefix=f"bench-{tag}", partitions=4)
        create_topics(settings)
        produced = _produce(settings, records)
        raw = _raw_consume(settings, records, parse=False)
        raw_json = _raw_consume(settings, records, parse=True)
        ours = _runtime_consume(settings, records)
    results: list[Result] = [
        result("produce raw kafka-python", "records/s", produced),
        result("consume raw kafka-python", "records/s", raw),
        result("consume raw + json.loads", "records/s", raw_json, ratio_to_raw=raw_json / raw),
        result("consume runtime (decode+validate+commit)", "records/s", ours, ratio_to_raw=ours / raw,
               extra="msgspec-validated Click events, no-op handler"),
        result("peak RSS", "MiB", peak_rss_mb()),
    ]
    report(results, as_json)
