"""FM recall (model/fm.py): the score is the FM formula, it learns, and replicas serve it."""

import itertools

import numpy as np
import pytest
import torch

from streamrecall.model import ModelConfigError, ModelUpdateError, OnlineTrainer, RecentHistory, TowerReplica, \
    decode_update
from streamrecall.model.fm import FactorizationMachine


def _fm_fields(model, feats_u, feats_i, u, i):
    """The (embedding row, value x) of every field of user u and item i, as the FM sees them."""
    uf, itf = feats_u, feats_i
    user = [(model.user.id_table[uf.id_rows[u]], 1.0)]
    start = int(uf.history_offsets[u])
    end = int(uf.history_offsets[u + 1]) if u + 1 < len(uf) else uf.history_rows.numel()
    user += [(model.item.id_table[uf.history_rows[h]], float(uf.history_weights[h])) for h in range(start, end)]
    item = [(model.item.id_table[itf.id_rows[i]], 1.0)]
    start = int(itf.token_offsets[i])
    end = int(itf.token_offsets[i + 1]) if i + 1 < len(itf) else itf.token_rows.numel()
    item += [(model.item.token_table[itf.token_rows[t]], float(itf.token_weights[t])) for t in range(start, end)]
    return user, item


def _fm(fields, f):
    """w0 = 0 + Σ wᵢxᵢ + Σ_{i<j} ⟨vᵢ,vⱼ⟩xᵢxⱼ, written out term by term."""
    first = sum(float(row[f]) * x for row, x in fields)
    pairs = sum(float(a[:f] @ b[:f]) * xa * xb for (a, xa), (b, xb) in itertools.combinations(fields, 2))
    return first + pairs


def test_the_fm_score_is_one_inner_product_equal_to_the_fm_formula(small_config, stream):
    catalog, clicks = stream()
    config = small_config(tower="fm", dim=6)
    model = FactorizationMachine(config)
    with torch.no_grad():  # every row non-zero, so no term of the formula vanishes by accident
        for table in model.tables().values():
            table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(1)))
    trainer = OnlineTrainer(config)
    items = list(catalog.values())[:4]
    users, histories = ["u1", "u2", "u3"], [[items[0].item_id, "x-unknown", items[1].item_id], [], [items[2].item_id]]
    feats_i, feats_u = trainer.featurizer.encode_items(items), trainer.featurizer.users(users, histories)
    assert feats_i.token_rows.numel() > 2 * len(items)  # items with several content tokens
    with torch.no_grad():
        scores = model.user(feats_u) @ model.item(feats_i).T
        f = config.dim - 1
        for u, i in itertools.product(range(len(users)), range(len(items))):
            user, item = _fm_fields(model, feats_u, feats_i, u, i)
            cross = sum(float(a[:f] @ b[:f]) * xa * xb for (a, xa), (b, xb) in itertools.product(user, item))
            # user-item cross terms + the item side's first-order and pair terms
            assert float(scores[u, i]) == pytest.approx(cross + _fm(item, f), rel=1e-4, abs=1e-4)
            # ... which is the whole FM minus what is constant for one user
            assert float(scores[u, i]) == pytest.approx(_fm(user + item, f) - _fm(user, f), rel=1e-4, abs=1e-4)


def test_the_fm_trains_past_most_popular(small_config, stream, held_out_hit_rates):
    catalog, clicks = stream(n_clicks=8_192, new_item_share=0.0)
    model_hr, popular_hr = held_out_hit_rates(small_config(tower="fm"), catalog, clicks, k=20)
    assert model_hr > 1.2 * popular_hr, (model_hr, popular_hr)


def test_the_fm_misses_the_bar_with_the_optimiser_switched_off(small_config, stream, monkeypatch, held_out_hit_rates):
    catalog, clicks = stream(n_clicks=8_192, new_item_share=0.0)
    model_hr, popular_hr = held_out_hit_rates(small_config(tower="fm"), catalog, clicks, k=20,
                                               monkeypatch=monkeypatch)
    assert model_hr < popular_hr, (model_hr, popular_hr)


def test_a_replica_fed_fm_updates_encodes_like_the_trainer(small_config, stream):
    catalog, clicks = stream()
    config = small_config(tower="fm")
    trainer, replica, history = OnlineTrainer(config), TowerReplica(config), RecentHistory(config.history_len)
    items = list(catalog.values())
    users = sorted({c.user_id for c in clicks[:200]})

    def train(chunk):
        trainer.step(trainer.make_batch(chunk, catalog, history.before_each(chunk)))

    train(clicks[:512])
    full = decode_update(trainer.export_update())
    assert (full.kind, full.dense_changed, full.dense, full.model["tower"]) == ("full", True, {}, "fm")
    applied = replica.apply(full)  # no dense layers: a full update moves rows, as a delta does
    assert not applied.reencode_all and applied.changed.changed_rows("item_id").numel()
    train(clicks[512:1024])
    delta = decode_update(trainer.export_update(dense=True))  # the role asks for dense layers every time
    assert (delta.kind, delta.dense_changed) == ("delta", False)  # the FM has none: no full re-encode
    touched = set(replica.items_touched(delta, items))
    before = replica.encode_items(items)
    assert replica.apply(delta).status == "applied"
    after = replica.encode_items(items)
    assert {i.item_id for i, a, b in zip(items, before, after) if not np.array_equal(a, b)} <= touched
    hists = [history.get(u) for u in users]
    with torch.no_grad():
        expected_i = trainer.model.item(trainer.featurizer.encode_items(items)).numpy()
        expected_u = trainer.model.user(trainer.featurizer.users(users, hists)).numpy()
    np.testing.assert_array_equal(after, expected_i)
    np.testing.assert_array_equal(replica.encode_users(users, hists), expected_u)
    assert np.abs(np.linalg.norm(expected_i, axis=1) - 1).max() > 1e-3  # not normalised: norms are scores


def test_towers_of_one_family_refuse_the_other_familys_updates(small_config, stream):
    catalog, clicks = stream()
    fm = OnlineTrainer(small_config(tower="fm"))
    fm.step(fm.make_batch(clicks[:256], catalog, [[] for _ in range(256)]))
    with pytest.raises(ModelUpdateError, match="tower"):
        TowerReplica(small_config(tower="two_tower")).apply(decode_update(fm.export_update()))
    two = OnlineTrainer(small_config(tower="two_tower"))
    two.step(two.make_batch(clicks[:256], catalog, [[] for _ in range(256)]))
    with pytest.raises(ModelUpdateError, match="tower"):
        TowerReplica(small_config(tower="fm")).apply(decode_update(two.export_update()))


def test_an_fm_needs_a_column_for_the_first_order_terms():
    with pytest.raises(ModelConfigError, match="dim"):
        from streamrecall.model import ModelConfig
        ModelConfig(tower="fm", dim=1)
