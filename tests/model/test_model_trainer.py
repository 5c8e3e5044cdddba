import os

import pytest
import torch

from streamrecall.model import CheckpointError, OnlineTrainer, RecentHistory


def _batches(trainer, catalog, clicks, size=256):
    history = RecentHistory(trainer.config.history_len)
    for i in range(0, len(clicks), size):
        chunk = clicks[i:i + size]
        yield trainer.make_batch(chunk, catalog, history.before_each(chunk))


def test_step_trains_and_reports_metrics(small_config, stream):
    catalog, clicks = stream()
    trainer = OnlineTrainer(small_config())
    losses = [trainer.step(b)["loss"] for b in _batches(trainer, catalog, clicks)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < sum(losses[:4])
    assert trainer.steps == len(losses)


def test_unknown_items_zero_weights_and_downsampling_are_counted(small_config, stream):
    catalog, clicks = stream()
    trainer = OnlineTrainer(small_config(downsample_top=1e-3))
    first = clicks[:256]
    missing = first[0].item_id
    shown = {k: v for k, v in catalog.items() if k != missing}
    m = trainer.step(trainer.make_batch(first, shown, [[] for _ in first]))
    assert m["unknown_items"] == sum(c.item_id == missing for c in first)
    # Once-seen items start at the prior's 1/(distinct items seen) > 1e-3, so they are thinned too.
    assert m["downsampled"] > 0
    assert m["examples"] + m["skipped"] == 256


def test_mixed_negatives_train(small_config, stream):
    catalog, clicks = stream()
    trainer = OnlineTrainer(small_config(mixed_negatives=64))
    batch = next(_batches(trainer, catalog, clicks))
    assert len(batch.negatives) == 64 and batch.catalog_size == len(catalog)
    assert torch.isfinite(torch.tensor(trainer.step(batch)["loss"]))


def test_checkpoint_restore_continues_with_identical_state(small_config, stream, tmp_path):
    catalog, clicks = stream()
    config = small_config(downsample_top=0.01, mixed_negatives=16)
    a = OnlineTrainer(config)
    batches = list(_batches(a, catalog, clicks))
    for b in batches[:8]:
        a.step(b)
    a.export_update()
    path = tmp_path / "ckpt" / "trainer.safetensors"
    a.checkpoint(path, {"offsets": {"clicks-0": 123}})
    assert [p.name for p in path.parent.iterdir()] == ["trainer.safetensors"]  # no temp file left
    b = OnlineTrainer(config)
    assert b.restore(path) == {"offsets": {"clicks-0": 123}}
    assert (b.version, b.steps, b.estimator.step) == (a.version, a.steps, a.estimator.step)
    for batch in batches[8:]:
        # Negatives are drawn by make_batch with the trainer's RNG, which restore brings back.
        ma = a.step(batch)
        mb = b.step(batch)
        assert ma == mb
    for name, t in a.model.tables().items():
        assert torch.equal(t, b.model.tables()[name]), name
    for name, t in a.model.dense().items():
        assert torch.equal(t, b.model.dense()[name]), name
    assert torch.equal(a.estimator.gap_ema, b.estimator.gap_ema)
    assert a.trending.top() == b.trending.top()


def test_restore_refuses_other_shapes_and_garbage(small_config, tmp_path):
    path = tmp_path / "c.safetensors"
    OnlineTrainer(small_config()).checkpoint(path)
    with pytest.raises(CheckpointError, match="dim"):
        OnlineTrainer(small_config(dim=8)).restore(path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00notjson!")
    with pytest.raises(CheckpointError):
        OnlineTrainer(small_config()).restore(bad)


def test_failed_checkpoint_leaves_no_temp_file(small_config, tmp_path):
    trainer = OnlineTrainer(small_config())
    with pytest.raises(CheckpointError, match="JSON"):
        trainer.checkpoint(tmp_path / "c.safetensors", {"bad": object()})
    assert os.listdir(tmp_path) == []


def test_trained_towers_beat_most_popular_on_held_out_clicks(small_config, stream, held_out_hit_rates):
    catalog, clicks = stream(n_clicks=8_192, new_item_share=0.0)
    model_hr, popular_hr = held_out_hit_rates(small_config(), catalog, clicks, k=20)
    assert model_hr > 1.1 * popular_hr, (model_hr, popular_hr)


def test_the_learning_bar_is_out_of_reach_with_the_optimisers_switched_off(small_config, stream, monkeypatch,
                                                                            held_out_hit_rates):
    # The guard of the test above: if nothing is learnt (the estimator still warms up and the
    # loss still falls), the towers rank by their seeded initial weights and miss the bar.
    catalog, clicks = stream(n_clicks=8_192, new_item_share=0.0)
    model_hr, popular_hr = held_out_hit_rates(small_config(), catalog, clicks, k=20, monkeypatch=monkeypatch)
    assert model_hr < popular_hr, (model_hr, popular_hr)


def test_user_tower_is_live_from_the_first_step(small_config, stream):
    catalog, clicks = stream()
    trainer = OnlineTrainer(small_config(tower="two_tower"))  # the FM has no MLP (tests/model/test_model_fm.py)
    batch = trainer.make_batch(clicks[:256], catalog, [[] for _ in range(256)])  # cold users, no history
    with torch.no_grad():
        before = trainer.model.user(batch.users)
    # Unit vectors at init, not the zero vector F.normalize cannot differentiate.
    assert torch.allclose(before.norm(dim=1), torch.ones(256), atol=1e-5)
    trainer.step(batch)
    rows = batch.users.id_rows.unique()
    assert (trainer.model.user.id_table[rows].abs().sum(dim=1) > 0).all()  # every user's row learnt
    last_bias = trainer.model.dense()["user.mlp.2.bias"]
    # A zero output's gradient is ~1e12 and Adam's second moment would freeze this bias.
    assert trainer._dense_opt.state[last_bias]["exp_avg_sq"].max() < 1e3
    with torch.no_grad():
        after = trainer.model.user(batch.users)
    assert not torch.allclose(before, after)
