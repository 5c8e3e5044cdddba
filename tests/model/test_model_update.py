import json
import struct

import numpy as np
import pytest
import torch

from streamrecall.model import ModelUpdateError, OnlineTrainer, RecentHistory, TowerReplica, decode_update
from streamrecall.model.safeio import dumps


def test_fresh_replica_equals_fresh_trainer_and_is_deterministic(small_config, stream):
    catalog, _ = stream()
    items = list(catalog.values())[:50]
    config = small_config(tower="two_tower")  # unit vectors; the FM's replica: tests/model/test_model_fm.py
    trainer, replica = OnlineTrainer(config), TowerReplica(config)
    assert replica.version == 0
    with torch.no_grad():
        ours = trainer.model.item(trainer.featurizer.encode_items(items)).numpy()
    np.testing.assert_array_equal(replica.encode_items(items), ours)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)


def test_full_then_deltas_reproduce_the_trainer(small_config, stream, train):
    catalog, clicks = stream()
    config = small_config(tower="two_tower")  # dense layers travel; the FM's updates: tests/model/test_model_fm.py
    trainer, replica, history = OnlineTrainer(config), TowerReplica(config), RecentHistory(config.history_len)
    items = list(catalog.values())
    train(trainer, catalog, clicks[:1024], history)
    full = decode_update(trainer.export_update())
    assert (full.kind, full.version, full.dense_changed) == ("full", 1, True)
    assert replica.apply(full).status == "applied"
    train(trainer, catalog, clicks[1024:2048], history)
    delta = decode_update(trainer.export_update())
    assert (delta.kind, delta.base_version, delta.dense_changed) == ("delta", 1, False)
    touched = set(replica.items_touched(delta, items))
    before = replica.encode_items(items)
    applied = replica.apply(delta)
    assert (applied.status, applied.reencode_all, replica.version) == ("applied", False, 2)
    after = replica.encode_items(items)
    changed = {i.item_id for i, a, b in zip(items, before, after) if not np.array_equal(a, b)}
    assert changed <= touched and changed  # only touched items moved
    # Dense layers travel on request; then the replica matches the trainer exactly.
    train(trainer, catalog, clicks[2048:3072], history)
    with_dense = decode_update(trainer.export_update(dense=True))
    assert replica.apply(with_dense).reencode_all
    with torch.no_grad():
        expected = trainer.model.item(trainer.featurizer.encode_items(items)).numpy()
        users = [c.user_id for c in clicks[:20]]
        hists = [history.get(u) for u in users]
        expected_u = trainer.model.user(trainer.featurizer.users(users, hists)).numpy()
    np.testing.assert_array_equal(replica.encode_items(items), expected)
    np.testing.assert_array_equal(replica.encode_users(users, hists), expected_u)
    assert replica.trending and replica.trending[0][1] >= replica.trending[-1][1]
    assert set(replica.users_touched(with_dense, users, hists)) == set(users)


def test_duplicates_and_gaps_are_flagged_not_applied(small_config, stream, train):
    catalog, clicks = stream()
    trainer, history = OnlineTrainer(small_config()), RecentHistory()
    train(trainer, catalog, clicks[:512], history)
    u1 = decode_update(trainer.export_update())
    train(trainer, catalog, clicks[512:1024], history)
    u2 = decode_update(trainer.export_update())
    train(trainer, catalog, clicks[1024:1536], history)
    u3 = decode_update(trainer.export_update())
    fresh = TowerReplica(small_config())
    assert fresh.apply(u2).status == "gap" and fresh.version == 0
    assert fresh.apply(u1).status == "applied"
    assert fresh.apply(u1).status == "duplicate"
    assert fresh.apply(u3).status == "gap"
    assert fresh.apply(u2).status == "applied" and fresh.apply(u3).status == "applied"
    assert fresh.version == 3


def test_restart_with_advance_version_publishes_a_superseding_full_update(small_config, tmp_path):
    trainer = OnlineTrainer(small_config())
    trainer.checkpoint(tmp_path / "c.safetensors")
    restarted = OnlineTrainer(small_config())
    restarted.restore(tmp_path / "c.safetensors")
    restarted.advance_version(41)  # the last version found on the topic
    update = decode_update(restarted.export_update())
    assert (update.kind, update.version) == ("full", 42)


def test_replica_refuses_an_update_for_another_model(small_config):
    update = decode_update(OnlineTrainer(small_config(dim=8)).export_update())
    with pytest.raises(ModelUpdateError, match="model"):
        TowerReplica(small_config()).apply(update)


def _valid(small_config) -> bytes:
    return OnlineTrainer(small_config()).export_update(now_ms=1)


def _rewrite_header(data: bytes, **changes) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    table = json.loads(data[8:8 + n])
    header = json.loads(table["__metadata__"]["streamrecall"]) | changes
    table["__metadata__"]["streamrecall"] = json.dumps(header)
    raw = json.dumps(table).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


@pytest.mark.parametrize("mutate, reason", [
    (lambda d: d[:20], "too short|does not fit|header"),
    (lambda d: b"\x80\x04\x95" + d, "header length|JSON"),  # a pickle prefix
    (lambda d: _rewrite_header(d, kind="weird"), "kind"),
    (lambda d: _rewrite_header(d, version=0), "version"),
    (lambda d: _rewrite_header(d, base_version=5, version=3), "base_version"),
    (lambda d: _rewrite_header(d, dense_changed=False), "full update"),
    (lambda d: _rewrite_header(d, trending=[["a", float("nan")]]), "JSON|trending"),
    (lambda d: _rewrite_header(d, format="other"), "format"),
])
def test_malformed_payloads_are_refused_with_a_reason(small_config, mutate, reason):
    with pytest.raises(ModelUpdateError, match=reason):
        decode_update(mutate(_valid(small_config)))


def test_bad_tensors_and_oversized_payloads_are_refused(small_config):
    good = decode_update(_valid(small_config))
    header = {"format": "streamrecall.model-update", "format_version": 1, "version": 2, "base_version": 1,
              "kind": "delta", "dense_changed": False, "model": good.model, "steps": 0, "created_at_ms": 0,
              "trending": []}
    nan = torch.zeros(1, 16)
    nan[0, 0] = float("nan")
    cases = {
        "non-finite": {"rows/item_id": torch.tensor([1]), "values/item_id": nan},
        "outside": {"rows/item_id": torch.tensor([5_000]), "values/item_id": torch.zeros(1, 16)},
        "duplicate": {"rows/item_id": torch.tensor([1, 1]), "values/item_id": torch.zeros(2, 16)},
        "float32": {"rows/item_id": torch.tensor([1]), "values/item_id": torch.zeros(1, 8)},
        "dtype": {"rows/item_id": torch.tensor([1]), "values/item_id": torch.zeros(1, 16, dtype=torch.float16)},
        "unexpected": {"evil": torch.zeros(1)},
        "both": {"rows/token": torch.tensor([1])},
        "dense_changed is false": {"dense/item.mlp.0.bias": torch.zeros(32)},
    }
    for reason, tensors in cases.items():
        with pytest.raises(ModelUpdateError, match=reason):
            decode_update(dumps(tensors, header))
    with pytest.raises(ModelUpdateError, match="limit"):
        decode_update(_valid(small_config), max_bytes=100)


@pytest.mark.parametrize("tower", ["two_tower", "fm"])
def test_a_full_update_restores_exactly_the_rows_written_since_the_last_one(small_config, stream, monkeypatch, tower,
                                                                            train):
    """A full update from another trainer (a restart from an older checkpoint, a replaced trainer)
    leaves the replica equal to a fresh one that applied only it; and the reset costs the rows
    written since, not a regeneration of every seeded row (which held the towers ~1 s per full
    update at the default size)."""
    import streamrecall.model.fm as fm
    import streamrecall.model.towers as towers

    catalog, clicks = stream()
    config = small_config(tower=tower)
    items = list(catalog.values())
    first, history = OnlineTrainer(config), RecentHistory(config.history_len)
    train(first, catalog, clicks[:2048], history)
    replica = TowerReplica(config)
    replica.apply(decode_update(first.export_update()))
    train(first, catalog, clicks[2048:3072], history)
    replica.apply(decode_update(first.export_update()))  # a delta
    other, other_history = OnlineTrainer(config), RecentHistory(config.history_len)
    train(other, catalog, clicks[3072:3584], other_history)  # trained on fewer clicks: fewer rows
    generated = []
    real = (towers if tower == "two_tower" else fm).seeded_uniform


    def counting(shape, *args, rows=None, **kwargs):
        generated.append(int(np.prod(shape)) if rows is None else len(rows) * int(np.prod(shape[1:])))
        return real(shape, *args, **kwargs) if rows is None else real(shape, *args, rows=rows, **kwargs)

    monkeypatch.setattr(towers if tower == "two_tower" else fm, "seeded_uniform", counting)
    other.advance_version(replica.version)
    full = decode_update(other.export_update())
    assert full.kind == "full" and replica.apply(full).status == "applied"
    token_rows = first.model.tables()["token"].shape[0]
    assert 0 < sum(generated) < token_rows * config.dim  # the written rows, not the whole table
    fresh = TowerReplica(config)
    fresh.apply(full)
    np.testing.assert_array_equal(replica.encode_items(items), fresh.encode_items(items))
    users = [c.user_id for c in clicks[:50]]
    hists = [history.get(u) for u in users]
    np.testing.assert_array_equal(replica.encode_users(users, hists), fresh.encode_users(users, hists))
    for name, table in replica.model.tables().items():
        assert torch.equal(table, fresh.model.tables()[name]), name
