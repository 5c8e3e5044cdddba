"""What `topics create` asks the broker for (the broker side is in tests/integration)."""

from __future__ import annotations

from streamrecall.consumers.topics import topic_specs
from streamrecall.settings import Settings


def test_model_updates_is_one_partition_with_time_retention_and_no_size_bounds():
    specs = {s.name: s for s in topic_specs(Settings(partitions=6, model_updates_retention_ms=7_200_000))}
    updates = specs["model-updates"]
    assert updates.partitions == 1
    assert updates.config == {"retention.ms": "7200000"}  # no retention.bytes, no max.message.bytes override
    assert specs["user-vectors"].config == {"cleanup.policy": "compact"}
    assert {s.partitions for n, s in specs.items() if n != "model-updates"} == {6}


def test_retention_forever_passes_through_as_kafka_spells_it():
    assert topic_specs(Settings(model_updates_retention_ms=-1))[3].config == {"retention.ms": "-1"}
