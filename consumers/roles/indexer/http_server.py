"""The indexer's HTTP transport (docs/api.md): uvicorn (httptools + uvloop) serving two small ASGI apps.

* The **public** listener (``http_port``) answers ``/recall``, ``/recall/batch``, ``/items/{id}``
  and ``/healthz``.
* The **admin** listener (``admin_port``) answers ``/metrics``, ``/healthz`` and ``/items/{id}``
  with ``with_vector=1``: what only Prometheus and operators should reach (a NetworkPolicy
  keeps it so, deploy/k8s/31-indexer.yaml).

Why this stack: measured on the project's two-core machine against the standard library's
threaded server, Starlette on uvicorn and granian, a bare ASGI app on uvicorn with httptools
answered the most kept-alive queries per second with the lowest p50 (docs/benchmarks.md),
and five routes need no framework. uvicorn sets TCP_NODELAY (through asyncio), so a kept-alive
client never waits for a delayed ACK.

Searches and the towers' query-time encodes (consumers/roles/indexer/scoring.py) run in a bounded thread
pool (``search_threads``), never on the event loop: hnswlib's ``knn_query`` and torch release
the GIL, and a slow query (a category cap that over-fetches 4,096 candidates) must not stall
every other connection. What uvicorn does not bound, :class:`_BoundedProtocol` does: a deadline
on receiving each request (a client sending half a request is cut off), a cap on header bytes,
and a connection limit; every refusal is a JSON answer like the app's own.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence
from urllib.parse import unquote

import msgspec
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from streamrecall.consumers.roles.indexer import http_requests as req
from streamrecall.consumers.roles.indexer.http_api import ApiError, RecallService
from streamrecall.consumers.roles.indexer.options import IndexerOptions
from streamrecall.metrics import Livez

log = logging.getLogger(__name__)

JSON = b"application/json"
#: Request line plus headers, at most (a client streaming headers forever is refused with 431).
MAX_HEADER_BYTES = 64 * 1024
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class ServerLimits:
    """How much the server accepts, and for how long (the ``[indexer]`` settings, docs/api.md)."""

    max_body_bytes: int = 1 << 20
    max_batch: int = 256
    request_timeout_s: float = 10.0     # a request must arrive whole within this of its first byte
    idle_timeout_s: float = 5.0         # a kept-alive connection idle this long is closed
    max_connections: int = 1024         # per listener; more are answered 503 and closed
    backlog: int = 1024                 # listen(2) backlog (the kernel caps it at net.core.somaxconn)
    shutdown_timeout_s: float = 10.0    # in-flight requests get this long to finish at stop()
    search_threads: int = 2             # the pool that runs searches and encodes

    @classmethod
    def of(cls, config: IndexerOptions) -> "ServerLimits":
        return cls(max_body_bytes=config.max_body_bytes, max_batch=config.max_batch,
                   request_timeout_s=config.http_request_timeout_s, idle_timeout_s=config.http_idle_timeout_s,
                   max_connections=config.http_max_connections, backlog=config.http_backlog,
                   shutdown_timeout_s=config.http_shutdown_timeout_s, search_threads=config.search_threads)


def error_body(status: int, message: str) -> bytes:
    return msgspec.json.encode({"error": message, "status": status})


def _raw_response(status: int, reason: str, message: str) -> bytes:
    """A whole JSON error response for the protocol layer to write when no app runs (then close)."""
    body = error_body(status, message)
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class _BoundedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds it lacks (``limits`` is set by a subclass).

    uvicorn closes a kept-alive connection idle after an answer (``timeout_keep_alive``) but
    has no deadline on a connection that never completes a request: the request deadline is
    armed when the connection opens, after each answer and at each request's first byte, and
    cancelled when the request has been read whole.
    """

    limits: ServerLimits

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        if len(self.connections) > self.limits.max_connections:
            log.warning("connection refused: %d open, the limit is %d", len(self.connections),
                        self.limits.max_connections)
            self._refuse(503, "Service Unavailable", f"more than {self.limits.max_connections} connections are open")
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def send_400_response(self, msg: str) -> None:  # the parser's refusals answer JSON too
        self._refuse(400, "Bad Request", f"malformed HTTP request: {msg}")

    # ------------------------------------------------------------------ bounds
    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
            self._refuse(431, "Request Header Fields Too Large",
                         f"request line and headers are above {MAX_HEADER_BYTES} bytes")

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.limits.request_timeout_s, self._expired)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()  # type: ignore[union-attr]
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if self.transport.is_closing():
            return
        if cycle is not None and not cycle.response_complete and not cycle.more_body:
            return  # read whole and being answered: the deadline covers the client, not the search
        log.info("connection from %s closed: no whole request within %.1fs", self.client,
                 self.limits.request_timeout_s)
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self._refuse(408, "Request Timeout", f"no whole request within {self.limits.request_timeout_s:g}s")
        else:
            self.transport.close()

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app's answer, if any, is not written after ours
        self.transport.write(_raw_response(status, reason, message))
        self.transport.close()


def _protocol_class(limits: ServerLimits) -> type[_BoundedProtocol]:
    return type("BoundedProtocol", (_BoundedProtocol,), {"limits": limits})


# ------------------------------------------------------------------------------ the apps
class _App:
    """One listener's routes; ``admin`` selects the admin set."""

    def __init__(self, service: RecallService, limits: ServerLimits, pool: ThreadPoolExecutor, admin: bool,
                 livez: Livez | None = None) -> None:
        self.service = service
        self.limits = limits
        self.pool = pool
        self.admin = admin
        self.livez = livez
        self.routes: dict[str, tuple[str, ...]] = (
            {"/metrics": ("GET",), "/healthz": ("GET",)} if admin
            else {"/recall": ("GET", "POST"), "/recall/batch": ("POST",), "/healthz": ("GET",)})
        if livez is not None:  # liveness from the poll loop's heartbeat, on both listeners
            self.routes["/livez"] = ("GET",)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; nothing else is served
            return
        method, path = scope["method"], scope["path"]
        metrics = self.service.state.metrics
        started = time.perf_counter()
        route = "invalid"
        headers: list[tuple[bytes, bytes]] = []
        try:
            allowed = self.routes.get(path, ("GET",) if path.startswith("/items/") else None)
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
        if path in ("/recall", "/recall/batch"):
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
        """Answers in query order; the queries are split over the pool's threads."""
        parts = max(1, min(self.limits.search_threads, len(queries)))
        slices = [list(queries[i::parts]) for i in range(parts)]
        done = await asyncio.gather(*(self._off_loop(lambda s=s: [self._recall(q) for q in s]) for s in slices))
        answers: list[Any] = [None] * len(queries)
        for i, part in enumerate(done):
            answers[i::parts] = part
        return msgspec.json.encode({"results": answers})

    def _item(self, item_id: str, query_string: bytes) -> bytes:
        with_vector = req.flag("with_vector", req.one(req.query_params(query_string), "with_vector"))
        if with_vector and not self.admin:
            raise ApiError(403, "with_vector=1 is served on the admin port only (admin_port, docs/api.md)")
        found = self.service.item(item_id, with_vector) if item_id else None
        if found is None:
            raise ApiError(404, f"item {item_id!r} is not in the index")
        return msgspec.json.encode(found)

    # ------------------------------------------------------------------ helpers
    def _unknown(self, path: str) -> str:
        if self.admin:
            where = " (/recall is served on the public port)" if path.startswith("/recall") else ""
            return f"no such path {path!r} on the admin port{where}; it serves /metrics, /healthz, /items/ID"
        where = " (/metrics is served on the admin port)" if path == "/metrics" else ""
        return (f"no such path {path!r}{where}; see docs/api.md "
                "(/recall, /recall/batch, /items/ID, /healthz)")

    def _request_limits(self) -> req.Limits:
        config = self.service.config
        return req.Limits(dim=self.service.state.index.dim, max_k=config.max_k, max_batch=self.limits.max_batch)

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


# ------------------------------------------------------------------------------ the server
def _listen(host: str, port: int, backlog: int) -> socket.socket:
    """Bind now (so a taken port fails at construction, and port 0 has an address at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class RecallApi:
    """The indexer's HTTP server: ``start()`` serves on a daemon thread, ``stop()`` drains and stops.

    ``admin_port`` None serves no admin listener (``/metrics`` and vectors are then not served).
    """

    def __init__(self, service: RecallService, host: str, port: int, max_body_bytes: int = 1 << 20,
                 *, admin_port: int | None = None, limits: ServerLimits | None = None,
                 livez: Livez | None = None) -> None:
        self.service = service
        base = limits or ServerLimits.of(service.config)
        self.limits = ServerLimits(**{**base.__dict__, "max_body_bytes": max_body_bytes})
        self.max_body_bytes = max_body_bytes
        self._pool = ThreadPoolExecutor(self.limits.search_threads, thread_name_prefix="indexer-search")
        self._sockets = [_listen(host, port, self.limits.backlog)]
        if admin_port is not None:
            self._sockets.append(_listen(host, admin_port, self.limits.backlog))
        self._servers = [self._server(_App(service, self.limits, self._pool, admin=i == 1, livez=livez))
                         for i in range(len(self._sockets))]
        self._thread = threading.Thread(target=self._run, name="indexer-http", daemon=True)
        self._started = threading.Event()

    def _server(self, app: _App) -> uvicorn.Server:
        config = uvicorn.Config(app, http=_protocol_class(self.limits), loop="none", lifespan="off",
                                log_config=None, access_log=False, server_header=False,
                                timeout_keep_alive=self.limits.idle_timeout_s,  # type: ignore[arg-type]
                                timeout_graceful_shutdown=self.limits.shutdown_timeout_s,  # type: ignore[arg-type]
                                backlog=self.limits.backlog)
        return uvicorn.Server(config)

    # ---------------------------------------------------------------- addresses
    @property
    def address(self) -> tuple[str, int]:
        return _address(self._sockets[0])

    @property
    def url(self) -> str:
        return _url(self.address)

    @property
    def admin_address(self) -> tuple[str, int] | None:
        return _address(self._sockets[1]) if len(self._sockets) > 1 else None

    @property
    def admin_url(self) -> str | None:
        address = self.admin_address
        return _url(address) if address else None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("the indexer's HTTP server did not start within 30 s")
        log.info("indexer API on %s (recall, items, healthz)%s", self.url,
                 f"; admin on {self.admin_url} (metrics, healthz, items with vectors)" if self.admin_url else "")

    def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to ``shutdown_timeout_s``), then stop."""
        for server in self._servers:
            server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(self.limits.shutdown_timeout_s + 5)
        for sock in self._sockets:
            sock.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        import uvloop  # the C event loop: part of what the stack was chosen for

        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except Exception:
            log.exception("the indexer's HTTP server failed")
        finally:
            self._started.set()
            loop.close()

    async def _serve(self) -> None:
        tasks = [asyncio.ensure_future(s.serve(sockets=[sock])) for s, sock in zip(self._servers, self._sockets)]
        while not all(s.started for s in self._servers) and not any(t.done() for t in tasks):
            await asyncio.sleep(0.01)
        self._started.set()
        await asyncio.gather(*tasks)


def _address(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


def _url(address: tuple[str, int]) -> str:
    host, port = address
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
