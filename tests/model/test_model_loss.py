import math

import pytest
import torch

from streamrecall.model import ModelError, sampled_softmax_loss


def _xent(logits: list[float], target: int) -> float:
    finite = [x for x in logits if x != -math.inf]
    return -(logits[target] - math.log(sum(math.exp(x) for x in finite)))


U = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
V = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
S = (U @ V.T).tolist()  # hand-checkable cosine scores


def test_plain_in_batch_softmax_matches_hand_computation():
    loss = sampled_softmax_loss(U, V, temperature=0.5)
    expected = sum(_xent([s / 0.5 for s in S[i]], i) for i in range(3)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_logq_correction_is_subtracted_from_every_column_including_the_positive():
    q = [0.5, 0.25, 0.05]
    loss = sampled_softmax_loss(U, V, temperature=0.5, log_q=torch.log(torch.tensor(q)))
    expected = sum(_xent([S[i][j] / 0.5 - math.log(q[j]) for j in range(3)], i) for i in range(3)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_accidental_hits_are_masked_and_weights_apply():
    keys = torch.tensor([7, 8, 7])  # rows 0 and 2 hold the same item
    q = [0.5, 0.25, 0.05]
    w = [1.0, 2.0, 0.5]
    loss = sampled_softmax_loss(U, V, temperature=0.5, item_keys=keys, log_q=torch.log(torch.tensor(q)),
                                weights=torch.tensor(w))
    rows = []
    for i in range(3):
        logits = [S[i][j] / 0.5 - math.log(q[j]) for j in range(3)]
        for j in range(3):
            if j != i and keys[j] == keys[i]:
                logits[j] = -math.inf
        rows.append(_xent(logits, i))
    expected = sum(wi * r for wi, r in zip(w, rows)) / sum(w)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Without masking the duplicate counts as a negative and the loss is larger.
    unmasked = sampled_softmax_loss(U, V, temperature=0.5, log_q=torch.log(torch.tensor(q)), weights=torch.tensor(w))
    assert unmasked.item() > loss.item()


def test_mixed_negatives_add_columns_with_their_own_correction_and_masking():
    neg = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    neg_keys = torch.tensor([99, 7])  # the second negative is row 0's positive: masked for row 0
    neg_lq = torch.log(torch.tensor([0.1, 0.1]))
    keys = torch.tensor([7, 8, 9])
    loss = sampled_softmax_loss(U, V, temperature=1.0, item_keys=keys, neg_item=neg, neg_keys=neg_keys,
                                neg_log_q=neg_lq)
    ns = (U @ neg.T).tolist()
    rows = []
    for i in range(3):
        logits = S[i] + [ns[i][m] - math.log(0.1) for m in range(2)]
        if i == 0:
            logits[4] = -math.inf
        rows.append(_xent(logits, i))
    assert loss.item() == pytest.approx(sum(rows) / 3, rel=1e-6)


def test_gradient_flows_and_shapes_are_checked():
    u = U.clone().requires_grad_(True)
    sampled_softmax_loss(u, V, temperature=0.1).backward()
    assert torch.isfinite(u.grad).all() and u.grad.abs().sum() > 0
    with pytest.raises(ModelError, match="B, d"):
        sampled_softmax_loss(U, V[:2], temperature=0.1)


def _captured_loss_inputs(trainer, batch, monkeypatch) -> dict:
    """The keyword arguments the trainer's step passes to the loss."""
    import streamrecall.model.trainer as trainer_module
    seen = {}

    def spy(user, item, **kwargs):
        seen.update(kwargs)
        return sampled_softmax_loss(user, item, **kwargs)

    monkeypatch.setattr(trainer_module, "sampled_softmax_loss", spy)
    trainer.step(batch)
    return seen


def _warm_trainer(small_config, stream, **changes):
    from streamrecall.model import OnlineTrainer, RecentHistory

    catalog, clicks = stream()
    trainer = OnlineTrainer(small_config(**changes))
    history = RecentHistory()
    batches = [trainer.make_batch(clicks[i:i + 256], catalog, history.before_each(clicks[i:i + 256]))
               for i in range(0, 2048, 256)]
    for b in batches[:-1]:  # warm the estimator, so that p̂ and the keep probabilities vary
        trainer.step(b)
    return trainer, batches[-1]


def _trained_batch_rate(trainer, keys: torch.Tensor, n: int) -> torch.Tensor:
    """n·p̂·keep: expected occurrences of each item among the trained columns of an n-click batch."""
    p = trainer.estimator.probability(keys).double()
    t = trainer.config.downsample_top
    return n * p * (torch.sqrt(t / p).clamp(max=1.0) if t is not None else 1.0)


def test_trainer_log_q_is_the_trained_batch_proposal_under_downsampling(small_config, stream, monkeypatch):
    trainer, batch = _warm_trainer(small_config, stream, downsample_top=2e-3)
    seen = _captured_loss_inputs(trainer, batch, monkeypatch)
    keys = seen["item_keys"]
    assert len(keys) < len(batch)  # some head clicks were dropped
    # A dropped click does not occupy a column: the proposal is p̂ × keep probability. With
    # in-batch negatives only a constant drops out, so compare up to one.
    expected = torch.log(_trained_batch_rate(trainer, keys, len(batch)))
    offset = seen["log_q"].double() - expected
    assert float(offset.max() - offset.min()) < 1e-4, "log q is not log(p̂·keep) up to a constant"
    assert float((expected - expected.mean()).abs().max()) > 0.5  # the keep probabilities did vary


@pytest.mark.parametrize("downsample_top", [None, 2e-3])
def test_trainer_mixed_negatives_share_one_mixture_proposal(small_config, stream, monkeypatch, downsample_top):
    trainer, batch = _warm_trainer(small_config, stream, mixed_negatives=64, downsample_top=downsample_top)
    seen = _captured_loss_inputs(trainer, batch, monkeypatch)
    uniform = 64 / batch.catalog_size  # M draws from N items
    n = len(batch)
    expected = torch.log(_trained_batch_rate(trainer, seen["item_keys"], n) + uniform)
    expected_neg = torch.log(_trained_batch_rate(trainer, batch.negatives.keys, n) + uniform)
    torch.testing.assert_close(seen["log_q"].double(), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(seen["neg_log_q"].double(), expected_neg, rtol=0, atol=1e-4)


def test_logq_alpha_scales_the_correction_and_zero_switches_it_off(small_config, stream, monkeypatch):
    full_trainer, batch = _warm_trainer(small_config, stream, mixed_negatives=16)
    half_trainer, _ = _warm_trainer(small_config, stream, mixed_negatives=16, logq_alpha=0.5)
    full = _captured_loss_inputs(full_trainer, batch, monkeypatch)
    half = _captured_loss_inputs(half_trainer, batch, monkeypatch)
    torch.testing.assert_close(half["log_q"], 0.5 * full["log_q"])
    torch.testing.assert_close(half["neg_log_q"], 0.5 * full["neg_log_q"])
    off, b = _warm_trainer(small_config, stream, logq=False)
    zero, _ = _warm_trainer(small_config, stream, logq_alpha=0.0)
    assert off.step(b)["loss"] == zero.step(b)["loss"]
