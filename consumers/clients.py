"""kafka-python clients built from settings, with the options every role shares."""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Callable, Iterator, TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaTimeoutError

from streamrecall.errors import BrokerUnreachable
from streamrecall.settings import Settings

C = TypeVar("C")

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
    return connect(settings, lambda: KafkaConsumer(**conf))


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
    return connect(settings, lambda: KafkaProducer(**conf))


def make_admin(settings: Settings) -> KafkaAdminClient:
    return connect(settings, lambda: KafkaAdminClient(request_timeout_ms=REQUEST_TIMEOUT_MS,
                                                      client_id="streamrecall-admin", **settings.kafka_config()))


def connect(settings: Settings, build: Callable[[], C]) -> C:
    """Build a client; kafka-python bootstraps in the constructor, bounded by
    ``settings.bootstrap_timeout_ms``. No broker in that time is :class:`BrokerUnreachable`,
    whose message says what to check, instead of kafka-python's timeout and traceback."""
    with _kafka_log_held() as held:
        try:
            client = build()
        except KafkaTimeoutError:
            held.clear()  # a retry line per attempt: the one error below says it all
            raise BrokerUnreachable(
                f"no Kafka broker answered at {settings.bootstrap_servers} within "
                f"{settings.bootstrap_timeout_ms / 1000:g}s: check --bootstrap-servers "
                "(STREAMRECALL_BOOTSTRAP_SERVERS), the security settings, and that the brokers are up") from None
    return client


class _Hold(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_hold_lock = threading.Lock()


@contextlib.contextmanager
def _kafka_log_held() -> Iterator[list[logging.LogRecord]]:
    """Hold kafka-python's log records while a client bootstraps, and pass them on afterwards
    unless the caller cleared them: a broker that never answers gives one clear error instead
    of a screenful of retries, and a bootstrap that succeeds loses no line."""
    kafka_log = logging.getLogger("kafka")
    with _hold_lock:  # clients are built one at a time, at start: holding the log is short
        hold = _Hold()
        propagate = kafka_log.propagate
        kafka_log.addHandler(hold)
        kafka_log.propagate = False
        try:
            yield hold.records
        finally:
            kafka_log.removeHandler(hold)
            kafka_log.propagate = propagate
    for record in hold.records:
        logging.getLogger(record.name).handle(record)


def check_reachable(settings: Settings) -> None:
    """Raise :class:`BrokerUnreachable` unless a broker answers within the bootstrap timeout."""
    make_admin(settings).close()
