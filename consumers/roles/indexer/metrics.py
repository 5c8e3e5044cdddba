"""The indexer's Prometheus metrics (docs/operations.md has the table)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from streamrecall.consumers.recall_api.metrics import QueryMetrics
from streamrecall.metrics import FRESHNESS_BUCKETS, LATENCY_BUCKETS

#: Label values known in advance (initialised at 0): the indexer's upsert causes.
UPSERT_CAUSES = ("item", "reencode", "rebuild")


class IndexerMetrics(QueryMetrics):
    """The index's families, and the query families of every recall API (:class:`QueryMetrics`)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        super().__init__(registry)
        self.items = Gauge("streamrecall_index_items", "Live items in the index.", registry=registry)
        self.deleted_share = Gauge("streamrecall_index_deleted_slots_ratio",
                                   "Share of index slots marked deleted (awaiting reuse).", registry=registry)
        self.upserts = Counter("streamrecall_index_upserts_total", "Item vectors upserted, by cause.",
                               ["cause"], registry=registry)
        for cause in UPSERT_CAUSES:
            self.upserts.labels(cause)
        self.deletes = Counter("streamrecall_index_deletes_total", "Items deleted.", registry=registry)
        self.drift_checks = Counter("streamrecall_index_drift_checks_total",
                                    "Items whose estimated drift passed reencode_drift_bound, by what encoding them "
                                    "found: rewritten (truly past it) or kept (within it: the estimate overshot).",
                                    ["outcome"], registry=registry)
        for outcome in ("rewritten", "kept"):
            self.drift_checks.labels(outcome)
        self.encode_seconds = Histogram("streamrecall_index_encode_seconds", "Item tower time per micro-batch.",
                                        buckets=LATENCY_BUCKETS, registry=registry)
        self.upsert_seconds = Histogram("streamrecall_index_upsert_seconds", "HNSW upsert time per micro-batch.",
                                        buckets=LATENCY_BUCKETS, registry=registry)
        self.freshness = Histogram("streamrecall_index_freshness_seconds",
                                   "Item event time (updated_at, else created_at) to searchable in the index, "
                                   "for events new to this indexer (docs/api.md).",
                                   buckets=FRESHNESS_BUCKETS, registry=registry)
        self.stale_share = Gauge("streamrecall_index_stale_ratio",
                                 "Share of indexed items encoded by an older model version.", registry=registry)
        self.behind = Gauge("streamrecall_index_behind_ratio",
                            "Share of indexed items encoded by a model version more than stale_after_versions "
                            "versions (by=versions) or stale_after_s seconds (by=seconds) behind the current one.",
                            ["by"], registry=registry)
        for by in ("versions", "seconds"):
            self.behind.labels(by)
        self.drift_mean = Gauge("streamrecall_index_drift_mean",
                                "Mean estimated drift of the indexed vectors since they were written "
                                "(share of their norm the model may have moved them).", registry=registry)
        self.over_drift_bound = Gauge("streamrecall_index_over_drift_bound_ratio",
                                      "Share of indexed items whose estimated drift exceeds reencode_drift_bound: "
                                      "the re-encode backlog.", registry=registry)
        self.recall_at_10 = Gauge("streamrecall_index_recall_at_10",
                                  "ANN recall@10 against exact search over the same live vectors (sampled).",
                                  registry=registry)
        self.user_vectors = Gauge("streamrecall_index_user_vectors", "User vectors held for /recall.",
                                  registry=registry)
        self.snapshot_time = Gauge("streamrecall_index_snapshot_timestamp_seconds",
                                   "Unix time of the last durable index snapshot.", registry=registry)
        self.user_encodes = Counter("streamrecall_query_user_vectors_total",
                                    "User vectors /recall scored with, by source: the stored one (made by the "
                                    "current model version) or one encoded at query time by this replica.",
                                    ["source"], registry=registry)
        for source in ("stored", "query-time"):
            self.user_encodes.labels(source)
        self.serving_overlap = Gauge("streamrecall_serving_overlap_at_k",
                                     "Sampled live queries asked again: share of the exact top-K (a fresh encode "
                                     "of the catalog by the current towers) that the served top-K holds.",
                                     registry=registry)
        self.serving_overlap.set(float("nan"))  # not measured yet: no alert fires, dashboards show a gap
        self.serving_overlap_queries = Counter("streamrecall_serving_overlap_queries_total",
                                               "Queries the serving-overlap monitor asked again.", registry=registry)
