"""Quality monitor: recall@k of the HNSW search against exact search over the same live vectors.

The sample is searched under one read of the index; the exact search (numpy matmuls) then runs
over the live rows of that moment a chunk at a time, each chunk's vectors read under a short
read of its own, so writers and the process's other threads get in between (measure_quality).
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


#: Live rows whose vectors are read per locked step of the exact search. hnswlib's ``get_items``
#: holds the GIL (about 5 µs an item on this machine), so reading every vector at once held it for
#: seconds at a million items: every other thread of the indexer, its HTTP API included, waited
#: (measured: /healthz 3 s at half a million items, a 10 s timeout at ~800k).
EXACT_CHUNK = 8192


def measure_quality(index: ItemIndex, sample_size: int = 256, k: int = 10, seed: int = 0,
                    queries: np.ndarray | None = None) -> QualityReport:
    """Recall@k of ``index`` on ``queries`` (shape (q, dim)) or, by default, on ``sample_size`` live item vectors.

    Item vectors as queries find themselves first, which flatters recall a little;
    pass real query vectors (e.g. recent user vectors) when you have them.

    The HNSW answers are taken under one read of the index; the exact top-k is then computed
    over the live rows of that moment, ``EXACT_CHUNK`` rows at a time, each chunk's vectors read
    under a short read of its own (queries and writes go on in between, and memory stays at one
    chunk). A row rewritten meanwhile is left out of the exact search: at most the rows of one
    measurement's duration, which the estimate can miss.
    """
    rng = np.random.default_rng(seed)
    with index._reading() as s:
        rows = s.live_rows()
        slots = s.hnsw.element_count
        deleted = (slots - len(rows)) / slots if slots else 0.0
        ef = s.params.ef
        if len(rows) == 0:
            return QualityReport(0.0, deleted, 0, 0, k, ef)
        gens = s.gen[rows]
        if queries is None:
            pick = rng.choice(len(rows), size=min(sample_size, len(rows)), replace=False)
            q = s.vectors(rows[pick])
        else:
            q = as_matrix(queries, s.params.dim, "queries")[:sample_size]
        kk = min(k, len(rows))
        approx = s.knn(q, kk)
        space = s.params.space
    exact = _exact_top(index, rows, gens, q, kk, space)
    hits = 0
    for (got, _), want in zip(approx, exact):
        hits += len(np.intersect1d(got.astype(np.uint64), want))
    recall = hits / (kk * len(q)) if len(q) else 0.0
    return QualityReport(recall, deleted, len(rows), len(q), k, ef)


def _exact_top(index: ItemIndex, rows: np.ndarray, gens: np.ndarray, queries: np.ndarray, k: int,
               space: str) -> np.ndarray:
    """Labels of the exact top-k of every query over ``rows`` at generations ``gens``, shape (q, k)."""
    if space == "cosine":
        queries = queries / np.where((n := np.linalg.norm(queries, axis=1, keepdims=True)) > 0, n, 1)
    best = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_labels = np.zeros((len(queries), k), dtype=np.uint64)
    for start in range(0, len(rows), EXACT_CHUNK):
        r, g = rows[start:start + EXACT_CHUNK], gens[start:start + EXACT_CHUNK]
        with index._reading() as s:
            same = s.live[r] & (s.gen[r] == g)  # still the vector the HNSW answers saw
            r, g = r[same], g[same]
            vectors = s.vectors(r)
        if not len(r):
            continue
        if space == "cosine":
            vectors = vectors / np.where((n := np.linalg.norm(vectors, axis=1, keepdims=True)) > 0, n, 1)
        sims = queries @ vectors.T
        if space == "l2":  # the same order as -|q - v|^2 for a fixed q
            sims = 2 * sims - (vectors * vectors).sum(axis=1)[None, :]
        candidates = np.concatenate([best, sims.astype(np.float32)], axis=1)
        labels = np.concatenate([best_labels, np.broadcast_to(labels_of(r, g), sims.shape)], axis=1)
        top = np.argpartition(-candidates, k - 1, axis=1)[:, :k]
        best = np.take_along_axis(candidates, top, axis=1)
        best_labels = np.take_along_axis(labels, top, axis=1)
    return best_labels


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
