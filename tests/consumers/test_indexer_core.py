"""The indexer's pieces without a broker: state writes, re-encoding, snapshots, the category cap."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from streamrecall.consumers.offsets import Offsets
from streamrecall.consumers.roles.indexer import snapshot as indexer_snapshot
from streamrecall.consumers.recall_api.rules import cap_per_category
from streamrecall.consumers.roles.indexer.options import IndexerOptions
from streamrecall.consumers.roles.indexer.state import IndexerState
from streamrecall.consumers.roles.indexer.reencoder import Job, Reencoder
from streamrecall.errors import ConfigError
from streamrecall.events import Click, Item
from streamrecall.index import QualityMonitor
from streamrecall.consumers.roles.indexer.metrics import IndexerMetrics
from streamrecall.model import ModelConfig, ModelUpdate, OnlineTrainer, decode_update
from streamrecall.settings import Settings

MODEL = ModelConfig(id_buckets=4096, token_buckets=4096, estimator_buckets=4096)


def make_items(n: int, start: int = 0) -> list[Item]:
    return [Item(item_id=f"i{i}", created_at=1_700_000_000_000 + i, title=f"title {i % 5}",
                 categories=(f"c{i % 4}",), tags=(f"t{i % 3}",)) for i in range(start, start + n)]


def make_state(**config) -> IndexerState:
    return IndexerState(IndexerOptions(**config), MODEL, IndexerMetrics(CollectorRegistry()))


def trained(items: list[Item], steps: int = 3) -> OnlineTrainer:
    trainer = OnlineTrainer(MODEL)
    catalog = {it.item_id: it for it in items}
    for s in range(steps):
        clicks = [Click(user_id=f"u{j}", item_id=items[(j * 7 + s) % len(items)].item_id, ts=j) for j in range(32)]
        trainer.step(trainer.make_batch(clicks, catalog, [[] for _ in clicks]))
    return trainer


def indexed_at_a_full_update(items: list[Item], **options: Any) -> tuple[OnlineTrainer, IndexerState, ModelUpdate]:
    """A trainer, and an indexer state (``options`` over a re-encode batch of 8) holding ``items``
    encoded at the trainer's full update."""
    trainer = trained(items)
    state = make_state(**({"reencode_batch": 8} | options))
    full = decode_update(trainer.export_update(full=True))
    if state.replica.apply(full).reencode_all:
        state.start_epoch(full.version)
    state.upsert_items(items)
    return trainer, state, full


def run_jobs(state: IndexerState, *jobs: Job) -> Reencoder:
    worker = Reencoder(state, QualityMonitor(state.index))
    for job in jobs:
        worker.submit(job)
    worker.run_queued()
    return worker


def test_upsert_delete_and_catalog_stay_in_step():
    state = make_state(encode_batch=7)
    state.upsert_items(make_items(20))
    assert len(state.index) == len(state.catalog) == 20
    meta = state.index.meta("i3")
    assert (meta.model_version, meta.event_ts_ms, meta.categories) == (0, 1_700_000_000_003, ("c3",))
    before = state.index.get("i3").vector.copy()
    state.upsert_items([Item(item_id="i3", created_at=5, title="something else", categories=("zz",))])
    assert state.index.meta("i3").categories == ("zz",)
    assert not (state.index.get("i3").vector == before).all()
    assert state.delete_items(["i4", "nope"]) == 1
    assert "i4" not in state.index and "i4" not in state.catalog
    assert [it.item_id for it in state.recent_items(2)] == ["i19", "i18"]


def test_a_dense_change_rebuilds_every_item_at_the_new_version():
    two_tower = ModelConfig(id_buckets=4096, token_buckets=4096, estimator_buckets=4096, tower="two_tower")
    items = make_items(40)
    state = IndexerState(IndexerOptions(reencode_batch=16), two_tower, IndexerMetrics(CollectorRegistry()))
    state.upsert_items(items)
    trainer = OnlineTrainer(two_tower)
    catalog = {it.item_id: it for it in items}
    clicks = [Click(user_id=f"u{j}", item_id=items[j].item_id, ts=j) for j in range(32)]
    trainer.step(trainer.make_batch(clicks, catalog, [[] for _ in clicks]))
    update = decode_update(trainer.export_update(full=True))
    applied = state.replica.apply(update)
    assert applied.reencode_all  # the dense layers moved: every vector is stale
    state.start_epoch(applied.version)
    worker = run_jobs(state, Job(applied.version))
    assert state.index.version_counts() == {applied.version: 40}
    assert state.served_epoch == applied.version and worker.settled_version == applied.version
    expected = state.replica.encode_items([items[5]])[0]
    assert abs(state.index.get("i5").vector - expected).max() < 1e-5
    assert state.compatible(applied.version) and not state.compatible(0)


def over_bound(state: IndexerState, changed, items: list[Item]) -> set[str]:
    """The items whose estimated drift from ``changed`` exceeds the bound (the index holds their norms)."""
    drift = state.replica.items_drift(changed, items)
    return {it.item_id for it, d in zip(items, drift)
            if d / max(np.linalg.norm(state.index.get(it.item_id).vector), 1e-6) > state.config.reencode_drift_bound}


def moved_row(state: IndexerState, row: int, amount: float):
    """Really move the replica's content-token ``row`` by ``amount`` (along its first axis); the rows
    and shifts an update that did so would report."""
    from streamrecall.model.update import ChangedRows

    with torch.no_grad():
        state.replica.model.tables()["token"][row, 0] += amount
    return ChangedRows({"token": torch.tensor([row])}, {"token": torch.tensor([amount])})


def test_a_delta_reencodes_the_items_it_moved_past_the_bound_and_only_those():
    # two disjoint groups of content tokens: a click in group a touches group a's rows only
    items = [Item(item_id=f"i{i}", created_at=i, categories=("a" if i < 10 else "b",)) for i in range(40)]
    trainer, state, full = indexed_at_a_full_update(items)
    catalog = {it.item_id: it for it in items}
    clicks = [Click(user_id="u1", item_id="i1", ts=1), Click(user_id="u2", item_id="i2", ts=2)]
    trainer.step(trainer.make_batch(clicks, catalog, [[], []]))
    delta = decode_update(trainer.export_update())
    assert delta.kind == "delta"
    touched = set(state.replica.items_touched(delta, items))  # before apply: the rule does not depend on it
    applied = state.replica.apply(delta)
    assert applied.status == "applied" and not applied.reencode_all
    expected = over_bound(state, applied.changed, items)
    worker = run_jobs(state, Job(applied.version, applied.changed))
    at_new = {i for i in catalog if state.index.meta(i).model_version == delta.version}
    assert at_new == expected and {"i1", "i2"} <= at_new <= touched
    assert not touched & {f"i{i}" for i in range(10, 40)}
    assert worker.settled_version == delta.version
    assert state.metrics.upserts.labels("rebuild")._value.get() == 0  # a quarter touched: in place
    for i in at_new:  # re-encoded: exactly the current towers' vectors, drift back to 0
        assert np.allclose(state.index.get(i).vector, state.replica.encode_items([catalog[i]])[0], atol=1e-6)
    assert state.staleness()["over_drift_bound"] == 0


def test_drift_below_the_bound_accumulates_until_it_crosses():
    """Small moves re-encode nothing; they add up, and the item is re-encoded once past the bound."""
    items = [Item(item_id=f"i{i}", created_at=i, categories=("a" if i < 3 else "b",)) for i in range(10)]
    state = make_state(reencode_drift_bound=0.1)
    state.upsert_items(items)
    row = int(state.replica.featurizer.encode_items(items[:1]).token_rows[0])  # category "a"'s token row
    norm = float(np.linalg.norm(state.index.get("i0").vector))
    weight = float(state.replica.featurizer.encode_items(items[:1]).token_weights[0])
    step = 0.06 * norm / weight  # moves each "a" item by 6% of its norm
    worker = Reencoder(state, QualityMonitor(state.index))
    worker.submit(Job(1, moved_row(state, row, step)))
    worker.run_queued()
    assert state.metrics.upserts.labels("reencode")._value.get() == 0
    assert state.staleness()["drift_mean"] == pytest.approx(0.06 * 3 / 10, rel=1e-3)
    worker.submit(Job(1, moved_row(state, row, step)))
    worker.run_queued()
    # 12% > 10%: the three "a" items (fewer than half: in place)
    assert state.metrics.upserts.labels("reencode")._value.get() == 3
    assert state.staleness() == {"behind_versions": 0.0, "behind_seconds": 0.0, "drift_mean": 0.0,
                                 "over_drift_bound": 0.0}


def test_the_reencode_budget_bounds_items_per_second_most_retrieved_first(monkeypatch):
    from streamrecall.consumers.roles.indexer import reencoder as module

    items = [Item(item_id=f"i{i}", created_at=i, categories=("a",)) for i in range(300)]
    state = make_state(reencode_items_per_s=100, reencode_batch=256)
    state.upsert_items(items)
    popular = state.index.get("i7").vector
    for _ in range(3):
        state.index.query(popular[None, :], k=10)  # the ten nearest to i7 are retrieved, three times
    retrieved = {h.item_id for h in state.index.query(popular[None, :], k=10)[0]}
    clock = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
    worker = Reencoder(state, QualityMonitor(state.index))
    worker._last_rebuild = clock[0]  # just rebuilt: the next rebuild may not start yet, so in place
    row = int(state.replica.featurizer.encode_items(items[:1]).token_rows[0])
    worker.submit(Job(1, moved_row(state, row, 100.0)))
    worker.run_queued(drain=False)
    assert state.staleness()["over_drift_bound"] == 1.0
    assert not worker._drain()  # no time has passed: no budget yet
    clock[0] += 0.5
    assert not worker._drain()  # half a second: 50 items, less than a batch of 100
    clock[0] += 0.5
    assert worker._drain() and not worker._drain()
    assert state.metrics.upserts.labels("reencode")._value.get() == 100
    assert state.staleness()["over_drift_bound"] == pytest.approx(200 / 300)
    left = set(state.index.drifted(state.config.reencode_drift_bound, 1000))
    assert len(left) == 200 and not retrieved & left  # the retrieved ones went first
    clock[0] += 10  # the bucket holds at most one second of budget
    assert worker._drain() and not worker._drain()
    assert state.metrics.upserts.labels("reencode")._value.get() == 200


def test_newer_epoch_supersedes_queued_work():
    items = make_items(10)
    trainer = trained(items)
    state = make_state()
    state.upsert_items(items)
    first = decode_update(trainer.export_update(full=True))
    second = decode_update(trainer.export_update(full=True))
    for u in (first, second):
        state.start_epoch(state.replica.apply(u).version)
    run_jobs(state, Job(first.version), Job(second.version))
    assert state.index.version_counts() == {second.version: 10}


def test_snapshot_roundtrip_keeps_items_content_and_resume(tmp_path):
    state = make_state()
    items = make_items(12)
    state.upsert_items(items)
    resume = indexer_snapshot.Resume(offsets={"items": {"0": 7, "1": 5}, "model-updates": {"0": 3}}, replica_version=2,
                                     settled_version=1, last_full_partition=0, last_full_offset=1)
    indexer_snapshot.write(tmp_path, state.index, list(state.catalog.values()), resume)
    state.upsert_items(make_items(3, start=100))  # a second snapshot replaces the first, catalog files too
    indexer_snapshot.write(tmp_path, state.index, list(state.catalog.values()), resume)
    assert len(list(tmp_path.glob("catalog-*.msgpack"))) == 1
    loaded = indexer_snapshot.load(tmp_path)
    assert set(loaded.catalog) == set(state.catalog) == set(loaded.index.ids())
    assert loaded.catalog["i4"] == items[4]
    assert loaded.resume.next_offsets() == Offsets({("items", 0): 7, ("items", 1): 5, ("model-updates", 0): 3})
    assert loaded.resume.last_full_offset == 1
    assert indexer_snapshot.read_resume(tmp_path)["settled_version"] == 1
    assert indexer_snapshot.load(tmp_path / "none") is None


def test_cap_per_category_keeps_rank_order():
    rows = [("a", ("x",)), ("b", ("x",)), ("c", ("y",)), ("d", ()), ("e", ("x", "z")), ("f", ("z",))]
    kept = cap_per_category(rows, 10, 1, lambda r: r[1])
    assert [r[0] for r in kept] == ["a", "c", "d", "f"]
    assert [r[0] for r in cap_per_category(rows, 2, 2, lambda r: r[1])] == ["a", "b"]


def test_indexer_config_refuses_unknown_and_bad_values():
    assert IndexerOptions.from_settings(Settings(extra={"indexer": {"snapshot_interval_s": 5}})).snapshot_interval_s == 5
    with pytest.raises(ConfigError, match="unknown"):
        IndexerOptions.from_settings(Settings(extra={"indexer": {"snapshot_every": 5}}))
    with pytest.raises(ConfigError, match="max_k"):
        IndexerOptions(max_k=0)
    with pytest.raises(ConfigError, match="integer"):
        IndexerOptions(max_k=2.5)


def test_rebuilds_keep_to_their_busy_share_when_a_build_is_slow():
    """A rebuild starts at most every rebuild_interval_s, and no sooner than its last duration /
    rebuild_busy_share after the last started: slow (large-index) builds are not run back to back."""
    state = make_state(rebuild_interval_s=5.0, rebuild_busy_share=0.25)
    worker = Reencoder(state, QualityMonitor(state.index))
    assert worker.rebuild_wait(100.0) < 0  # never built: now
    worker._last_rebuild, worker._last_rebuild_s = 100.0, 1.0  # a quick build: the interval rules
    assert worker.rebuild_wait(102.0) == pytest.approx(3.0)
    worker._last_rebuild_s = 60.0  # a one-minute build: at most a quarter of the time
    assert worker.rebuild_wait(102.0) == pytest.approx(238.0)
    assert worker.rebuild_wait(400.0) < 0
    with pytest.raises(ConfigError, match="rebuild_busy_share"):
        IndexerOptions(rebuild_busy_share=1.5)


def test_a_rebuild_records_how_long_it_took():
    state = make_state()
    state.upsert_items(make_items(50))
    worker = run_jobs(state, Job(version=1))
    assert worker._last_rebuild_s > 0 and worker._last_rebuild > 0


def test_quality_measurements_keep_to_their_busy_share(monkeypatch):
    """recall@10 reads every live vector (seconds at a million items): measurements start at most
    every quality_interval_s and no sooner than their last duration / QUALITY_BUSY_SHARE after."""
    import types

    import streamrecall.consumers.roles.indexer.reencoder as reencoder

    clock = [1000.0]
    monkeypatch.setattr(reencoder, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    state = make_state(quality_interval_s=30.0)
    state.upsert_items(make_items(20))
    worker = Reencoder(state, QualityMonitor(state.index))
    measured: list[float] = []

    def slow_measure():  # each measurement takes 10 s of the fake clock
        measured.append(clock[0])
        clock[0] += 10.0
        return QualityMonitor(state.index).measure()

    monkeypatch.setattr(worker.monitor, "measure", slow_measure)
    for _ in range(400):  # 400 s of loop iterations, one a second
        clock[0] += 1.0
        worker._maybe_measure()
    gaps = [b - a for a, b in zip(measured, measured[1:])]
    assert len(measured) >= 2 and all(gap >= 10.0 / reencoder.QUALITY_BUSY_SHARE for gap in gaps), gaps


def test_snapshots_keep_to_their_busy_share(monkeypatch, tmp_path):
    """A snapshot copies the graph holding the interpreter lock (seconds at a million items): the
    poll loop snapshots at most every snapshot_interval_s and no sooner than the last snapshot's
    duration / SNAPSHOT_BUSY_SHARE after it started."""
    import types

    import streamrecall.consumers.roles.indexer.handler as handler_module
    from streamrecall.consumers.roles.indexer.handler import IndexerHandler

    clock = [1000.0]
    monkeypatch.setattr(handler_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
    state = make_state(snapshot_interval_s=30.0)
    state.upsert_items(make_items(20))
    handler = IndexerHandler(Settings(state_dir=tmp_path), state, Reencoder(state, QualityMonitor(state.index)))
    taken: list[float] = []

    def slow_write(*args, **kwargs):  # each snapshot takes 4 s of the fake clock
        taken.append(clock[0])
        clock[0] += 4.0
        return tmp_path

    monkeypatch.setattr(handler_module.indexer_snapshot, "write", slow_write)
    for _ in range(300):  # a flush a second
        clock[0] += 1.0
        handler.flush(Offsets())
    gaps = [b - a for a, b in zip(taken, taken[1:])]
    assert len(taken) >= 2 and all(gap >= 4.0 / handler_module.SNAPSHOT_BUSY_SHARE for gap in gaps), gaps


def _deltas(trainer: OnlineTrainer, items: list[Item], n: int) -> list:
    catalog = {it.item_id: it for it in items}
    out = []
    for step in range(n):
        clicks = [Click(user_id=f"u{step}", item_id=items[step].item_id, ts=step)]
        trainer.step(trainer.make_batch(clicks, catalog, [[]]))
        out.append(decode_update(trainer.export_update()))
    return out


def test_deltas_queued_behind_a_job_are_merged_into_one_pass_of_their_rows():
    """At a million items a rebuild takes minutes while deltas arrive several a second: queued
    deltas keep only their changed rows (no values) and run as one pass at the newest version,
    re-encoding exactly what each would have."""
    from streamrecall.model.update import ChangedRows

    # eight groups of content tokens: each delta's click touches its group's rows
    items = [Item(item_id=f"i{i}", created_at=i, categories=(f"g{i % 8}",)) for i in range(80)]
    trainer, state, full = indexed_at_a_full_update(items, reencode_drift_bound=1e-9)
    deltas = _deltas(trainer, items, 3)
    touched = set().union(*(state.replica.items_touched(d, items) for d in deltas))
    applied = [state.replica.apply(d) for d in deltas]
    assert not any(a.reencode_all for a in applied)
    jobs = [Job(d.version, a.changed) for d, a in zip(deltas, applied)]
    assert all(not j.everything and not hasattr(j.update, "sparse") for j in jobs)  # rows and shifts only
    moved = over_bound(state, ChangedRows.of(*(j.update for j in jobs)), items)
    worker = Reencoder(state, QualityMonitor(state.index))
    passes = []
    real = worker._drift_pass
    worker._drift_pass = lambda version, update: passes.append(version) or real(version, update)
    for job in jobs:
        worker.submit(job)
    worker.run_queued()
    assert passes == [deltas[-1].version] and worker.pending == 0
    assert {i for i in (it.item_id for it in items) if state.index.meta(i).model_version == deltas[-1].version} == moved
    assert moved <= touched and 0 < len(touched) < len(items) / 2 and worker.settled_version == deltas[-1].version
    with pytest.raises(ValueError, match="touches everything"):
        ChangedRows.of(full)


def test_a_delta_that_touches_most_items_rebuilds_the_graph():
    """Rewriting most items in place costs more than a fresh graph (an update is ~8 inserts); but
    a pass does not wait for a paced rebuild (the graph would stay on old vectors meanwhile)."""
    items = [Item(item_id=f"i{i}", created_at=i, categories=("shared",)) for i in range(60)]
    trainer, state, full = indexed_at_a_full_update(items, reencode_drift_bound=1e-9)
    first, second = _deltas(trainer, items, 2)
    row = int(state.replica.featurizer.encode_items(items[:1]).token_rows[0])  # the shared token row
    state.replica.apply(first)
    worker = run_jobs(state, Job(first.version, moved_row(state, row, 1.0)))  # moved far
    assert state.metrics.upserts.labels("rebuild")._value.get() == 60
    assert state.metrics.upserts.labels("reencode")._value.get() == 0
    assert state.index.version_counts() == {first.version: 60}
    # within rebuild_interval_s of that rebuild: rewritten in place now, not left waiting
    state.replica.apply(second)  # carries the row as the trainer has it: the first move is undone
    worker.submit(Job(second.version, moved_row(state, row, 3.0)))
    worker.run_queued()
    assert state.metrics.upserts.labels("rebuild")._value.get() == 60
    assert state.metrics.upserts.labels("reencode")._value.get() == 60
    assert state.index.version_counts() == {second.version: 60}


def test_an_estimate_past_the_bound_is_checked_against_the_exact_drift_before_rewriting():
    """The estimate sums row shifts (an upper bound): moves that cancel out leave the vectors where
    they were. Encoding finds that, and neither a rewrite nor a rebuild follows."""
    items = [Item(item_id=f"i{i}", created_at=i, categories=("a" if i < 40 else "b",)) for i in range(60)]
    state = make_state(reencode_drift_bound=0.1, reencode_batch=16)
    state.upsert_items(items)
    before = {it.item_id: state.index.get(it.item_id).vector.copy() for it in items}
    a_row, b_row = (int(state.replica.featurizer.encode_items([items[i]]).token_rows[0]) for i in (0, 59))
    worker = Reencoder(state, QualityMonitor(state.index))
    there, back = moved_row(state, a_row, 5.0), moved_row(state, a_row, -5.0)  # and back: no net move
    from streamrecall.model.update import ChangedRows

    worker.submit(Job(1, ChangedRows.of(there, ChangedRows(back.rows, {"token": back.shift["token"].abs()}))))
    worker.submit(Job(1, moved_row(state, b_row, 50.0)))  # the "b" items really move
    worker.run_queued()
    assert state.metrics.upserts.labels("rebuild")._value.get() == 0  # 2/3 estimated over, the sample says 1/3
    assert state.metrics.upserts.labels("reencode")._value.get() == 20
    for it in items:  # the "b" items hold their new vectors; the "a" items are where they were
        assert np.allclose(state.index.get(it.item_id).vector, state.replica.encode_items([it])[0], atol=1e-5)
        assert np.array_equal(state.index.get(it.item_id).vector, before[it.item_id]) == (it.categories == ("a",))
    assert state.staleness()["over_drift_bound"] == 0  # the kept ones carry their exact drift now: 0


def test_a_rebuild_says_it_is_running_while_it_runs():
    items = make_items(20)
    trainer, state, full = indexed_at_a_full_update(items)
    worker = Reencoder(state, QualityMonitor(state.index))
    seen = []
    real = state.index.reencode
    state.index.reencode = lambda *a, **k: seen.append(worker.rebuilding) or real(*a, **k)  # type: ignore[method-assign]
    worker.submit(Job(full.version))
    worker.run_queued()
    assert seen == [True] and not worker.rebuilding


def test_an_update_that_waited_for_the_towers_readers_says_which_lock_held_it(tmp_path, caplog):
    """Item ingest waits on the poll loop while an update waits for its locks: the log names the lock."""
    import logging
    import threading

    from streamrecall.consumers.roles.indexer.handler import LOCK_WAIT_LOG_S, IndexerHandler

    items = make_items(20)
    trainer, state, _ = indexed_at_a_full_update(items)
    handler = IndexerHandler(Settings(state_dir=tmp_path), state, Reencoder(state, QualityMonitor(state.index)))
    delta = decode_update(trainer.export_update(full=False))
    reading, release = threading.Event(), threading.Event()

    def query() -> None:  # a query encoding at the current version holds the towers for reading
        with state.model_lock.read():
            reading.set()
            release.wait(5)

    reader = threading.Thread(target=query)
    reader.start()
    reading.wait(5)
    threading.Timer(2 * LOCK_WAIT_LOG_S, release.set).start()
    with caplog.at_level(logging.INFO, logger="streamrecall.consumers.roles.indexer.handler"):
        handler.apply_update(delta, 0, 7)
    reader.join(5)
    waits = [r.getMessage() for r in caplog.records if "waited" in r.getMessage()]
    assert len(waits) == 1 and f"model update v{delta.version} waited 0.0" in waits[0], waits
    towers = float(waits[0].split("and ")[1].split("s for")[0])
    assert towers >= 2 * LOCK_WAIT_LOG_S * 0.9
    assert state.replica.version == delta.version

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="streamrecall.consumers.roles.indexer.handler"):
        handler.apply_update(decode_update(trainer.export_update(full=False)), 0, 8)
    assert not [r for r in caplog.records if "waited" in r.getMessage()], "no wait, no line"


def drifted_state(n: int = 100, batch: int = 100) -> tuple[IndexerState, list[Item], Reencoder]:
    """``n`` items all over the drift bound (one content row moved far), and a re-encoder that may
    not rebuild (it just did), so they are rewritten in place."""
    items = [Item(item_id=f"i{i}", created_at=i, categories=("a",)) for i in range(n)]
    state = make_state(reencode_batch=batch)
    state.upsert_items(items)
    worker = Reencoder(state, QualityMonitor(state.index))
    worker._last_rebuild = time.monotonic()
    row = int(state.replica.featurizer.encode_items(items[:1]).token_rows[0])
    worker.submit(Job(1, moved_row(state, row, 100.0)))
    worker.run_queued(drain=False)
    assert state.staleness()["over_drift_bound"] == 1.0
    return state, items, worker


def test_the_reencoder_encodes_without_the_state_lock_and_writes_in_short_holds():
    """The poll loop waits for the state lock: a re-encode batch holds it only for its writes, a
    ``REWRITE_CHUNK`` at a time, not for the encode (a batch under the lock held it 0.2 s at 30k items)."""
    import threading

    from streamrecall.consumers.roles.indexer.reencoder import REWRITE_CHUNK

    state, items, worker = drifted_state()
    free_while_encoding, sizes = [], []
    real_encode, real_upsert = state.replica.encode_items, state.index.upsert

    def encode(batch):
        got = []
        other = threading.Thread(target=lambda: got.append(state.lock.acquire(timeout=5) and state.lock.release() is None))
        other.start()
        other.join()
        free_while_encoding.append(got == [True])
        return real_encode(batch)

    def upsert(ids, vectors, metas):
        sizes.append(len(ids))
        return real_upsert(ids, vectors, metas)

    state.replica.encode_items = encode  # type: ignore[method-assign]
    state.index.upsert = upsert  # type: ignore[method-assign]
    assert worker._drain(budget=False)
    assert free_while_encoding == [True]
    assert sum(sizes) == 100 and max(sizes) <= REWRITE_CHUNK
    assert state.staleness()["over_drift_bound"] == 0.0


def test_an_item_replaced_while_it_was_reencoded_keeps_its_new_content():
    """The poll loop replaced an item while the re-encoder encoded its old content: the old content's
    vector is not written over the new one."""
    state, items, worker = drifted_state(10)
    replaced = Item(item_id="i3", created_at=99, title="entirely new words", categories=("zz",))
    real_encode = state.replica.encode_items
    calls = []

    def encode(batch):
        calls.append(len(batch))
        vectors = real_encode(batch)
        if len(calls) == 1:  # the poll loop ingests meanwhile (its encode is call 2)
            state.upsert_items([replaced])
        return vectors

    state.replica.encode_items = encode  # type: ignore[method-assign]
    assert worker._drain(budget=False)
    assert state.index.meta("i3").categories == ("zz",)
    assert np.allclose(state.index.get("i3").vector, real_encode([replaced])[0], atol=1e-6)
    assert state.metrics.upserts.labels("reencode")._value.get() == 9


def test_a_batch_an_update_overtook_writes_nothing_and_is_read_again():
    """A model update landed while the batch was encoded: its vectors are an older version's, so
    none is written, and the next batch (at the new version) re-encodes the items."""
    state, items, worker = drifted_state(10)
    real = state.encode_current
    before = state.replica.version

    def encode_then_an_update_lands(batch):
        encoded = real(batch)
        state.replica.version += 1  # what an applied delta does, as far as the batch can tell
        return encoded

    state.encode_current = encode_then_an_update_lands  # type: ignore[method-assign]
    assert worker._drain(budget=False)
    assert state.metrics.upserts.labels("reencode")._value.get() == 0
    assert state.staleness()["over_drift_bound"] == 1.0
    state.encode_current = real  # type: ignore[method-assign]
    assert worker._drain(budget=False)
    assert state.metrics.upserts.labels("reencode")._value.get() == 10
    assert state.index.meta("i0").model_version == before + 1
