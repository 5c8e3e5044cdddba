"""The router's metrics (docs/operations.md): per-shard requests and latency, incomplete answers.

The query families (``streamrecall_queries_total``, ``streamrecall_query_seconds``) are the ones
every recall API serves (:class:`~streamrecall.consumers.recall_api.metrics.QueryMetrics`), so a dashboard reads the
router and a single indexer alike.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from streamrecall.consumers.recall_api.metrics import QueryMetrics
from streamrecall.metrics import LATENCY_BUCKETS

#: Outcomes of one request to a shard: answered, past the deadline, every replica down, refused
#: (a 4xx: a bug or a mismatch between router and shard), or answered by an older model version.
SHARD_OUTCOMES = ("ok", "deadline", "down", "error", "behind")


class RouterMetrics(QueryMetrics):
    def __init__(self, registry: CollectorRegistry = REGISTRY, shards: int = 0) -> None:
        super().__init__(registry)
        self.shard_requests = Counter("streamrecall_router_shard_requests_total",
                                      "Requests the router sent to a shard, by outcome.", ["shard", "outcome"],
                                      registry=registry)
        self.shard_seconds = Histogram("streamrecall_router_shard_seconds",
                                       "Time a shard took to answer the router (answered requests).", ["shard"],
                                       buckets=LATENCY_BUCKETS, registry=registry)
        for shard in range(shards):
            for outcome in SHARD_OUTCOMES:
                self.shard_requests.labels(str(shard), outcome)
            self.shard_seconds.labels(str(shard))
        self.partial = Counter("streamrecall_router_incomplete_answers_total",
                               "Answers without every shard: partial (flagged, or a 503 with partial = refuse) "
                               "or none (no shard answered: 503).", ["kind"], registry=registry)
        for kind in ("partial", "none"):
            self.partial.labels(kind)
        self.user_vectors = Gauge("streamrecall_router_user_vectors", "User vectors held for /recall.",
                                  registry=registry)
