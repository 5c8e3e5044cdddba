"""What one indexer replica holds in memory, and the rules that change it.

The indexer keeps, side by side:

* ``catalog`` — the latest content of every live item (the ``Item`` events), so items can
  be re-encoded when the item tower changes and the index can be rebuilt from scratch;
* ``replica`` — the towers at the latest model version read from ``model-updates``;
* ``index`` — the HNSW :class:`~streamrecall.index.ItemIndex` of item vectors;
* ``users`` — the latest vector of the ``max_user_vectors`` users most recently written to the
  compacted ``user-vectors`` topic (the least recently written forgotten beyond it: such a user is
  answered like an unknown one, from trending, until its next vector arrives).

**Locking.** ``lock`` serialises every change of the replica, the catalog and the index made
by this role: the poll loop holds it for one micro-batch of items (encode + upsert) or one
model update, the background re-encoder for the writes of a few items: it encodes without it
(:meth:`encode_current`, reading the towers under ``model_lock``) and, holding it, writes only
the items the catalog still holds as it encoded them, at the version that encoded them. So an
item is never re-encoded from content the poll loop has just replaced, nor written with a tower
halfway through (or behind) an update. Queries never take it: the index is safe to query while it is written
(see docs/index.md), and the user table is replaced entry by entry. Queries encode with the
towers (``consumers/roles/indexer/scoring.py``) under ``model_lock`` for reading; applying an update holds
it for writing, so a query never sees a half-applied update.

**Model versions.** An update after which every vector changes (a full update, or a delta
with new dense layers) starts a new *epoch*. Vectors of one epoch share one space (the dense
layers): a delta changes only the items whose sparse rows moved, and only those are
re-encoded, so an untouched item may keep an older ``model_version`` tag while its vector
is exactly what the current tower computes. ``served_epoch`` is the epoch whose re-encode
into the index is complete; a user vector is *compatible* with the index when it was
computed in that epoch.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from typing import Any, Collection, Iterable, Sequence

import numpy as np

from streamrecall.bounded import LRUMap
from streamrecall.consumers.recall_api.users import UserEntry
from streamrecall.consumers.recall_api.rules import popular_overfetch
from streamrecall.consumers.roles.indexer.metrics import IndexerMetrics
from streamrecall.consumers.roles.indexer.newest import NewestItems
from streamrecall.consumers.roles.indexer.options import IndexerOptions
from streamrecall.consumers.roles.indexer.scoring import ItemVectorCache
from streamrecall.events import Item, event_time
from streamrecall.index import EntryMeta, ItemIndex, RWLock
from streamrecall.metrics import STATE, StateMetrics
from streamrecall.model.config import ModelConfig
from streamrecall.model.replica import DEFAULT_MAX_VERSION_JUMP, TowerReplica

log = logging.getLogger(__name__)


def now_ms() -> int:
    return int(time.time() * 1000)


def batches(seq: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


class IndexerState:
    """Catalog, replica, index and users of one indexer, with the writes the role makes to them."""

    def __init__(self, config: IndexerOptions, model: ModelConfig, metrics: IndexerMetrics,
                 index: ItemIndex | None = None, max_version_jump: int = DEFAULT_MAX_VERSION_JUMP,
                 states: StateMetrics = STATE) -> None:
        self.config = config
        self.metrics = metrics
        self.states = states
        self.replica = TowerReplica(model, max_version_jump)
        self.index = index if index is not None else ItemIndex(
            model.dim, space="ip", M=config.M, ef_construction=config.ef_construction, ef=config.ef)
        self.catalog: dict[str, Item] = {}  # written with self.newest alongside (upsert/delete/replace_catalog)
        # as many as the recent route asks for at most: k, or its over-fetch with a category cap
        self.newest = NewestItems(popular_overfetch(config.max_k))
        self.users: LRUMap[str, UserEntry] = LRUMap(config.max_user_vectors)
        self.lock = threading.RLock()
        # The towers: applying an update writes them, query-time encodes read them (queries never
        # take ``lock``). Writers take it inside ``lock``; it is not reentrant.
        self.model_lock = RWLock()
        self.item_vectors = ItemVectorCache(config.item_vector_cache_items)  # current-version vectors of recent candidates
        self.epochs: list[int] = [0]    # versions that started an epoch (0: the seeded weights)
        self.served_epoch = 0           # the epoch whose re-encode into the index is complete
        self.last_full: tuple[int, int] | None = None  # (partition, offset) of the last full update applied
        # When each version was made (its created_at_ms), for the staleness gauges; pruned to the
        # versions the index holds. A version applied before this run started is unknown here.
        self.version_times: dict[int, int] = {}

    # ------------------------------------------------------------------ items
    def upsert_items(self, items: Sequence[Item], fresh: Collection[str] = ()) -> None:
        """Encode ``items`` with the current item tower and upsert them, in micro-batches.

        Freshness (event time to searchable) is observed for the ids in ``fresh`` only: events new
        to this indexer (see :meth:`is_new`), so replays and re-reads do not count against the SLO."""
        m = self.metrics
        for chunk in batches(items, self.config.encode_batch):
            with self.lock:
                started = time.perf_counter()
                vectors = self.replica.encode_items(chunk)
                encoded = time.perf_counter()
                version, at = self.replica.version, now_ms()
                metas = [EntryMeta(version, at, it.created_at, tuple(it.categories)) for it in chunk]
                self.index.upsert([it.item_id for it in chunk], vectors, metas)
                for it in chunk:
                    old = self.catalog.get(it.item_id)
                    self.catalog[it.item_id] = it
                    self.newest.upserted(it, old, len(self.catalog))
            done = time.perf_counter()
            m.encode_seconds.observe(encoded - started)
            m.upsert_seconds.observe(done - encoded)
            m.upserts.labels("item").inc(len(chunk))
            searchable_ms = now_ms()
            for it in chunk:
                if it.item_id in fresh:
                    m.freshness.observe(max(0.0, (searchable_ms - event_time(it)) / 1000.0))

    def encode_current(self, items: Sequence[Item]) -> tuple[np.ndarray, int]:
        """``items`` encoded by the towers as they are, and the version that encoded them.

        Reads the towers under ``model_lock``, not ``lock``: the poll loop goes on ingesting
        meanwhile (encoding 256 items took about a third of the re-encoder's hold of ``lock``,
        the in-place write the rest). A caller that writes the vectors takes ``lock`` afterwards
        and checks the version and the catalog entry are still these. Never call it holding the
        towers for reading already (the lock is not reentrant)."""
        with self.model_lock.read():
            return self.replica.encode_items(items), self.replica.version

    def is_new(self, item: Item) -> bool:
        """Whether ``item``'s event is a change this indexer has not applied: an id it does not hold,
        or a later event time (``updated_at``, else ``created_at``) than the one it holds. A
        re-read or duplicate event, and an update that carries no ``updated_at``, are not new."""
        held = self.catalog.get(item.item_id)
        return held is None or event_time(item) > event_time(held)

    def delete_items(self, item_ids: Sequence[str]) -> int:
        with self.lock:
            for item_id in item_ids:
                old = self.catalog.pop(item_id, None)
                if old is not None:
                    self.newest.deleted(old)
            removed = self.index.delete(item_ids)
        self.metrics.deletes.inc(removed)
        return removed

    def recent_items(self, n: int) -> list[Item]:
        """The ``n`` most recently created live items, newest first (the fallback route; kept as items
        come and go, see newest.py)."""
        with self.lock:
            return self.newest.newest(n, self.catalog)

    def replace_catalog(self, catalog: dict[str, Item]) -> None:
        """Take ``catalog`` as the live items (a snapshot's, at start)."""
        with self.lock:
            self.catalog = catalog
            self.newest.clear()

    # ----------------------------------------------------------------- epochs
    def start_epoch(self, version: int) -> None:
        """Record that ``version`` starts an epoch. Epochs before the served one are dropped: no
        decision tells them apart (a vector of any of them is simply not compatible), and with dense
        layers in every update a new epoch comes with every update, so the list would grow forever."""
        if version > self.epochs[-1]:
            self.epochs.append(version)
        del self.epochs[:bisect.bisect_left(self.epochs, self.served_epoch)]

    @property
    def current_epoch(self) -> int:
        return self.epochs[-1]

    def epoch_of(self, version: int) -> int | None:
        """The epoch a vector of ``version`` belongs to, or None when older than every epoch known."""
        i = bisect.bisect_right(self.epochs, version) - 1
        return self.epochs[i] if i >= 0 else None

    def compatible(self, user_version: int) -> bool:
        """Whether a user vector of ``user_version`` lives in the space the index serves."""
        return self.epoch_of(user_version) == self.served_epoch

    # ---------------------------------------------------------------- gauges
    def staleness(self) -> dict[str, float]:
        """How far the index lags the model: the share of items encoded by a version more than
        ``stale_after_versions`` behind the current one, or made more than ``stale_after_s`` before it
        (unknown: counted as behind when older), the mean drift and the share over the drift bound."""
        counts = self.index.version_counts()
        for version in [v for v in self.version_times if v not in counts and v != self.replica.version]:
            del self.version_times[version]
        current, total = self.replica.version, sum(counts.values())
        now = self.version_times.get(current)
        behind_s = self.config.stale_after_s * 1000
        by_versions = by_seconds = 0
        for version, n in counts.items():
            if current - version > self.config.stale_after_versions:
                by_versions += n
            made = self.version_times.get(version)
            if version < current and (made is None or now is None or now - made > behind_s):
                by_seconds += n
        drift_mean, over = self.index.drift_stats(self.config.reencode_drift_bound)
        return {"behind_versions": by_versions / total if total else 0.0,
                "behind_seconds": by_seconds / total if total else 0.0,
                "drift_mean": drift_mean, "over_drift_bound": over}

    def update_gauges(self) -> None:
        m = self.metrics
        m.items.set(len(self.index))
        m.deleted_share.set(self.index.deleted_share())
        m.stale_share.set(self.index.stale_share(self.current_epoch))
        lag = self.staleness()
        m.behind.labels("versions").set(lag["behind_versions"])
        m.behind.labels("seconds").set(lag["behind_seconds"])
        m.drift_mean.set(lag["drift_mean"])
        m.over_drift_bound.set(lag["over_drift_bound"])
        m.user_vectors.set(len(self.users))
        self.states.fill("indexer", "user_vectors", len(self.users), self.users.capacity)
        self.states.fill("indexer", "item_vector_cache", len(self.item_vectors), self.item_vectors.max_items)
