"""The indexer's HTTP server under real sockets: keep-alive, abuse, slow clients, limits, shutdown,
batch recall and the admin listener (no broker: an in-memory index)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from contextlib import ExitStack
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from streamrecall.consumers.roles.indexer.http_api import RecallService
from streamrecall.consumers.recall_api.server import RecallApi
from streamrecall.consumers.recall_api.protocol import ServerLimits
from streamrecall.consumers.roles.indexer.options import IndexerOptions
from streamrecall.consumers.recall_api.users import UserEntry
from streamrecall.consumers.roles.indexer.state import IndexerState
from streamrecall.events import Item
from streamrecall.index import QualityMonitor
from streamrecall.consumers.roles.indexer.metrics import IndexerMetrics
from streamrecall.model import ModelConfig

MODEL = ModelConfig(id_buckets=4096, token_buckets=4096, estimator_buckets=4096)
MAX_K = 50


def make_state() -> IndexerState:
    state = IndexerState(IndexerOptions(max_k=MAX_K, max_batch=8), MODEL, IndexerMetrics(CollectorRegistry()))
    state.upsert_items([Item(item_id=f"i{i}", created_at=1000 + i, categories=(f"c{i % 3}",), title=f"w{i % 4}")
                        for i in range(30)])
    state.users["u1"] = UserEntry(state.index.get("i7").vector, 0, 1, ("i7",))
    state.users["u2"] = UserEntry(state.index.get("i12").vector, 0, 1, ("i12", "i13"))
    return state


@pytest.fixture
def server_factory() -> Iterator[Callable[..., tuple[RecallApi, IndexerState]]]:
    """Start a server over a fresh state; ``service_class`` and ``limits`` as the test needs."""
    with ExitStack() as stack:
        def make(service_class: type[RecallService] = RecallService, **limits: Any) -> tuple[RecallApi, IndexerState]:
            state = make_state()
            service = service_class(state, state.config, QualityMonitor(state.index),
                                    lambda: (True, {"ready": True, "items": len(state.index)}))
            server = RecallApi(service, "127.0.0.1", 0, limits.pop("max_body_bytes", 1 << 20), admin_port=0,
                               limits=ServerLimits(max_batch=state.config.max_batch, **limits))
            server.start()
            stack.callback(server.stop)
            return server, state
        yield make


@pytest.fixture
def api(server_factory):
    return server_factory()


def request(conn: http.client.HTTPConnection, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=raw, headers={"Content-Type": "application/json"} if raw is not None else {})
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, json.loads(data) if resp.getheader("content-type", "").startswith("application/json") else data


def connect(server: RecallApi, admin: bool = False) -> http.client.HTTPConnection:
    host, port = server.admin_address if admin else server.address
    return http.client.HTTPConnection(host, port, timeout=10)


def raw_socket(server: RecallApi) -> socket.socket:
    return socket.create_connection(server.address, timeout=10)


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection (fails the test if it never does)."""
    out = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return out
        out += chunk


def vec(state: IndexerState, item: str) -> list[float]:
    return state.index.get(item).vector.tolist()


# ----------------------------------------------------------------------------- keep-alive
def test_kept_alive_connection_answers_every_request(api):
    server, state = api
    conn = connect(server)
    try:
        for n in range(40):
            status, body = request(conn, "POST", "/recall", {"vector": vec(state, f"i{n % 30}"), "k": 3})
            assert status == 200 and len(body["results"]) == 3
            status, body = request(conn, "GET", "/recall?user_id=u1&k=2")
            assert status == 200 and body["route"] == "user-vector"
        # a refused GET keeps the connection too (nothing unread); the next request is answered
        assert request(conn, "GET", "/recall?k=2")[0] == 400
        assert request(conn, "GET", "/healthz")[0] == 200
        assert conn.sock is not None  # still the first connection: never closed by the server
    finally:
        conn.close()


# ----------------------------------------------------------------------------- bad requests
NESTED = b"[" * 50_000 + b"]" * 50_000


@pytest.mark.parametrize("method,path,body,status,needle", [
    ("POST", "/recall", NESTED, 400, "JSON object"),
    ("POST", "/recall", b'{"k": 3, "vector": ' + NESTED + b"}", 400, "Expected `float`, got `array`"),
    ("POST", "/recall", b'{"k": 3, "exclude": ' + NESTED + b"}", 400, "Expected `str`, got `array`"),
    ("POST", "/recall", b'{"k": 3, "deep": ' + NESTED + b"}", 400, "unknown field `deep`"),
    ("POST", "/recall/batch", b'{"k": 3, "queries": ' + NESTED + b"}", 400, "Expected `object`, got `array`"),
    ("POST", "/recall", b'{"k": 1' + b"0" * 5000 + b', "vector": []}', 400, "out of range"),
    ("POST", "/recall", b'{"k": 1' + b"0" * 15 + b', "vector": []}', 400, "above the limit of 50"),
    ("POST", "/recall", b'{"k": 1e400}', 400, "out of range"),
    ("POST", "/recall", b'{"k": "3"}', 400, "Expected `int | null`, got `str`"),
    ("POST", "/recall", b'{"k": true}', 400, "got `bool`"),
    ("POST", "/recall", b'{"k": 3.5}', 400, "got `float`"),
    ("POST", "/recall", b'{"k": 3, "vector": "abc"}', 400, "got `str`"),
    ("POST", "/recall", b'{"k": 3, "max_per_category": 0, "vector": []}', 400, "max_per_category must be a positive"),
    ("POST", "/recall", b'{"k": 3, "vector": [1, 2], "exclude": "i1"}', 400, "Expected `array`, got `str`"),
    ("POST", "/recall", b"\xff\xfe", 400, "not valid JSON"),
    ("POST", "/recall", b"", 400, "not valid JSON"),
    ("GET", "/recall?user_id=u1&k=" + "9" * 5000, None, 400, "positive integer"),
    ("GET", "/recall?user_id=u1&k=%C2%B2", None, 400, "positive integer"),  # '²' passes str.isdigit
    ("GET", "/recall?user_id=u1&k=1_0", None, 400, "positive integer"),
    ("GET", "/recall?" + "&".join(f"p{i}=1" for i in range(40)), None, 400, "more than 16 parameters"),
    ("GET", "/recall?user_id=%FF&k=3", None, 400, "not UTF-8"),
    ("GET", "/recall?user_id=u1&user_id=u2&k=3", None, 400, "given 2 times"),
    ("POST", "/recall/batch", b'{"k": 3}', 400, "queries is required"),
    ("POST", "/recall/batch", b'{"k": 3, "queries": []}', 400, "queries is required"),
    ("POST", "/recall/batch", b'{"k": 3, "queries": [{}]}', 400, "queries[0]: give exactly one of"),
    ("POST", "/recall/batch", b'{"queries": [{"user_id": "u1"}]}', 400, "queries[0].k (or k) is required"),
    ("POST", "/recall/batch", b'{"k": 3, "queries": [{"user_id": "u1", "vector": [1]}]}', 400, "exactly one of"),
    ("POST", "/recall/batch", b'{"k": 3, "queries": [{"user_id": "u1"}, {"vector": [1, 2]}]}', 400,
     "queries[1].vector has 2 values"),
    ("POST", "/recall/batch", b'{"k": 3, "queries": [{"user_id": "u1", "exclude": ["i1"]}]}', 400, "exclude_seen"),
    ("POST", "/recall/batch", b'{"k": 3, "queries": [{"user_id": "u1", "k": 51}]}', 400, "above the limit of 50"),
    ("POST", "/recall/batch", b'{"k": 3, "queries": [' + b", ".join([b'{"user_id": "u1"}'] * 9) + b"]}", 413,
     "9 queries is above the limit of 8"),
])
def test_every_bad_request_is_a_4xx_with_a_json_reason(api, method, path, body, status, needle):
    server, _ = api
    conn = connect(server)
    try:
        got_status, got = request(conn, method, path, body)
    finally:
        conn.close()
    assert got_status == status, got
    assert needle in got["error"] and got["status"] == status, got


def test_too_many_exclusions_are_refused_by_max_k(api):
    server, state = api
    conn = connect(server)
    too_many = [f"x{i}" for i in range(MAX_K + 1)]
    status, body = request(conn, "POST", "/recall", {"vector": vec(state, "i1"), "k": 3, "exclude": too_many})
    assert status == 400 and "at most 50 (max_k)" in body["error"]
    status, body = request(connect(server), "POST", "/recall", {"vector": vec(state, "i1"), "k": 3,
                                                                "exclude": too_many[:MAX_K]})
    assert status == 200


def test_get_with_a_body_is_refused_and_the_connection_closed(api):
    server, _ = api
    sock = raw_socket(server)
    sock.sendall(b"GET /recall?user_id=u1&k=3 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400") and b'"GET /recall takes no body' in answer


def test_oversized_bodies_are_refused_before_they_are_read(server_factory):
    server, _ = server_factory(max_body_bytes=4096)
    sock = raw_socket(server)  # announced too big: answered at once, without sending the body
    sock.sendall(b"POST /recall HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
    answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 413") and b"above the limit of 4096" in answer
    sock = raw_socket(server)  # chunked: cut off once past the limit
    chunk = b"x" * 3000
    sock.sendall(b"POST /recall HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 2)
    answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 413") and b'"status":413' in answer
    conn = connect(server)
    conn.putrequest("POST", "/recall")
    conn.endheaders()  # no Content-Length, not chunked
    resp = conn.getresponse()
    assert resp.status == 411 and json.loads(resp.read())["status"] == 411


def test_malformed_http_and_huge_headers_answer_json(api):
    server, _ = api
    sock = raw_socket(server)
    sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
    answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400") and b'"status":400' in answer
    sock = raw_socket(server)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431") and b'"status":431' in answer


# ----------------------------------------------------------------------------- slow clients
def test_slow_clients_are_disconnected_after_the_timeout_while_others_are_served(server_factory):
    server, state = server_factory(request_timeout_s=1.0, idle_timeout_s=0.5)
    half = [raw_socket(server) for _ in range(20)]
    for sock in half[:10]:  # half a request, then silence
        sock.sendall(b"POST /recall HTTP/1.1\r\nHost: x\r\nContent-Length: 400\r\n\r\n{\"k\": 3, ")
    for sock in half[10:15]:
        sock.sendall(b"GET /recall?user_id=u1&k=3 HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    # half[15:] send nothing at all
    started = time.monotonic()
    conn = connect(server)
    for _ in range(5):  # others are served meanwhile
        assert request(conn, "GET", "/recall?user_id=u1&k=3")[0] == 200
    assert time.monotonic() - started < 1.0, "a healthy client waited for the slow ones"
    for sock in half:
        answer = read_all(sock)  # returns once the server closed the connection
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert time.monotonic() - started < 8
    # a kept-alive connection idle past idle_timeout_s is closed too
    conn.sock.settimeout(5)
    time.sleep(0.8)
    assert conn.sock.recv(1) == b""


def test_connections_beyond_the_limit_get_503(server_factory):
    server, _ = server_factory(max_connections=3)
    kept = [connect(server) for _ in range(3)]
    for conn in kept:
        assert request(conn, "GET", "/healthz")[0] == 200
    extra = raw_socket(server)
    answer = read_all(extra)
    assert answer.startswith(b"HTTP/1.1 503") and b"more than 3 connections" in answer
    kept[0].close()
    time.sleep(0.2)
    conn = connect(server)
    assert request(conn, "GET", "/healthz")[0] == 200  # a slot freed is usable again


# ----------------------------------------------------------------------------- shutdown
class SlowService(RecallService):
    """Vector queries take a second (a test double for a slow search): shutdown must wait for them."""

    entered = threading.Event()

    def recall_for_vector(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        SlowService.entered.set()
        time.sleep(1.0)
        return super().recall_for_vector(*args, **kwargs)


def test_graceful_shutdown_finishes_in_flight_requests(server_factory):
    SlowService.entered.clear()
    server, state = server_factory(SlowService, shutdown_timeout_s=10)
    got: dict[str, Any] = {}

    def ask() -> None:
        got["answer"] = request(connect(server), "POST", "/recall", {"vector": vec(state, "i3"), "k": 2})

    asker = threading.Thread(target=ask)
    asker.start()
    assert SlowService.entered.wait(10)
    server.stop()
    asker.join(10)
    status, body = got["answer"]
    assert status == 200 and body["route"] == "vector" and len(body["results"]) == 2
    with pytest.raises(OSError):
        request(connect(server), "GET", "/healthz")


# ----------------------------------------------------------------------------- batch
def test_batch_answers_each_query_as_the_single_form_would(api):
    server, state = api
    conn = connect(server)
    singles = [request(conn, "GET", "/recall?user_id=u1&k=4&exclude_seen=1")[1],
               request(conn, "GET", "/recall?user_id=u2&k=3&max_per_category=1")[1],
               request(conn, "POST", "/recall", {"vector": vec(state, "i20"), "k": 4, "exclude": ["i20"]})[1],
               request(conn, "GET", "/recall?user_id=nobody&k=4")[1]]
    status, batch = request(conn, "POST", "/recall/batch", {
        "k": 4, "exclude_seen": True,
        "queries": [{"user_id": "u1"},
                    {"user_id": "u2", "k": 3, "max_per_category": 1, "exclude_seen": False},
                    {"vector": vec(state, "i20"), "exclude": ["i20"]},
                    {"user_id": "nobody", "exclude_seen": False}]})
    assert status == 200 and len(batch["results"]) == 4
    for single, answer in zip(singles, batch["results"]):
        assert answer == single
    assert "i7" not in [r["item_id"] for r in batch["results"][0]["results"]]  # exclude_seen from the batch
    cats = [r["categories"][0] for r in batch["results"][1]["results"]]
    assert len(cats) == len(set(cats)) == 3  # the per-query cap
    assert "i20" not in [r["item_id"] for r in batch["results"][2]["results"]]
    assert batch["results"][3]["route"] == "recent"


def test_batch_keeps_query_order_across_threads(server_factory):
    server, state = server_factory(search_threads=3)
    vectors = [f"i{n}" for n in range(8)]
    status, batch = request(connect(server), "POST", "/recall/batch",
                            {"k": 1, "queries": [{"vector": vec(state, i)} for i in vectors]})
    assert status == 200
    tops = [a["results"][0]["item_id"] for a in batch["results"]]
    for item, top in zip(vectors, tops):  # same content gives ties: i, i+12, i+24 share categories and title
        assert np.allclose(state.index.get(top).vector, state.index.get(item).vector, atol=1e-5)


# ----------------------------------------------------------------------------- two listeners
def test_admin_views_live_on_the_admin_port_only(api):
    server, state = api
    public, admin = connect(server), connect(server, admin=True)
    status, body = request(public, "GET", "/metrics")
    assert status == 404 and "admin port" in body["error"]
    status, body = request(public, "GET", "/items/i3?with_vector=1")
    assert status == 403 and "admin port" in body["error"]
    assert request(public, "GET", "/items/i3")[0] == 200  # the item's metadata stays public
    status, body = request(admin, "GET", "/items/i3?with_vector=1")
    assert status == 200 and np.allclose(body["vector"], vec(state, "i3"), atol=1e-6)
    status, text = request(admin, "GET", "/metrics")
    assert status == 200 and b"streamrecall_records_consumed_total" in text
    status, body = request(admin, "GET", "/recall?user_id=u1&k=3")
    assert status == 404 and "public port" in body["error"]
    assert request(admin, "GET", "/healthz")[0] == 200


def test_queries_are_counted_by_route_and_status(api):
    server, state = api
    conn = connect(server)
    request(conn, "POST", "/recall/batch", {"k": 2, "queries": [{"user_id": "u1"}]})
    request(conn, "GET", "/recall?user_id=u1&k=0")
    counts = {(s.labels["route"], s.labels["status"]): s.value for metric in state.metrics.queries.collect()
              for s in metric.samples if s.name.endswith("_total")}
    assert counts[("batch", "200")] == 1 and counts[("invalid", "400")] == 1
