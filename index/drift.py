"""Which index entries to re-encode next: how far each one's vector drifted, since when, how often retrieved.

After a sparse model update only some item vectors move, and most of them only a little: with the
FM, content-token rows shared by many items change with nearly every training step. Rewriting
every touched vector in place (an HNSW update costs about 8 inserts) made each delta re-encode a
quarter of the catalog. Instead the indexer measures each touched item's **drift** — how far the
vector stored in the index is from the one the current towers compute — and keeps the items with a
non-zero drift here, in a :class:`DriftQueue`. A budgeted writer takes them in priority order
(:meth:`DriftQueue.take`): items whose drift exceeds the bound first, the most retrieved of those
first, then the rest by drift, as the budget allows.

Drift is *relative*: ``‖stored − current‖ / ‖current‖`` (:func:`relative_drift`), so one bound
means the same for the two towers' unit vectors and the FM's unnormalised ones (0.05: the stored
vector is off by 5% of its length, about 3° of angle). It is exact, not an estimate: the indexer
encodes the touched items and compares (docs/roles.md says why that is cheaper than it sounds).

An entry keeps the version and time at which its vector first went stale (``since``): later
updates that move it further raise its drift, not its age. So :meth:`DriftQueue.staleness` can
say which share of the index has been out of date for more than N seconds or M versions.

Pure and thread-safe (one lock): the re-encoder thread writes, gauges and health read.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

#: A drift at or below this is "the vector is current" (float32 round-off of the same computation).
EXACT = 1e-6


def relative_drift(stored: np.ndarray, current: np.ndarray) -> np.ndarray:
    """(n,) ``‖stored − current‖ / ‖current‖`` row by row (a zero current vector: the absolute norm)."""
    diff = np.linalg.norm(np.asarray(stored, dtype=np.float32) - np.asarray(current, dtype=np.float32), axis=1)
    norm = np.linalg.norm(np.asarray(current, dtype=np.float32), axis=1)
    return diff / np.where(norm > 0, norm, 1.0)


@dataclass(frozen=True)
class Staleness:
    """What :meth:`DriftQueue.staleness` measures. ``stale_share``: share of ``total`` entries whose
    vector has been out of date for more than the age or version bound; ``mean_drift``: the mean
    relative drift over all ``total`` entries (current ones count 0); ``pending``: entries queued."""

    stale_share: float
    mean_drift: float
    pending: int
    over_bound: int


class DriftQueue:
    """Entries whose stored vector differs from the current towers', with their drift and age."""

    def __init__(self, initial: int = 1024) -> None:
        self._lock = threading.Lock()
        self._slot: dict[str, int] = {}
        self._ids: list[str | None] = [None] * initial
        self._drift = np.zeros(initial, dtype=np.float32)
        self._since_version = np.zeros(initial, dtype=np.int64)
        self._since_ms = np.zeros(initial, dtype=np.int64)
        self._used = np.zeros(initial, dtype=bool)
        self._free: list[int] = list(range(initial - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._slot

    def drift(self, item_id: str) -> float:
        """The drift recorded for ``item_id`` (0.0: not queued, its vector is current)."""
        with self._lock:
            slot = self._slot.get(item_id)
            return float(self._drift[slot]) if slot is not None else 0.0

    def record(self, ids: Sequence[str], drifts: np.ndarray, version: int, at_ms: int) -> None:
        """Set the drift of ``ids`` as measured against the towers of ``version`` at ``at_ms``.

        A drift at or below :data:`EXACT` removes the entry (its stored vector is current); a new
        entry is stale since (``version``, ``at_ms``); a queued one keeps its first ``since``."""
        drifts = np.asarray(drifts, dtype=np.float32)
        if len(drifts) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(drifts)} drifts")
        with self._lock:
            for item_id, d in zip(ids, drifts.tolist()):
                slot = self._slot.get(item_id)
                if d <= EXACT:
                    if slot is not None:
                        self._release(item_id, slot)
                    continue
                if slot is None:
                    slot = self._acquire(item_id)
                    self._since_version[slot] = version
                    self._since_ms[slot] = at_ms
                self._drift[slot] = d

    def discard(self, ids: Iterable[str]) -> None:
        """Forget ``ids`` (re-encoded, deleted, or rewritten with new content)."""
        with self._lock:
            for item_id in ids:
                slot = self._slot.get(item_id)
                if slot is not None:
                    self._release(item_id, slot)

    def clear(self) -> None:
        """Forget every entry (a rebuild re-encoded everything)."""
        with self._lock:
            for item_id, slot in list(self._slot.items()):
                self._release(item_id, slot)

    def take(self, n: int, bound: float, retrievals: "RetrievalCounts | None" = None) -> list[str]:
        """Up to ``n`` ids in re-encode order (they stay queued until :meth:`discard`): drift above
        ``bound`` first, most retrieved first among those (then the larger drift); then the rest by
        drift. Vectorised over the queue; the retrieval counts are read by walking the recently
        retrieved ids (decayed, so far fewer than a million-item queue), never by looking up every
        queued id (1.9 s for a million of them, measured)."""
        if n <= 0:
            return []
        recent = retrievals.items() if retrievals is not None else []
        with self._lock:
            hits = np.zeros(len(self._ids), dtype=np.int64)
            slot_of = self._slot.get
            for item_id, count in recent:
                slot = slot_of(item_id)
                if slot is not None:
                    hits[slot] = count
            over = self._used & (self._drift > bound)
            chosen: list[int] = []
            hot = np.flatnonzero(over & (hits > 0))
            if len(hot):
                chosen = hot[np.lexsort((-self._drift[hot], -hits[hot]))[:n]].tolist()  # last key is primary
            for pool in (np.flatnonzero(over & (hits == 0)), np.flatnonzero(self._used & ~over)):
                room = n - len(chosen)
                if room <= 0:
                    break
                if len(pool) > room:
                    pool = pool[np.argpartition(-self._drift[pool], room - 1)[:room]]
                chosen += pool[np.argsort(-self._drift[pool], kind="stable")].tolist()
            return [self._ids[s] for s in chosen]  # type: ignore[misc]

    def staleness(self, total: int, now_ms: int, version: int, max_age_s: float, max_versions: int,
                  bound: float) -> Staleness:
        """The staleness of an index of ``total`` entries at ``now_ms`` and model ``version``."""
        with self._lock:
            used = self._used
            late = (self._since_ms[used] < now_ms - max_age_s * 1000.0) | \
                   (self._since_version[used] < version - max_versions)
            drift = self._drift[used]
            stale, drifted, over = int(np.count_nonzero(late)), float(drift.sum(dtype=np.float64)), \
                int(np.count_nonzero(drift > bound))
        total = max(total, len(self._slot))
        return Staleness(stale / total if total else 0.0, drifted / total if total else 0.0,
                         len(self._slot), over)

    def oldest_version(self) -> int | None:
        """The smallest ``since`` version queued (None when the queue is empty)."""
        with self._lock:
            return int(self._since_version[self._used].min()) if self._slot else None

    # ------------------------------------------------------------------ slots
    def _acquire(self, item_id: str) -> int:
        if not self._free:
            n = len(self._ids)
            self._ids.extend([None] * n)
            self._drift = np.concatenate([self._drift, np.zeros(n, dtype=np.float32)])
            self._since_version = np.concatenate([self._since_version, np.zeros(n, dtype=np.int64)])
            self._since_ms = np.concatenate([self._since_ms, np.zeros(n, dtype=np.int64)])
            self._used = np.concatenate([self._used, np.zeros(n, dtype=bool)])
            self._free = list(range(2 * n - 1, n - 1, -1))
        slot = self._free.pop()
        self._slot[item_id] = slot
        self._ids[slot] = item_id
        self._used[slot] = True
        return slot

    def _release(self, item_id: str, slot: int) -> None:
        del self._slot[item_id]
        self._ids[slot] = None
        self._used[slot] = False
        self._drift[slot] = 0.0
        self._free.append(slot)


class RetrievalCounts:
    """How often each item was returned by the recall path, recently: a count per item id.

    Counted per answered query (O(k) under one lock, cheap next to the search). Bounded: at
    ``max_items`` ids, or at :meth:`decay`, every count is halved and the zeros dropped, so old
    popularity fades and memory stays at most ``max_items`` entries."""

    def __init__(self, max_items: int) -> None:
        if max_items <= 0:
            raise ValueError(f"max_items must be positive, got {max_items}")
        self.max_items = max_items
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._counts)

    def observe(self, ids: Iterable[str]) -> None:
        with self._lock:
            counts = self._counts
            for item_id in ids:
                counts[item_id] = counts.get(item_id, 0) + 1
            if len(counts) > self.max_items:
                self._halve()

    def items(self) -> list[tuple[str, int]]:
        """A copy of the (id, count) pairs (the ids retrieved lately)."""
        with self._lock:
            return list(self._counts.items())

    def counts(self, ids: Sequence[str]) -> np.ndarray:
        """(len(ids),) int64 counts (0 for an id never retrieved)."""
        with self._lock:
            get = self._counts.get
            return np.fromiter((get(i, 0) for i in ids), dtype=np.int64, count=len(ids))

    def decay(self) -> None:
        """Halve every count (called periodically, so the order follows recent traffic)."""
        with self._lock:
            self._halve()

    def discard(self, ids: Iterable[str]) -> None:
        with self._lock:
            for item_id in ids:
                self._counts.pop(item_id, None)

    def _halve(self) -> None:
        self._counts = {k: v // 2 for k, v in self._counts.items() if v > 1}
