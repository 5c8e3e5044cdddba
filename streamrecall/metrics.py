"""Prometheus metrics shared by every role, defined once.

Each metric family lives on a :class:`RuntimeMetrics` built against a registry;
the module-level :data:`RUNTIME` uses the default registry, tests build their own.
Label values are bounded: topic names, partition numbers and the fixed reasons in
:data:`streamrecall.events.InvalidEvent.REASONS` plus "handler-error".
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

#: Buckets for latencies that should stay well under a second.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RuntimeMetrics:
    """The poll loop's metrics (records, dead letters, batches, lag, commits, rebalances)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.records_consumed = Counter(
            "streamrecall_records_consumed_total", "Records consumed, by role and topic.",
            ["role", "topic"], registry=registry)
        self.deadlettered = Counter(
            "streamrecall_deadlettered_total", "Records sent to the dead-letter topic, by reason.",
            ["role", "topic", "reason"], registry=registry)
        self.batch_seconds = Histogram(
            "streamrecall_batch_processing_seconds", "Time to decode and handle one polled batch.",
            ["role"], buckets=LATENCY_BUCKETS, registry=registry)
        self.flush_seconds = Histogram(
            "streamrecall_flush_seconds", "Time to flush a role's side effects and commit.",
            ["role"], buckets=LATENCY_BUCKETS, registry=registry)
        self.lag = Gauge(
            "streamrecall_consumer_lag_records", "High watermark minus position, per partition.",
            ["role", "topic", "partition"], registry=registry)
        self.commits = Counter(
            "streamrecall_commits_total", "Offset commits, by outcome.", ["role", "outcome"], registry=registry)
        self.rebalances = Counter(
            "streamrecall_rebalances_total", "Partition assignment changes, by kind.",
            ["role", "kind"], registry=registry)
        self.transient_retries = Counter(
            "streamrecall_transient_retries_total", "Retries after transient broker errors.",
            ["role"], registry=registry)


RUNTIME = RuntimeMetrics()


def serve_metrics(host: str, port: int, registry: CollectorRegistry = REGISTRY) -> WSGIServer:
    """Serve ``/metrics`` on host:port in a daemon thread; returns the server (``.shutdown()`` stops it)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server
