"""The recall APIs' HTTP transport (docs/api.md): uvicorn (httptools + uvloop) serving two small ASGI apps.

One server for the indexer and the router (a :class:`RecallBackend` each):

* The **public** listener (``http_port``) answers ``/recall``, ``/recall/batch`` and ``/healthz``;
  an indexer also ``/items/{id}`` and ``/recall/shard`` (the router's request to a shard).
* The **admin** listener (``admin_port``) answers ``/metrics``, ``/healthz`` and, on an indexer,
  ``/items/{id}`` with ``with_vector=1``: what only Prometheus and operators should reach (a
  NetworkPolicy keeps it so, deploy/k8s/31-indexer.yaml).

Why this stack: measured on the project's two-core machine against the standard library's
threaded server, Starlette on uvicorn and granian, a bare ASGI app on uvicorn with httptools
answered the most kept-alive queries per second with the lowest p50 (docs/benchmarks.md),
and five routes need no framework. uvicorn sets TCP_NODELAY (through asyncio), so a kept-alive
client never waits for a delayed ACK.

Searches and the towers' query-time encodes (consumers/roles/indexer/scoring.py) run in a bounded thread
pool (``search_threads``), never on the event loop: hnswlib's ``knn_query`` and torch release
the GIL, and a slow query (a category cap that over-fetches 4,096 candidates) must not stall
every other connection. What uvicorn does not bound, :class:`BoundedProtocol` does: a deadline
on receiving each request (a client sending half a request is cut off), a cap on header bytes,
and a connection limit; every refusal is a JSON answer like the app's own.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import uvicorn

from streamrecall.consumers.recall_api.app import RecallApp, RecallBackend
from streamrecall.consumers.recall_api.protocol import ServerLimits, bounded_protocol
from streamrecall.metrics import Livez

log = logging.getLogger(__name__)


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
    """A recall API's HTTP server: ``start()`` serves on a daemon thread, ``stop()`` drains and stops.

    ``admin_port`` None serves no admin listener (``/metrics`` and vectors are then not served);
    ``name`` (the role) names its threads and log lines.
    """

    def __init__(self, service: RecallBackend, host: str, port: int, max_body_bytes: int = 1 << 20,
                 *, admin_port: int | None = None, limits: ServerLimits | None = None,
                 livez: Livez | None = None, name: str = "indexer") -> None:
        self.name = name
        self.service = service
        base = limits or ServerLimits.of(service.config)
        self.limits = ServerLimits(**{**base.__dict__, "max_body_bytes": max_body_bytes})
        self.max_body_bytes = max_body_bytes
        self._pool = ThreadPoolExecutor(self.limits.search_threads, thread_name_prefix=f"{name}-search")
        self._sockets = [_listen(host, port, self.limits.backlog)]
        if admin_port is not None:
            self._sockets.append(_listen(host, admin_port, self.limits.backlog))
        self._servers = [self._server(RecallApp(service, self.limits, self._pool, admin=i == 1, livez=livez))
                         for i in range(len(self._sockets))]
        self._thread = threading.Thread(target=self._run, name=f"{name}-http", daemon=True)
        self._started = threading.Event()

    def _server(self, app: RecallApp) -> uvicorn.Server:
        config = uvicorn.Config(app, http=bounded_protocol(self.limits), loop="none", lifespan="off",
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
            raise RuntimeError(f"the {self.name}'s HTTP server did not start within 30 s")
        log.info("%s API on %s (recall%s, healthz)%s", self.name, self.url,
                 ", items, shard" if self.service.serves_items else "",
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
            log.exception("the %s's HTTP server failed", self.name)
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
