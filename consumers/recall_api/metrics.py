"""The query families every recall API serves (the indexer's and the router's), defined once."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from streamrecall.metrics import LATENCY_BUCKETS

#: Label values known in advance (initialised at 0): the answered routes, and the statuses of
#: refused /recall requests (counted under route "invalid").
QUERY_ROUTES = ("user-vector", "vector", "trending", "recent")
QUERY_ERROR_STATUSES = ("400", "404", "405", "411", "413")


class QueryMetrics:
    """``streamrecall_queries_total{route,status}`` and ``streamrecall_query_seconds{route}``."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.queries = Counter("streamrecall_queries_total", "Recall queries, by route and status.",
                               ["route", "status"], registry=registry)
        self.query_seconds = Histogram("streamrecall_query_seconds", "Recall query latency, by route.",
                                       ["route"], buckets=LATENCY_BUCKETS, registry=registry)
        for route in QUERY_ROUTES:
            self.queries.labels(route, "200")
            self.query_seconds.labels(route)
        for status in QUERY_ERROR_STATUSES:
            self.queries.labels("invalid", status)
