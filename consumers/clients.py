"""kafka-python clients built from settings, with the options every role shares."""

from __future__ import annotations

from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from streamrecall.settings import Settings

#: Bounds on every blocking call: far below max_poll_interval_ms (5 min), so no wait can stall the loop.
REQUEST_TIMEOUT_MS = 15_000


def make_consumer(settings: Settings, group_id: str | None, **overrides: Any) -> KafkaConsumer:
    conf: dict[str, Any] = dict(
        group_id=group_id,
        enable_auto_commit=False,  # the runtime commits only after side effects are durable
        auto_offset_reset="earliest",
        max_poll_records=settings.max_poll_records,
        fetch_max_wait_ms=50,  # freshness: do not let the broker sit on small fetches
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
        max_poll_interval_ms=300_000,
        request_timeout_ms=REQUEST_TIMEOUT_MS + 5_000,
        max_partition_fetch_bytes=4 << 20,
        client_id=f"streamrecall-{group_id or 'reader'}",
    )
    conf.update(settings.kafka_config())
    conf.update(overrides)
    return KafkaConsumer(**conf)


def make_producer(settings: Settings, **overrides: Any) -> KafkaProducer:
    conf: dict[str, Any] = dict(
        acks="all",
        linger_ms=5,
        batch_size=256 * 1024,
        max_request_size=8 << 20,
        request_timeout_ms=REQUEST_TIMEOUT_MS,
        retries=10,
        retry_backoff_ms=200,
        max_in_flight_requests_per_connection=1,  # keeps per-partition order across retries
        client_id="streamrecall-producer",
    )
    conf.update(settings.kafka_config())
    conf.update(overrides)
    return KafkaProducer(**conf)


def make_admin(settings: Settings) -> KafkaAdminClient:
    return KafkaAdminClient(request_timeout_ms=REQUEST_TIMEOUT_MS, client_id="streamrecall-admin",
                            **settings.kafka_config())
