"""/livez follows the poll loop on a real broker: 200 while it steps, 503 while a handler is stuck
(the metrics thread still answers), 200 again once it moves."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from streamrecall.consumers.clients import make_consumer, make_producer
from streamrecall.consumers.deadletter import DeadLetterSink
from streamrecall.consumers.liveness import Heartbeat
from streamrecall.consumers.handler import HandlerBase, Record
from streamrecall.consumers.runtime import Runtime
from streamrecall.metrics import RuntimeMetrics, serve_metrics

pytestmark = pytest.mark.integration


class Stuck(HandlerBase):
    """Blocks in handle() until released: a poll loop stuck in a call."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def handle(self, records: list[Record]) -> None:
        self.entered.set()
        self.release.wait(60)


def livez(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_status(url: str, want: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while livez(url) != want:
        assert time.monotonic() < deadline, f"/livez never answered {want}"
        time.sleep(0.1)


def test_livez_follows_the_poll_loop(settings_factory) -> None:
    s = settings_factory()
    producer = make_producer(s)
    heartbeat = Heartbeat(stall_s=1.0)
    handler = Stuck()
    metrics = RuntimeMetrics(CollectorRegistry())
    runtime = Runtime(role="trainer", consumer=make_consumer(s, s.group_id("trainer")),
                      deadletters=DeadLetterSink(producer, s.topics.deadletter, "trainer", metrics), handler=handler,
                      topics={s.topics.clicks: ("clicks", lambda v: v)}, metrics=metrics, heartbeat=heartbeat,
                      flush_interval_ms=100)
    server = serve_metrics("127.0.0.1", 0, CollectorRegistry(), livez=heartbeat.answer)
    url = f"http://127.0.0.1:{server.server_port}/livez"
    thread = threading.Thread(target=runtime.run, kwargs={"max_seconds": 120}, daemon=True)
    try:
        assert livez(url) == 503  # starting: no step yet
        thread.start()
        wait_status(url, 200)
        producer.send(s.topics.clicks, key=b"u", value=b"{}", partition=0)
        producer.flush(timeout=30)
        assert handler.entered.wait(30)
        wait_status(url, 503, timeout_s=10)  # stuck for longer than the bound
        handler.release.set()
        wait_status(url, 200)
    finally:
        handler.release.set()
        runtime.stop()
        thread.join(30)
        server.shutdown()
        producer.close()
