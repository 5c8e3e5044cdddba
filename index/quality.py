"""Quality monitor: recall@k of the HNSW search against exact search over the same live vectors.

The approximate and the exact results are computed from one consistent view:
the live vectors are copied and the sample searched under the index's shared
lock (queries go on; writers wait for about one copy of the vectors), and the
exact search (a numpy matmul) runs afterwards, outside the lock.
"""

from __future__ import annotations

import math
import random
import sys
import threading

import msgspec
import numpy as np

from ._store import as_matrix, labels_of
from .hnsw import ItemIndex


class QualityReport(msgspec.Struct, frozen=True):
    """Plain numbers for the metrics layer."""

    recall_at_10: float  # mean over sampled queries of |HNSW top-k ∩ exact top-k| / k (k=10 by default)
    deleted_share: float  # deleted hnswlib slots / used slots
    live: int
    sampled: int
    k: int = 10
    ef: int = 0


def measure_quality(index: ItemIndex, sample_size: int = 256, k: int = 10, seed: int = 0,
                    queries: np.ndarray | None = None) -> QualityReport:
    """Recall@k of ``index`` on ``queries`` (shape (q, dim)) or, by default, on ``sample_size`` live item vectors.

    Item vectors as queries find themselves first, which flatters recall a little;
    pass real query vectors (e.g. recent user vectors) when you have them.
    """
    rng = np.random.default_rng(seed)
    with index._reading() as s:
        rows = s.live_rows()
        slots = s.hnsw.element_count
        deleted = (slots - len(rows)) / slots if slots else 0.0
        ef = s.params.ef
        if len(rows) == 0:
            return QualityReport(0.0, deleted, 0, 0, k, ef)
        labels = labels_of(rows, s.gen[rows])
        vectors = s.vectors(rows)
        if queries is None:
            pick = rng.choice(len(rows), size=min(sample_size, len(rows)), replace=False)
            q = vectors[pick]
        else:
            q = as_matrix(queries, s.params.dim, "queries")[:sample_size]
        kk = min(k, len(rows))
        approx = s.knn(q, kk)
        space = s.params.space
    exact = _exact_top(vectors, q, kk, space)
    hits = 0
    for (got, _), want in zip(approx, exact):
        hits += len(np.intersect1d(got.astype(np.uint64), labels[want]))
    recall = hits / (kk * len(q)) if len(q) else 0.0
    return QualityReport(recall, deleted, len(rows), len(q), k, ef)


def _exact_top(vectors: np.ndarray, queries: np.ndarray, k: int, space: str) -> np.ndarray:
    """Row indices of the exact top-k per query, shape (q, k)."""
    out = np.empty((len(queries), k), dtype=np.intp)
    base_sq = (vectors * vectors).sum(axis=1) if space == "l2" else None
    if space == "cosine":
        norms = np.linalg.norm(vectors, axis=1)
        vectors = vectors / np.where(norms > 0, norms, 1)[:, None]
    for start in range(0, len(queries), 64):
        qb = queries[start:start + 64]
        sims = qb @ vectors.T
        if space == "l2":
            sims = 2 * sims - base_sq[None, :]
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        out[start:start + 64] = part
    return out


class QualityMonitor:
    """Keeps a reservoir of recent query vectors and measures recall on them.

    ``observe`` is cheap and thread-safe; call it from the query path. ``measure``
    uses the reservoir when it holds queries, else live item vectors.
    """

    def __init__(self, index: ItemIndex, sample_size: int = 256, k: int = 10, seed: int = 0) -> None:
        self.index = index
        self.sample_size = sample_size
        self.k = k
        self._rng = random.Random(seed)  # a few draws at a time: the stdlib's is ~10× cheaper per call than numpy's
        self._seed = seed
        self._seen = 0
        self._w = 0.0  # algorithm L's running weight, and the position of the next vector kept
        self._next = 0
        self._reservoir: list[np.ndarray] = []
        self._lock = threading.Lock()
        self.last: QualityReport | None = None

    def observe(self, vectors: np.ndarray) -> None:
        """Offer query vectors (one, or a batch's rows) to the reservoir, a uniform sample of every
        vector observed. Li's algorithm L draws how many vectors to skip before the next one kept,
        so a vector costs a comparison, not a random draw (a draw each was ~4% of a batch's answer)."""
        vecs = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        with self._lock:
            start, self._seen = self._seen, self._seen + len(vecs)
            reservoir, size = self._reservoir, self.sample_size
            j = 0
            while len(reservoir) < size and j < len(vecs):
                reservoir.append(vecs[j].copy())
                j += 1
                if len(reservoir) == size:
                    self._w = math.exp(math.log(self._uniform()) / size)
                    self._next = start + j - 1 + self._skip()
            while size and len(reservoir) == size and self._next < self._seen:
                reservoir[self._rng.randrange(size)] = vecs[self._next - start].copy()
                self._w *= math.exp(math.log(self._uniform()) / size)
                self._next += self._skip()

    def _uniform(self) -> float:
        return self._rng.random() or 5e-324  # (0, 1): log() of it is finite

    def _skip(self) -> int:
        """Positions from the last vector kept to the next one kept (at least 1)."""
        if self._w >= 1.0:
            return 1
        if self._w <= 0.0:  # underflowed after an astronomically long stream: keep what is there
            return sys.maxsize
        return int(math.log(self._uniform()) / math.log1p(-self._w)) + 1

    def measure(self) -> QualityReport:
        with self._lock:
            queries = np.stack(self._reservoir) if self._reservoir else None
        self.last = measure_quality(self.index, self.sample_size, self.k, self._seed, queries)
        return self.last
