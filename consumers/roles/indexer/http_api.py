"""The indexer's recall API (docs/api.md), without the transport: recall by user or by vector, items,
and a shard's part of a sharded index's answer (``POST /recall/shard``, what the router asks).

:class:`RecallService` knows nothing of HTTP; it is safe to call from several threads at once
(the index's reader-writer lock lets searches run in parallel, and they never take the role's
write lock). consumers/recall_api/requests.py turns requests into its arguments and
consumers/recall_api/server.py serves it; :class:`~streamrecall.consumers.recall_api.rules.ApiError`
is how either refuses a request.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from streamrecall.consumers.recall_api.requests import RecallRequest, ShardRecall, UserRecall
from streamrecall.consumers.recall_api.rules import ApiError, cap_per_category, overfetch_limit, popular_overfetch
from streamrecall.consumers.recall_api.users import UserEntry
from streamrecall.consumers.roles.indexer.options import IndexerOptions
from streamrecall.consumers.roles.indexer.scoring import (
    QuerySampler,
    QueryVector,
    SampledQuery,
    Scored,
    Settled,
    UserQuery,
    VectorQuery,
    current_vector,
    rescore,
)
from streamrecall.consumers.roles.indexer.state import IndexerState
from streamrecall.index import QualityMonitor
from streamrecall.index.json_rows import encode_rows

log = logging.getLogger(__name__)

HealthFn = Callable[[], tuple[bool, dict[str, Any]]]


class RecallService:
    """Answers recall queries from the index, the user vectors and the trending list.

    ``shard`` is (I, N) on shard I of a sharded index (``--shard I --shards N``): it holds no user
    vectors (the router does), so it refuses user queries and answers the router's
    ``/recall/shard`` instead; None on an indexer that holds every item.
    """

    serves_items = True

    def __init__(self, state: IndexerState, config: IndexerOptions, monitor: QualityMonitor,
                 health: HealthFn, sampler: QuerySampler | None = None,
                 shard: tuple[int, int] | None = None) -> None:
        self.state = state
        self.config = config
        self.monitor = monitor
        self.health = health
        self.sampler = sampler or QuerySampler(config.overlap_sample_size)
        self.shard = shard

    @property
    def metrics(self) -> Any:
        return self.state.metrics

    @property
    def dim(self) -> int:
        return self.state.index.dim

    # -------------------------------------------------------------- queries
    def recall_for_user(self, user_id: str, k: int, exclude_seen: bool = False,
                        max_per_category: int | None = None) -> dict[str, Any]:
        """Top ``k`` for a known user, scored by one model version for the user and every item.

        The stored user vector is used when it was computed by the replica's current version;
        otherwise (the publisher has not re-published the user since the last model update, or
        is ahead of this replica) the user is encoded now from the recent items the vector
        carries, so the user and the items always come from the same towers.
        """
        user = self._user(user_id)
        if user is None:
            return {"user_id": user_id, "k": k} | self._popular(k, max_per_category)
        exclude = set(user.recent_items) if exclude_seen else None
        query = UserQuery(user_id, user)
        scored = self.search(query, k, exclude, max_per_category)
        self.monitor.observe(scored.vector)
        return self._user_answer(query, k, exclude, max_per_category, scored)

    def recall_for_vector(self, vector: np.ndarray, k: int, max_per_category: int | None = None,
                          exclude: Iterable[str] = ()) -> dict[str, Any]:
        excluded = set(exclude) or None
        self.monitor.observe(vector)
        return self._vector_answer(vector, k, excluded, max_per_category,
                                   self.search(VectorQuery(vector), k, excluded, max_per_category))

    def recall_together(self, queries: Sequence[RecallRequest]) -> list[dict[str, Any] | None]:
        """The answers of a batch's queries that can share one search; None for the others.

        Uncapped queries without exclusions, of one ``k``, against a settled index (see
        :meth:`_search_settled`) are searched by one hnswlib call over all their vectors on
        ``search_threads`` threads, under one read of the towers, and answered exactly as one by
        one. Capped, excluding and trending queries, or any while the index re-encodes, are None:
        the caller asks them one by one (``recall_for_user`` / ``recall_for_vector``).
        """
        out: list[dict[str, Any] | None] = [None] * len(queries)
        by_k: dict[int, list[tuple[int, QueryVector]]] = {}
        for n, q in enumerate(queries):
            if q.max_per_category is not None:
                continue
            if isinstance(q, UserRecall):
                user = None if q.exclude_seen else self._user(q.user_id)
                if user is not None:
                    by_k.setdefault(q.k, []).append((n, UserQuery(q.user_id, user)))
            elif not q.exclude:
                by_k.setdefault(q.k, []).append((n, VectorQuery(q.vector)))
        for k, group in by_k.items():
            fetch = self._fetch(k)
            scored = self._search_settled([query for _, query in group], k, fetch, None)
            if scored is None:
                continue
            self.monitor.observe(np.stack([one.vector for one in scored]))
            for (n, query), one in zip(group, scored):
                out[n] = (self._user_answer(query, k, None, None, one) if isinstance(query, UserQuery)
                          else self._vector_answer(one.vector, k, None, None, one))
        return out

    def _user(self, user_id: str) -> UserEntry | None:
        """The user's stored entry; None for an unknown user or a vector of another dimension."""
        state = self.state
        if self.shard is not None:
            raise ApiError(400, f"this indexer is shard {self.shard[0]} of {self.shard[1]}: it holds no user vectors "
                                "and a share of the items; ask the router (docs/api.md)")
        user = state.users.get(user_id)
        if user is not None and len(user.vector) != state.index.dim:
            log.warning("user %s has a %d-d vector, the index is %d-d: answering from trending",
                        user_id, len(user.vector), state.index.dim)
            return None
        return user

    def _user_answer(self, query: UserQuery, k: int, exclude: set[str] | None, max_per_category: int | None,
                     scored: Scored | Settled) -> dict[str, Any]:
        user = query.entry
        self.sampler.offer(SampledQuery(query.user_id, user.recent_items, None, k, exclude, max_per_category))
        encoded = "stored" if query.used_stored else "query-time"
        self.state.metrics.user_encodes.labels(encoded).inc()
        return {"user_id": query.user_id, "k": k, "route": "user-vector", "compatible": True,
                "user_encoded": encoded, "model_versions": self._versions(user.model_version, scored.version),
                "results": scored.results()}

    def _vector_answer(self, vector: np.ndarray, k: int, exclude: set[str] | None, max_per_category: int | None,
                       scored: Scored | Settled) -> dict[str, Any]:
        self.sampler.offer(SampledQuery(None, (), vector, k, exclude, max_per_category))
        return {"route": "vector", "k": k, "model_versions": self._versions(None, scored.version),
                "results": scored.results()}

    def shard_recall(self, q: ShardRecall) -> dict[str, Any]:
        """This shard's exact top ``q.k`` for the router (``POST /recall/shard``): no caps (the router
        caps the merged ranking), scored by this replica's current version, which the answer names.

        A user comes with its stored vector, that vector's version and its recent items: scored as
        :meth:`recall_for_user` scores it (the vector as it is when this version made it, else the
        user encoded now), so the shard that holds the towers does the query-time encoding. Neither
        a user nor a vector: the trending (else recent) items this shard holds.
        """
        state = self.state
        if q.user is None and q.vector is None:
            route, rows = self._popular_rows(q.k, None)
            return {"route": route, "version": state.replica.version, "user_encoded": None,
                    "rows": [{"item_id": i, "score": s, "model_version": m.model_version,
                              "categories": list(m.categories), "event_ts": m.event_ts_ms} for i, s, m in rows[:q.k]]}
        exclude = set(q.exclude) or None
        query: QueryVector = UserQuery(q.user_id or "", q.user) if q.user is not None else VectorQuery(q.vector)
        scored = self.search(query, q.k, exclude, None)
        self.monitor.observe(scored.vector)
        # the serving-overlap monitor asks it again as the vector it was scored with (no users here)
        self.sampler.offer(SampledQuery(None, (), scored.vector, q.k, exclude, None))
        encoded = None
        if q.user is not None:
            encoded = "stored" if query.used_stored else "query-time"
            state.metrics.user_encodes.labels(encoded).inc()
        return {"route": "user-vector" if q.user is not None else "vector", "version": scored.version,
                "user_encoded": encoded, "rows": scored.results()}

    def search(self, query: QueryVector, k: int, exclude: set[str] | None,
               max_per_category: int | None) -> Scored | Settled:
        """The top ``k`` by the current towers: candidates from the graph, re-scored exactly.

        The graph supplies ``rescore_factor × k`` candidates; their vectors are computed now by
        the replica (with the user's, under one read of the towers) and ranked by exact inner
        product. So an answer never mixes model versions, whatever the index's re-encode is
        doing: graph vectors only decide which items are candidates. With a category cap the
        candidate pool widens ×4 per round until ``k`` pass the cap.
        """
        state, index = self.state, self.state.index
        fetch = self._fetch(k)
        if max_per_category is None:
            settled = self._search_settled([query], k, fetch, exclude)
            if settled is not None:
                return settled[0]
        live = len(index)
        limit = min(live, overfetch_limit(k)) if max_per_category is not None else fetch
        vector = current_vector(state, query)
        while True:
            hits = index.query(vector, fetch, exclude=exclude)[0]
            scored = rescore(state, query, hits)
            vector = scored.vector
            if max_per_category is None:
                return scored.top(k)
            kept = cap_per_category(scored.hits, k, max_per_category, lambda h: h.categories)
            if len(kept) >= k or len(hits) < fetch or fetch >= limit:
                return scored.with_hits(kept)
            fetch = min(limit, fetch * 4)

    def _fetch(self, k: int) -> int:
        """Graph candidates searched for a top ``k``: ``rescore_factor × k``, within the index."""
        return min(len(self.state.index), max(k, math.ceil(k * self.config.rescore_factor)))

    def _search_settled(self, queries: Sequence[QueryVector], k: int, fetch: int,
                        exclude: set[str] | None) -> Sequence[Scored | Settled] | None:
        """The answers straight from the graph when every indexed vector is of the replica's current
        version (a settled index: no update since the last re-encode finished), else None.

        Then the graph's scores are the current towers' exact inner products, so re-scoring would
        only recompute them (it was about 40% of a query). The check and the search run under one
        read of the towers: no update can land between them, and a re-encode writes vectors of a
        newer version only after an update did. The graph explores ``fetch`` candidates, as
        widely as the re-scoring path, and the best ``k`` are kept. Several queries are one
        hnswlib call on ``search_threads`` threads, and without exclusions their rows are read
        and encoded as columns for the whole block (index/json_rows.py), no Hit per row.
        """
        state, index, threads = self.state, self.state.index, self.config.search_threads
        with state.model_lock.read():
            version = state.replica.version
            if not index.all_at_version(version):
                return None
            vectors = [query.at(state.replica) for query in queries]
            matrix = np.stack(vectors)
            block = None if exclude else index.query_block(matrix, k, explore=fetch, threads=threads)
            if block is None:  # exclusions, or a query the block form leaves to query()
                found = index.query(matrix, k, exclude=exclude, explore=fetch, threads=threads)
                return [Scored(hits, version, vector) for hits, vector in zip(found, vectors)]
        rows = encode_rows(block.members, block.scores, version)
        return [Settled(ids, one, version, vector) for ids, one, vector in zip(block.ids, rows, vectors)]

    def _popular(self, k: int, max_per_category: int | None) -> dict[str, Any]:
        """Users without a vector: the trainer's trending items (minus deleted), else the newest items."""
        route, rows = self._popular_rows(k, max_per_category)
        results = [{"rank": n + 1, "item_id": i, "score": s, "model_version": m.model_version,
                    "categories": list(m.categories)} for n, (i, s, m) in enumerate(rows[:k])]
        return {"route": route, "model_versions": self._versions(None), "results": results}

    def _popular_rows(self, k: int, max_per_category: int | None) -> tuple[str, list[tuple[str, float | None, Any]]]:
        """(route, [(item id, score, meta)]) of the popular answer, best first (route trending or recent)."""
        index = self.state.index
        trending = self.state.replica.trending  # replaced wholesale by each update: a consistent list
        if trending:
            candidates = ((item_id, score, index.meta(item_id)) for item_id, score in trending)
            rows = [(i, s, m) for i, s, m in candidates if m is not None]
            route = "trending"
        else:
            n = k if max_per_category is None else min(len(index), popular_overfetch(k))
            rows = [(it.item_id, None, index.meta(it.item_id)) for it in self.state.recent_items(n)]
            rows = [r for r in rows if r[2] is not None]
            route = "recent"
        if max_per_category is not None:
            rows = cap_per_category(rows, k, max_per_category, lambda r: r[2].categories)
        return route, rows

    def _versions(self, user_version: int | None, scored: int | None = None) -> dict[str, Any]:
        state = self.state
        return {"user_vector": user_version, "scored": state.replica.version if scored is None else scored,
                "index": state.replica.version, "index_epoch": state.served_epoch}

    # --------------------------------------------------------------- items
    def item(self, item_id: str, with_vector: bool = False) -> dict[str, Any] | None:
        """When and by which model version ``item_id`` was encoded (one dict lookup), or None."""
        if not with_vector:
            meta = self.state.index.meta(item_id)
            vector = None
        else:
            entry = self.state.index.get(item_id)
            meta, vector = (entry.meta, entry.vector) if entry is not None else (None, None)
        if meta is None:
            return None
        out = {"item_id": item_id, "model_version": meta.model_version, "encoded_at": meta.encoded_at_ms,
               "event_ts": meta.event_ts_ms, "categories": list(meta.categories)}
        if vector is not None:
            out["vector"] = [round(float(v), 7) for v in vector]
        return out

