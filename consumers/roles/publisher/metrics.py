"""The publisher's Prometheus metrics (docs/operations.md has the table)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from streamrecall.metrics import FRESHNESS_BUCKETS


class PublisherMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.published = Counter("streamrecall_publisher_vectors_published_total",
                                 "User vectors published, by cause (click or model update).", ["cause"],
                                 registry=registry)
        for cause in ("click", "model_update"):
            self.published.labels(cause)
        self.click_to_vector = Histogram("streamrecall_publisher_click_to_vector_seconds",
                                         "Click event time (ts) to its user's vector published.",
                                         buckets=FRESHNESS_BUCKETS, registry=registry)
        self.users = Gauge("streamrecall_publisher_users", "Users with recent history held.", registry=registry)
        self.pending_refresh = Gauge("streamrecall_publisher_pending_refresh_users",
                                     "Users still to re-publish after a model update.", registry=registry)
