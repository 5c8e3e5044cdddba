"""Operator signals that tell the truth: freshness from the event's own time and only for events
new to the indexer, labelled series present at 0 from the start, "last update" gauges moved on the
broker's acknowledgement, and liveness from poll-loop progress."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from prometheus_client import CollectorRegistry

from streamrecall.consumers.deadletter import DeadLetterSink, reasons_for
from streamrecall.consumers.roles.indexer.options import IndexerOptions
from streamrecall.consumers.roles.indexer.state import IndexerState
from streamrecall.consumers.liveness import Heartbeat
from streamrecall.consumers.roles.indexer.reencoder import Reencoder
from streamrecall.consumers.roles.indexer.handler import IndexerHandler
from streamrecall.consumers.roles.trainer.sink import KafkaUpdateSink
from streamrecall.consumers.handler import Record
from streamrecall.events import Item
from streamrecall.index import QualityMonitor
from streamrecall.consumers.roles.indexer.metrics import IndexerMetrics
from streamrecall.consumers.roles.publisher.metrics import PublisherMetrics
from streamrecall.metrics import RuntimeMetrics, serve_metrics
from streamrecall.consumers.roles.trainer.metrics import TrainerMetrics
from streamrecall.model import ModelConfig
from streamrecall.settings import Settings

MODEL = ModelConfig(dim=8, hidden=8, id_buckets=256, token_buckets=256, estimator_buckets=256)


def now_ms() -> int:
    return int(time.time() * 1000)


# --- freshness ------------------------------------------------------------------------------
def indexer(registry: CollectorRegistry) -> IndexerHandler:
    state = IndexerState(IndexerOptions(), MODEL, IndexerMetrics(registry))
    return IndexerHandler(Settings(), state, Reencoder(state, QualityMonitor(state.index)))


def item_record(offset: int, appended_ms: int, **fields: Any) -> Record:
    item = Item(**({"item_id": "i1", "title": "t", "categories": ("c",)} | fields))
    return Record("items", 0, offset, item.item_id.encode(), item, appended_ms)


def observed(registry: CollectorRegistry) -> tuple[float, float]:
    """(count, sum) of the freshness histogram."""
    return (registry.get_sample_value("streamrecall_index_freshness_seconds_count") or 0.0,
            registry.get_sample_value("streamrecall_index_freshness_seconds_sum") or 0.0)


def test_freshness_counts_new_events_from_their_own_time_only() -> None:
    registry = CollectorRegistry()
    handler = indexer(registry)
    created = now_ms() - 3_600_000  # an item created an hour ago
    handler.handle([item_record(0, now_ms(), created_at=now_ms() - 200)])  # a new item, 0.2 s old
    count, total = observed(registry)
    assert count == 1 and 0.1 < total < 5

    handler.handle([item_record(1, now_ms(), item_id="i2", created_at=created, updated_at=now_ms() - 300)])
    count, total = observed(registry)
    assert count == 2 and total < 10, "an update is measured from updated_at, not an hour-old created_at"

    handler.handle([item_record(2, now_ms(), item_id="i2", created_at=created, updated_at=now_ms() - 5000,
                                title="older change")])
    handler.handle([item_record(3, now_ms(), item_id="i2", created_at=created, title="no time of its own")])
    assert observed(registry)[0] == 2, "a change no newer than the one held is not new to the indexer"


def test_a_replayed_record_does_not_count_against_freshness() -> None:
    registry = CollectorRegistry()
    handler = indexer(registry)
    appended_before_start = handler.started_ms - 60_000
    handler.handle([item_record(0, appended_before_start, item_id="old", created_at=appended_before_start)])
    assert observed(registry)[0] == 0
    assert "old" in handler.state.catalog  # still indexed, of course


# --- labelled series exist at 0 -----------------------------------------------------------------
def test_role_metric_groups_start_with_their_known_label_values_at_zero() -> None:
    registry = CollectorRegistry()
    IndexerMetrics(registry), PublisherMetrics(registry), TrainerMetrics(registry)
    zero = {("streamrecall_index_upserts_total", (("cause", c),)) for c in ("item", "reencode", "rebuild")}
    zero |= {("streamrecall_queries_total", (("route", r), ("status", "200")))
             for r in ("user-vector", "vector", "trending", "recent")}
    zero |= {("streamrecall_queries_total", (("route", "invalid"), ("status", "400")))}
    zero |= {("streamrecall_publisher_vectors_published_total", (("cause", c),)) for c in ("click", "model_update")}
    zero |= {("streamrecall_trainer_updates_published_total", (("kind", k),)) for k in ("full", "delta")}
    zero |= {("streamrecall_trainer_update_publish_failures_total", ())}
    for name, labels in zero:
        assert registry.get_sample_value(name, dict(labels)) == 0, (name, labels)


def test_a_runtime_declares_its_roles_series_at_zero() -> None:
    registry = CollectorRegistry()
    sink = DeadLetterSink(producer=None, topic="dl", role="indexer", metrics=RuntimeMetrics(registry))
    sink.declare(["items", "model-updates"])
    for topic in ("items", "model-updates"):
        assert registry.get_sample_value("streamrecall_records_consumed_total", {"role": "indexer", "topic": topic}) == 0
        for reason in reasons_for(topic):
            assert registry.get_sample_value("streamrecall_deadlettered_total",
                                             {"role": "indexer", "topic": topic, "reason": reason}) == 0
    for reason in ("unsigned", "bad-signature", "stale-epoch", "version-jump"):
        assert registry.get_sample_value("streamrecall_model_updates_refused_total",
                                         {"role": "indexer", "reason": reason}) == 0
    for outcome in ("ok", "failed"):
        assert registry.get_sample_value("streamrecall_commits_total", {"role": "indexer", "outcome": outcome}) == 0


# --- "last update" moves on acknowledgement ---------------------------------------------------------
class Future:
    def __init__(self) -> None:
        self.is_done = False
        self.exception: Exception | None = None

    def failed(self) -> bool:
        return self.exception is not None


class Producer:
    def __init__(self) -> None:
        self.futures: list[Future] = []

    def send(self, topic: str, **kwargs: Any) -> Future:
        self.futures.append(Future())
        return self.futures[-1]


def test_acknowledged_gauges_move_only_when_the_broker_acknowledged() -> None:
    registry = CollectorRegistry()
    metrics = TrainerMetrics(registry)
    producer = Producer()
    sink = KafkaUpdateSink(producer, "model-updates", trainer_epoch=1, metrics=metrics)  # type: ignore[arg-type]
    sink.send(b"x", "full", 7)
    assert not sink.failed()
    assert registry.get_sample_value("streamrecall_trainer_acked_model_version") == 0, "sent, not acknowledged"
    assert registry.get_sample_value("streamrecall_trainer_last_acked_update_timestamp_seconds") == 0
    producer.futures[0].is_done = True
    assert not sink.failed()
    assert registry.get_sample_value("streamrecall_trainer_acked_model_version") == 7
    assert registry.get_sample_value("streamrecall_trainer_last_acked_update_timestamp_seconds") > 0
    sink.send(b"y", "delta", 8)
    producer.futures[1].is_done, producer.futures[1].exception = True, TimeoutError("no ack")
    assert sink.failed()
    assert registry.get_sample_value("streamrecall_trainer_acked_model_version") == 7
    assert registry.get_sample_value("streamrecall_trainer_update_publish_failures_total") == 1


# --- liveness ---------------------------------------------------------------------------------------------
def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_livez_answers_from_the_heartbeat_on_the_metrics_port() -> None:
    clock = [100.0]
    heartbeat = Heartbeat(stall_s=10, clock=lambda: clock[0])
    server = serve_metrics("127.0.0.1", 0, CollectorRegistry(), livez=heartbeat.answer)
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        status, body = get(url + "/livez")
        assert status == 503 and body["reason"].startswith("starting")
        heartbeat.beat()
        assert get(url + "/livez")[0] == 200
        clock[0] += 11  # the loop made no progress for longer than the bound
        status, body = get(url + "/livez")
        assert status == 503 and "no step" in body["reason"]
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:  # /metrics still answers
            assert r.status == 200
    finally:
        server.shutdown()
