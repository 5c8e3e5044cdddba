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
        self.deadletters_unwritten = Counter(
            "streamrecall_deadletters_unwritten_total",
            "Dead letters the producer or the broker refused; each is sent again at the next flush, and "
            "nothing is committed until it is written.", ["role"], registry=registry)
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
        self.deadletters_unwritten.labels(role)
        self.batch_seconds.labels(role)
        self.flush_seconds.labels(role)
        for reason in refusal_reasons:
            self.updates_refused.labels(role, reason)


class ModelVersionMetrics:
    """Which model version each role publishes or uses."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.version = Gauge("streamrecall_model_version", "Model version published (trainer) or in use.",
                             ["role"], registry=registry)
        self.apply_seconds = Histogram(
            "streamrecall_model_update_apply_seconds",
            "Time a model-update reader spent on one update: part=loop, what its poll loop waited (decode and "
            "apply, or only the write of a staged full update); part=off_loop, decoding and staging a big full "
            "update in the worker thread meanwhile.", ["role", "part"], buckets=LATENCY_BUCKETS, registry=registry)


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


M = TypeVar("M")


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
