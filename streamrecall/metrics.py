"""Prometheus metrics, defined once (docs/operations.md has the table).

Each group of families is a class built against a registry; a role builds its
group once at start-up on the default registry, tests build their own.
Label values are bounded: topic names, partition numbers and the fixed reasons in
:data:`streamrecall.events.InvalidEvent.REASONS` plus "handler-error" (and the model-update
refusals). Every label value known in advance is initialised to 0 where the group is built, or,
for the per-role families, by :meth:`RuntimeMetrics.declare` when a role's runtime starts: a
dashboard shows 0, not "no data", and ``rate()`` sees the first increment.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any, Callable, Iterable, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)

#: Label values known in advance (initialised at 0): the indexer's upsert causes, the recall API's
#: answered routes, and the statuses of refused /recall requests (counted under route "invalid").
UPSERT_CAUSES = ("item", "reencode", "rebuild")
QUERY_ROUTES = ("user-vector", "vector", "trending", "recent")
QUERY_ERROR_STATUSES = ("400", "404", "405", "411", "413")
#: Buckets for latencies that should stay well under a second.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Buckets for event-time-to-effect delays; the SLO is 1 s.
FRESHNESS_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


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
        self.updates_refused = Counter(
            "streamrecall_model_updates_refused_total",
            "Model updates a replica refused and dead-lettered: unsigned, bad-signature (model_signing_key "
            "set), stale-epoch (from a replaced trainer), version-jump.", ["role", "reason"], registry=registry)
        self.last_step = Gauge(
            "streamrecall_runtime_last_step_timestamp_seconds",
            "Unix time the role's poll loop last completed a step (liveness: it stops moving when the loop is stuck).",
            ["role"], registry=registry)

    def declare(self, role: str, deadletter_reasons: dict[str, tuple[str, ...]],
                refusal_reasons: tuple[str, ...] = ()) -> None:
        """Create ``role``'s series at 0: dead letters per logical topic and reason, the poll
        loop's counters and histograms, and (for a model-update reader) the refusals."""
        for topic, reasons in deadletter_reasons.items():
            self.records_consumed.labels(role, topic)
            for reason in reasons:
                self.deadlettered.labels(role, topic, reason)
        for outcome in ("ok", "failed"):
            self.commits.labels(role, outcome)
        for kind in ("assigned", "revoked"):
            self.rebalances.labels(role, kind)
        self.transient_retries.labels(role)
        self.batch_seconds.labels(role)
        self.flush_seconds.labels(role)
        for reason in refusal_reasons:
            self.updates_refused.labels(role, reason)


class ModelVersionMetrics:
    """Which model version each role publishes or uses."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.version = Gauge("streamrecall_model_version", "Model version published (trainer) or in use.",
                             ["role"], registry=registry)


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.loss = Gauge("streamrecall_trainer_loss", "Loss of the latest training step.", registry=registry)
        self.steps = Counter("streamrecall_trainer_steps_total", "Training steps taken.", registry=registry)
        self.examples = Counter("streamrecall_trainer_examples_total", "Clicks trained on.", registry=registry)
        self.replay_steps = Counter("streamrecall_trainer_replay_steps_total",
                                    "Training steps on replayed clicks, taken while the stream was idle.",
                                    registry=registry)
        self.unknown_items = Counter("streamrecall_trainer_unknown_item_clicks_total",
                                     "Clicks on items not (yet) seen on the items topic; trained on the id only.",
                                     registry=registry)
        self.step_seconds = Histogram("streamrecall_trainer_step_seconds", "Time of one training step.",
                                      buckets=LATENCY_BUCKETS, registry=registry)
        self.estimator_top_p = Gauge("streamrecall_trainer_estimator_top_probability",
                                     "Largest estimated item sampling probability (1/B).", registry=registry)
        self.estimator_median_p = Gauge("streamrecall_trainer_estimator_median_probability",
                                        "Median estimated probability over items seen in recent batches.",
                                        registry=registry)
        self.updates_published = Counter("streamrecall_trainer_updates_published_total",
                                         "Model updates sent, by kind.", ["kind"], registry=registry)
        for kind in ("full", "delta"):
            self.updates_published.labels(kind)
        self.publish_failures = Counter("streamrecall_trainer_update_publish_failures_total",
                                        "Model updates the broker did not acknowledge.", registry=registry)
        self.acked_version = Gauge("streamrecall_trainer_acked_model_version",
                                   "Newest model version the broker acknowledged on model-updates.", registry=registry)
        self.acked_time = Gauge("streamrecall_trainer_last_acked_update_timestamp_seconds",
                                "Unix time the broker last acknowledged a model update.", registry=registry)
        self.update_bytes = Histogram("streamrecall_trainer_update_bytes", "Size of published model updates.",
                                      buckets=(1e4, 1e5, 1e6, 4e6, 16e6, 64e6, 256e6, 1e9), registry=registry)
        self.update_chunks = Histogram("streamrecall_trainer_update_chunks",
                                       "Records (chunks of at most 1 MiB) per published model update.",
                                       buckets=(1, 2, 4, 16, 64, 256, 1024), registry=registry)
        self.checkpoint_time = Gauge("streamrecall_trainer_checkpoint_timestamp_seconds",
                                     "Unix time of the last durable checkpoint.", registry=registry)


class IndexerMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.items = Gauge("streamrecall_index_items", "Live items in the index.", registry=registry)
        self.deleted_share = Gauge("streamrecall_index_deleted_slots_ratio",
                                   "Share of index slots marked deleted (awaiting reuse).", registry=registry)
        self.upserts = Counter("streamrecall_index_upserts_total", "Item vectors upserted, by cause.",
                               ["cause"], registry=registry)
        for cause in UPSERT_CAUSES:
            self.upserts.labels(cause)
        self.deletes = Counter("streamrecall_index_deletes_total", "Items deleted.", registry=registry)
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
        self.recall_at_10 = Gauge("streamrecall_index_recall_at_10",
                                  "ANN recall@10 against exact search over the same live vectors (sampled).",
                                  registry=registry)
        self.queries = Counter("streamrecall_queries_total", "Recall queries, by route and status.",
                               ["route", "status"], registry=registry)
        self.query_seconds = Histogram("streamrecall_query_seconds", "Recall query latency, by route.",
                                       ["route"], buckets=LATENCY_BUCKETS, registry=registry)
        for route in QUERY_ROUTES:
            self.queries.labels(route, "200")
            self.query_seconds.labels(route)
        for status in QUERY_ERROR_STATUSES:
            self.queries.labels("invalid", status)
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


#: The bounded in-memory states of each role (docs/operations.md#bounded-memory): the label values
#: of ``streamrecall_state_entries`` and ``streamrecall_state_capacity``.
ROLE_STATES: dict[str, tuple[str, ...]] = {
    "trainer": ("histories", "catalog", "trending", "deadletter_dedup"),
    "indexer": ("user_vectors", "item_vector_cache", "deadletter_dedup"),
    "publisher": ("histories", "deadletter_dedup"),
}


class StateMetrics:
    """How full each role's bounded in-memory maps are: entries held and the bound they stop at."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.entries = Gauge("streamrecall_state_entries",
                             "Entries held in a bounded in-memory state (histories, user vectors, item table, "
                             "dead-letter dedup, ...), by role and state.", ["role", "state"], registry=registry)
        self.capacity = Gauge("streamrecall_state_capacity",
                              "The bound of a role's in-memory state (a setting): at it, the least recent "
                              "entry is evicted.", ["role", "state"], registry=registry)

    def declare(self, role: str) -> None:
        """Create ``role``'s series at 0 (none for a role without bounded states)."""
        for state in ROLE_STATES.get(role, ()):
            self.entries.labels(role, state)
            self.capacity.labels(role, state)

    def fill(self, role: str, state: str, entries: int, capacity: int) -> None:
        self.entries.labels(role, state).set(entries)
        self.capacity.labels(role, state).set(capacity)


RUNTIME = RuntimeMetrics()
MODEL_VERSION = ModelVersionMetrics()
STATE = StateMetrics()

M = TypeVar("M", TrainerMetrics, IndexerMetrics, PublisherMetrics)


@functools.cache
def role_metrics(group: type[M]) -> M:
    """A role's metric group, built once per process on the default registry (on first use, so
    a process registers only the families of the roles it runs)."""
    return group()


#: ``livez()`` answers (status, content type, body) for ``GET /livez``.
Livez = Callable[[], tuple[int, str, bytes]]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds: not worth a log line
        pass


def serve_metrics(host: str, port: int, registry: CollectorRegistry = REGISTRY,
                  livez: Livez | None = None) -> WSGIServer:
    """Serve ``/metrics`` (and, given ``livez``, ``/livez``) on host:port in a daemon thread; returns
    the server (``.shutdown()`` stops it)."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if livez is not None and environ.get("PATH_INFO") == "/livez":
            status, content_type, body = livez()
            start_response(f"{status} {'OK' if status == 200 else 'Service Unavailable'}",
                           [("Content-Type", content_type), ("Content-Length", str(len(body)))])
            return [body]
        return metrics_app(environ, start_response)

    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics%s", host, server.server_port, " (and /livez)" if livez else "")
    return server
