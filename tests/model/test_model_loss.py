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
