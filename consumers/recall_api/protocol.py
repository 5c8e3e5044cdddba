"""What uvicorn does not bound, for the recall APIs' listeners: a deadline on receiving each request
(a client sending half a request is cut off with a 408), a cap on header bytes (431) and a
connection limit (503), each refusal a JSON answer like the app's own (:class:`BoundedProtocol`)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


#: Request line plus headers, at most (a client streaming headers forever is refused with 431).
MAX_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True)
class ServerLimits:
    """How much the server accepts, and for how long (the ``[indexer]`` or ``[router]`` settings, docs/api.md)."""

    max_body_bytes: int = 1 << 20
    max_batch: int = 256
    request_timeout_s: float = 10.0     # a request must arrive whole within this of its first byte
    idle_timeout_s: float = 5.0         # a kept-alive connection idle this long is closed
    max_connections: int = 1024         # per listener; more are answered 503 and closed
    backlog: int = 1024                 # listen(2) backlog (the kernel caps it at net.core.somaxconn)
    shutdown_timeout_s: float = 10.0    # in-flight requests get this long to finish at stop()
    search_threads: int = 2             # the pool that runs searches and encodes

    @classmethod
    def of(cls, config: Any) -> "ServerLimits":
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


class BoundedProtocol(HttpToolsProtocol):
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


def bounded_protocol(limits: ServerLimits) -> type[BoundedProtocol]:
    return type("BoundedProtocol", (BoundedProtocol,), {"limits": limits})
