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
    assert m["downsampled"] > 0  # unseen items start at p_min, so only repeats in-batch are dropped
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
