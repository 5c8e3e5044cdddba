"""The recall APIs' routes as two small ASGI apps (public and admin) over a :class:`RecallBackend`
(the indexer's or the router's): request validation, answers, refusals as 4xx with a JSON reason;
searches run in the bounded ``search_threads`` pool, never on the event loop."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Protocol, Sequence
from urllib.parse import unquote

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from streamrecall.consumers.recall_api import requests as req
from streamrecall.consumers.recall_api.protocol import ServerLimits, error_body
from streamrecall.consumers.recall_api.rules import ApiError
from streamrecall.metrics import Livez

log = logging.getLogger(__name__)


JSON = b"application/json"


Scope = dict[str, Any]


Receive = Callable[[], Awaitable[dict[str, Any]]]


Send = Callable[[dict[str, Any]], Awaitable[None]]


class RecallBackend(Protocol):
    """What a recall API answers with: the indexer's RecallService, the router's RouterService.

    ``config`` carries the HTTP settings (``max_k``, ``max_batch``, ``http_*``, ``search_threads``)
    under the same names in ``[indexer]`` and ``[router]``; ``metrics`` the query families
    (consumers/recall_api/metrics.py). A backend with ``serves_items`` also answers
    ``/items/{id}`` (``item``) and ``/recall/shard`` (``shard_recall``).
    """

    config: Any
    serves_items: bool

    @property
    def metrics(self) -> Any: ...

    @property
    def dim(self) -> int: ...

    def health(self) -> tuple[bool, dict[str, Any]]: ...

    def recall_for_user(self, user_id: str, k: int, exclude_seen: bool = False,
                        max_per_category: int | None = None) -> dict[str, Any]: ...

    def recall_for_vector(self, vector: Any, k: int, max_per_category: int | None = None,
                          exclude: Sequence[str] = ()) -> dict[str, Any]: ...

    def recall_together(self, queries: Sequence[req.RecallRequest]) -> list[dict[str, Any] | None]:
        """A batch's answers that can share one search, None where a query is asked on its own."""


# ------------------------------------------------------------------------------ the apps
class RecallApp:
    """One listener's routes; ``admin`` selects the admin set."""

    def __init__(self, service: RecallBackend, limits: ServerLimits, pool: ThreadPoolExecutor, admin: bool,
                 livez: Livez | None = None) -> None:
        self.service = service
        self.limits = limits
        self.pool = pool
        self.admin = admin
        self.livez = livez
        self.routes: dict[str, tuple[str, ...]] = (
            {"/metrics": ("GET",), "/healthz": ("GET",)} if admin
            else {"/recall": ("GET", "POST"), "/recall/batch": ("POST",), "/healthz": ("GET",)})
        if service.serves_items and not admin:
            self.routes["/recall/shard"] = ("POST",)
        if livez is not None:  # liveness from the poll loop's heartbeat, on both listeners
            self.routes["/livez"] = ("GET",)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; nothing else is served
            return
        method, path = scope["method"], scope["path"]
        metrics = self.service.metrics
        started = time.perf_counter()
        route = "invalid"
        headers: list[tuple[bytes, bytes]] = []
        try:
            items = path.startswith("/items/") and self.service.serves_items
            allowed = self.routes.get(path, ("GET",) if items else None)
            if allowed is None:
                raise ApiError(404, self._unknown(path))
            if method not in allowed:
                headers.append((b"allow", ", ".join(allowed).encode()))
                raise ApiError(405, f"{path} answers {', '.join(allowed)}, not {method}")
            if method == "GET" and _has_body(scope):
                raise ApiError(400, f"GET {path} takes no body (POST /recall takes a JSON body)")
            status, ctype, body, route = await self._route(scope, receive, method, path)
        except ApiError as exc:
            status, ctype, body = exc.status, JSON, error_body(exc.status, str(exc))
            if method != "GET" or _has_body(scope):
                headers.append((b"connection", b"close"))  # a body left unread would be read as the next request
        except _Disconnected:
            return
        except Exception:
            log.exception("%s %s failed", method, path)
            status, ctype, body = 500, JSON, error_body(500, "internal error")
        if path in ("/recall", "/recall/batch", "/recall/shard"):
            metrics.queries.labels(route, str(status)).inc()
            if status == 200:
                metrics.query_seconds.labels(route).observe(time.perf_counter() - started)
        headers += [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _route(self, scope: Scope, receive: Receive, method: str, path: str) -> tuple[int, bytes, bytes, str]:
        service = self.service
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST.encode(), await self._off_loop(generate_latest, REGISTRY), "metrics"
        if path == "/livez" and self.livez is not None:
            status, ctype, body = self.livez()
            return status, ctype.encode(), body, "livez"
        if path == "/healthz":
            ready, health = service.health()
            return (200 if ready else 503), JSON, msgspec.json.encode(health), "healthz"
        if path.startswith("/items/"):
            return 200, JSON, self._item(unquote(path[len("/items/"):]), scope["query_string"]), "items"
        limits = self._request_limits()
        if path == "/recall/batch":
            queries = req.batch_request(await self._body(scope, receive), limits)
            return 200, JSON, await self._batch(queries), "batch"
        if path == "/recall/shard":
            shard_query = req.shard_request(await self._body(scope, receive), limits)
            answer = await self._off_loop(self.service.shard_recall, shard_query)  # type: ignore[attr-defined]
            return 200, JSON, msgspec.json.encode(answer), answer["route"]
        if method == "GET":
            query: req.RecallRequest = req.user_request(scope["query_string"], limits)
        else:
            query = req.vector_request(await self._body(scope, receive), limits)
        answer = await self._off_loop(self._recall, query)
        return 200, JSON, msgspec.json.encode(answer), answer["route"]

    # ------------------------------------------------------------------ routes
    def _recall(self, q: req.RecallRequest) -> dict[str, Any]:
        """One query, on a pool thread (RecallService does the work; this only dispatches)."""
        if isinstance(q, req.UserRecall):
            return self.service.recall_for_user(q.user_id, q.k, q.exclude_seen, q.max_per_category)
        return self.service.recall_for_vector(q.vector, q.k, q.max_per_category, q.exclude)

    async def _batch(self, queries: Sequence[req.RecallRequest]) -> bytes:
        """Answers in query order: what the backend answers together (one search), then the rest
        one by one, split over the pool's threads."""
        answers = await self._off_loop(self.service.recall_together, queries)
        rest = [n for n, answer in enumerate(answers) if answer is None]
        parts = max(1, min(self.limits.search_threads, len(rest)))
        slices = [part for part in (rest[i::parts] for i in range(parts)) if part]
        done = await asyncio.gather(*(self._off_loop(lambda s=s: [self._recall(queries[n]) for n in s])
                                      for s in slices))
        for part, answered in zip(slices, done):
            for n, answer in zip(part, answered):
                answers[n] = answer
        return msgspec.json.encode({"results": answers})

    def _item(self, item_id: str, query_string: bytes) -> bytes:
        with_vector = req.flag("with_vector", req.one(req.query_params(query_string), "with_vector"))
        if with_vector and not self.admin:
            raise ApiError(403, "with_vector=1 is served on the admin port only (admin_port, docs/api.md)")
        found = self.service.item(item_id, with_vector) if item_id else None  # type: ignore[attr-defined]
        if found is None:
            raise ApiError(404, f"item {item_id!r} is not in the index")
        return msgspec.json.encode(found)

    # ------------------------------------------------------------------ helpers
    def _unknown(self, path: str) -> str:
        if not self.service.serves_items:  # the router: recall only; items live on the shards
            where = " (/metrics is served on the admin port)" if path == "/metrics" and not self.admin else ""
            return (f"no such path {path!r}{where}; the router serves /recall, /recall/batch and /healthz "
                    "(/metrics on its admin port); items are on the shards (docs/api.md)")
        if self.admin:
            where = " (/recall is served on the public port)" if path.startswith("/recall") else ""
            return f"no such path {path!r} on the admin port{where}; it serves /metrics, /healthz, /items/ID"
        where = " (/metrics is served on the admin port)" if path == "/metrics" else ""
        return (f"no such path {path!r}{where}; see docs/api.md "
                "(/recall, /recall/batch, /items/ID, /healthz)")

    def _request_limits(self) -> req.Limits:
        config = self.service.config
        return req.Limits(dim=self.service.dim, max_k=config.max_k, max_batch=self.limits.max_batch)

    async def _off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.limits.max_body_bytes
        length = _header(scope, b"content-length")
        if length is None and _header(scope, b"transfer-encoding") is None:
            raise ApiError(411, "POST needs a Content-Length header")
        if length is not None:
            if not length.isdigit() or len(length) > 18:
                raise ApiError(400, f"Content-Length {length[:40]!r} is not a number")
            if int(length) > limit:
                raise ApiError(413, f"body of {int(length)} bytes is above the limit of {limit}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # chunked bodies have no length to check up front
                raise ApiError(413, f"body is above the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class _Disconnected(Exception):
    """The client went away before its body arrived: nothing to answer."""


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1").strip()
    return None


def _has_body(scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    return (length is not None and length != "0") or _header(scope, b"transfer-encoding") is not None
