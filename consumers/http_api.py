"""The indexer's HTTP API (docs/api.md): recall by user or by vector, item lookup, health, metrics.

Standard library only (``ThreadingHTTPServer``): one thread per connection, which is what
the index's reader-writer lock is built for (queries run in parallel and never take the
role's write lock). The query logic lives in :class:`RecallService`, which knows nothing
of HTTP; :class:`RecallApi` parses requests, maps :class:`ApiError` to 4xx answers and
serialises JSON.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from streamrecall.consumers.indexer_state import IndexerConfig, IndexerState
from streamrecall.consumers.scoring import (QuerySampler, QueryVector, SampledQuery, Scored, UserQuery, VectorQuery,
                                            current_vector, rescore)
from streamrecall.index import Hit, QualityMonitor

log = logging.getLogger(__name__)

HealthFn = Callable[[], tuple[bool, dict[str, Any]]]
#: How far a ``max_per_category`` query over-fetches, at most (multiples of k, and an absolute floor).
MAX_OVERFETCH_FACTOR = 64
MIN_OVERFETCH = 4096


class ApiError(Exception):
    """A request the API refuses; ``status`` is the HTTP status, the message says what to fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RecallService:
    """Answers recall queries from the index, the user vectors and the trending list."""

    def __init__(self, state: IndexerState, config: IndexerConfig, monitor: QualityMonitor,
                 health: HealthFn, sampler: QuerySampler | None = None) -> None:
        self.state = state
        self.config = config
        self.monitor = monitor
        self.health = health
        self.sampler = sampler or QuerySampler(config.overlap_sample_size)

    # -------------------------------------------------------------- queries
    def recall_for_user(self, user_id: str, k: int, exclude_seen: bool = False,
                        max_per_category: int | None = None) -> dict[str, Any]:
        """Top ``k`` for a known user, scored by one model version for the user and every item.

        The stored user vector is used when it was computed by the replica's current version;
        otherwise (the publisher has not re-published the user since the last model update, or
        is ahead of this replica) the user is encoded now from the recent items the vector
        carries, so the user and the items always come from the same towers.
        """
        state = self.state
        user = state.users.get(user_id)
        base = {"user_id": user_id, "k": k}
        if user is not None and len(user.vector) != state.index.dim:
            log.warning("user %s has a %d-d vector, the index is %d-d: answering from trending",
                        user_id, len(user.vector), state.index.dim)
            user = None
        if user is None:
            return base | self._popular(k, max_per_category)
        exclude = set(user.recent_items) if exclude_seen else None
        query = UserQuery(user_id, user)
        scored = self.search(query, k, exclude, max_per_category)
        self.monitor.observe(scored.vector)
        self.sampler.offer(SampledQuery(user_id, user.recent_items, None, k, exclude, max_per_category))
        state.metrics.user_encodes.labels("stored" if query.used_stored else "query-time").inc()
        return base | {"route": "user-vector", "compatible": True,
                       "user_encoded": "stored" if query.used_stored else "query-time",
                       "model_versions": self._versions(user.model_version, scored.version),
                       "results": _results(scored.hits, scored.version)}

    def recall_for_vector(self, vector: np.ndarray, k: int, max_per_category: int | None = None,
                          exclude: Iterable[str] = ()) -> dict[str, Any]:
        self.monitor.observe(vector)
        excluded = set(exclude) or None
        scored = self.search(VectorQuery(vector), k, excluded, max_per_category)
        self.sampler.offer(SampledQuery(None, (), vector, k, excluded, max_per_category))
        return {"route": "vector", "k": k, "model_versions": self._versions(None, scored.version),
                "results": _results(scored.hits, scored.version)}

    def search(self, query: QueryVector, k: int, exclude: set[str] | None,
               max_per_category: int | None) -> Scored:
        """The top ``k`` by the current towers: candidates from the graph, re-scored exactly.

        The graph supplies ``rescore_factor × k`` candidates; their vectors are computed now by
        the replica (with the user's, under one read of the towers) and ranked by exact inner
        product. So an answer never mixes model versions, whatever the index's re-encode is
        doing: graph vectors only decide which items are candidates. With a category cap the
        candidate pool widens ×4 per round until ``k`` pass the cap.
        """
        state, index = self.state, self.state.index
        live = len(index)
        fetch = min(live, max(k, math.ceil(k * self.config.rescore_factor)))
        limit = min(live, max(MIN_OVERFETCH, k * MAX_OVERFETCH_FACTOR)) if max_per_category is not None else fetch
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

    def _popular(self, k: int, max_per_category: int | None) -> dict[str, Any]:
        """Users without a vector: the trainer's trending items (minus deleted), else the newest items."""
        index = self.state.index
        trending = self.state.replica.trending  # replaced wholesale by each update: a consistent list
        if trending:
            candidates = ((item_id, score, index.meta(item_id)) for item_id, score in trending)
            rows = [(i, s, m) for i, s, m in candidates if m is not None]
            route = "trending"
        else:
            n = k if max_per_category is None else min(len(index), max(MIN_OVERFETCH, 8 * k))
            rows = [(it.item_id, None, index.meta(it.item_id)) for it in self.state.recent_items(n)]
            rows = [r for r in rows if r[2] is not None]
            route = "recent"
        if max_per_category is not None:
            rows = cap_per_category(rows, k, max_per_category, lambda r: r[2].categories)
        results = [{"rank": n + 1, "item_id": i, "score": s, "model_version": m.model_version,
                    "categories": list(m.categories)} for n, (i, s, m) in enumerate(rows[:k])]
        return {"route": route, "model_versions": self._versions(None), "results": results}

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


def cap_per_category(rows: Sequence[Any], k: int, cap: int, categories: Callable[[Any], Sequence[str]]) -> list[Any]:
    """The first ``k`` rows, in order, such that no category appears more than ``cap`` times.

    A row with several categories counts against each and is skipped if any is full;
    rows without categories are never capped.
    """
    counts: dict[str, int] = {}
    out = []
    for row in rows:
        cats = categories(row)
        if any(counts.get(c, 0) >= cap for c in cats):
            continue
        for c in cats:
            counts[c] = counts.get(c, 0) + 1
        out.append(row)
        if len(out) == k:
            break
    return out


def _results(hits: Sequence[Hit], version: int) -> list[dict[str, Any]]:
    """Scores come from model ``version`` (the re-scoring), whichever version the graph holds."""
    return [{"rank": n + 1, "item_id": h.item_id, "score": round(h.score, 6), "model_version": version,
             "categories": list(h.categories)} for n, h in enumerate(hits)]


# ----------------------------------------------------------------------- HTTP
ROUTES = {"/recall": ("GET", "POST"), "/healthz": ("GET",), "/metrics": ("GET",)}


class RecallApi:
    """The HTTP server: ``start()`` serves in a daemon thread, ``stop()`` shuts it down."""

    def __init__(self, service: RecallService, host: str, port: int, max_body_bytes: int = 1 << 20,
                 poll_interval_s: float = 0.5) -> None:
        self.service = service
        self.poll_interval_s = poll_interval_s  # how soon stop() is noticed
        self.max_body_bytes = max_body_bytes
        handler = type("Handler", (_Handler,), {"api": self})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, args=(poll_interval_s,),
                                        name="indexer-http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread.start()
        log.info("indexer API on %s (recall, items, healthz, metrics)", self.url)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------ dispatch
    def answer(self, method: str, target: str, body: Callable[[], bytes]) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request; 4xx for anything the client got wrong."""
        url = urlsplit(target)
        path = url.path
        metrics = self.service.state.metrics
        route = "invalid"
        started = time.perf_counter()
        try:
            allowed = ROUTES.get(path, ("GET",) if path.startswith("/items/") else None)
            if allowed is None:
                raise ApiError(404, f"no such path {path!r}; see docs/api.md (/recall, /items/ID, /healthz, /metrics)")
            if method not in allowed:
                raise ApiError(405, f"{path} answers {', '.join(allowed)}, not {method}")
            if path == "/metrics":
                return 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
            if path == "/healthz":
                ready, health = self.service.health()
                return (200 if ready else 503), "application/json", _json(health)
            if path.startswith("/items/"):
                item_id = unquote(path[len("/items/"):])
                with_vector = _flag("with_vector", _one(parse_qs(url.query, keep_blank_values=True), "with_vector"))
                found = self.service.item(item_id, with_vector) if item_id else None
                if found is None:
                    raise ApiError(404, f"item {item_id!r} is not in the index")
                return 200, "application/json", _json(found)
            if method == "GET":
                answer = self._recall_get(parse_qs(url.query, keep_blank_values=True))
            else:
                answer = self._recall_post(body())
            route = answer["route"]
            metrics.queries.labels(route, "200").inc()
            metrics.query_seconds.labels(route).observe(time.perf_counter() - started)
            return 200, "application/json", _json(answer)
        except ApiError as exc:
            if path == "/recall":
                metrics.queries.labels(route, str(exc.status)).inc()
            return exc.status, "application/json", _json({"error": str(exc), "status": exc.status})

    def _recall_get(self, query: dict[str, list[str]]) -> dict[str, Any]:
        user_id = _one(query, "user_id")
        if not user_id:
            raise ApiError(400, "user_id is required (GET /recall?user_id=U&k=K); to query by vector, POST /recall")
        k = self._k(_one(query, "k"))
        cap = _positive_int("max_per_category", _one(query, "max_per_category"), required=False)
        exclude_seen = _flag("exclude_seen", _one(query, "exclude_seen"))
        return self.service.recall_for_user(user_id, k, exclude_seen, cap)

    def _recall_post(self, raw: bytes) -> dict[str, Any]:
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise ApiError(400, 'body must be a JSON object: {"vector": [...], "k": K}')
        k = self._k(payload.get("k"))
        cap = _positive_int("max_per_category", payload.get("max_per_category"), required=False)
        vector = self._vector(payload.get("vector"))
        exclude = payload.get("exclude", [])
        if not isinstance(exclude, list) or not all(isinstance(i, str) for i in exclude):
            raise ApiError(400, "exclude must be a list of item ids")
        return self.service.recall_for_vector(vector, k, cap, exclude)

    def _k(self, raw: Any) -> int:
        k = _positive_int("k", raw, required=True)
        if k > self.service.config.max_k:
            raise ApiError(400, f"k={k} is above the limit of {self.service.config.max_k}")
        return k

    def _vector(self, raw: Any) -> np.ndarray:
        dim = self.service.state.index.dim
        if not isinstance(raw, list):
            raise ApiError(400, f"vector is required: a list of {dim} numbers")
        if len(raw) != dim:
            raise ApiError(400, f"vector has {len(raw)} values; the index holds {dim}-d vectors")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
            raise ApiError(400, "vector values must be numbers")
        if not all(math.isfinite(v) for v in raw):
            raise ApiError(400, "vector values must be finite (no NaN or Infinity)")
        return np.asarray(raw, dtype=np.float32)


class _Handler(BaseHTTPRequestHandler):
    api: RecallApi
    protocol_version = "HTTP/1.1"
    server_version = "streamrecall-indexer"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        try:
            status, ctype, body = self.api.answer(method, self.path, self._body)
        except Exception:
            log.exception("%s %s failed", method, self.path)
            status, ctype, body = 500, "application/json", _json({"error": "internal error", "status": 500})
        if method != "GET" and status >= 400:
            self.close_connection = True  # a body left unread would be taken for the next request
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if status == 405:
            allowed = ROUTES.get(urlsplit(self.path).path, ("GET",))
            self.send_header("Allow", ", ".join(allowed))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "POST needs a Content-Length header")
        try:
            n = int(length)
        except ValueError:
            raise ApiError(400, f"Content-Length {length!r} is not a number") from None
        if n < 0:
            raise ApiError(400, "Content-Length is negative")
        if n > self.api.max_body_bytes:
            raise ApiError(413, f"body of {n} bytes is above the limit of {self.api.max_body_bytes}")
        return self.rfile.read(n)

    def log_message(self, format: str, *args: Any) -> None:  # access log at DEBUG, not stderr
        log.debug("%s %s", self.address_string(), format % args)


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, f"{name} is given {len(values)} times")
    return values[0]


def _positive_int(name: str, raw: Any, *, required: bool) -> int | None:
    if raw is None:
        if required:
            raise ApiError(400, f"{name} is required (a positive integer)")
        return None
    if isinstance(raw, bool):
        raise ApiError(400, f"{name} must be a positive integer, got {raw!r}")
    if isinstance(raw, str):
        try:
            raw = int(raw.strip())
        except ValueError:
            raise ApiError(400, f"{name} must be a positive integer, got {raw!r}") from None
    if not isinstance(raw, int) or raw < 1:
        raise ApiError(400, f"{name} must be a positive integer, got {raw!r}")
    return raw


def _flag(name: str, raw: str | None) -> bool:
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in ("1", "true", "yes", ""):
        return True
    if value in ("0", "false", "no"):
        return False
    raise ApiError(400, f"{name} must be 1 or 0, got {raw!r}")


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
