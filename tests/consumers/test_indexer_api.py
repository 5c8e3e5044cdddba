"""The recall API over a real socket, on an in-memory index (no broker): routes and clear 4xx answers."""

from __future__ import annotations

import http.client
import json
from contextlib import ExitStack

import pytest
from prometheus_client import CollectorRegistry

from streamrecall.consumers.roles.indexer.http_api import RecallService
from streamrecall.consumers.roles.indexer.http_server import RecallApi
from streamrecall.consumers.roles.indexer.options import IndexerOptions
from streamrecall.consumers.roles.indexer.state import IndexerState, UserEntry
from streamrecall.events import Item
from streamrecall.index import QualityMonitor
from streamrecall.consumers.roles.indexer.metrics import IndexerMetrics
from streamrecall.model import ModelConfig

MODEL = ModelConfig(id_buckets=4096, token_buckets=4096, estimator_buckets=4096)


@pytest.fixture
def api():
    state = IndexerState(IndexerOptions(max_k=50, max_body_bytes=4096), MODEL, IndexerMetrics(CollectorRegistry()))
    state.upsert_items([Item(item_id=f"i{i}", created_at=1000 + i, categories=(f"c{i % 3}",), title=f"w{i % 4}")
                        for i in range(30)])
    seen = state.index.get("i7").vector
    state.users["u1"] = UserEntry(seen, 0, 1, ("i7",))
    service = RecallService(state, state.config, QualityMonitor(state.index),
                            lambda: (True, {"ready": True, "items": len(state.index)}))
    server = RecallApi(service, "127.0.0.1", 0, state.config.max_body_bytes, admin_port=0)
    with ExitStack() as stack:
        server.start()
        stack.callback(server.stop)
        yield server, state


def call(server: RecallApi, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None, admin: bool = False) -> tuple[int, dict | str]:
    host, port = server.admin_address if admin else server.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw.decode()


def test_user_vector_route_with_exclude_seen_and_category_cap(api):
    server, state = api
    status, body = call(server, "GET", "/recall?user_id=u1&k=5")
    assert status == 200 and body["route"] == "user-vector" and body["compatible"] is True
    assert body["results"][0]["item_id"] == "i7" and len(body["results"]) == 5
    assert body["model_versions"] == {"user_vector": 0, "scored": 0, "index": 0, "index_epoch": 0}
    assert body["user_encoded"] == "stored"
    status, body = call(server, "GET", "/recall?user_id=u1&k=5&exclude_seen=1")
    assert "i7" not in [r["item_id"] for r in body["results"]] and len(body["results"]) == 5
    status, body = call(server, "GET", "/recall?user_id=u1&k=3&max_per_category=1")
    cats = [r["categories"][0] for r in body["results"]]
    assert len(cats) == 3 and len(set(cats)) == 3


def test_unknown_user_falls_back_to_recent_then_trending(api):
    server, state = api
    status, body = call(server, "GET", "/recall?user_id=nobody&k=3")
    assert status == 200 and body["route"] == "recent"
    assert [r["item_id"] for r in body["results"]] == ["i29", "i28", "i27"]
    state.replica.trending = [("gone", 9.0), ("i2", 5.0), ("i4", 4.0), ("i8", 3.0)]  # as an update would set it
    status, body = call(server, "GET", "/recall?user_id=nobody&k=2")
    assert body["route"] == "trending" and [r["item_id"] for r in body["results"]] == ["i2", "i4"]
    status, body = call(server, "GET", "/recall?user_id=nobody&k=3&max_per_category=1")
    assert [r["item_id"] for r in body["results"]] == ["i2", "i4"]  # i8 shares c2 with i2


def test_post_vector_items_health_metrics(api):
    server, state = api
    vector = state.index.get("i11").vector.tolist()
    status, body = call(server, "POST", "/recall", json.dumps({"vector": vector, "k": 4}).encode())
    assert status == 200 and body["route"] == "vector" and body["results"][0]["item_id"] == "i11"
    status, body = call(server, "GET", "/items/i11")
    assert status == 200 and body == {"item_id": "i11", "model_version": 0,
                                      "encoded_at": state.index.meta("i11").encoded_at_ms,
                                      "event_ts": 1011, "categories": ["c2"]}
    assert call(server, "GET", "/healthz") == (200, {"ready": True, "items": 30})
    status, text = call(server, "GET", "/metrics", admin=True)
    assert status == 200 and "streamrecall_records_consumed_total" in text
    assert call(server, "GET", "/healthz", admin=True) == (200, {"ready": True, "items": 30})


@pytest.mark.parametrize("method,path,body,status,needle", [
    ("GET", "/recall?user_id=u1", None, 400, "k is required"),
    ("GET", "/recall?user_id=u1&k=0", None, 400, "positive integer"),
    ("GET", "/recall?user_id=u1&k=ten", None, 400, "positive integer"),
    ("GET", "/recall?user_id=u1&k=51", None, 400, "above the limit of 50"),
    ("GET", "/recall?k=5", None, 400, "user_id is required"),
    ("GET", "/recall?user_id=u1&k=5&exclude_seen=maybe", None, 400, "exclude_seen"),
    ("GET", "/recall?user_id=u1&k=5&max_per_category=-1", None, 400, "max_per_category"),
    ("POST", "/recall", b"{not json", 400, "not valid JSON"),
    ("POST", "/recall", b"[1, 2]", 400, "JSON object"),
    ("POST", "/recall", b'{"k": 3}', 400, "vector is required"),
    ("POST", "/recall", b'{"k": 3, "vector": [1, 2]}', 400, "holds 64-d vectors"),
    ("POST", "/recall", ('{"k": 3, "vector": [NaN' + ", 0" * 63 + "]}").encode(), 400, "not valid JSON"),
    ("POST", "/recall", ('{"k": 3, "vector": [1e400' + ", 0" * 63 + "]}").encode(), 400, "out of range"),
    ("POST", "/recall", ('{"k": 3, "vector": [1e39' + ", 0" * 63 + "]}").encode(), 400, "finite"),
    ("POST", "/recall", ('{"vector": [' + ", ".join(["0"] * 64) + "]}").encode(), 400, "k is required"),
    ("POST", "/recall", b"x" * 5000, 413, "above the limit"),
    ("GET", "/nope", None, 404, "no such path"),
    ("GET", "/items/missing", None, 404, "not in the index"),
    ("DELETE", "/recall", None, 405, "not DELETE"),
    ("POST", "/healthz", b"{}", 405, "not POST"),
])
def test_clear_client_errors(api, method, path, body, status, needle):
    server, _ = api
    got_status, got = call(server, method, path, body)
    assert got_status == status, got
    assert needle in got["error"] and got["status"] == status


def test_query_command_prints_a_table_and_clear_errors(api, tmp_path):
    from click.testing import CliRunner

    from streamrecall.ops.query import command

    server, state = api
    runner = CliRunner()
    out = runner.invoke(command, ["--url", server.url, "--user-id", "u1", "-k", "3", "--exclude-seen"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].startswith("route: user-vector | scored by model v0 | index v0 (graph epoch 0) | stored user vector v0")
    assert lines[1].split() == ["rank", "item_id", "score", "version", "categories"] and len(lines) == 5
    assert "i7" not in out.output.split()
    vector = tmp_path / "v.json"
    v4 = state.index.get("i4").vector
    vector.write_text(json.dumps(v4.tolist()))
    out = runner.invoke(command, ["--url", server.url, "--vector-file", str(vector), "-k", "2"])
    top = out.output.splitlines()[2].split()
    # same content: ties; the score is the inner product (‖v‖² = 1 for the two towers' unit vectors)
    assert out.exit_code == 0 and top[1] in ("i4", "i16", "i28") and top[2] == f"{float(v4 @ v4):.4f}"
    out = runner.invoke(command, ["--url", server.url, "--admin-url", server.admin_url, "--item-id", "i4", "-k", "2",
                                  "--json"])
    answer = json.loads(out.output)
    assert answer["route"] == "vector" and "i4" not in [r["item_id"] for r in answer["results"]]
    host, port = server.address
    out = runner.invoke(command, ["--user-id", "u1"], env={"STREAMRECALL_HTTP_HOST": host,
                                                           "STREAMRECALL_HTTP_PORT": str(port)})
    assert out.exit_code == 0 and "route: user-vector" in out.output
    out = runner.invoke(command, ["--url", server.url, "--admin-url", server.admin_url, "--item-id", "missing"])
    assert out.exit_code == 1 and "404 item 'missing' is not in the index" in out.output
    out = runner.invoke(command, ["--url", server.url])
    assert out.exit_code == 2 and "exactly one of" in out.output
    assert "STREAMRECALL_HTTP_PORT" in runner.invoke(command, ["--help"]).output
