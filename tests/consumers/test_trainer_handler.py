"""The trainer role's handler without Kafka: batching, update cadence, checkpoint and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from streamrecall.consumers.offsets import Offsets
from streamrecall.consumers.roles.trainer.handler import TrainerHandler
from streamrecall.consumers.roles.trainer.options import FULL_INTERVAL_MAX_S, TrainerOptions, full_interval_s
from streamrecall.consumers.handler import Record
from streamrecall.errors import ConfigError, TransientError
from streamrecall.events import Click, Item
from streamrecall.metrics import ModelVersionMetrics
from streamrecall.consumers.roles.trainer.metrics import TrainerMetrics
from streamrecall.model import ItemCatalog, ModelConfig, OnlineTrainer, decode_update
from streamrecall.settings import Settings

CONFIG = ModelConfig(dim=8, hidden=16, id_buckets=4096, token_buckets=4096, estimator_buckets=4096)
TOPIC = "clicks"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class ListSink:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, str, int]] = []
        self.fail_next = False  # the next failed() reports a failure
        self.failing = False    # every send fails (not acknowledged) while set
        self.attempts = 0

    def send(self, data: bytes, kind: str, version: int) -> None:
        self.attempts += 1
        if self.failing:
            self.fail_next = True
        else:
            self.sent.append((data, kind, version))

    def failed(self) -> bool:
        failed, self.fail_next = self.fail_next, False
        return failed

    def flush(self) -> None:
        pass


def clicks(n: int, start: int = 0, partition: int = 0) -> list[Record]:
    return [Record("clicks", partition, start + i, f"u{i % 5}".encode(),
                   Click(user_id=f"u{i % 5}", item_id=f"i{(start + i) % 13}", ts=1_700_000_000_000 + start + i),
                   0) for i in range(n)]


@pytest.fixture
def make_handler(tmp_path: Path):
    def make(catalog: ItemCatalog | None = None, config: ModelConfig = CONFIG,
             **options) -> tuple[TrainerHandler, ListSink, Clock]:
        sink, clock = ListSink(), Clock()
        registry = CollectorRegistry()
        handler = TrainerHandler(OnlineTrainer(config), catalog if catalog is not None else ItemCatalog(), sink,
                                 tmp_path / "trainer" / "checkpoint.safetensors", TOPIC, [0, 1],
                                 TrainerOptions(**options), TrainerMetrics(registry), ModelVersionMetrics(registry),
                                 clock=clock)
        handler.restore()
        return handler, sink, clock
    return make


def test_trains_full_batches_at_once_and_partial_ones_after_the_wait(make_handler):
    handler, _, clock = make_handler(batch_size=8, max_batch_wait_ms=200, publish_every_steps=1000)
    handler.handle(clicks(20))
    assert handler.trainer.steps == 2 and handler.clicks_trained == 16
    handler.tick()
    assert handler.trainer.steps == 2, "the partial batch waits"
    clock.t += 0.2
    handler.tick()
    assert handler.trainer.steps == 3 and handler.clicks_trained == 20


def test_history_fed_to_training_is_the_history_before_each_click(make_handler):
    handler, _, _ = make_handler(batch_size=4)
    handler.handle(clicks(10))
    handler.tick()
    handler.checkpoint()
    # u0 clicked at offsets 0 and 5 (items i0, i5): both recorded, oldest first.
    assert handler.history.get("u0") == ["i0", "i5"]


def test_unknown_items_are_trained_on_and_counted(make_handler):
    catalog = ItemCatalog()
    catalog.upsert(Item(item_id="i0", created_at=0, categories=("a",)))
    handler, _, _ = make_handler(catalog, batch_size=13)
    handler.handle(clicks(13))
    assert handler.metrics.unknown_items._value.get() == 12
    assert handler.metrics.examples._value.get() == 13


def test_updates_every_n_steps_first_full_then_deltas_with_a_full_every_t_seconds(make_handler):
    handler, sink, clock = make_handler(batch_size=4, publish_every_steps=2, full_every_s=10.0)
    handler.handle(clicks(4 * 6))
    clock.t += 10
    handler.handle(clicks(4 * 6, start=24))
    updates = [decode_update(data) for data, _, _ in sink.sent]
    assert [u.version for u in updates] == [1, 2, 3, 4, 5, 6]
    assert [u.kind for u in updates] == ["full", "delta", "delta", "full", "delta", "delta"]
    assert [kind for _, kind, _ in sink.sent] == [u.kind for u in updates]
    assert [v for _, _, v in sink.sent] == [1, 2, 3, 4, 5, 6]
    assert all(u.base_version == u.version - 1 for u in updates)


def test_a_big_model_s_full_updates_are_spaced_to_stay_within_full_bytes_per_s(make_handler):
    handler, sink, clock = make_handler(batch_size=4, publish_every_steps=2, full_every_s=10.0, full_bytes_per_s=1.0)
    handler.handle(clicks(4 * 2))  # v1: the first export, full, at start: N bytes, so the next is due N s later
    first = len(sink.sent[0][0])
    assert sink.sent[0][1] == "full" and first > 10.0
    assert handler.metrics.full_interval._value.get() == first
    clock.t += 10.0  # full_every_s has passed, but not first / full_bytes_per_s
    handler.handle(clicks(4 * 2, start=8))
    clock.t += first - 10.0
    handler.handle(clicks(4 * 2, start=16))
    assert [kind for _, kind, _ in sink.sent] == ["full", "delta", "full"]


def test_full_interval_is_full_every_s_for_a_small_model_or_without_a_byte_bound():
    options = TrainerOptions()
    assert full_interval_s(options, 16_870_072) == 60.0, "the 50k-item full update: one a minute"
    assert 400 < full_interval_s(options, 213_702_408) < 410, "the million-row one: ~7 minutes"
    assert full_interval_s(TrainerOptions(full_bytes_per_s=0), 213_702_408) == 60.0
    assert full_interval_s(options, 10 ** 12) == FULL_INTERVAL_MAX_S, "however big the model"
    assert full_interval_s(TrainerOptions(full_every_s=7200), 10 ** 12) == 7200, "full_every_s is a floor"


def test_dense_layers_travel_in_every_delta_by_default_else_at_most_every_dense_every_s(make_handler):
    two_tower = CONFIG.replace(tower="two_tower")
    handler, sink, _ = make_handler(batch_size=4, publish_every_steps=1, config=two_tower)
    handler.handle(clicks(12))
    assert [decode_update(d).dense_changed for d, _, _ in sink.sent] == [True, True, True]
    # The FM has no dense layers: only its full updates say dense_changed (consumers re-encode all).
    handler, sink, _ = make_handler(batch_size=4, publish_every_steps=1, config=CONFIG.replace(tower="fm"))
    handler.handle(clicks(12))
    assert [decode_update(d).dense_changed for d, _, _ in sink.sent] == [True, False, False]
    handler, sink, clock = make_handler(batch_size=4, publish_every_steps=1, dense_every_s=5.0, config=two_tower)
    handler.handle(clicks(12))
    clock.t += 5
    handler.handle(clicks(4, start=12))
    assert [decode_update(d).dense_changed for d, _, _ in sink.sent] == [True, False, False, True]


def test_flush_trains_the_buffer_and_publishes_it_before_the_commit(make_handler):
    handler, sink, _ = make_handler(batch_size=100, publish_every_steps=100)
    handler.handle(clicks(7))
    assert sink.sent == [] and handler.clicks_trained == 0
    handler.flush(Offsets({("clicks", 0): 7}))
    assert handler.clicks_trained == 7 and len(sink.sent) == 1
    assert decode_update(sink.sent[0][0]).trained_through_ms == 1_700_000_000_006, "the newest click trained on"
    handler.flush(Offsets({("clicks", 0): 7}))
    assert len(sink.sent) == 1, "nothing new trained, nothing published"


def test_a_failed_send_blocks_the_commit_and_makes_the_next_update_full(make_handler):
    handler, sink, clock = make_handler(batch_size=4, publish_every_steps=1, full_every_s=1e6)
    handler.handle(clicks(8))
    assert [k for _, k, _ in sink.sent] == ["full", "delta"]
    handler.handle(clicks(4, start=8))
    sink.fail_next = True
    with pytest.raises(TransientError):
        handler.flush(Offsets({("clicks", 0): 12}))
    sent = len(sink.sent)
    with pytest.raises(TransientError):  # the runtime's retry, within the back-off: nothing is sent
        handler.flush(Offsets({("clicks", 0): 12}))
    assert len(sink.sent) == sent
    clock.t += 1.0  # publish_backoff_s
    handler.flush(Offsets({("clicks", 0): 12}))  # the retry after the back-off commits
    assert [k for _, k, _ in sink.sent][-1] == "full"


def test_a_failing_publish_backs_off_keeps_training_and_heals_with_a_full_update(make_handler):
    handler, sink, clock = make_handler(batch_size=4, publish_every_steps=1, full_every_s=1e6,
                                        publish_backoff_s=1.0, publish_backoff_max_s=4.0)
    handler.handle(clicks(4))
    handler.flush(Offsets({("clicks", 0): 4}))
    sink.failing = True
    for i in range(6):  # the broker refuses every update for 3 s
        handler.handle(clicks(4, start=4 + 4 * i))  # clicks keep coming and are trained on
        with pytest.raises(TransientError, match="stay uncommitted"):
            handler.flush(Offsets({("clicks", 0): 8 + 4 * i}))
        clock.t += 0.5
    assert handler.trainer.steps == 7, "training went on while publishing failed"
    # attempted at once and after the 1 s back-off (the next waits 2 s): not at each of the 6 steps
    assert sink.attempts - len(sink.sent) == 2
    sink.failing = False
    clock.t += 4.0  # the back-off is bounded by publish_backoff_max_s
    handler.handle(clicks(4, start=100))
    handler.flush(Offsets({("clicks", 0): 104}))  # acknowledged: the commit may go ahead
    update = decode_update(sink.sent[-1][0])
    assert update.kind == "full", "the update after failures is full: it heals every replica's chain"
    handler.handle(clicks(4, start=104))
    handler.flush(Offsets({("clicks", 0): 108}))
    assert decode_update(sink.sent[-1][0]).kind == "delta", "deltas resume after the healing full update"


def test_flush_checkpoints_only_when_due_and_a_restart_resumes_exactly(make_handler, tmp_path):
    handler, sink, clock = make_handler(batch_size=8, checkpoint_every_s=30, publish_every_steps=2)
    path = handler.checkpoint_path
    handler.handle(clicks(20))
    handler.flush(Offsets({("clicks", 0): 20}))
    assert not path.exists(), "flush is cheap until a checkpoint is due"
    handler.handle(clicks(5, start=0, partition=1))
    clock.t += 30
    handler.flush(Offsets({("clicks", 1): 5}))
    assert path.exists()
    assert handler.clicks_trained == 25, "the buffer is trained before the checkpoint"
    saved = (handler.trainer.version, handler.trainer.steps, handler.history.get("u1"))

    again, sink2, _ = make_handler(batch_size=8)
    assert again.restored
    assert (again.trainer.version, again.trainer.steps, again.history.get("u1")) == saved
    assert again.clicks_trained == 25
    assert again.start_offsets() == Offsets({("clicks", 0): 20, ("clicks", 1): 5})
    again.trainer.advance_version(saved[0] + 3)  # what the role does with the topic's last version
    again.publish()
    update = decode_update(sink2.sent[0][0])
    assert update.kind == "full" and update.version == saved[0] + 4 and update.steps == saved[1]


def test_without_a_checkpoint_every_partition_starts_at_the_beginning(make_handler):
    handler, _, _ = make_handler()
    assert not handler.restored
    assert handler.start_offsets() == Offsets({("clicks", 0): 0, ("clicks", 1): 0})


def test_shutdown_trains_publishes_and_checkpoints(make_handler):
    handler, sink, _ = make_handler(batch_size=100, publish_every_steps=100)
    handler.handle(clicks(7))
    handler.flush(Offsets({("clicks", 0): 7}))
    handler.shutdown()
    assert handler.clicks_trained == 7 and len(sink.sent) == 1 and handler.checkpoint_path.exists()


def test_options_come_from_the_trainer_table_and_are_checked():
    s = Settings(extra={"trainer": {"batch_size": "64", "full_every_s": 2, "dense_every_s": 0}})
    assert TrainerOptions.from_settings(s) == TrainerOptions(batch_size=64, full_every_s=2.0, dense_every_s=0.0)
    with pytest.raises(ConfigError, match="trainer.bogus"):
        TrainerOptions.from_settings(Settings(extra={"trainer": {"bogus": 1}}))
    with pytest.raises(ConfigError, match="trainer.batch_size"):
        TrainerOptions.from_settings(Settings(extra={"trainer": {"batch_size": 0}}))


def test_an_idle_trainer_does_not_rewrite_its_checkpoint(make_handler):
    handler, _, clock = make_handler(batch_size=4, checkpoint_every_s=1)
    handler.handle(clicks(4))
    clock.t += 1
    handler.flush(Offsets({("clicks", 0): 4}))
    written = handler.checkpoint_path.stat().st_mtime_ns
    clock.t += 1
    handler.flush(Offsets())
    assert handler.checkpoint_path.stat().st_mtime_ns == written


def test_replay_fills_idle_ticks_only_and_fresh_clicks_train_first(make_handler):
    handler, _, clock = make_handler(batch_size=8, max_batch_wait_ms=200, publish_every_steps=1000,
                                     replay_capacity=64, replay_batch_size=4)
    handler.tick()
    assert handler.trainer.steps == 0 and handler._steps_since_publish == 0, "nothing to replay yet"
    handler.handle(clicks(12))  # one full batch trained, 4 clicks buffered
    assert handler.trainer.steps == 1 and len(handler.replay) == 8
    handler.tick()
    assert handler.trainer.steps == 1, "fresh clicks are waiting: no replay"
    clock.t += 0.2
    handler.tick()  # the partial batch trains, fresh, before any replay
    assert handler.trainer.steps == 2 and handler.clicks_trained == 12 and len(handler.replay) == 12
    estimator = {k: v.clone() for k, v in handler.trainer.estimator.state().items()}
    for _ in range(3):
        handler.tick()  # idle: one small replay step per tick
    assert handler.trainer.steps == 5 and handler.clicks_trained == 12
    assert handler.metrics.replay_steps._value.get() == 3
    assert all((v == estimator[k]).all() for k, v in handler.trainer.estimator.state().items())


def test_replay_is_off_by_default(make_handler):
    handler, _, _ = make_handler(batch_size=8)
    handler.handle(clicks(8))
    handler.tick()
    assert handler.replay is None and handler.trainer.steps == 1


def test_a_checkpoint_of_the_first_format_still_resumes_at_its_offsets(make_handler):
    handler, _, _ = make_handler()
    handler.handle(clicks(6))
    handler._train_buffer()
    handler.history.to_json()
    # Format 1 stored the clicks partitions' next offsets alone, as {"partition": offset}.
    handler.trainer.checkpoint(handler.checkpoint_path, {"format": 1, "clicks_topic": TOPIC, "offsets": {"0": 6, "1": 2},
                                                         "clicks_trained": 6, "history": handler.history.to_json()})
    again, _, _ = make_handler()
    assert again.restored and again.start_offsets() == Offsets({("clicks", 0): 6, ("clicks", 1): 2})
    again.flush(Offsets({("clicks", 0): 9}))
    again.checkpoint()
    assert make_handler()[0].start_offsets() == Offsets({("clicks", 0): 9, ("clicks", 1): 2})
