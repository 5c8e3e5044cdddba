"""Every in-memory map that grows with users, items or records stops at its bound, evicts the least
recently written entry, and exports its fill (streamrecall_state_entries / _capacity)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from streamrecall.consumers.offsets import Offsets
from streamrecall.bounded import LRUMap
from streamrecall.consumers.deadletter import DeadLetter, DeadLetterSink
from streamrecall.consumers.roles.indexer.options import IndexerOptions
from streamrecall.consumers.roles.indexer.state import IndexerState, UserEntry
from streamrecall.consumers.roles.publisher.state import PartitionState
from streamrecall.consumers.roles.publisher.handler import PublisherHandler
from streamrecall.consumers.roles.publisher.options import PublisherOptions
from streamrecall.consumers.roles.trainer.handler import TrainerHandler
from streamrecall.consumers.roles.trainer.options import TrainerOptions
from streamrecall.consumers.handler import Record
from streamrecall.events import Click, Item, UserVector
from streamrecall.metrics import ROLE_STATES, ModelVersionMetrics, RuntimeMetrics, StateMetrics
from streamrecall.consumers.roles.indexer.metrics import IndexerMetrics
from streamrecall.consumers.roles.publisher.metrics import PublisherMetrics
from streamrecall.consumers.roles.trainer.metrics import TrainerMetrics
from streamrecall.model import ItemCatalog, ModelConfig, OnlineTrainer, RecentHistory, TowerReplica, TrendingCounter

CONFIG = ModelConfig(dim=8, hidden=16, id_buckets=4096, token_buckets=4096, estimator_buckets=4096)


def fill(registry: CollectorRegistry, role: str, state: str) -> tuple[float | None, float | None]:
    labels = {"role": role, "state": state}
    return (registry.get_sample_value("streamrecall_state_entries", labels),
            registry.get_sample_value("streamrecall_state_capacity", labels))


def item(i: int) -> Item:
    return Item(item_id=f"i{i}", created_at=1_700_000_000_000 + i)


def test_lru_map_evicts_the_least_recently_written_key():
    m: LRUMap[str, int] = LRUMap(2)
    assert m.put("a", 1) is None and m.put("b", 2) is None
    m.touch("a")                     # b is now the least recent
    assert m.put("c", 3) == "b"
    assert list(m) == ["a", "c"]
    assert m.put("a", 9) is None and list(m.items()) == [("c", 3), ("a", 9)]
    with pytest.raises(ValueError):
        LRUMap(0)


def test_every_roles_states_are_declared_at_zero():
    registry = CollectorRegistry()
    states = StateMetrics(registry)
    for role in ROLE_STATES:
        states.declare(role)
    assert fill(registry, "indexer", "user_vectors") == (0.0, 0.0)
    assert fill(registry, "trainer", "catalog") == (0.0, 0.0)
    assert fill(registry, "publisher", "deadletter_dedup") == (0.0, 0.0)


def test_history_stops_at_its_bound_and_a_smaller_bound_keeps_the_most_recent():
    h = RecentHistory(max_len=2, max_users=3)
    for user in ("u1", "u2", "u3", "u1", "u4"):
        h.add(user, "x")
    assert len(h) == 3 and "u2" not in h and {"u1", "u3", "u4"} <= {u for u in ("u1", "u3", "u4") if u in h}
    smaller = RecentHistory.from_json(h.to_json(), max_users=2)
    assert len(smaller) == 2 and "u1" in smaller and "u4" in smaller and "u3" not in smaller


def test_trainer_catalog_forgets_the_least_recently_upserted_item_and_never_samples_it():
    catalog = ItemCatalog(max_items=3)
    for i in range(3):
        catalog.upsert(item(i))
    catalog.upsert(item(0))          # i0 refreshed: i1 is now the least recent
    catalog.upsert(item(3))
    assert sorted(catalog) == ["i0", "i2", "i3"] and len(catalog) == 3
    drawn = {it.item_id for it in catalog.sample(200, random.Random(0))}
    assert drawn == {"i0", "i2", "i3"}
    catalog.delete("i2")
    catalog.upsert(item(4))
    assert sorted(catalog) == ["i0", "i3", "i4"]
    assert {it.item_id for it in catalog.sample(200, random.Random(1))} == {"i0", "i3", "i4"}


def test_trending_stays_within_its_capacity():
    trending = TrendingCounter(size=5, half_life=1000)
    for step in range(50):
        trending.add(f"i{step * 7 + j}" for j in range(7))
        assert len(trending) <= trending.capacity == 20
    assert len(trending.top()) == 5


def test_trainer_exports_the_fill_of_histories_catalog_and_trending(tmp_path: Path):
    registry = CollectorRegistry()
    catalog = ItemCatalog(max_items=4)
    for i in range(10):
        catalog.upsert(item(i))
    handler = TrainerHandler(OnlineTrainer(CONFIG), catalog, _NullUpdates(), tmp_path / "ckpt", "clicks", [0],
                             TrainerOptions(history_users=3), TrainerMetrics(registry), ModelVersionMetrics(registry),
                             states=StateMetrics(registry))
    records = [Record("clicks", 0, i, None, Click(user_id=f"u{i}", item_id=f"i{i % 10}", ts=1_700_000_000_000 + i), 0)
               for i in range(8)]
    handler.handle(records)
    handler.flush(Offsets())
    assert fill(registry, "trainer", "histories") == (3.0, 3.0)  # 8 users clicked, 3 kept
    assert fill(registry, "trainer", "catalog") == (4.0, 4.0)
    entries, capacity = fill(registry, "trainer", "trending")
    assert 0 < entries <= 8 and capacity == 4 * CONFIG.trending_size


def test_publisher_bounds_users_and_replay_floors_and_exports_the_fill():
    state = PartitionState(history_len=3, max_users=2)
    vectors = [UserVector(user_id=f"u{i}", vector=[0.0] * 8, model_version=1, event_ts=100 + i, published_at=0,
                          recent_items=["a"]) for i in range(5)]
    state.load(vectors, now=10.0, now_ms=200)
    assert list(state.users) == ["u3", "u4"] and set(state.replay_floor) == {"u3", "u4"}
    assert len(state.history) == 2

    registry = CollectorRegistry()
    handler = PublisherHandler(TowerReplica(CONFIG), _NullVectors(), lambda ps: {p: [] for p in ps}, "clicks",
                               PublisherOptions(history_users=2), PublisherMetrics(registry),
                               ModelVersionMetrics(registry), clock=lambda: 1.0, wall_ms=lambda: 1_700_000_010_000,
                               states=StateMetrics(registry))
    handler.handle([Record("clicks", 0, i, None, Click(user_id=f"u{i}", item_id="a", ts=1_700_000_000_000 + i), 0)
                    for i in range(5)])
    handler.flush(Offsets())
    assert fill(registry, "publisher", "histories") == (2.0, 2.0)
    assert list(handler.states[0].users) == ["u3", "u4"]


def test_indexer_user_vectors_stop_at_their_bound_and_the_fill_moves():
    registry = CollectorRegistry()
    state = IndexerState(IndexerOptions(max_user_vectors=2, item_vector_cache_items=10), CONFIG,
                         IndexerMetrics(registry), states=StateMetrics(registry))
    entry = UserEntry(np.zeros(8, np.float32), 1, 0, ())
    state.users.put("u1", entry)
    state.update_gauges()
    assert fill(registry, "indexer", "user_vectors") == (1.0, 2.0)
    state.users.put("u2", entry)
    state.users.put("u1", entry)     # u1 published again: u2 is the least recently written
    state.users.put("u3", entry)
    state.update_gauges()
    assert set(state.users) == {"u1", "u3"}
    assert fill(registry, "indexer", "user_vectors") == (2.0, 2.0)
    state.item_vectors.vectors(state.replica, [item(i) for i in range(4)])
    state.update_gauges()
    assert fill(registry, "indexer", "item_vector_cache") == (4.0, 10.0)


def test_indexer_epochs_before_the_served_one_are_dropped():
    state = IndexerState(IndexerOptions(), CONFIG, IndexerMetrics(CollectorRegistry()),
                         states=StateMetrics(CollectorRegistry()))
    for version in range(1, 1001):
        state.served_epoch = max(0, version - 2)   # the rebuild trails by two epochs
        state.start_epoch(version)
    assert state.epochs == [998, 999, 1000]
    assert state.compatible(998) and not state.compatible(997) and not state.compatible(999)
    assert state.epoch_of(1000) == state.current_epoch == 1000


def test_deadletter_dedup_forgets_the_oldest_and_exports_its_fill():
    registry = CollectorRegistry()
    producer = _Producer()
    sink = DeadLetterSink(producer, "deadletter", "indexer", RuntimeMetrics(registry), already_sent=LRUMap(2),
                          states=StateMetrics(registry))
    assert fill(registry, "indexer", "deadletter_dedup") == (0.0, 2.0)
    letters = [DeadLetter("items", 0, offset, None, b"x", "invalid-json", "bad") for offset in range(3)]
    for letter in letters:
        sink.send(letter, "items")
    sink.send(letters[2], "items")   # remembered: not sent again
    assert len(producer.sent) == 3
    assert fill(registry, "indexer", "deadletter_dedup") == (2.0, 2.0)
    sink.send(letters[0], "items")   # forgotten (the oldest): sent a second time
    assert len(producer.sent) == 4


class _Producer:
    def __init__(self) -> None:
        self.sent: list[bytes | None] = []

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None, headers=None) -> None:
        self.sent.append(value)


class _NullUpdates:
    def send(self, data: bytes, kind: str, version: int) -> None:
        pass

    def failed(self) -> bool:
        return False

    def flush(self) -> None:
        pass


class _NullVectors:
    def send(self, vector: UserVector, partition: int) -> None:
        pass

    def flush(self) -> list[tuple[int, str]]:
        return []
