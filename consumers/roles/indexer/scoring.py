"""Version-consistent scoring: a query's user vector and every candidate item from one model version.

The HNSW graph is a candidate generator. Its vectors lag the model by however long the
re-encode after an update takes (a rebuild after a dense change, the touched items after a
sparse delta), so ranking by them would mix versions. Instead the API takes
``rescore_factor × k`` candidates from the graph and scores them now, with the replica's
current towers: the candidates' item vectors and, when the stored user vector is of another
version, the user vector too (from the recent items it carries). One read of the towers covers
both, so an answer is exactly what the current model says about its candidates, and what the
graph's lag can still cost is which items are candidates — the serving-overlap monitor
(:class:`ServingMonitor`) measures that.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Sequence

import msgspec
import numpy as np

from streamrecall.index import Hit
from streamrecall.index.json_rows import encode_rows, item_members
from streamrecall.model.features import ItemLike
from streamrecall.model.replica import TowerReplica

if TYPE_CHECKING:  # import cycle at run time: the state module does not need these
    from streamrecall.consumers.roles.indexer.http_api import RecallService
    from streamrecall.consumers.recall_api.users import UserEntry
    from streamrecall.consumers.roles.indexer.state import IndexerState

log = logging.getLogger(__name__)


class QueryVector(Protocol):
    """Where a query's vector comes from; ``at`` is called with the towers held for reading."""

    used_stored: bool

    def at(self, replica: TowerReplica) -> np.ndarray: ...


class VectorQuery:
    """A caller's own vector (``POST /recall``): used as given, no tower can re-derive it."""

    used_stored = True

    def __init__(self, vector: np.ndarray) -> None:
        self.vector = vector

    def at(self, replica: TowerReplica) -> np.ndarray:
        return self.vector


class UserQuery:
    """A known user: the stored vector when the replica's version made it, else encoded now."""

    def __init__(self, user_id: str, entry: "UserEntry") -> None:
        self.user_id = user_id
        self.entry = entry
        self.used_stored = True
        self._encoded: tuple[int, np.ndarray] | None = None

    def at(self, replica: TowerReplica) -> np.ndarray:
        if self.entry.model_version == replica.version:
            self.used_stored = True
            return self.entry.vector
        self.used_stored = False
        if self._encoded is None or self._encoded[0] != replica.version:
            vector = replica.encode_users([self.user_id], [list(self.entry.recent_items)])[0]
            self._encoded = (replica.version, vector)
        return self._encoded[1]


@dataclass(frozen=True)
class Scored:
    """Hits ranked by exact inner product under model ``version``; ``vector`` is the query's."""

    hits: list[Hit]
    version: int
    vector: np.ndarray

    def top(self, k: int) -> "Scored":
        return Scored(self.hits[:k], self.version, self.vector)

    def with_hits(self, hits: list[Hit]) -> "Scored":
        return Scored(hits, self.version, self.vector)

    @property
    def item_ids(self) -> list[str]:
        return [h.item_id for h in self.hits]

    def results(self) -> msgspec.Raw:
        """The answer's rows as JSON (index/json_rows.py); scores from model ``version``."""
        members = np.empty((1, len(self.hits)), dtype=object)
        members[0, :] = [item_members(h.item_id, h.categories) for h in self.hits]
        return encode_rows(members, np.array([[h.score for h in self.hits]], dtype=np.float64), self.version)[0]


@dataclass(frozen=True)
class Settled:
    """An answer straight from a settled graph (every vector of the scoring version, so the graph's
    scores are exact): its rows were encoded with the rest of its batch, no Hit per row."""

    ids: np.ndarray  # the items, best first
    rows: msgspec.Raw
    version: int
    vector: np.ndarray

    @property
    def item_ids(self) -> list[str]:
        return self.ids.tolist()

    def results(self) -> msgspec.Raw:
        return self.rows


class ItemVectorCache:
    """Item vectors of the current model version, so re-scoring encodes each candidate once per
    version rather than once per query (popular candidates recur across queries; while clicks
    flow a version lasts one trainer flush, about 200 ms, and without clicks indefinitely).

    Only used with the towers held for reading, so the version cannot change while a caller
    reads or fills it; an entry is keyed by the item object, so new content is encoded again.
    The recall API runs ``search_threads`` queries at once against one cache, so a lookup and its
    fill (the encode of the missing candidates included) hold one lock: concurrent fills gave two
    new ids one row and raced the matrix's growth. Misses are rare once a version's popular
    candidates are in, and a settled index skips re-scoring altogether.
    Cleared on a new version and when it holds ``max_items`` (the indexer's
    ``item_vector_cache_items``): a cleared cache costs one encode per candidate of the next queries.
    """

    def __init__(self, max_items: int = 200_000) -> None:
        self.max_items = max_items
        self.version = -1
        self._lock = threading.Lock()
        self._clear(0)

    def _clear(self, dim: int) -> None:
        # Vectors live in one matrix, so a query's candidates are one fancy-indexing gather
        # rather than a stack of per-item arrays (the stack alone was ~0.1 ms of a 200-item rescore).
        self._slot: dict[str, int] = {}   # item id → row of _matrix
        self._items: list[object] = []     # the item object each row was encoded from
        self._matrix = np.empty((1024, dim), dtype=np.float32)

    def __len__(self) -> int:
        return len(self._slot)

    def vectors(self, replica: TowerReplica, items: Sequence[ItemLike]) -> np.ndarray:
        """(len(items), dim) vectors of ``items`` at ``replica.version``."""
        if not items:
            return np.zeros((0, replica.config.dim), dtype=np.float32)
        with self._lock:
            if self.version != replica.version or len(self._slot) + len(items) > self.max_items:
                self._clear(replica.config.dim)
                self.version = replica.version
            get, objs = self._slot.get, self._items
            slots = [s if (s := get(it.item_id)) is not None and objs[s] is it else -1 for it in items]
            missing = [j for j, s in enumerate(slots) if s < 0]
            if missing:
                for j, v in zip(missing, replica.encode_items([items[j] for j in missing])):
                    slots[j] = self._put(items[j], v)
            return self._matrix[np.asarray(slots, dtype=np.intp)]

    def _put(self, item: ItemLike, vector: np.ndarray) -> int:
        slot = self._slot.get(item.item_id)
        if slot is None:  # a new id (an id whose content changed keeps its row)
            slot = self._slot[item.item_id] = len(self._items)
            self._items.append(item)
            if slot >= len(self._matrix):
                grown = np.empty((2 * len(self._matrix), self._matrix.shape[1]), dtype=np.float32)
                grown[:slot] = self._matrix[:slot]
                self._matrix = grown
        else:
            self._items[slot] = item
        self._matrix[slot] = vector
        return slot


def current_vector(state: "IndexerState", query: QueryVector) -> np.ndarray:
    """The query's vector at the replica's version now (to search the graph with)."""
    with state.model_lock.read():
        return query.at(state.replica)


def rescore(state: "IndexerState", query: QueryVector, candidates: Sequence[Hit]) -> Scored:
    """``candidates`` (deleted ones dropped) re-scored and re-ranked by the current towers."""
    pairs = [(h, it) for h in candidates if (it := state.catalog.get(h.item_id)) is not None]
    with state.model_lock.read():  # one version for the user and every item
        version = state.replica.version
        vector = query.at(state.replica)
        item_vectors = state.item_vectors.vectors(state.replica, [it for _, it in pairs])
    scores = item_vectors @ vector if pairs else np.zeros(0, dtype=np.float32)
    order = np.argsort(-scores, kind="stable").tolist()
    ranked = scores.tolist()
    hits = [Hit(pairs[j][0].item_id, ranked[j], version, pairs[j][0].categories) for j in order]
    return Scored(hits, version, vector)


# ------------------------------------------------------------------ the serving-skew monitor
@dataclass(frozen=True)
class SampledQuery:
    """What a live query asked, so the monitor can ask it again: a user or a raw vector."""

    user_id: str | None
    recent_items: tuple[str, ...]
    vector: np.ndarray | None
    k: int
    exclude: set[str] | None
    max_per_category: int | None


class QuerySampler:
    """The last ``size`` queries (O(1) per query, thread-safe: a deque with maxlen)."""

    def __init__(self, size: int) -> None:
        self._queries: deque[SampledQuery] = deque(maxlen=size)

    def offer(self, query: SampledQuery) -> None:
        self._queries.append(query)

    def take(self) -> list[SampledQuery]:
        out = []
        while self._queries:
            try:
                out.append(self._queries.popleft())
            except IndexError:  # emptied by another taker meanwhile
                break
        return out


@dataclass
class ServingMonitor:
    """Asks sampled live queries again and compares the served top-K with the exact top-K over a
    fresh encode of the whole catalog by the same towers: ``streamrecall_serving_overlap_at_k``.

    1.0 means the system serves exactly what its model knows; what lowers it is the graph (its
    approximate search, or vectors its re-encode has not refreshed yet) missing candidates.
    Runs on its own thread every ``interval_s``; skipped above ``max_items`` live items: the
    exact side encodes the whole catalog under one read of the towers, during which an update
    waits, and so do queries behind it (about 2.5 ms per 1,000 items on one core).
    """

    service: "RecallService"
    sampler: QuerySampler
    interval_s: float
    max_items: int
    last: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="indexer-serving-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.measure()
            except Exception:  # keep the thread alive: the gauge just keeps its last value
                log.exception("serving-overlap measurement failed")

    def measure(self) -> float | None:
        """Mean overlap@K over the queries sampled since the last call (None when none were)."""
        samples = self.sampler.take()
        state = self.service.state
        if not samples or len(state.catalog) > self.max_items:
            return None
        overlaps = [o for q in samples if (o := self._overlap(q)) is not None]
        if not overlaps:
            return None
        self.last = float(np.mean(overlaps))
        state.metrics.serving_overlap.set(self.last)
        state.metrics.serving_overlap_queries.inc(len(overlaps))
        return self.last

    def _overlap(self, q: SampledQuery) -> float | None:
        from streamrecall.consumers.recall_api.rules import cap_per_category

        state = self.service.state
        entry = state.users.get(q.user_id) if q.user_id is not None else None
        if q.user_id is not None and entry is None:
            return None
        for _ in range(3):  # an update between the two sides: ask again
            query: QueryVector = UserQuery(q.user_id, entry) if entry is not None else VectorQuery(q.vector)
            served = self.service.search(query, q.k, q.exclude, q.max_per_category)
            # A copy of the catalog taken without state.lock: the poll loop takes state.lock and then
            # the towers for writing, so waiting for state.lock while reading the towers could deadlock.
            items = [it for it in list(state.catalog.values()) if not q.exclude or it.item_id not in q.exclude]
            with state.model_lock.read():
                if state.replica.version != served.version:
                    continue
                # the re-scoring cache: candidates already encoded at this version are not again
                vectors = state.item_vectors.vectors(state.replica, items) if items else None
                vector = query.at(state.replica)
            if vectors is None:
                return None
            order = np.argsort(-(vectors @ vector), kind="stable")
            ranked = [items[j] for j in order[: max(q.k * 64, 4096) if q.max_per_category else q.k].tolist()]
            if q.max_per_category is not None:
                ranked = cap_per_category(ranked, q.k, q.max_per_category, lambda it: tuple(it.categories))
            exact = {it.item_id for it in ranked[: q.k]}
            if not exact:
                return None
            return len(exact & set(served.item_ids)) / len(exact)
        return None
