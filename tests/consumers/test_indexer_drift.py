"""The indexer's re-encode in proportion to effect: unchanged full updates, the drift budget, staleness."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from streamrecall.consumers.roles.indexer.handler import IndexerHandler
from streamrecall.consumers.roles.indexer.metrics import IndexerMetrics
from streamrecall.consumers.roles.indexer.options import IndexerOptions
from streamrecall.consumers.roles.indexer.reencoder import Reencoder
from streamrecall.consumers.roles.indexer.state import IndexerState
from streamrecall.events import Click, Item
from streamrecall.index import QualityMonitor
from streamrecall.metrics import ModelVersionMetrics
from streamrecall.model import ModelConfig, OnlineTrainer, decode_update
from streamrecall.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def model(tower: str = "fm") -> ModelConfig:
    return ModelConfig(id_buckets=4096, token_buckets=4096, estimator_buckets=4096, tower=tower)


def make_items(n: int) -> list[Item]:
    return [Item(item_id=f"i{i}", created_at=1_700_000_000_000 + i, title=f"title {i % 7}",
                 categories=(f"c{i % 5}",), tags=(f"t{i % 3}",)) for i in range(n)]


def train(trainer: OnlineTrainer, items: list[Item], steps: int, seed: int = 0) -> None:
    catalog = {it.item_id: it for it in items}
    for s in range(steps):
        clicks = [Click(user_id=f"u{j}", item_id=items[(j * 7 + s + seed) % len(items)].item_id, ts=j)
                  for j in range(32)]
        trainer.step(trainer.make_batch(clicks, catalog, [[] for _ in clicks]))


def setup(tower: str = "fm", n: int = 60, clock: Clock | None = None, items: list[Item] | None = None, **options):
    state = IndexerState(IndexerOptions(**options), model(tower), IndexerMetrics(CollectorRegistry()))
    worker = Reencoder(state, QualityMonitor(state.index), clock=clock or Clock())
    handler = IndexerHandler(Settings(), state, worker, ModelVersionMetrics(CollectorRegistry()))
    items = items if items is not None else make_items(n)
    state.upsert_items(items)
    return state, worker, handler, items


def counter(state: IndexerState, cause: str) -> float:
    return state.metrics.upserts.labels(cause)._value.get()


@pytest.mark.parametrize("tower", ["fm", "two_tower"])
def test_a_full_update_of_an_unchanged_model_rebuilds_and_reencodes_nothing(tower):
    """Measured in `streamrecall bench scale`: every full update (one every full_every_s) showed a
    stale share of 1.0 and a rebuild of every item, though the model had not changed."""
    state, worker, handler, items = setup(tower)
    trainer = OnlineTrainer(model(tower))
    train(trainer, items, 3)
    handler.apply_update(decode_update(trainer.export_update(full=True)), 0, 0)
    worker.run_queued()
    assert worker.idle and state.index.stale_share(state.current_epoch) == 0.0
    epoch, rebuilt, reencoded = state.current_epoch, counter(state, "rebuild"), counter(state, "reencode")

    handler.apply_update(decode_update(trainer.export_update(full=True)), 0, 1)  # nothing trained since
    assert state.replica.version == 2 and state.current_epoch == epoch
    assert state.index.stale_share(state.current_epoch) == 0.0
    worker.run_queued()
    assert (counter(state, "rebuild"), counter(state, "reencode")) == (rebuilt, reencoded)
    assert worker.settled_version == 2 and len(state.drift) == 0


def test_sparse_updates_reencode_within_the_budget_drifted_and_most_retrieved_first():
    clock = Clock()
    state, worker, handler, items = setup("fm", n=80, clock=clock, reencode_items_per_s=10.0,
                                          reencode_drift_bound=0.02)
    trainer = OnlineTrainer(model())
    train(trainer, items, 4)
    handler.apply_update(decode_update(trainer.export_update()), 0, 0)  # the first export is full
    worker._run(worker._jobs.get_nowait())
    worker._measure_moved()
    queued = len(state.drift)
    assert queued > 20 and worker.pending == 0 and not worker.idle
    assert worker.settled_version == 0  # measured, not yet re-encoded
    # among the items over the bound, the most retrieved go first, whatever their drift
    bound = state.config.reencode_drift_bound
    over = sorted((i for i in state.catalog if state.drift.drift(i) > bound), key=state.drift.drift)
    assert len(over) > 10
    hot = over[:3]  # the three smallest drifts over the bound...
    state.retrievals.observe(hot * 3)  # ...are the most retrieved
    first = state.drift.take(5, bound, state.retrievals)
    assert first[:3] == hot[::-1] and set(first[3:]) <= set(over[-2:])  # then the largest drifts

    clock.t += 0.5  # half a second of a 10/s budget: the queue is ordered once a second's worth accrued
    worker._spend_budget()
    assert len(state.drift) == queued
    clock.t += 0.5
    worker._spend_budget()
    at_new = {i for i in state.catalog if state.index.meta(i).model_version == 1}
    assert set(first) <= at_new and len(at_new) == 10 and len(state.drift) == queued - 10
    assert counter(state, "reencode") == 10
    clock.t += 100.0  # a long idle spell: the budget accrues one second's worth at most
    worker._spend_budget()
    assert len(state.drift) == queued - 20
    worker.run_queued()  # tools and tests: everything, whatever the budget
    assert worker.idle and worker.settled_version == 1
    expected = state.replica.encode_items(items)
    for it, vector in zip(items, expected):
        assert abs(state.index.get(it.item_id).vector - vector).max() < 1e-5


def test_staleness_gauges_count_items_out_of_date_for_too_many_versions():
    state, worker, handler, items = setup("fm", stale_after_versions=2, reencode_items_per_s=1.0)
    trainer = OnlineTrainer(model())
    train(trainer, items, 3)
    handler.apply_update(decode_update(trainer.export_update()), 0, 0)
    worker._run(worker._jobs.get_nowait())
    worker._measure_moved()
    pending = len(state.drift)
    state.update_gauges()
    m = state.metrics
    assert m.drift_pending._value.get() == pending > 0
    assert m.outdated_share._value.get() == 0.0  # stale since v1, now v1: not beyond either bound
    assert m.drift_mean._value.get() == pytest.approx(
        sum(state.drift.drift(i) for i in state.catalog) / len(items), rel=1e-5)
    for v in (2, 3, 4):  # three updates that move nothing: the queued items are now 3 versions behind
        handler.apply_update(decode_update(trainer.export_update(full=True)), 0, v)
    state.update_gauges()
    assert m.outdated_share._value.get() == pytest.approx(pending / len(items))


def test_an_idle_reencoder_vouches_for_the_index_so_queries_skip_re_scoring():
    """Items no update moved keep their old version tag with a current vector: once the re-encoder
    has nothing left to do, the query fast path (graph scores as they are) must still apply."""
    import streamrecall.consumers.roles.indexer.http_api as api
    from streamrecall.consumers.roles.indexer.http_api import RecallService

    own = [Item(item_id=f"s{i}", created_at=i, categories=(f"own-{i}",)) for i in range(40)]  # no shared token
    state, worker, handler, items = setup("fm", items=own)
    trainer = OnlineTrainer(model())
    train(trainer, items[:10], 2)  # only these items' rows move
    handler.apply_update(decode_update(trainer.export_update()), 0, 0)
    assert state.current_as_of == -1
    worker.run_queued()
    assert state.current_as_of == 1 and not state.index.all_at_version(1)  # untouched items kept v0 tags
    service = RecallService(state, state.config, QualityMonitor(state.index), lambda: (True, {}))
    rescored = []
    real = api.rescore
    api_rescore = lambda *a: rescored.append(1) or real(*a)  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api, "rescore", api_rescore)
        vector = state.replica.encode_users(["u1"], [["i3"]])[0]
        fast = service.recall_for_vector(vector, 5)
        assert rescored == []
        exact = (state.replica.encode_items(items) @ vector).argsort()[::-1][:5]
        assert [r["item_id"] for r in fast["results"]] == [items[j].item_id for j in exact]
        train(trainer, items[:10], 1, seed=3)
        handler.apply_update(decode_update(trainer.export_update()), 0, 1)  # v2: not vouched for yet
        service.recall_for_vector(vector, 5)
        assert rescored == [1]


def test_the_budget_settings_are_checked():
    from streamrecall.errors import ConfigError

    options = IndexerOptions.from_settings(Settings(extra={"indexer": {"reencode_items_per_s": 250,
                                                                      "stale_after_versions": 50}}))
    assert (options.reencode_items_per_s, options.stale_after_versions, options.drift_interval_s) == (250, 50, 5.0)
    for bad in ({"reencode_items_per_s": 0}, {"reencode_drift_bound": -0.1}, {"stale_after_versions": 2.5}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            IndexerOptions(**bad)
