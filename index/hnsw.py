"""``ItemIndex``: an updatable HNSW index of item vectors keyed by string ids.

Guarantees (see docs/index.md for the long form):

* **Updates.** ``upsert`` inserts new ids and replaces the vector and metadata of
  existing ones; ``delete`` removes ids. Vacated hnswlib slots are reused by later
  inserts (``allow_replace_deleted``), so the graph does not grow with churn;
  capacity doubles automatically when it is full.
* **Concurrency.** Any number of threads may call ``query``/``get``/``stats`` at
  the same time; writes (``upsert``, ``delete``, ``reencode``, the swap of a
  ``rebuild``) are serialised, and each write chunk (at most ``write_batch`` new
  items or ``write_batch / 8`` updates) holds the graph exclusively; the lock is
  phase-fair, so a query waits for at most one chunk. A query
  sees every write that returned before it started, never a deleted id, never
  a half-applied chunk. A multi-chunk ``upsert`` becomes visible chunk by chunk.
* **Snapshots.** ``snapshot`` copies the graph and tables (queries keep running;
  writers wait for the copy only) and writes the copy atomically outside any lock.
* **Re-encoding.** Every entry carries the model version that encoded it;
  ``reencode`` refreshes stale entries in bounded batches, or, when most of the
  index is stale, builds a fresh graph beside the live one and swaps it in.
  Writes made while a rebuild is building are replayed onto the fresh graph before
  the swap, so none are lost. Until re-encoding finishes, a query may return items
  encoded by different model versions; each ``Hit`` says which.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Sequence

import numpy as np

from . import snapshot as _snapshot
from ._rwlock import RWLock
from ._store import SPACES, Params, Store, as_matrix
from .errors import InvalidInputError, RebuildInProgressError
from .types import Block, Entry, EntryMeta, Hit

UPDATE_COST = 8
"""Replacing an id costs about this many inserts (hnswlib retire + slot reuse, measured ~6-8x)."""

EncodeFn = Callable[[list[str]], np.ndarray]
"""Maps a list of item ids to their vectors, shape (len(ids), dim)."""


def now_ms() -> int:
    return int(time.time() * 1000)


class ItemIndex:
    """An HNSW index (hnswlib) over item vectors with string ids, safe to query while it is written.

    Args:
        dim: vector dimension.
        space: ``"ip"`` (inner product; use it for L2-normalised vectors), ``"cosine"`` or ``"l2"``.
        M, ef_construction: hnswlib graph parameters.
        ef: search breadth; hnswlib searches with ``max(ef, k)``.
        initial_capacity: hnswlib slots allocated up front; doubled when full.
        num_threads: threads hnswlib uses for one ``add_items`` call or a batch of queries.
        write_batch: largest number of new items (or ``write_batch / 8`` replaced
            ones) written while holding the graph exclusively; bounds how long a
            query can wait behind a write.
        seed: hnswlib's random seed (level assignment).
    """

    def __init__(self, dim: int, *, space: str = "ip", M: int = 16, ef_construction: int = 200, ef: int = 64,
                 initial_capacity: int = 1024, num_threads: int = 1, write_batch: int = 64, seed: int = 100) -> None:
        if dim <= 0:
            raise InvalidInputError(f"dim must be positive, got {dim}")
        if space not in SPACES:
            raise InvalidInputError(f"space must be one of {SPACES}, got {space!r}")
        if ef <= 0 or M <= 1 or ef_construction <= 0 or write_batch <= 0 or num_threads == 0:
            raise InvalidInputError("ef, M, ef_construction, write_batch must be positive and num_threads non-zero")
        params = Params(dim=dim, space=space, M=M, ef_construction=ef_construction, ef=ef, seed=seed)
        self._init(Store(params, capacity=initial_capacity, num_threads=num_threads), initial_capacity, write_batch)

    def _init(self, store: Store, initial_capacity: int, write_batch: int) -> None:
        self._s = store
        self._initial_capacity = initial_capacity
        self.write_batch = write_batch
        self._rw = RWLock()  # guards the graph: queries share it, write chunks hold it alone
        self._writer = threading.Lock()  # one writer at a time, across the chunks of a call
        self._snapshotting = threading.Lock()
        self._journal: dict[str, tuple[np.ndarray, EntryMeta] | None] | None = None

    # ---------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        return self._s.params.dim

    @property
    def space(self) -> str:
        return self._s.params.space

    @property
    def ef(self) -> int:
        return self._s.params.ef

    @ef.setter
    def ef(self, value: int) -> None:
        if value <= 0:
            raise InvalidInputError(f"ef must be positive, got {value}")
        with self._writer, self._rw.write():
            s = self._s
            s.params = Params(**{**s.params.__dict__, "ef": int(value)})
            s.hnsw.set_ef(int(value))

    @property
    def capacity(self) -> int:
        """hnswlib slots allocated (live + deleted + free)."""
        return self._s.capacity

    def __len__(self) -> int:
        """Number of live items."""
        return self._s.size

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._s.row_of

    def ids(self) -> list[str]:
        """The live ids, in no particular order (a copy)."""
        with self._rw.read():
            return list(self._s.row_of)

    def deleted_share(self) -> float:
        """Share of used hnswlib slots that hold deleted nodes waiting for reuse."""
        with self._rw.read():
            s = self._s
            slots = s.hnsw.element_count
            return s.deleted_slots / slots if slots else 0.0

    def stats(self) -> dict[str, float]:
        """Plain numbers for the metrics layer."""
        with self._rw.read():
            s = self._s
            slots = s.hnsw.element_count
            return {"live": float(s.size), "slots": float(slots), "capacity": float(s.capacity),
                    "deleted_slots": float(s.deleted_slots),
                    "deleted_share": s.deleted_slots / slots if slots else 0.0, "ef": float(s.params.ef)}

    # -------------------------------------------------------------------- writes
    def upsert(self, ids: Sequence[str], vectors: np.ndarray, meta: Sequence[EntryMeta] | EntryMeta) -> None:
        """Insert new ids, replace the vectors and metadata of existing ones.

        Args:
            ids: item ids; if an id repeats, its last occurrence wins.
            vectors: shape (len(ids), dim), converted to float32; must be finite.
            meta: one ``EntryMeta`` per id, or one for all.

        Raises InvalidInputError (nothing written) on malformed input. If hnswlib
        fails mid-chunk (out of memory), that chunk's ids are removed, not half
        written, and the error propagates.
        """
        ids, vecs, metas = self._validated(ids, vectors, meta)
        if not ids:
            return
        with self._writer:
            self._write(ids, vecs, metas)

    def _write(self, ids: list[str], vecs: np.ndarray, metas: list[EntryMeta]) -> None:
        """Apply in chunks of at most ``write_batch`` insert-equivalents. Caller holds ``_writer``.

        Replacing an existing id costs about UPDATE_COST inserts in hnswlib, so a
        chunk holds ``write_batch`` new ids or ``write_batch / UPDATE_COST`` updates:
        either way the graph is held exclusively for about the same short time.
        """
        row_of = self._s.row_of
        start, budget = 0, 0
        for j, item_id in enumerate(ids):
            budget += UPDATE_COST if item_id in row_of else 1
            if budget >= self.write_batch:
                self._write_chunk(ids[start:j + 1], vecs[start:j + 1], metas[start:j + 1])
                start, budget = j + 1, 0
        if start < len(ids):
            self._write_chunk(ids[start:], vecs[start:], metas[start:])

    def _write_chunk(self, ids: list[str], vecs: np.ndarray, metas: list[EntryMeta]) -> None:
        """Caller holds ``_writer``."""
        with self._rw.write():
            self._s.upsert(ids, vecs, metas)
        if self._journal is not None:
            for i, item_id in enumerate(ids):
                self._journal[item_id] = (vecs[i].copy(), metas[i])

    def delete(self, ids: Collection[str]) -> int:
        """Remove ``ids``; unknown ids are ignored. Returns how many were actually removed."""
        if isinstance(ids, str):
            raise InvalidInputError("delete() takes a collection of ids, not one string")
        ids = list(dict.fromkeys(ids))
        removed = 0
        with self._writer:
            for start in range(0, len(ids), self.write_batch):
                chunk = ids[start:start + self.write_batch]
                with self._rw.write():
                    removed += self._s.delete(chunk)
                if self._journal is not None:
                    for item_id in chunk:
                        self._journal[item_id] = None
        return removed

    def _validated(self, ids: Sequence[str], vectors: np.ndarray,
                   meta: Sequence[EntryMeta] | EntryMeta) -> tuple[list[str], np.ndarray, list[EntryMeta]]:
        if isinstance(ids, str):
            raise InvalidInputError("ids must be a sequence of strings, not one string")
        ids = list(ids)
        vecs = as_matrix(vectors, self.dim)
        if len(vecs) != len(ids):
            raise InvalidInputError(f"{len(ids)} ids but {len(vecs)} vectors")
        if isinstance(meta, EntryMeta):
            metas = [meta] * len(ids)
        else:
            metas = list(meta)
            if len(metas) != len(ids):
                raise InvalidInputError(f"{len(ids)} ids but {len(metas)} metadata entries")
            if not all(isinstance(m, EntryMeta) for m in metas):
                raise InvalidInputError("meta must be EntryMeta instances")
        try:  # the store keeps them in int64 columns: check before anything is written
            np.array([(m.model_version, m.encoded_at_ms, m.event_ts_ms) for m in metas], dtype=np.int64)
        except (OverflowError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"meta: model_version, encoded_at_ms and event_ts_ms must be 64-bit integers "
                                    f"({exc})") from None
        if not all(type(i) is str for i in ids):
            if not all(isinstance(i, str) for i in ids):
                raise InvalidInputError("item ids must be str")
            ids = [str(i) for i in ids]  # str subclasses such as numpy.str_
        last = {item_id: j for j, item_id in enumerate(ids)}
        if len(last) != len(ids):  # duplicates: keep each id's last occurrence, in order
            keep = sorted(last.values())
            ids = [ids[j] for j in keep]
            vecs = vecs[keep]
            metas = [metas[j] for j in keep]
        return ids, vecs, metas

    # --------------------------------------------------------------------- reads
    def query(self, vectors: np.ndarray, k: int, exclude: Collection[str] | None = None,
              filter: Callable[[Hit], bool] | None = None, explore: int = 0,
              threads: int = 0) -> list[list[Hit]]:
        """The ``k`` most similar live items for each query vector, best first.

        Args:
            vectors: shape (dim,) or (q, dim).
            k: results wanted per query.
            exclude: ids never to return (e.g. items the user has seen); the search
                fetches ``k`` plus the excluded ids present, so exclusions do not
                shorten the result.
            filter: predicate on a ``Hit``; the search widens (x4 per round) until
                ``k`` hits pass or the whole index was searched.
            explore: candidates to search for at least (hnswlib's search breadth is
                ``max(ef, candidates)``), of which the best ``k`` are returned: a wider
                search without building hits that are dropped.

        Returns one list per query vector, fewer than ``k`` hits when fewer live
        items qualify (never raises for that).
        """
        if k < 0:
            raise InvalidInputError(f"k must be non-negative, got {k}")
        vecs = as_matrix(vectors, self.dim, "query vectors")
        with self._rw.read():
            return self._s.query(vecs, int(k), exclude, filter, int(explore), int(threads))

    def query_block(self, vectors: np.ndarray, k: int, explore: int = 0, threads: int = 0) -> Block | None:
        """What :meth:`query` returns without ``exclude`` or ``filter``, as columns (a
        :class:`~streamrecall.index.types.Block` of shape (queries, k): ids, JSON members,
        scores), for callers that encode answers without a Python object per hit
        (index/json_rows.py). None when some query needs :meth:`query`'s care (hnswlib could not
        fill its search, or a stale node is among its first ``k``): ask :meth:`query` then.
        """
        if k < 0:
            raise InvalidInputError(f"k must be non-negative, got {k}")
        vecs = as_matrix(vectors, self.dim, "query vectors")
        with self._rw.read():
            return self._s.query_block(vecs, int(k), int(explore), int(threads))

    def get(self, item_id: str) -> Entry | None:
        """The stored vector and metadata of ``item_id``, or None if it is not in the index."""
        with self._rw.read():
            return self._s.get(item_id)

    def meta(self, item_id: str) -> EntryMeta | None:
        """Metadata only (no vector copy)."""
        with self._rw.read():
            row = self._s.row_of.get(item_id)
            return None if row is None else self._s.meta(row)

    @contextmanager
    def _reading(self) -> Iterator[Store]:
        """The store under the shared lock, for code in this package (quality monitor)."""
        with self._rw.read():
            yield self._s

    # ------------------------------------------------------------ model versions
    def stale_share(self, current_version: int) -> float:
        """Share of live items encoded by a model version older than ``current_version``."""
        with self._rw.read():
            s = self._s
            rows = s.live_rows()
            if len(rows) == 0:
                return 0.0
            return float(np.count_nonzero(s.model_version[rows] < current_version)) / len(rows)

    def all_at_version(self, version: int) -> bool:
        """Whether every item's vector was encoded by model ``version`` (O(1); True when empty)."""
        with self._rw.read():
            return self._s.all_at(version)

    def version_counts(self) -> dict[int, int]:
        """Live items per model version (O(versions held), not O(items))."""
        with self._rw.read():
            return {v: n for v, n in self._s.at_version.items() if n > 0}

    # -------------------------------------------------------------------- drift
    def add_drift(self, ids: Sequence[str], amounts: np.ndarray, *, below_version: int | None = None) -> None:
        """Add ``amounts`` — how far the model may have moved each vector since it was written
        (absolute; :meth:`TowerReplica.items_drift`) — to the drift of ``ids``, kept relative to each
        vector's norm; with ``below_version``, only to vectors encoded by an older version (one written
        since by that version already holds the move). Writing an item resets its drift; unknown ids
        are ignored."""
        amounts = np.asarray(amounts, dtype=np.float32)
        if len(amounts) != len(ids):
            raise InvalidInputError(f"{len(amounts)} drift amounts for {len(ids)} ids")
        with self._writer:
            self._s.add_drift(ids, amounts, below_version)

    def measure_drift(self, ids: Sequence[str], vectors: np.ndarray) -> np.ndarray:
        """The exact drift of ``ids``: how far ``vectors`` — what the model encodes for them now — are
        from their stored vectors, relative to the stored norm; it replaces their estimated drift (which
        sums the rows' shifts, an upper bound: measured on synthetic streams 4-12x the true move).
        Returns it per id, NaN for ids not in the index. Reads the stored vectors (~5 µs an item)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(ids), self.dim):
            raise InvalidInputError(f"vectors must have shape ({len(ids)}, {self.dim}), got {vectors.shape}")
        with self._writer:
            return self._s.measure_drift(ids, vectors)

    def drifted(self, bound: float, limit: int) -> list[str]:
        """Up to ``limit`` ids whose drift exceeds ``bound``: the most retrieved first, then the most drifted."""
        with self._rw.read():
            s = self._s
            rows = s.live_rows()
            rows = rows[s.drift[rows] > bound]
            if len(rows) > limit:  # the first ``limit`` by retrievals; ties (most items: never) by drift
                retrieved = s.retrieved[rows]
                cut = retrieved[np.argpartition(-retrieved, limit - 1)[limit - 1]]
                above, ties = rows[retrieved > cut], rows[retrieved == cut]
                take = limit - len(above)
                if len(ties) > take:
                    ties = ties[np.argpartition(-s.drift[ties], take - 1)[:take]]
                rows = np.concatenate([above, ties])
            order = np.lexsort((-s.drift[rows], -s.retrieved[rows]))
            return s.ids[rows[order]].tolist()

    def drift_stats(self, bound: float) -> tuple[float, float]:
        """(mean drift, share of items whose drift exceeds ``bound``) over the live items."""
        with self._rw.read():
            s = self._s
            drift = s.drift[s.live_rows()]
            if len(drift) == 0:
                return 0.0, 0.0
            return float(drift.mean()), float(np.count_nonzero(drift > bound)) / len(drift)

    def decay_retrieved(self, factor: float) -> None:
        """Multiply every retrieval count by ``factor`` (so "most retrieved" means lately)."""
        with self._rw.read():
            s = self._s
            s.retrieved[: s.nrows] *= np.float32(factor)

    def stale_ids(self, current_version: int, limit: int) -> list[str]:
        """Up to ``limit`` ids encoded by an older version, oldest version (then oldest encoding) first."""
        with self._rw.read():
            s = self._s
            rows = s.live_rows()
            rows = rows[s.model_version[rows] < current_version]
            if len(rows) > limit:
                order = np.lexsort((s.encoded_at_ms[rows], s.model_version[rows]))[:limit]
                rows = rows[order]
            return s.ids[rows].tolist()

    def reencode(self, encode_fn: EncodeFn, current_version: int, batch_size: int = 1024, *,
                 rebuild_threshold: float = 0.5, max_items: int | None = None,
                 clock: Callable[[], int] = now_ms) -> int:
        """Re-encode items whose vectors come from a model version older than ``current_version``.

        ``encode_fn`` is called on at most ``batch_size`` ids at a time and must
        return their vectors under ``current_version``; queries and other writes go
        on between batches. Re-encoded entries keep their ``event_ts_ms`` and
        categories and get ``model_version=current_version``, ``encoded_at_ms=clock()``.
        An id deleted or re-upserted with a newer version while its batch was being
        encoded is left alone.

        When the stale share is at least ``rebuild_threshold`` (and ``max_items`` is
        None) the whole index is rebuilt instead: stale items are encoded, current
        ones copied, into a fresh graph that is swapped in atomically — an insert
        costs ~7x less than an in-place update. Otherwise at most ``max_items``
        (default: all) stale items are updated in place.

        Returns the number of items re-encoded.
        """
        if batch_size <= 0:
            raise InvalidInputError(f"batch_size must be positive, got {batch_size}")
        share = self.stale_share(current_version)
        if share == 0.0:
            return 0
        if max_items is None and share >= rebuild_threshold:
            return self._reencode_by_rebuild(encode_fn, current_version, batch_size, clock)
        done = 0
        while max_items is None or done < max_items:
            n = batch_size if max_items is None else min(batch_size, max_items - done)
            ids = self.stale_ids(current_version, n)
            if not ids:
                break
            vecs = self._encoded(encode_fn, ids)
            done += self._apply_reencoded(ids, vecs, current_version, clock())
        return done

    def _encoded(self, encode_fn: EncodeFn, ids: list[str]) -> np.ndarray:
        vecs = as_matrix(encode_fn(ids), self.dim, "encoded vectors")
        if len(vecs) != len(ids):
            raise InvalidInputError(f"encode_fn returned {len(vecs)} vectors for {len(ids)} ids")
        return vecs

    def _apply_reencoded(self, ids: list[str], vecs: np.ndarray, version: int, encoded_at: int) -> int:
        with self._writer:
            s = self._s
            keep, metas = [], []
            for j, item_id in enumerate(ids):
                row = s.row_of.get(item_id)
                if row is not None and s.model_version[row] < version:
                    keep.append(j)
                    old = s.meta(row)
                    metas.append(EntryMeta(version, encoded_at, old.event_ts_ms, old.categories))
            self._write([ids[j] for j in keep], vecs[keep], metas)
            return len(keep)

    # ------------------------------------------------------------------ rebuilds
    @contextmanager
    def _journaling(self) -> Iterator[None]:
        """Record every write from now on, so a fresh graph can catch up before the swap."""
        with self._writer:
            if self._journal is not None:
                raise RebuildInProgressError("a rebuild is already building")
            self._journal = {}
        try:
            yield
        finally:
            with self._writer:
                self._journal = None

    def _fresh_store(self, n: int) -> Store:
        s = self._s
        return Store(s.params, capacity=max(self._initial_capacity, int(n * 1.05) + 16), num_threads=s.num_threads)

    def _swap_in(self, fresh: Store) -> None:
        """Replay the journal onto ``fresh`` and make it the live store. Caller is inside ``_journaling``."""
        with self._writer:
            journal = self._journal or {}
            upserts = [(i, v) for i, v in journal.items() if v is not None]
            deletes = [i for i, v in journal.items() if v is None]
            fresh.delete(deletes)
            for start in range(0, len(upserts), self.write_batch):
                part = upserts[start:start + self.write_batch]
                fresh.upsert([i for i, _ in part], np.stack([v[0] for _, v in part]), [v[1] for _, v in part])
            self._journal = {}
            with self._rw.write():
                self._s = fresh

    def rebuild(self, ids: Sequence[str], vectors: np.ndarray, meta: Sequence[EntryMeta] | EntryMeta) -> None:
        """Replace the whole content with ``ids``/``vectors``/``meta``, built into a fresh graph beside the live one.

        Queries are served from the old graph until the fresh one is swapped in
        atomically; writes made after ``rebuild`` was called are replayed onto the
        fresh graph before the swap. Ids not given (and not written meanwhile) are
        gone afterwards. Also compacts: the fresh graph has no deleted slots.
        """
        ids, vecs, metas = self._validated(ids, vectors, meta)
        with self._journaling():
            fresh = self._fresh_store(len(ids))
            step = max(self.write_batch, 4096)
            for start in range(0, len(ids), step):
                fresh.upsert(ids[start:start + step], vecs[start:start + step], metas[start:start + step])
            self._swap_in(fresh)

    def compact(self) -> None:
        """Rebuild from the stored vectors: drops every deleted slot, keeps versions and metadata."""
        def never_called(ids: list[str]) -> np.ndarray:
            raise AssertionError("compact() re-encodes nothing")

        self._reencode_by_rebuild(never_called, np.iinfo(np.int64).min, 4096, now_ms)

    def _reencode_by_rebuild(self, encode_fn: EncodeFn, version: int, batch_size: int,
                             clock: Callable[[], int]) -> int:
        with self._journaling():
            with self._rw.read():
                s = self._s
                rows = s.live_rows()
                ids = s.ids[rows].tolist()
                gens = s.gen[rows].copy()
                stale = s.model_version[rows] < version
                metas = [s.meta(r) for r in rows.tolist()]
                drift, retrieved = s.drift[rows].copy(), s.retrieved[rows].copy()
            fresh = self._fresh_store(len(ids))
            encoded = 0
            for start in range(0, len(ids), batch_size):
                sl = slice(start, start + batch_size)
                b_ids, b_rows, b_gens, b_stale, b_meta = ids[sl], rows[sl], gens[sl], stale[sl], metas[sl]
                vecs = np.empty((len(b_ids), self.dim), dtype=np.float32)
                present = np.ones(len(b_ids), dtype=bool)
                if b_stale.any():
                    idx = np.flatnonzero(b_stale)
                    vecs[idx] = self._encoded(encode_fn, [b_ids[j] for j in idx])
                    at = clock()
                    for j in idx.tolist():
                        m = b_meta[j]
                        b_meta[j] = EntryMeta(version, at, m.event_ts_ms, m.categories)
                    encoded += len(idx)
                if (~b_stale).any():
                    idx = np.flatnonzero(~b_stale)
                    with self._rw.read():  # copy current vectors; skip ids rewritten since (the journal has them)
                        live = self._s
                        same = (live.gen[b_rows[idx]] == b_gens[idx]) & live.live[b_rows[idx]]
                        idx_same = idx[same]
                        vecs[idx_same] = live.vectors(b_rows[idx_same])
                    present[idx[~same]] = False
                keep = np.flatnonzero(present).tolist()
                kept_ids = [b_ids[j] for j in keep]
                fresh.upsert(kept_ids, vecs[keep], [b_meta[j] for j in keep])
                # what the items carry besides their vectors: retrieval counts, and the drift of copied ones
                f_rows = np.fromiter((fresh.row_of[i] for i in kept_ids), dtype=np.intp, count=len(kept_ids))
                src = start + np.asarray(keep, dtype=np.intp)
                fresh.retrieved[f_rows] = retrieved[src]
                fresh.drift[f_rows] = np.where(stale[src], np.float32(0.0), drift[src])
            self._swap_in(fresh)
        return encoded

    # ----------------------------------------------------------------- snapshots
    def snapshot(self, path: Path, offsets: dict[str, Any]) -> Path:
        """Write index, ids, metadata and ``offsets`` atomically as the current snapshot under ``path``.

        ``offsets`` is an opaque JSON-able dict holding the *next offset to read*
        for each topic/partition whose effects the index holds, e.g.
        ``{"items": {"0": 123}}``; ``load`` hands it back. The snapshot contains
        every write that returned before this call (and possibly later ones,
        which replay makes harmless: upserts are idempotent).

        Queries are not stopped: the graph is copied under the shared lock (writers
        wait for the copy), then written and fsynced outside any lock. A crash
        at any point leaves the previous snapshot loadable. Returns the new
        snapshot directory.
        """
        with self._snapshotting:
            with self._writer, self._rw.read():
                frozen = self._s.copy()
            return _snapshot.write(frozen, Path(path), offsets)

    @classmethod
    def load(cls, path: Path, *, num_threads: int = 1, write_batch: int = 64,
             initial_capacity: int = 1024) -> tuple["ItemIndex", dict[str, Any]]:
        """Load the current snapshot under ``path``; returns the index and the offsets to resume from.

        Raises SnapshotError when there is no snapshot or it fails its checks.
        """
        store, offsets, _ = _snapshot.read(Path(path), num_threads=num_threads)
        self = cls.__new__(cls)
        self._init(store, initial_capacity, write_batch)
        return self, offsets
