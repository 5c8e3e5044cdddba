"""What an applied update says it moved: rows, their shifts, and the drift they cause per item."""

import math

import numpy as np
import torch

from streamrecall.model import OnlineTrainer, RecentHistory, TowerReplica, decode_update
from streamrecall.model.update import ChangedRows


def test_a_full_update_after_the_deltas_moves_only_what_changed_since(small_config, stream, train):
    catalog, clicks = stream()
    config = small_config(tower="fm")
    trainer, replica, history = OnlineTrainer(config), TowerReplica(config), RecentHistory(config.history_len)
    items = list(catalog.values())
    train(trainer, catalog, clicks[:1024], history)
    replica.apply(decode_update(trainer.export_update()))
    train(trainer, catalog, clicks[1024:2048], history)
    delta = decode_update(trainer.export_update())
    tables = {name: t.detach().clone() for name, t in replica.model.tables().items()}
    applied = replica.apply(delta)
    for name, rows in applied.changed.rows.items():  # a delta's shifts are how far its rows moved
        moved = (replica.model.tables()[name].detach()[rows] - tables[name][rows]).norm(dim=1)
        torch.testing.assert_close(applied.changed.shift[name], moved)
    # A full update right after the delta it follows: the same weights, so nothing moved.
    full = decode_update(trainer.export_update(full=True))
    assert full.kind == "full"
    same = replica.apply(full)
    assert not same.reencode_all and all(r.numel() == 0 for r in same.changed.rows.values())
    # After more training, a full update moves what that training moved — not every row it carries.
    train(trainer, catalog, clicks[2048:2304], history)
    full = decode_update(trainer.export_update(full=True))
    before = replica.encode_items(items)
    applied = replica.apply(full)
    after = replica.encode_items(items)
    carried = sum(full.changed_rows(t).numel() for t in full.sparse)
    moved = sum(applied.changed.changed_rows(t).numel() for t in applied.changed.rows)
    assert 0 < moved < carried
    with torch.no_grad():  # and the replica still equals the trainer
        np.testing.assert_array_equal(after, trainer.model.item(trainer.featurizer.encode_items(items)).numpy())
    # Every item that moved is touched, and its factor part moved at most its estimated drift.
    drift = replica.items_drift(applied.changed, items)
    shifted = np.linalg.norm(after[:, :-1] - before[:, :-1], axis=1)
    assert (shifted <= drift + 1e-5).all()
    assert ((drift > 0) | (shifted == 0)).all() and (drift > 0).any()


def test_a_full_update_that_reverts_rows_counts_them_as_moved(small_config, stream, train):
    catalog, clicks = stream()
    config = small_config(tower="fm")
    trainer, replica, history = OnlineTrainer(config), TowerReplica(config), RecentHistory(config.history_len)
    train(trainer, catalog, clicks[:512], history)
    replica.apply(decode_update(trainer.export_update()))
    # A newer trainer starting over (another checkpoint) publishes a full update carrying fewer rows:
    # the rows it lacks go back to their initial values, and that is a move.
    fresh = OnlineTrainer(config)
    train(fresh, catalog, clicks[:64], RecentHistory(config.history_len))
    update = decode_update(fresh.export_update())
    object.__setattr__(update, "version", 5)
    applied = replica.apply(update)
    reverted = set(range(config.id_buckets)) - set(update.changed_rows("item_id").tolist())
    moved = set(applied.changed.changed_rows("item_id").tolist())
    assert moved & reverted
    assert torch.equal(replica.model.tables()["item_id"].detach()[sorted(reverted)],
                       torch.zeros(len(reverted), config.dim))


def test_merged_rows_add_their_shifts_and_an_unknown_shift_is_infinite():
    a = ChangedRows({"token": torch.tensor([1, 3])}, {"token": torch.tensor([0.5, 1.0])})
    b = ChangedRows({"token": torch.tensor([3, 4])}, {"token": torch.tensor([0.25, 2.0])})
    merged = ChangedRows.of(a, b)
    assert merged.rows["token"].tolist() == [1, 3, 4]
    assert merged.shift["token"].tolist() == [0.5, 1.25, 2.0]
    unknown = ChangedRows.of(ChangedRows({"item_id": torch.tensor([2])}), a)
    assert unknown.row_shift("item_id", 4).tolist() == [0.0, 0.0, math.inf, 0.0]
    assert unknown.row_shift("token", 5).tolist() == [0.0, 0.5, 0.0, 1.0, 0.0]
