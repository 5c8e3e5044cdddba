"""The publisher role's handler without Kafka: micro-batches, replay after a move, refresh on updates."""

from __future__ import annotations

import pytest
from kafka import TopicPartition
from prometheus_client import CollectorRegistry

from streamrecall.consumers.offsets import Offsets
from streamrecall.consumers.roles.publisher.handler import PublisherHandler
from streamrecall.consumers.roles.publisher.options import PublisherOptions
from streamrecall.consumers.handler import Record
from streamrecall.errors import ConfigError, TransientError
from streamrecall.events import Click, Item, UserVector
from streamrecall.metrics import ModelVersionMetrics
from streamrecall.consumers.roles.publisher.metrics import PublisherMetrics
from streamrecall.model import ModelConfig, OnlineTrainer, TowerReplica, decode_update
from streamrecall.settings import Settings

CONFIG = ModelConfig(dim=8, hidden=16, id_buckets=4096, token_buckets=4096, estimator_buckets=4096)
TWO_TOWER = ModelConfig(dim=8, hidden=16, id_buckets=4096, token_buckets=4096, estimator_buckets=4096,
                        tower="two_tower")
TOPIC = "clicks"
TS = 1_700_000_000_000


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class ListSink:
    def __init__(self) -> None:
        self.sent: list[tuple[UserVector, int]] = []
        self.fail: list[tuple[int, str]] = []

    def send(self, vector: UserVector, partition: int) -> None:
        self.sent.append((vector, partition))

    def flush(self) -> list[tuple[int, str]]:
        failed, self.fail = self.fail, []
        return failed

    def latest(self) -> dict[str, UserVector]:
        return {v.user_id: v for v, _ in self.sent}


def click(user: str, item: str, ts: int, partition: int = 0, offset: int = 0) -> Record:
    return Record("clicks", partition, offset, user.encode(), Click(user_id=user, item_id=item, ts=ts), ts)


@pytest.fixture
def make_handler():
    def make(stored: dict[int, list[UserVector]] | None = None, replica: TowerReplica | None = None,
             partitions=(0, 1), **options):
        sink, clock = ListSink(), Clock()
        registry = CollectorRegistry()
        handler = PublisherHandler(replica or TowerReplica(CONFIG), sink, lambda ps: {p: (stored or {}).get(p, []) for p in ps},
                                   TOPIC, PublisherOptions(**options), PublisherMetrics(registry),
                                   ModelVersionMetrics(registry), clock=clock, wall_ms=lambda: TS + 5_000)
        handler.assigned({TopicPartition(TOPIC, p) for p in partitions})
        return handler, sink, clock
    return make


def test_clicks_become_vectors_with_history_event_ts_version_and_partition(make_handler):
    handler, sink, _ = make_handler()
    handler.handle([click("a", "i1", TS), click("b", "i2", TS + 1, partition=1), click("a", "i3", TS + 2)])
    latest = sink.latest()
    assert latest["a"].recent_items == ["i1", "i3"] and latest["a"].event_ts == TS + 2
    assert latest["b"].recent_items == ["i2"] and latest["b"].model_version == 0
    assert latest["a"].published_at == TS + 5_000
    assert {v.user_id: p for v, p in sink.sent} == {"a": 0, "b": 1}
    assert len(sink.sent) == 2, "one vector per user per micro-batch"
    assert len(latest["a"].vector) == CONFIG.dim
    assert handler.metrics.published.labels("click")._value.get() == 2


def test_flush_ms_holds_a_micro_batch_until_time_or_size(make_handler):
    handler, sink, clock = make_handler(flush_ms=100, flush_users=3)
    handler.handle([click("a", "i1", TS)])
    handler.tick()
    assert sink.sent == []
    clock.t += 0.1
    handler.tick()
    assert len(sink.sent) == 1
    handler.handle([click(u, "i1", TS + 1) for u in ("x", "y", "z")])
    assert len(sink.sent) == 4, "a full micro-batch goes at once"


def test_a_moved_partition_is_rebuilt_and_replayed_clicks_are_skipped(make_handler):
    stored = {0: [UserVector(user_id="a", vector=[1.0] * 8, model_version=3, event_ts=TS + 10, published_at=TS,
                             recent_items=["i1", "i2"])]}
    handler, sink, _ = make_handler(stored)
    handler.tick()
    assert handler.states[0].history.get("a") == ["i1", "i2"]
    handler.handle([click("a", "i1", TS + 5), click("a", "i2", TS + 10)])  # replayed: covered by the vector
    assert sink.sent == []
    handler.handle([click("a", "i9", TS + 11), click("a", "i0", TS + 9)])   # new, then a late one: both count
    assert sink.latest()["a"].recent_items == ["i1", "i2", "i9", "i0"]
    assert sink.latest()["a"].event_ts == TS + 11


def test_revoked_partitions_drop_their_state_and_pending_users(make_handler):
    handler, sink, _ = make_handler(flush_ms=100)
    handler.handle([click("a", "i1", TS), click("b", "i2", TS, partition=1)])
    handler.revoked({TopicPartition(TOPIC, 1)})
    assert set(handler.states) == {0}
    handler.flush(Offsets())
    assert [v.user_id for v, _ in sink.sent] == ["a"]


def test_flush_blocks_the_commit_when_a_send_failed_and_sends_again(make_handler):
    handler, sink, _ = make_handler()
    handler.handle([click("a", "i1", TS)])
    sink.fail = [(0, "a")]
    with pytest.raises(TransientError):
        handler.flush(Offsets({("clicks", 0): 1}))
    handler.flush(Offsets({("clicks", 0): 1}))
    assert [v.user_id for v, _ in sink.sent] == ["a", "a"]


def _updates(n_deltas: int):
    trainer = OnlineTrainer(CONFIG)
    out = [decode_update(trainer.export_update())]
    for i in range(n_deltas):
        clicks = [Click(user_id=f"t{i}", item_id=f"x{i}", ts=TS), Click(user_id=f"s{i}", item_id=f"y{i}", ts=TS)]
        trainer.step(trainer.make_batch(clicks, {}, [[], []]))
        out.append(decode_update(trainer.export_update()))
    return out


def _moving_full(config: ModelConfig):
    """A full update of the two towers whose dense layers moved (every user vector changes)."""
    trainer = OnlineTrainer(config)
    catalog = {i: Item(item_id=i, created_at=TS, categories=(c,)) for i, c in (("x", "a"), ("y", "b"))}
    clicks = [Click(user_id="t", item_id="x", ts=TS), Click(user_id="s", item_id="y", ts=TS)]
    trainer.step(trainer.make_batch(clicks, catalog, [[], []]))
    update = decode_update(trainer.export_update())
    assert TowerReplica(config).apply(update).reencode_all
    return update


def test_a_full_update_that_moves_nothing_republishes_nobody(make_handler):
    replica = TowerReplica(CONFIG)
    handler, sink, _ = make_handler(replica=replica, refresh_per_tick=2)
    handler.handle([click(u, "i1", TS) for u in "abcde"])
    full = _updates(0)[0]  # an untrained trainer's: the seeded weights the replica already holds
    applied = replica.apply(full)
    assert not applied.reencode_all
    handler.on_model_update(full, applied)
    for _ in range(5):
        handler.tick()
    assert handler.metrics.published.labels("model_update")._value.get() == 0


def test_a_full_update_republishes_active_users_in_bounded_chunks(make_handler):
    replica = TowerReplica(TWO_TOWER)
    handler, sink, _ = make_handler(replica=replica, refresh_per_tick=2)
    handler.handle([click(u, "i1", TS) for u in "abcde"])
    full = _moving_full(TWO_TOWER)
    handler.on_model_update(full, replica.apply(full))
    assert handler.metrics.pending_refresh._value.get() == 5
    # Right after fresh clicks, re-publication waits for its rate budget (none has accrued
    # yet); with no fresh clicks it goes at full speed (2 per tick).
    for expected in (0, 2, 4, 5):
        handler.tick()
        assert sum(1 for v, _ in sink.sent if v.model_version == 1) == expected
    assert handler.metrics.published.labels("model_update")._value.get() == 5
    assert all(v.model_version == 1 for v in sink.latest().values())


def test_while_clicks_flow_republication_keeps_to_its_rate(make_handler):
    """Fresh clicks first: re-publication after an update is held to refresh_per_s while clicks
    keep coming (bursts of it after each round doubled the click → vector p99), most recently
    active users first."""
    replica = TowerReplica(TWO_TOWER)
    handler, sink, clock = make_handler(replica=replica, refresh_per_tick=1000, refresh_per_s=100)
    users = [f"u{i}" for i in range(500)]
    for i, u in enumerate(users):
        clock.t += 0.001
        handler.handle([click(u, "i1", TS + i)])
    full = _moving_full(TWO_TOWER)
    handler.on_model_update(full, replica.apply(full))
    refreshed = []
    for step in range(100):  # 2 s of a busy loop: a click and a tick every 20 ms
        clock.t += 0.02
        handler.handle([click(users[step], "i2", TS + 1000 + step)])
        handler.tick()
    refreshed = [v.user_id for v, _ in sink.sent if v.model_version == 1 and v.user_id not in users[:100]]
    assert 195 <= len(refreshed) <= 211  # 100 users/s for 2 s, plus at most 0.1 s of it at once
    assert refreshed[:5] == users[-1:-6:-1]  # the most recently active first


def test_a_delta_republishes_only_the_users_it_touches(make_handler):
    replica = TowerReplica(CONFIG)
    full, delta = _updates(1)
    replica.apply(full)
    handler, sink, _ = make_handler(replica=replica)
    handler.handle([click("t0", "i1", TS), click("q", "i1", TS), click("r", "x0", TS)])
    handler.on_model_update(delta, replica.apply(delta))
    handler.tick()  # right after fresh clicks: waits for its rate budget
    handler.tick()  # no fresh clicks since: full speed
    refreshed = {v.user_id for v, _ in sink.sent if v.model_version == 2}
    assert refreshed == {"t0", "r"}, "t0's id row and r's history item x0 changed; q's did not"


def test_clicks_published_meanwhile_leave_the_refresh_queue(make_handler):
    replica = TowerReplica(CONFIG)
    handler, sink, _ = make_handler(replica=replica, refresh_per_tick=100)
    handler.handle([click("a", "i1", TS)])
    full = _updates(0)[0]
    handler.on_model_update(full, replica.apply(full))
    handler.handle([click("a", "i2", TS + 1)])
    handler.tick()
    assert [(v.model_version, v.event_ts) for v, _ in sink.sent] == [(0, TS), (1, TS + 1)]


def test_options_are_checked():
    assert PublisherOptions.from_settings(Settings(extra={"publisher": {"flush_ms": 50}})).flush_ms == 50
    with pytest.raises(ConfigError, match="flush_ms"):
        PublisherOptions.from_settings(Settings(extra={"publisher": {"flush_ms": 500}}))


def test_a_round_while_one_is_in_progress_queues_only_the_users_published_since(make_handler):
    """Updates come every flush and rounds every refresh_interval_s; scanning every active user at
    each took the loop 1.2 s at 800,000 users. While a round is being worked through, the users it
    has not reached get the newest version anyway: a new round queues only those published since."""
    replica = TowerReplica(TWO_TOWER)
    handler, sink, clock = make_handler(replica=replica, refresh_per_tick=2, refresh_interval_s=10)
    users = [f"u{i}" for i in range(20)]
    handler.handle([click(u, "i1", TS + i) for i, u in enumerate(users)])
    full = _moving_full(TWO_TOWER)
    handler.on_model_update(full, replica.apply(full))
    assert handler.metrics.pending_refresh._value.get() == 20
    handler.tick()  # right after the clicks: no budget yet
    handler.tick()  # two re-published at v1 (most recent first)
    handler.handle([click("u0", "i2", TS + 100)])  # and one fresh click
    clock.t += 11
    handler.on_model_update(full, replica.apply(full))  # the next round (a duplicate here: the same effect)
    # 18 not reached (u0 among them, skipped when reached: it is queued) and the 3 published since
    assert handler.metrics.pending_refresh._value.get() == 18 + 3
    start = len(sink.sent)
    for _ in range(30):
        clock.t += 1
        handler.tick()
    assert handler.metrics.pending_refresh._value.get() == 0
    again = [v.user_id for v, _ in sink.sent[start:]]
    assert sorted(again) == sorted(users), "each user once more at the newest version, u0 not twice"
    # the round is done: the next one checks every active user again
    clock.t += 11
    handler.on_model_update(full, replica.apply(full))
    assert handler.metrics.pending_refresh._value.get() == 20


def test_starting_a_round_reads_no_user(make_handler, monkeypatch):
    """A round's start only copies the users' keys; each is checked when its turn comes (checking
    them all at the start held the loop 0.67-0.92 s at 220,000 users in bench scale)."""
    from streamrecall.bounded import LRUMap

    replica = TowerReplica(TWO_TOWER)
    handler, sink, clock = make_handler(replica=replica, refresh_per_tick=3)
    handler.handle([click(f"u{i}", "i1", TS + i, partition=i % 2) for i in range(10)])
    reads: list[str] = []
    get, item = LRUMap.get, LRUMap.__getitem__
    monkeypatch.setattr(LRUMap, "get", lambda self, key, default=None: reads.append(key) or get(self, key, default))
    monkeypatch.setattr(LRUMap, "__getitem__", lambda self, key: reads.append(key) or item(self, key))
    full = _moving_full(TWO_TOWER)
    handler.on_model_update(full, replica.apply(full))
    assert reads == [] and handler.metrics.pending_refresh._value.get() == 10
    clock.t += 1
    handler.tick()
    handler.tick()
    assert 0 < len(set(reads)) <= 6, "checked as they come: three a tick"
    for _ in range(5):
        handler.tick()
    assert sorted(v.user_id for v, _ in sink.sent if v.model_version == 1) == sorted(f"u{i}" for i in range(10))


def test_a_round_skips_users_no_longer_active(make_handler):
    replica = TowerReplica(TWO_TOWER)
    handler, sink, clock = make_handler(replica=replica, refresh_active_s=60)
    handler.handle([click("old", "i1", TS)])
    clock.t += 120
    handler.handle([click("new", "i1", TS + 1)])
    full = _moving_full(TWO_TOWER)
    handler.on_model_update(full, replica.apply(full))
    for _ in range(3):
        clock.t += 1
        handler.tick()
    assert [v.user_id for v, _ in sink.sent if v.model_version == 1] == ["new"]
    assert handler.metrics.pending_refresh._value.get() == 0


def test_click_stages_split_click_to_vector_at_the_record_timestamp_and_the_poll():
    """produce: event ts → record timestamp; deliver: → the publisher's poll; hold: → vector sent.
    flush_ms holds the batch, so the hold is the time until the tick that publishes it."""
    registry, wall = CollectorRegistry(), [TS + 3_000]
    handler = PublisherHandler(TowerReplica(CONFIG), ListSink(), lambda ps: {}, TOPIC, PublisherOptions(flush_ms=100),
                               PublisherMetrics(registry), ModelVersionMetrics(registry), clock=Clock(),
                               wall_ms=lambda: wall[0])
    handler.assigned({TopicPartition(TOPIC, 0)})
    handler.handle([Record("clicks", 0, 0, b"a", Click(user_id="a", item_id="i1", ts=TS), TS + 1_000)])
    handler.clock.t += 0.15
    wall[0] += 150
    handler.tick()

    def observed(stage: str) -> tuple[float, float]:
        labels = {"stage": stage}
        return (registry.get_sample_value("streamrecall_publisher_click_stage_seconds_sum", labels),
                registry.get_sample_value("streamrecall_publisher_click_stage_seconds_count", labels))

    assert observed("produce") == (1.0, 1.0)
    assert observed("deliver") == (2.0, 1.0)
    assert observed("hold") == pytest.approx((0.15, 1.0))
    assert registry.get_sample_value("streamrecall_publisher_click_to_vector_seconds_sum") == pytest.approx(3.15)
