"""Asking every shard at once, with one deadline (the router's side of a sharded index).

Each shard is a list of replica URLs (indexers started with the same ``--shard I``); a query
goes to one replica of every shard, chosen round-robin among those not marked down. A replica
that refuses the connection or answers 5xx is marked down for ``down_s`` and the next replica
of that shard is tried while the deadline allows; a replica that does not answer within the
deadline is only left out of this answer (slow is not down).

Transport: the standard library's ``http.client`` with kept-alive connections, one per worker
thread and replica, on a pool of ``threads`` workers. The request is one ``send`` (headers and
body together, ``TCP_NODELAY`` set), so no delayed-ACK stall; the socket timeout is the time left
to the deadline, and a connection that timed out is closed (its answer would arrive later, on
the next request). The shards' answers are JSON (msgspec decodes them).
"""

from __future__ import annotations

import http.client
import itertools
import logging
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit

import msgspec

from streamrecall.errors import ConfigError

log = logging.getLogger(__name__)

SHARD_PATH = "/recall/shard"


@dataclass(frozen=True)
class Reply:
    """A shard's JSON answer (``status`` 200), from replica ``url``."""

    shard: int
    url: str
    body: dict[str, Any]
    seconds: float


@dataclass(frozen=True)
class Failure:
    """No answer from shard ``shard``: ``reason`` is ``deadline``, ``down`` or ``error``."""

    shard: int
    reason: str
    detail: str


def parse_shard_urls(text: str) -> list[list[str]]:
    """``shard_urls``: shards separated by ``;``, the replicas of one shard by ``,``, in shard order.

    ``http://a:8470;http://b:8470,http://b2:8470`` is shard 0 on ``a`` and shard 1 on ``b`` or ``b2``.
    """
    shards = []
    for n, part in enumerate(text.split(";")):
        replicas = [u.strip().rstrip("/") for u in part.split(",") if u.strip()]
        if not replicas:
            raise ConfigError(f"shard_urls: shard {n} has no URL (shards are separated by ';', "
                              "the replicas of one shard by ',')")
        for url in replicas:
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
                raise ConfigError(f"shard_urls: {url!r} (shard {n}) is not http://HOST:PORT")
            try:
                parts.port
            except ValueError:
                raise ConfigError(f"shard_urls: {url!r} (shard {n}) has an invalid port") from None
        shards.append(replicas)
    return shards


class _Replica:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or ""
        self.port = parts.port or 80
        self.down_until = 0.0


class ShardClient:
    """Sends one request body to every shard and collects what answers before the deadline."""

    def __init__(self, shards: Sequence[Sequence[str]], *, threads: int = 16, down_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.shards = [[_Replica(u) for u in replicas] for replicas in shards]
        self.down_s = down_s
        self.clock = clock
        self._turn = [itertools.count() for _ in self.shards]
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="router-fanout")

    def __len__(self) -> int:
        return len(self.shards)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def ask(self, bodies: Mapping[int, bytes], deadline_s: float) -> dict[int, Reply | Failure]:
        """POST ``bodies[shard]`` to one replica of each shard; whatever has not answered within
        ``deadline_s`` (from now) is a ``deadline`` failure."""
        until = self.clock() + deadline_s
        items = list(bodies.items())
        if not items:
            return {}
        # The caller's thread asks the last shard itself: one thread hand-off fewer per query.
        futures: dict[int, Future[Reply | Failure]] = {
            shard: self._pool.submit(self._ask_shard, shard, body, until) for shard, body in items[:-1]}
        last_shard, last_body = items[-1]
        last = self._ask_shard(last_shard, last_body, until)
        wait(list(futures.values()), timeout=max(0.0, until - self.clock()))
        out: dict[int, Reply | Failure] = {last_shard: last}
        for shard, future in futures.items():
            if future.done() and not future.cancelled():
                out[shard] = future.result()
            else:
                future.cancel()
                out[shard] = Failure(shard, "deadline", f"no answer within {deadline_s * 1000:.0f} ms")
        return out

    # ------------------------------------------------------------------ one shard
    def _order(self, shard: int) -> list[_Replica]:
        """The shard's replicas, starting at this turn's, those marked down last."""
        replicas = self.shards[shard]
        start = next(self._turn[shard]) % len(replicas)
        rotated = replicas[start:] + replicas[:start]
        now = self.clock()
        return [r for r in rotated if r.down_until <= now] + [r for r in rotated if r.down_until > now]

    def _ask_shard(self, shard: int, body: bytes, until: float) -> Reply | Failure:
        errors = []
        for replica in self._order(shard):
            left = until - self.clock()
            if left <= 0:
                return Failure(shard, "deadline", "; ".join(errors) or "no time left")
            started = self.clock()
            try:
                status, data = self._post(replica, body, left)
            except (socket.timeout, TimeoutError):
                self._drop(replica)
                return Failure(shard, "deadline", f"{replica.url} did not answer in time")
            except (OSError, http.client.HTTPException) as exc:
                self._drop(replica)
                replica.down_until = self.clock() + self.down_s
                errors.append(f"{replica.url}: {type(exc).__name__}: {exc}")
                continue
            if status >= 500:
                replica.down_until = self.clock() + self.down_s
                errors.append(f"{replica.url}: HTTP {status}")
                continue
            if status != 200:  # the router asked something the shard refuses: a bug or a mismatch
                return Failure(shard, "error", f"{replica.url}: HTTP {status}: {data[:300].decode('utf-8', 'replace')}")
            try:
                decoded = msgspec.json.decode(data)
            except msgspec.DecodeError as exc:
                return Failure(shard, "error", f"{replica.url}: not JSON: {exc}")
            return Reply(shard, replica.url, decoded, self.clock() - started)
        return Failure(shard, "down", "; ".join(errors))

    def _post(self, replica: _Replica, body: bytes, timeout_s: float) -> tuple[int, bytes]:
        """(status, body) of one POST; a kept-alive connection the shard closed meanwhile is retried
        once on a fresh one (a fresh connection that fails raises)."""
        conns: dict[str, http.client.HTTPConnection] = self._local.__dict__.setdefault("conns", {})
        reused = replica.url in conns
        try:
            return self._exchange(conns, replica, body, timeout_s)
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
            self._drop(replica)
            if not reused:
                raise
        return self._exchange(conns, replica, body, timeout_s)

    def _exchange(self, conns: dict[str, http.client.HTTPConnection], replica: _Replica, body: bytes,
                  timeout_s: float) -> tuple[int, bytes]:
        conn = conns.get(replica.url)
        if conn is None:
            conn = conns[replica.url] = http.client.HTTPConnection(replica.host, replica.port, timeout=timeout_s)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            conn.sock.settimeout(timeout_s)
        conn.request("POST", SHARD_PATH, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.will_close:
            self._drop(replica)
        return response.status, data

    def _drop(self, replica: _Replica) -> None:
        conn = self._local.__dict__.get("conns", {}).pop(replica.url, None)
        if conn is not None:
            conn.close()
