import numpy as np
import pytest
import torch

from streamrecall.model import FrequencyEstimator

N_ITEMS, BATCH = 100_000, 1024


def _zipf(seed: int = 0):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, N_ITEMS + 1)
    p /= p.sum()
    cdf = np.cumsum(p)
    keys = np.arange(N_ITEMS, dtype=np.int64) * 7919 + 12345

    def draw(order: np.ndarray) -> torch.Tensor:
        ranks = np.minimum(np.searchsorted(cdf, rng.random(BATCH)), N_ITEMS - 1)
        return torch.from_numpy(keys[order[ranks]])

    return p, keys, draw


def _median_rel_error(est: FrequencyEstimator, keys: np.ndarray, truth: np.ndarray) -> float:
    p_hat = est.probability(torch.from_numpy(keys)).numpy()
    return float(np.median(np.abs(p_hat - truth) / truth))


@pytest.mark.parametrize("hashes", [1, 2])
def test_zipf_stream_top_items_within_10_percent_and_recovers_after_a_flip(hashes):
    p, keys, draw = _zipf()
    est = FrequencyEstimator(1 << 20, hashes=hashes, alpha=0.01)
    ident = np.arange(N_ITEMS)
    for _ in range(2000):
        est.update(draw(ident))
    assert _median_rel_error(est, keys[:1000], p[:1000]) < 0.10
    flipped = ident[::-1].copy()  # the most popular items become the rarest and vice versa
    for _ in range(2000):
        est.update(draw(flipped))
    assert _median_rel_error(est, keys[flipped[:1000]], p[:1000]) < 0.10


def test_repeats_within_one_batch_count_as_separate_occurrences():
    est = FrequencyEstimator(1024, alpha=0.5)
    # Items 1 and 2 occur every 4th example, item 9 every 2nd: each repeats in every batch.
    for _ in range(200):
        est.update(torch.tensor([1, 9, 2, 9, 1, 9, 2, 9]))
    p = est.probability(torch.tensor([1, 2, 9]))
    assert p[0].item() == pytest.approx(0.25, rel=0.05)
    assert p[1].item() == pytest.approx(0.25, rel=0.05)
    assert p[2].item() == pytest.approx(0.5, rel=0.05)


def test_unseen_and_once_seen_items_get_p_min():
    est = FrequencyEstimator(1024, p_min=1e-5)
    est.update(torch.tensor([42]))
    assert est.probability(torch.tensor([42, 43])).tolist() == pytest.approx([1e-5, 1e-5])


def test_state_round_trip_continues_identically():
    _, _, draw = _zipf(1)
    a = FrequencyEstimator(1 << 16, hashes=2)
    order = np.arange(N_ITEMS)
    for _ in range(50):
        a.update(draw(order))
    b = FrequencyEstimator(1 << 16, hashes=2)
    b.load_state({k: v.clone() for k, v in a.state().items()})
    nxt = draw(order)
    a.update(nxt)
    b.update(nxt)
    probe = draw(order)
    assert torch.equal(a.probability(probe), b.probability(probe))
    assert a.step == b.step
