"""The router's shard client over real sockets: failover between replicas, the deadline, down marks."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from streamrecall.consumers.roles.router.fanout import Failure, Reply, ShardClient


class _Shard(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    delay_s = 0.0
    status = 200

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(self.delay_s)
        out = json.dumps({"echo": json.loads(body), "port": self.server.server_address[1]}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: object) -> None:
        pass


def _serve(delay_s: float = 0.0, status: int = 200) -> ThreadingHTTPServer:
    handler = type("Handler", (_Shard,), {"delay_s": delay_s, "status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def servers() -> Iterator[list[ThreadingHTTPServer]]:
    started: list[ThreadingHTTPServer] = []
    yield started
    for server in started:
        server.shutdown()
        server.server_close()


def _url(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_every_shard_answers_on_kept_alive_connections(servers):
    servers += [_serve(), _serve()]
    client = ShardClient([[_url(servers[0])], [_url(servers[1])]], threads=2)
    for n in range(3):
        replies = client.ask({0: b'{"q": 0}', 1: json.dumps({"q": n}).encode()}, 2.0)
        assert all(isinstance(r, Reply) for r in replies.values())
        assert replies[1].body["echo"] == {"q": n} and replies[1].body["port"] == servers[1].server_address[1]
    client.close()


def test_a_refused_replica_fails_over_and_is_marked_down(servers):
    servers.append(_serve())
    dead = f"http://127.0.0.1:{_closed_port()}"
    client = ShardClient([[dead, _url(servers[0])]], threads=2, down_s=60)
    for _ in range(4):  # round-robin would start at the dead replica every other time
        (reply,) = client.ask({0: b"{}"}, 2.0).values()
        assert isinstance(reply, Reply) and reply.url == _url(servers[0])
    assert client.shards[0][0].down_until > time.monotonic()
    client.close()


def test_a_slow_shard_misses_the_deadline_and_the_others_still_answer(servers):
    servers += [_serve(delay_s=1.0), _serve()]
    client = ShardClient([[_url(servers[0])], [_url(servers[1])]], threads=2)
    started = time.monotonic()
    replies = client.ask({0: b"{}", 1: b"{}"}, 0.2)
    assert time.monotonic() - started < 0.9
    assert isinstance(replies[0], Failure) and replies[0].reason == "deadline"
    assert isinstance(replies[1], Reply)
    assert client.shards[0][0].down_until == 0.0, "slow is not down"
    client.close()


def test_every_replica_down_or_failing_is_a_down_failure_and_4xx_an_error(servers):
    servers += [_serve(status=503), _serve(status=400)]
    dead = f"http://127.0.0.1:{_closed_port()}"
    client = ShardClient([[dead, _url(servers[0])], [_url(servers[1])]], threads=2)
    replies = client.ask({0: b"{}", 1: b"{}"}, 2.0)
    assert isinstance(replies[0], Failure) and replies[0].reason == "down"
    assert "HTTP 503" in replies[0].detail and "ConnectionRefused" in replies[0].detail
    assert isinstance(replies[1], Failure) and replies[1].reason == "error" and "HTTP 400" in replies[1].detail
    client.close()
