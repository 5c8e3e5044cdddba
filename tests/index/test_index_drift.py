"""The drift queue: what is re-encoded first, how staleness is measured, and the retrieval counts."""

from __future__ import annotations

import numpy as np
import pytest

from streamrecall.index.drift import DriftQueue, RetrievalCounts, relative_drift


def test_relative_drift_is_scale_free_and_zero_for_equal_vectors():
    current = np.array([[3.0, 4.0], [0.3, 0.4], [1.0, 0.0]], dtype=np.float32)
    stored = current + np.array([[0.5, 0.0], [0.05, 0.0], [0.0, 0.0]], dtype=np.float32)
    assert relative_drift(stored, current) == pytest.approx([0.1, 0.1, 0.0], abs=1e-6)


def test_take_orders_over_bound_by_retrievals_then_the_rest_by_drift():
    q, hits = DriftQueue(initial=2), RetrievalCounts(100)  # initial=2: the slot arrays must grow
    q.record(["cold-big", "hot-over", "warm-over", "small", "tiny"], np.array([0.5, 0.2, 0.3, 0.04, 0.01]),
             version=3, at_ms=1000)
    hits.observe(["hot-over"] * 5 + ["warm-over"] * 2 + ["small"] * 9)
    assert q.take(10, bound=0.1, retrievals=hits) == ["hot-over", "warm-over", "cold-big", "small", "tiny"]
    assert q.take(2, bound=0.1, retrievals=hits) == ["hot-over", "warm-over"]
    assert q.take(4, bound=1.0) == ["cold-big", "warm-over", "hot-over", "small"]  # none over: by drift
    assert len(q) == 5  # taking does not remove; re-encoding discards


def test_record_keeps_the_first_stale_time_and_an_exact_vector_leaves_the_queue():
    q = DriftQueue()
    q.record(["a", "b"], np.array([0.2, 0.3]), version=5, at_ms=10_000)
    q.record(["a", "b"], np.array([0.4, 0.0]), version=9, at_ms=50_000)  # b moved back: current again
    assert "b" not in q and q.drift("a") == pytest.approx(0.4)
    # "a" has been stale since v5 / 10 s: over 30 s and 3 versions old at (60 s, v9)
    s = q.staleness(total=4, now_ms=60_000, version=9, max_age_s=30.0, max_versions=100, bound=0.1)
    assert (s.stale_share, s.pending, s.over_bound) == (0.25, 1, 1)
    assert s.mean_drift == pytest.approx(0.1)  # 0.4 over 4 entries, current ones count 0
    assert q.staleness(4, 20_000, 9, 30.0, 3, 0.1).stale_share == 0.25  # by versions: 5 < 9 - 3
    assert q.staleness(4, 20_000, 9, 30.0, 4, 0.1).stale_share == 0.0
    q.discard(["a"])
    assert len(q) == 0 and q.oldest_version() is None


def test_retrieval_counts_stay_bounded_and_decay():
    hits = RetrievalCounts(3)
    hits.observe(["a", "a", "a", "a", "b", "b", "c"])
    hits.observe(["d"])  # a fourth id: every count halves, the ones vanish
    assert len(hits) <= 3
    assert hits.counts(["a", "b", "c", "d"]).tolist() == [2, 1, 0, 0]
    hits.decay()
    assert hits.counts(["a", "b"]).tolist() == [1, 0]


def test_index_vectors_returns_the_stored_vectors_of_present_ids(make_index):
    index = make_index(5)
    found, vectors = index.vectors(["i3", "gone", "i0"])
    assert found.tolist() == [True, False, True]
    np.testing.assert_array_equal(vectors, np.stack([index.get("i3").vector, index.get("i0").vector]))
    assert index.vectors([])[1].shape == (0, index.dim)
