"""The replay buffer (model/replay.py) and OnlineTrainer.replay_step."""

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from streamrecall.model import OnlineTrainer, RecentHistory, ReplayBuffer


def _click(item, user="u"):
    return SimpleNamespace(user_id=user, item_id=item, weight=1.0, ts=0)


def test_draws_favour_the_newest_and_old_entries_fall_out():
    buf = ReplayBuffer(capacity=4, half_life=1.0, seed=0)
    buf.add([_click(f"i{n}") for n in range(6)], [[]] * 6)  # i0 and i1 fell out
    assert len(buf) == 4
    drawn = Counter(c.item_id for c in buf.sample(20_000).clicks)
    assert set(drawn) == {"i2", "i3", "i4", "i5"}
    # weights 2^-age: i5 : i4 : i3 : i2 = 8 : 4 : 2 : 1
    assert drawn["i5"] / drawn["i4"] == pytest.approx(2, rel=0.1)
    assert drawn["i4"] / drawn["i2"] == pytest.approx(4, rel=0.15)


def test_the_proposal_is_the_probability_that_a_draw_yields_the_item():
    buf = ReplayBuffer(capacity=10, half_life=2.0, seed=0)
    buf.add([_click(i) for i in ["a", "b", "a", "c"]], [[], ["a"], ["a", "b"], []])
    w = 2.0 ** (-np.arange(3, -1, -1) / 2.0)
    w /= w.sum()
    want = {"a": w[0] + w[2], "b": w[1], "c": w[3]}
    sample = buf.sample(200)
    for click, q in zip(sample.clicks, sample.proposal):
        assert q == pytest.approx(want[click.item_id])
    drawn = Counter(c.item_id for c in buf.sample(40_000).clicks)
    assert drawn["a"] / 40_000 == pytest.approx(want["a"], abs=0.01)
    # histories travel with their click, as they were before it
    assert {(c.item_id, h) for c, h in zip(sample.clicks, sample.histories)} <= \
        {("a", ()), ("b", ("a",)), ("a", ("a", "b")), ("c", ())}


def test_a_replay_step_trains_but_counts_no_new_click(small_config, stream):
    catalog, clicks = stream()
    trainer = OnlineTrainer(small_config())
    history, buf = RecentHistory(trainer.config.history_len), ReplayBuffer(1024, 256.0)
    chunk = clicks[:512]
    histories = history.before_each(chunk)
    trainer.step(trainer.make_batch(chunk, catalog, histories))
    buf.add(chunk, histories)
    estimator = {k: v.clone() for k, v in trainer.estimator.state().items()}
    trending = trainer.trending.top()
    rows = trainer.model.item.id_table.detach().clone()
    out = trainer.replay_step(buf, catalog, 128)
    assert out["examples"] == 128 and out["steps"] == 2 and out["loss"] > 0
    assert not torch.equal(rows, trainer.model.item.id_table.detach())  # it learnt
    for k, v in trainer.estimator.state().items():  # ... but p̂ saw nothing new
        assert torch.equal(v, estimator[k]), k
    assert trainer.trending.top() == trending


def test_a_replay_step_corrects_by_the_buffers_proposal(small_config, stream, monkeypatch):
    catalog, clicks = stream()
    trainer = OnlineTrainer(small_config())
    buf = ReplayBuffer(64, 8.0)
    buf.add(clicks[:64], [[] for _ in range(64)])
    seen = {}

    def spy(user, item, **kw):
        seen.update(kw)
        return (user * item).sum() * 0.0 + 1.0
    monkeypatch.setattr("streamrecall.model.trainer.sampled_softmax_loss", spy)
    sample_buf = ReplayBuffer(64, 8.0)  # same seed, same draws: the sample the step will take
    sample_buf.add(clicks[:64], [[] for _ in range(64)])
    sample = sample_buf.sample(32)
    trainer.replay_step(buf, catalog, 32)
    want = torch.log(32 * torch.from_numpy(sample.proposal).float())
    torch.testing.assert_close(seen["log_q"], want)


def test_an_empty_buffer_takes_no_step(small_config, stream):
    catalog, _ = stream()
    trainer = OnlineTrainer(small_config())
    assert trainer.replay_step(ReplayBuffer(8, 1.0), catalog, 16)["examples"] == 0 and trainer.steps == 0
