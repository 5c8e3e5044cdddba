"""The router role: ``user-vectors`` in, the recall API over a sharded index out.

The router is stateless: it holds the latest vector of each user (read from the compacted
``user-vectors`` topic from the beginning at every start, like the indexer does) and the shards'
addresses (``shard_urls``). Its poll loop only keeps the user table current; queries are answered
on the HTTP server's pool by :class:`~.service.RouterService`, which asks every shard's
``POST /recall/shard`` and merges. Its group offsets on ``user-vectors`` are committed for lag
monitoring only; any number of router replicas can run behind one load balancer.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any, Callable

from kafka import TopicPartition

from streamrecall.consumers.assembly import RoleAssembly, model_config
from streamrecall.consumers.handler import HandlerBase, Record
from streamrecall.consumers.liveness import Heartbeat
from streamrecall.consumers.offsets import Offsets
from streamrecall.consumers.recall_api.rules import MAX_OVERFETCH_FACTOR, MIN_OVERFETCH, cap_per_category
from streamrecall.consumers.recall_api.server import RecallApi
from streamrecall.consumers.recall_api.users import UserEntry, apply_user_record
from streamrecall.consumers.roles.router.fanout import ShardClient, parse_shard_urls
from streamrecall.consumers.roles.router.metrics import RouterMetrics
from streamrecall.consumers.roles.router.options import RouterOptions
from streamrecall.consumers.roles.router.service import RouterService
from streamrecall.consumers.lag import lag_reasons, measured_lag
from streamrecall.consumers.start import StartPosition
from streamrecall.bounded import LRUMap
from streamrecall.errors import ConfigError
from streamrecall.events import user_vector_decoder
from streamrecall.settings import Settings

log = logging.getLogger(__name__)

ROLE = "router"


class RouterHandler(HandlerBase):
    """The poll loop's side of the router: the latest vector per user (a tombstone removes it)."""

    def __init__(self, users: LRUMap[str, UserEntry], metrics: RouterMetrics) -> None:
        self.users = users
        self.metrics = metrics
        self.assigned_partitions: set[tuple[str, int]] = set()

    def start_offsets(self) -> Offsets:
        return Offsets()  # user-vectors is always read whole (the router is stateless)

    def assigned(self, partitions: set[TopicPartition]) -> None:
        self.assigned_partitions |= {("user-vectors", tp.partition) for tp in partitions}

    def handle(self, records: list[Record]) -> None:
        for r in records:
            apply_user_record(self.users, r.key, r.value)

    def tick(self) -> None:
        self.metrics.user_vectors.set(len(self.users))


class RouterRole:
    """Builds the router's user table, shard client, service and API."""

    def __init__(self, settings: Settings, metrics: RouterMetrics | None = None) -> None:
        if not settings.shard_urls:
            raise ConfigError("shard_urls: the router needs the shards' addresses (--shard-urls "
                              "'http://shard0:8470;http://shard1:8470', replicas of one shard separated by ',')")
        self.settings = settings
        self.config = RouterOptions.from_settings(settings)
        shards = parse_shard_urls(settings.shard_urls)
        self.metrics = metrics if metrics is not None else RouterMetrics(shards=len(shards))
        self.users: LRUMap[str, UserEntry] = LRUMap(self.config.max_user_vectors)
        self.handler = RouterHandler(self.users, self.metrics)
        self.client = ShardClient(shards, threads=self.config.fanout_threads, down_s=self.config.down_s)
        self.service = RouterService(self.client, self.users, self.config, self.metrics, model_config(settings).dim,
                                     cap_per_category, self.health, (MAX_OVERFETCH_FACTOR, MIN_OVERFETCH))
        self.api: RecallApi | None = None
        log.info("router over %d shard(s): %s", len(shards), "; ".join(", ".join(r) for r in shards))

    def topics(self) -> dict[str, tuple[str, Callable[[bytes | None], Any]]]:
        decode = user_vector_decoder(self.settings.max_value_bytes, self.settings.max_event_ahead_ms)
        return {self.settings.topics.user_vectors: ("user-vectors", decode)}

    def serve_http(self, stack: ExitStack, heartbeat: Heartbeat) -> None:
        self.api = RecallApi(self.service, self.settings.http_host, self.settings.port_for(ROLE),
                             self.config.max_body_bytes, admin_port=self.settings.admin_port_for(ROLE),
                             livez=heartbeat.answer, name=ROLE)
        self.api.start()
        stack.callback(self.api.stop)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Ready once this run measured its user-vectors lag within ``ready_max_lag`` (the shards'
        own readiness is theirs: an answer says which shards answered)."""
        lag = measured_lag(ROLE, self.handler.assigned_partitions)
        total, reasons = lag_reasons(lag, self.config.ready_max_lag)
        return not reasons, {"ready": not reasons, "reasons": reasons, "shards": len(self.client),
                             "user_vectors": len(self.users), "lag": total, "lag_by_topic": lag}


def run(settings: Settings, start: StartPosition) -> None:
    """Run the router until SIGTERM/SIGINT."""
    if start.kind != "committed":
        log.info("router: --from %s: the router always reads user-vectors whole; ignored", start)
    with ExitStack() as stack:
        process = RoleAssembly(ROLE, settings, stack)
        role = RouterRole(settings)
        stack.callback(role.client.close)
        process.run(StartPosition("earliest"), role.handler, role.topics(), assign_all=True,
                    serve_http=role.serve_http)
