"""Topic creation: partition counts and cleanup policies as docs/architecture.md specifies."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from streamrecall.consumers.clients import make_admin
from streamrecall.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def topic_specs(settings: Settings) -> list[TopicSpec]:
    t = settings.topics
    n = settings.partitions
    return [
        TopicSpec(t.items, n, {}),
        TopicSpec(t.clicks, n, {}),
        # Compacted: the latest vector per user wins, so a new reader gets every user once.
        TopicSpec(t.user_vectors, n, {"cleanup.policy": "compact"}),
        # One partition: updates must be applied in version order. No size override: updates travel
        # in chunks of at most 1 MiB (consumers/update_chunks.py), within the broker's default.
        # Time-based retention, never size-based: a size bound could cut the newest full update's
        # first chunks, and a reader from the start then waits for the next full update.
        TopicSpec(t.model_updates, 1, {"retention.ms": str(settings.model_updates_retention_ms)}),
        TopicSpec(t.deadletter, n, {}),
    ]


def create_topics(settings: Settings) -> dict[str, str]:
    """Create any missing topic; returns {name: "created" | "exists"}."""
    admin = make_admin(settings)
    try:
        existing = set(admin.list_topics())
        wanted = [s for s in topic_specs(settings) if s.name not in existing]
        result = {s.name: "exists" for s in topic_specs(settings) if s.name in existing}
        if wanted:
            try:
                admin.create_topics([NewTopic(s.name, s.partitions, settings.replication_factor, topic_configs=s.config)
                                     for s in wanted])
            except TopicAlreadyExistsError:
                pass  # raced with another creator
            result.update({s.name: "created" for s in wanted})
        for name, state in sorted(result.items()):
            log.info("topic %s: %s", name, state)
        return result
    finally:
        admin.close()
