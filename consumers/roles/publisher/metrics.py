"""The publisher's Prometheus metrics (docs/operations.md has the table)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from streamrecall.metrics import FRESHNESS_BUCKETS

#: The stages of click → vector, in order (``streamrecall_publisher_click_stage_seconds``).
CLICK_STAGES = ("produce", "deliver", "hold")


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
        # Where click → vector goes: "produce" event time to the record's Kafka timestamp (the
        # app and its producer), "deliver" that to the publisher's poll (broker and fetch), "hold"
        # the poll to the vector sent (this process). Per vector the three sum to click_to_vector.
        self.click_stage = Histogram("streamrecall_publisher_click_stage_seconds",
                                     "Click → vector by stage: produce, deliver (broker to poll), hold (in the publisher).",
                                     ["stage"], buckets=FRESHNESS_BUCKETS, registry=registry)
        for stage in CLICK_STAGES:
            self.click_stage.labels(stage)
        self.users = Gauge("streamrecall_publisher_users", "Users with recent history held.", registry=registry)
        self.pending_refresh = Gauge("streamrecall_publisher_pending_refresh_users",
                                     "Users still to re-publish after a model update.", registry=registry)
