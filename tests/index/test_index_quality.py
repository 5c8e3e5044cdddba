"""The quality monitor: recall@10 against exact search over the same live vectors, deleted share."""

from __future__ import annotations

import numpy as np
import pytest

from streamrecall.index import ItemIndex, QualityMonitor, measure_quality

from .conftest import meta


def test_good_index_has_full_recall(make_index):
    index = make_index(500)
    index.delete([f"i{j}" for j in range(100)])
    rep = measure_quality(index, sample_size=50)
    assert rep.recall_at_10 >= 0.98
    assert rep.deleted_share == pytest.approx(100 / 500)
    assert rep.live == 400 and rep.sampled == 50 and rep.k == 10


def test_poor_index_is_detected():
    rng = np.random.default_rng(0)
    dim = 32
    index = ItemIndex(dim, M=2, ef_construction=4, ef=1, num_threads=1)
    v = rng.standard_normal((1500, dim)).astype(np.float32)
    index.upsert([str(j) for j in range(1500)], v / np.linalg.norm(v, axis=1, keepdims=True), meta())
    q = rng.standard_normal((40, dim)).astype(np.float32)
    low = measure_quality(index, queries=q / np.linalg.norm(q, axis=1, keepdims=True)).recall_at_10
    assert low < 0.9
    index.ef = 1500  # exhaustive: approximate == exact
    assert measure_quality(index, queries=q / np.linalg.norm(q, axis=1, keepdims=True)).recall_at_10 > low


def test_empty_and_tiny_index(make_index):
    assert measure_quality(make_index()).live == 0
    rep = measure_quality(make_index(3))
    assert rep.recall_at_10 == 1.0 and rep.sampled == 3


def test_monitor_uses_observed_queries(make_index, make_vectors):
    index = make_index(300)
    mon = QualityMonitor(index, sample_size=20)
    for v in make_vectors(100):
        mon.observe(v)
    rep = mon.measure()
    assert rep.sampled == 20 and rep.recall_at_10 >= 0.95 and mon.last is rep


def test_the_reservoir_is_a_uniform_sample_of_everything_observed(make_index):
    """Algorithm L's skips: over many runs fed in batches of varying size, every position of the
    stream is kept about equally often (early ones no more than late ones), and the reservoir
    holds exactly ``sample_size`` vectors once that many were seen."""
    index = make_index(5)
    n, size, runs = 1000, 20, 1500
    kept = np.zeros(n)
    sizes = np.random.default_rng(5)
    for run in range(runs):
        mon = QualityMonitor(index, sample_size=size, seed=run)
        stream = np.arange(n, dtype=np.float32).reshape(-1, 1)
        at = 0
        while at < n:
            step = int(sizes.integers(1, 70))
            mon.observe(stream[at:at + step])
            at += step
        assert len(mon._reservoir) == size
        kept[[int(v[0]) for v in mon._reservoir]] += 1
    expected = runs * size / n  # 30 per position
    deciles = kept.reshape(10, -1).sum(axis=1) / (expected * n / 10)
    assert np.all(np.abs(deciles - 1.0) < 0.1), deciles
    assert kept.max() < 3 * expected and kept.min() > 0


@pytest.mark.parametrize("space", ["ip", "cosine", "l2"])
def test_the_exact_search_reads_the_index_a_chunk_at_a_time_and_lets_writers_in(make_vectors, monkeypatch, space):
    """hnswlib's get_items holds the GIL: reading every live vector at once stalled the indexer's
    other threads for seconds at a million items. The exact side now reads ``EXACT_CHUNK`` rows per
    short read of the index, so a writer gets in between chunks; the recall measured is the one a
    single pass over every vector gives."""
    import threading

    import streamrecall.index.quality as quality
    from streamrecall.index._store import Store

    index = ItemIndex(16, space=space, num_threads=1, initial_capacity=64, ef=10, M=4, ef_construction=20)
    index.upsert([f"i{j}" for j in range(3000)], make_vectors(3000), meta(1))
    queries = make_vectors(40)
    whole = measure_quality(index, k=10, queries=queries).recall_at_10  # 3,000 rows: one chunk
    assert whole < 1.0  # a small graph: the comparison below means something

    monkeypatch.setattr(quality, "EXACT_CHUNK", 500)
    reads: list[int] = []
    written = threading.Event()
    real_vectors, real_reading = Store.vectors, index._reading

    def spying(self: Store, rows: np.ndarray) -> np.ndarray:
        reads.append(len(rows))
        if len(reads) == 3:  # under the read of a chunk: a writer asks for the index
            threading.Thread(target=lambda: (index.upsert(["new"], make_vectors(1), meta(1)), written.set())).start()
        return real_vectors(self, rows)

    def reading():  # between chunks no lock is held: the writer gets in before the next read
        if len(reads) == 3:
            assert written.wait(10), "the writer could not get in between two chunks"
        return real_reading()

    monkeypatch.setattr(Store, "vectors", spying)
    monkeypatch.setattr(index, "_reading", reading)
    chunked = measure_quality(index, k=10, queries=queries).recall_at_10
    assert max(reads) <= 500 and len(reads) >= 6 and written.is_set()
    assert chunked == pytest.approx(whole)
