"""The single-threaded core of the item index: one hnswlib graph and its id tables.

Nothing here locks; :class:`streamrecall.index.hnsw.ItemIndex` wraps a ``_Store``
with the locking, the rebuild journal and the snapshots.

Ids and labels
--------------
Every item id owns a *row* in a set of column arrays (id, generation, metadata).
Rows of deleted ids go onto a free list and are reused. The hnswlib label of an
item is ``generation << 32 | row``; the generation is bumped every time the row
gets a new vector, so a label is never handed to hnswlib twice. That matters:

* ``add_items(..., replace_deleted=True)`` with a label hnswlib already knows
  leaves two live nodes with that label (hnswlib 0.8.0), so slots are reused only
  for fresh labels;
* an update is ``mark_deleted(old label)`` + insert of a fresh label into a vacant
  slot, which costs about what hnswlib's in-place update costs (~6-8x an insert,
  measured) and keeps the graph from growing;
* a label coming back from a search is checked against the row's current
  generation, so a stale node can never be reported as a live item.

Every hnswlib slot is either live with the label its row names, or marked
deleted, hence ``deleted slots = element_count - live``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Callable, Collection, Sequence

import hnswlib
import numpy as np

from .errors import IndexStoreError, InvalidInputError
from .json_rows import item_members
from .types import Block, Entry, EntryMeta, Hit

ROW_BITS = 32
ROW_MASK = (1 << ROW_BITS) - 1
#: A Hit from a (id, score, version, categories) tuple, called from C: a third cheaper per hit than ``Hit(...)``.
_new_hit = partial(tuple.__new__, Hit)
MAX_GENERATION = (1 << 32) - 1
SPACES = ("ip", "cosine", "l2")
#: The per-row tables (arrays indexed by row).
COLUMNS = ("ids", "gen", "live", "model_version", "encoded_at_ms", "event_ts_ms", "categories", "members",
           "norm", "drift", "retrieved")


@dataclass(frozen=True)
class Params:
    dim: int
    space: str
    M: int
    ef_construction: int
    ef: int
    seed: int


def as_matrix(vectors: np.ndarray, dim: int, what: str = "vectors") -> np.ndarray:
    """Validate and return ``vectors`` as a C-contiguous float32 array of shape (n, dim)."""
    arr = np.asarray(vectors)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise InvalidInputError(f"{what} must have shape (n, {dim}) or ({dim},), got {np.shape(vectors)}")
    if not np.issubdtype(arr.dtype, np.number):
        raise InvalidInputError(f"{what} must be numeric, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"{what} contain NaN or infinite values")
    return arr


def labels_of(rows: np.ndarray, gens: np.ndarray) -> np.ndarray:
    return (gens.astype(np.uint64) << np.uint64(ROW_BITS)) | rows.astype(np.uint64)


class Store:
    """hnswlib graph + row tables. Not thread-safe: callers lock."""

    def __init__(self, params: Params, capacity: int, num_threads: int,
                 hnsw: hnswlib.Index | None = None) -> None:
        self.params = params
        self.num_threads = num_threads
        if hnsw is None:
            hnsw = hnswlib.Index(space=params.space, dim=params.dim)
            hnsw.init_index(max_elements=max(1, capacity), M=params.M, ef_construction=params.ef_construction,
                            random_seed=params.seed, allow_replace_deleted=True)
        hnsw.set_ef(params.ef)
        hnsw.set_num_threads(num_threads)
        self.hnsw = hnsw
        self.row_of: dict[str, int] = {}
        self.free: list[int] = []
        self.nrows = 0
        self._categories: dict[tuple[str, ...], tuple[str, ...]] = {}
        # Live rows per model version, kept as rows go live and die, so "is every vector of
        # version v" is one lookup (the API skips re-scoring then), not a scan of the index.
        self.at_version: Counter[int] = Counter()
        self._alloc_rows(max(16, capacity))

    # ----------------------------------------------------------------- tables
    def _alloc_rows(self, n: int) -> None:
        self.ids = np.empty(n, dtype=object)
        self.gen = np.zeros(n, dtype=np.uint32)
        self.live = np.zeros(n, dtype=bool)
        self.model_version = np.zeros(n, dtype=np.int64)
        self.encoded_at_ms = np.zeros(n, dtype=np.int64)
        self.event_ts_ms = np.zeros(n, dtype=np.int64)
        self.categories = np.empty(n, dtype=object)
        self.members = np.empty(n, dtype=object)  # each item's id and categories as JSON (json_rows.py)
        self.norm = np.zeros(n, dtype=np.float32)  # the vector's L2 norm when it was written
        # How far the model may have moved the item's vector since it was written, relative to its
        # norm (estimated from the rows updates moved: TowerReplica.items_drift); 0 when written.
        self.drift = np.zeros(n, dtype=np.float32)
        self.retrieved = np.zeros(n, dtype=np.float32)  # times returned by a query (decayed: decay_retrieved)

    def _grow_rows(self, need: int) -> None:
        cap = len(self.gen)
        if need <= cap:
            return
        new = max(need, 2 * cap)
        for name in COLUMNS:
            old = getattr(self, name)
            arr = np.zeros(new, dtype=old.dtype) if old.dtype != object else np.empty(new, dtype=object)
            arr[:cap] = old
            setattr(self, name, arr)

    def live_rows(self) -> np.ndarray:
        return np.flatnonzero(self.live[: self.nrows])

    def label(self, row: int) -> int:
        return (int(self.gen[row]) << ROW_BITS) | row

    @property
    def size(self) -> int:
        return len(self.row_of)

    @property
    def deleted_slots(self) -> int:
        return self.hnsw.element_count - len(self.row_of)

    @property
    def capacity(self) -> int:
        return self.hnsw.max_elements

    # ----------------------------------------------------------------- writes
    def upsert(self, ids: Sequence[str], vectors: np.ndarray, metas: Sequence[EntryMeta]) -> None:
        """Insert or replace ``ids`` (unique within the call) with ``vectors`` (n, dim) float32."""
        n = len(ids)
        if n == 0:
            return
        hnsw = self.hnsw
        existing = [self.row_of.get(i) for i in ids]
        for row in existing:  # updates: retire the old node; its slot becomes vacant
            if row is not None:
                hnsw.mark_deleted(self.label(row))
        # Live rows of the updated ids still count in row_of, so the slots just retired
        # are not in deleted_slots yet: add them back.
        vacant = self.deleted_slots + sum(1 for r in existing if r is not None)
        need = hnsw.element_count + max(0, n - vacant)
        if need > hnsw.max_elements:
            hnsw.resize_index(max(need, 2 * hnsw.max_elements))
        rows = np.empty(n, dtype=np.int64)
        for j, (item_id, row) in enumerate(zip(ids, existing)):
            if row is None:
                if self.free:
                    row = self.free.pop()
                else:
                    self._grow_rows(self.nrows + 1)
                    row = self.nrows
                    self.nrows += 1
                self.row_of[item_id] = row
                self.ids[row] = item_id
                self.retrieved[row] = 0.0
            rows[j] = row
        if int(self.gen[rows].max()) >= MAX_GENERATION:
            raise IndexStoreError("a row ran out of label generations (2**32 updates of one id)")
        self.gen[rows] += 1
        self._uncount(rows[self.live[rows]])
        self.live[rows] = False  # not visible until the insert below succeeded
        labels = labels_of(rows, self.gen[rows])
        try:
            hnsw.add_items(vectors, labels, num_threads=self.num_threads, replace_deleted=True)
        except BaseException:
            self._roll_back(ids, rows, labels)
            raise
        self.live[rows] = True
        self.norm[rows] = np.linalg.norm(vectors, axis=1)
        self.drift[rows] = 0.0
        self.model_version[rows] = [m.model_version for m in metas]
        self.at_version.update(m.model_version for m in metas)
        self.encoded_at_ms[rows] = [m.encoded_at_ms for m in metas]
        self.event_ts_ms[rows] = [m.event_ts_ms for m in metas]
        cats, interned, members = self.categories, self._categories, self.members
        for row, item_id, m in zip(rows.tolist(), ids, metas):
            c = m.categories if type(m.categories) is tuple else tuple(m.categories)
            cats[row] = interned.setdefault(c, c)  # one tuple object per distinct category set
            members[row] = item_members(item_id, c)

    def _roll_back(self, ids: Sequence[str], rows: np.ndarray, labels: np.ndarray) -> None:
        """After a failed insert: drop the whole chunk, so no half-written id stays visible."""
        for label in labels.tolist():
            try:
                self.hnsw.mark_deleted(label)
            except RuntimeError:
                pass  # this label never made it into the graph: nothing to retire
        for item_id, row in zip(ids, rows.tolist()):
            if self.row_of.pop(item_id, None) is not None:
                self._free_row(row)

    def _uncount(self, rows: np.ndarray) -> None:
        for version, n in Counter(self.model_version[rows].tolist()).items():
            self.at_version[version] -= n
            if self.at_version[version] <= 0:
                del self.at_version[version]

    def recount(self) -> None:
        """Rebuild ``at_version`` from the tables (after they were filled directly: a snapshot load)."""
        self.at_version = Counter(self.model_version[self.live_rows()].tolist())

    def all_at(self, version: int) -> bool:
        """Whether every live row's vector was encoded by model ``version`` (True when empty)."""
        return self.at_version.get(version, 0) == self.size

    def add_drift(self, ids: Sequence[str], amounts: np.ndarray, below_version: int | None = None) -> None:
        """Add ``amounts`` (absolute moves of the vectors of ``ids``; unknown ids ignored) to their drift,
        only to vectors encoded by a version below ``below_version`` when given."""
        rows = np.fromiter((self.row_of.get(i, -1) for i in ids), dtype=np.intp, count=len(ids))
        held = rows >= 0
        if below_version is not None:
            held &= self.model_version[np.where(held, rows, 0)] < below_version
        rows = rows[held]
        self.drift[rows] += amounts[held] / np.maximum(self.norm[rows], 1e-6)

    def measure_drift(self, ids: Sequence[str], vectors: np.ndarray) -> np.ndarray:
        """Set the drift of ``ids`` to how far ``vectors`` (what the model encodes now) are from the stored
        ones, relative to the stored norm (cosine: between the unit vectors hnswlib stores); returns it,
        NaN for unknown ids (left alone)."""
        rows = np.fromiter((self.row_of.get(i, -1) for i in ids), dtype=np.intp, count=len(ids))
        out = np.full(len(ids), np.nan, dtype=np.float32)
        held = np.flatnonzero(rows >= 0)
        if len(held) == 0:
            return out
        r, new = rows[held], np.asarray(vectors, dtype=np.float32)[held]
        if self.params.space == "cosine":
            new = new / np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
            scale = np.ones(len(r), dtype=np.float32)
        else:
            scale = np.maximum(self.norm[r], 1e-6)
        out[held] = np.linalg.norm(self.vectors(r) - new, axis=1) / scale
        self.drift[r] = out[held]
        return out

    def _free_row(self, row: int) -> None:
        if self.live[row]:
            self._uncount(np.asarray([row]))
        self.live[row] = False
        self.ids[row] = None
        self.categories[row] = None
        self.members[row] = None
        self.drift[row] = 0.0
        self.free.append(row)

    def delete(self, ids: Collection[str]) -> int:
        removed = 0
        for item_id in ids:
            row = self.row_of.pop(item_id, None)
            if row is None:
                continue
            self.hnsw.mark_deleted(self.label(row))
            self._free_row(row)
            removed += 1
        return removed

    # ------------------------------------------------------------------ reads
    def meta(self, row: int) -> EntryMeta:
        return EntryMeta(model_version=int(self.model_version[row]), encoded_at_ms=int(self.encoded_at_ms[row]),
                         event_ts_ms=int(self.event_ts_ms[row]), categories=self.categories[row])

    def get(self, item_id: str) -> Entry | None:
        row = self.row_of.get(item_id)
        if row is None:
            return None
        vec = np.asarray(self.hnsw.get_items([self.label(row)]), dtype=np.float32)[0]
        return Entry(item_id, vec, self.meta(row))

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Stored vectors of live ``rows``, shape (len(rows), dim)."""
        if len(rows) == 0:
            return np.empty((0, self.params.dim), dtype=np.float32)
        return np.asarray(self.hnsw.get_items(labels_of(rows, self.gen[rows])), dtype=np.float32)

    def knn(self, vectors: np.ndarray, k: int, threads: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
        """Raw hnswlib search, one (labels, distances) pair per query; never raises for "too few results".

        hnswlib raises when it finds fewer than k live nodes (possible after many
        deletions even when k <= live); then each query is retried alone with a
        halved k until it succeeds, and may return fewer than k.
        """
        block = self._knn_block(vectors, k, threads)
        return list(zip(*block)) if block is not None else self._knn_each(vectors, k)

    def _knn_each(self, vectors: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each query alone, as many results as hnswlib can fill (after one call for all of them failed)."""
        out = []
        for v in vectors:  # binary search for the largest k hnswlib can fill for this query
            best = (np.empty(0, np.uint64), np.empty(0, np.float32))
            lo, hi = 0, k + 1 if len(vectors) > 1 else k  # lo succeeds (trivially), hi fails
            while hi - lo > 1:
                mid = (lo + hi) // 2
                try:
                    labels, dists = self.hnsw.knn_query(v, k=mid, num_threads=1)
                    best, lo = (labels[0], dists[0]), mid
                except RuntimeError:
                    hi = mid
            out.append(best)
        return out

    def _knn_block(self, vectors: np.ndarray, k: int, threads: int) -> tuple[np.ndarray, np.ndarray] | None:
        """One hnswlib call: (queries, k) labels and distances; None when it cannot fill k for a query."""
        try:
            return self.hnsw.knn_query(vectors, k=k, num_threads=1 if len(vectors) == 1 else threads or self.num_threads)
        except RuntimeError:
            return None

    def scores_of(self, dists: np.ndarray) -> np.ndarray:
        return -dists if self.params.space == "l2" else 1.0 - dists

    def query(self, vectors: np.ndarray, k: int, exclude: Collection[str] | None,
              filter: Callable[[Hit], bool] | None, explore: int = 0, threads: int = 0) -> list[list[Hit]]:
        live = self.size
        if live == 0 or k <= 0:
            return [[] for _ in range(len(vectors))]
        excl_rows: set[int] = set()
        if exclude:
            row_of = self.row_of
            excl_rows = {r for r in (row_of.get(i) for i in exclude) if r is not None}
        want = max(k, explore)
        fetch = min(live, (want if filter is None else max(want, 2 * k)) + len(excl_rows))
        results: list[list[Hit]] = [[] for _ in range(len(vectors))]
        pending = np.arange(len(vectors))
        while True:
            block = self._knn_block(vectors[pending], fetch, threads)
            if block is not None:
                found = self._hits_block(block[0], block[1], k, excl_rows, filter)
                searched = [fetch] * len(found)
            else:  # hnswlib could not fill fetch for some query: each as far as it can
                pairs = self._knn_each(vectors[pending], fetch)
                found = [self._picked(*self._valid(labels, excl_rows), dists, k, filter) for labels, dists in pairs]
                searched = [len(labels) for labels, _ in pairs]
            again = []
            for qi, hits, n in zip(pending.tolist(), found, searched):
                results[qi] = hits
                if len(hits) < k and n >= fetch and fetch < live:
                    again.append(qi)  # the filter ate too much: search wider
            if not again:
                return results
            pending = np.asarray(again)
            fetch = min(live, fetch * 4)

    def query_block(self, vectors: np.ndarray, k: int, explore: int, threads: int) -> Block | None:
        """The first ``k`` of each query's ``max(k, explore)`` nearest as columns, without a Hit per row;
        None when hnswlib could not fill the search for some query, or some query's first ``k``
        hold a row that is not live at its label's generation (then :meth:`query` sorts it out)."""
        live = self.size
        if live == 0 or k <= 0:
            return None
        block = self._knn_block(vectors, min(live, max(k, explore)), threads)
        if block is None:
            return None
        labels, dists = block[0][:, :k], block[1][:, :k]
        rows, keep = self._valid(labels, set())
        if not keep.all():
            return None
        self.retrieved[rows] += 1.0  # a race between readers loses a count, never an item
        return Block(self.ids[rows], self.members[rows], self.scores_of(dists.astype(np.float64)))

    def _valid(self, labels: np.ndarray, excl_rows: set[int]) -> tuple[np.ndarray, np.ndarray]:
        """(rows, keep) of hnswlib ``labels`` (any shape): keep is a live row of the label's generation, not excluded."""
        labels = labels.astype(np.uint64, copy=False)
        rows = (labels & np.uint64(ROW_MASK)).astype(np.intp)
        gens = (labels >> np.uint64(ROW_BITS)).astype(np.uint32)
        in_range = rows < self.nrows
        rows = np.where(in_range, rows, 0)
        keep = in_range & self.live[rows] & (self.gen[rows] == gens)
        if excl_rows:
            keep &= ~np.isin(rows, np.fromiter(excl_rows, dtype=np.intp, count=len(excl_rows)))
        return rows, keep

    def _hits_block(self, labels: np.ndarray, dists: np.ndarray, k: int, excl_rows: set[int],
                    filter: Callable[[Hit], bool] | None) -> list[list[Hit]]:
        """Hits of every query of one hnswlib call: when each query's first ``k`` labels are all kept
        (the usual case: no deleted, stale or excluded item among them), read column-wise for the
        whole block, which a batch of queries shares; else query by query."""
        rows, keep = self._valid(labels, excl_rows)
        if filter is not None or not keep[:, :k].all():
            return [self._picked(rows[i], keep[i], dists[i], k, filter) for i in range(len(rows))]
        columns = self._columns(rows[:, :k], dists[:, :k])
        return [list(map(_new_hit, zip(*query))) for query in zip(*columns)]

    def _picked(self, rows: np.ndarray, keep: np.ndarray, dists: np.ndarray, k: int,
                filter: Callable[[Hit], bool] | None) -> list[Hit]:
        """One query's hits: its kept rows in order, the first ``k`` (that pass ``filter``)."""
        picked = np.flatnonzero(keep)
        if filter is None:
            picked = picked[:k]  # only the hits returned are built (a query may search wider than k)
        hits = map(_new_hit, zip(*self._columns(rows[picked], dists[picked])))
        if filter is None:
            return list(hits)
        out: list[Hit] = []
        for hit in hits:
            if filter(hit):
                out.append(hit)
                if len(out) == k:
                    break
        return out

    def _columns(self, rows: np.ndarray, dists: np.ndarray) -> tuple[list, list, list, list]:
        """Ids, scores, versions and categories of ``rows`` (one query's, or a block's: nested lists)."""
        self.retrieved[rows] += 1.0
        return (self.ids[rows].tolist(), self.scores_of(dists.astype(np.float64)).tolist(),
                self.model_version[rows].tolist(), self.categories[rows].tolist())

    # --------------------------------------------------------------- copying
    def copy(self) -> "Store":
        """A deep copy (graph and tables) for snapshots; costs about one memcpy of the index."""
        dup = Store.__new__(Store)
        dup.params = self.params
        dup.num_threads = self.num_threads
        dup.hnsw = hnswlib.Index(self.hnsw)
        dup.row_of = dict(self.row_of)
        dup.free = list(self.free)
        dup._categories = dict(self._categories)
        dup.at_version = Counter(self.at_version)
        dup.nrows = self.nrows
        n = self.nrows
        for name in COLUMNS:
            setattr(dup, name, getattr(self, name)[:n].copy())
        return dup
