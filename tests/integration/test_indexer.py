"""The indexer role on a real broker and real hnswlib, observed over its HTTP API.

Most tests run the role's pieces in a thread; the restart test runs the real
`streamrecall run indexer` process and SIGKILLs it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import msgspec
import pytest
from kafka import TopicPartition
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from streamrecall.consumers.roles.indexer import snapshot as indexer_snapshot
from streamrecall.consumers.assembly import RoleAssembly
from streamrecall.consumers.clients import make_consumer, make_producer
from streamrecall.consumers.deadletter import headers_dict
from streamrecall.consumers.roles.indexer.wiring import IndexerRole
from streamrecall.consumers.start import StartPosition
from streamrecall.events import Click, Item
from streamrecall.consumers.roles.indexer.metrics import IndexerMetrics
from streamrecall.metrics import ModelVersionMetrics
from streamrecall.model import ModelConfig, OnlineTrainer, TowerReplica, decode_update
from streamrecall.settings import Settings

pytestmark = pytest.mark.integration
MODEL = {"id_buckets": 4096, "token_buckets": 4096, "estimator_buckets": 4096}
WAIT_S = 60.0


def indexer_settings(settings_factory: Callable[..., Settings], model: dict[str, Any] | None = None,
                     **indexer: Any) -> Settings:
    return settings_factory(http_port=0, flush_interval_ms=100, max_poll_records=200,
                            extra={"model": model or MODEL, "indexer": {"snapshot_interval_s": 1, "quality_interval_s": 1,
                                                               "encode_batch": 16, "reencode_batch": 16, **indexer}})


@contextmanager
def running_indexer(s: Settings) -> Iterator[tuple[IndexerRole, str]]:
    """The role as ``wiring.run`` assembles it, its loop in a thread (no signal handlers there)."""
    with ExitStack() as stack:
        process = RoleAssembly("indexer", s, stack)
        role = IndexerRole(process, StartPosition(), IndexerMetrics(CollectorRegistry()),
                           ModelVersionMetrics(CollectorRegistry()))
        stack.callback(role.close)
        runtime = process.runtime(StartPosition(), role.handler, role.topics(), assign_all=True,
                                  serve_http=role.serve_http)
        role.begin()
        thread = threading.Thread(target=runtime.run, kwargs={"max_seconds": 300}, daemon=True)
        thread.start()
        stack.callback(thread.join, 30)
        stack.callback(runtime.stop)
        yield role, role.api.url


def get(url: str, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url + path, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def post(url: str, path: str, payload: Any) -> tuple[int, Any]:
    req = urllib.request.Request(url + path, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_for(what: str, condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def items(n: int, start: int = 0, **fields: Any) -> list[Item]:
    return [Item(item_id=f"i{i}", created_at=1_700_000_000_000 + i, title=f"name{i}",
                 categories=(f"c{i % 3}",), tags=(f"t{i % 5}",), **fields) for i in range(start, start + n)]


def produce(s: Settings, topic: str, values: list[tuple[bytes | None, bytes | None]]) -> None:
    producer = make_producer(s)
    for key, value in values:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def produce_items(s: Settings, batch: list[Item]) -> None:
    produce(s, s.topics.items, [(it.item_id.encode(), msgspec.json.encode(it)) for it in batch])


def item_version(url: str, item_id: str) -> int | None:
    status, body = get(url, f"/items/{item_id}")
    return body["model_version"] if status == 200 else None


def test_items_become_queryable_update_and_delete(settings_factory):
    s = indexer_settings(settings_factory)
    produce_items(s, items(40))
    with running_indexer(s) as (role, url):
        wait_for("40 items queryable", lambda: all(item_version(url, f"i{i}") is not None for i in range(40)))
        status, body = get(url, "/items/i7")
        assert status == 200 and body["event_ts"] == 1_700_000_000_007 and body["categories"] == ["c1"]
        assert body["model_version"] == 0 and body["encoded_at"] > 0
        wait_for("ready", lambda: get(url, "/healthz")[0] == 200)
        assert get(url, "/healthz")[1]["items"] == 40

        before = role.state.index.get("i7").vector.copy()
        produce_items(s, [Item(item_id="i7", created_at=1_750_000_000_000, title="entirely different",
                               categories=("zz",))])
        wait_for("i7 updated", lambda: get(url, "/items/i7")[1]["event_ts"] == 1_750_000_000_000)
        assert get(url, "/items/i7")[1]["categories"] == ["zz"]
        assert abs(role.state.index.get("i7").vector - before).max() > 1e-3

        vector = role.state.index.get("i9").vector.tolist()
        status, body = post(url, "/recall", {"vector": vector, "k": 40})
        assert status == 200 and body["results"][0]["item_id"] == "i9" and len(body["results"]) == 40
        produce_items(s, items(1, start=9, deleted=True))
        wait_for("i9 deleted", lambda: get(url, "/items/i9")[0] == 404)
        status, body = post(url, "/recall", {"vector": vector, "k": 40})
        ids = [r["item_id"] for r in body["results"]]
        assert "i9" not in ids and len(ids) == 39
        status, body = post(url, "/recall", {"vector": vector, "k": 10, "max_per_category": 2})
        cats = [r["categories"][0] for r in body["results"]]
        assert all(cats.count(c) <= 2 for c in cats)


def test_model_update_reencodes_every_item_while_queries_answer(settings_factory):
    # Two towers: a full update moves the dense layers, so it is a new epoch (every item re-encoded).
    # A drift bound near zero re-encodes every item a delta's rows move at all, in place (the long
    # rebuild interval keeps the delta pass from rebuilding).
    model = {**MODEL, "tower": "two_tower"}
    s = indexer_settings(settings_factory, model=model, reencode_drift_bound=1e-9, rebuild_interval_s=3600)
    catalog = items(60)
    produce_items(s, catalog)
    config = ModelConfig(**model)
    trainer = OnlineTrainer(config)
    by_id = {it.item_id: it for it in catalog}
    for step in range(4):
        clicks = [Click(user_id=f"u{j}", item_id=f"i{(j * 7 + step) % 60}", ts=j) for j in range(32)]
        trainer.step(trainer.make_batch(clicks, by_id, [[] for _ in clicks]))
    full = trainer.export_update(full=True)
    # user vectors: one at version 0; the API answers from it, and excludes what it saw
    own = TowerReplica(config).encode_items([by_id["i3"]])[0]
    uv = {"user_id": "u1", "vector": own.tolist(), "model_version": 0, "event_ts": 1, "published_at": 2,
          "recent_items": ["i3"]}
    produce(s, s.topics.user_vectors, [(b"u1", json.dumps(uv).encode())])

    with running_indexer(s) as (role, url):
        wait_for("ready with 60 items", lambda: get(url, "/healthz")[1].get("items") == 60
                 and get(url, "/healthz")[0] == 200)
        status, body = get(url, "/recall?user_id=u1&k=5")
        assert body["route"] == "user-vector" and body["results"][0]["item_id"] == "i3"
        assert body["model_versions"]["user_vector"] == 0 and body["compatible"] is True
        status, body = get(url, "/recall?user_id=u1&k=5&exclude_seen=1")
        assert "i3" not in [r["item_id"] for r in body["results"]]
        status, body = get(url, "/recall?user_id=someone-else&k=3")
        assert status == 200 and body["route"] == "recent"

        failures: list[Any] = []
        answered = [0]
        stop = threading.Event()

        def query_loop() -> None:
            while not stop.is_set():
                status, body = get(url, "/recall?user_id=u1&k=10")
                if status != 200 or len(body["results"]) != 10:
                    failures.append((status, body))
                answered[0] += 1

        querier = threading.Thread(target=query_loop, daemon=True)
        querier.start()
        try:
            produce(s, s.topics.model_updates, [(None, b"not a model update"), (None, full)])
            wait_for("every item re-encoded at v1",
                     lambda: all(item_version(url, f"i{i}") == 1 for i in range(60)))
            more = items(5, start=100)
            produce_items(s, more)  # indexed with the new tower as soon as it is read
            wait_for("new items at v1", lambda: all(item_version(url, it.item_id) == 1 for it in more))
        finally:
            stop.set()
            querier.join(30)
        assert not failures and answered[0] > 0
        health = get(url, "/healthz")[1]
        assert health["model_version"] == 1 and health["served_epoch"] == 1
        status, body = get(url, "/recall?user_id=u1&k=5")
        assert body["model_versions"] == {"user_vector": 0, "scored": 1, "index": 1, "index_epoch": 1}
        # a v0 user vector against a v1 index: the user is encoded again by the v1 towers
        assert body["user_encoded"] == "query-time" and body["compatible"] is True
        assert health["settled"] is True
        status, body = get(url, "/recall?user_id=someone-else&k=3")
        update = decode_update(full)
        trending = [i for i, _ in update.trending]
        assert body["route"] == "trending" and [r["item_id"] for r in body["results"]] == trending[:3]

        # a delta re-encodes exactly the items whose vectors its rows may move (all past the bound)
        # (two clicks: a batch of one has a zero loss, so it moves no row)
        clicks = [Click(user_id="u9", item_id="i1", ts=5), Click(user_id="u8", item_id="i16", ts=6)]
        trainer.step(trainer.make_batch(clicks, by_id, [[], []]))
        delta = trainer.export_update()
        replica = TowerReplica(config)
        replica.apply(update)
        changed = replica.apply(decode_update(delta)).changed
        assert changed is not None
        drift = replica.items_drift(changed, catalog + more)
        touched = {it.item_id for it, d in zip(catalog + more, drift) if d > 0}
        assert "i1" in touched
        produce(s, s.topics.model_updates, [(None, delta)])
        wait_for("touched items at v2", lambda: all(item_version(url, i) == 2 for i in touched))
        wait_for("re-encode settled", lambda: get(url, "/healthz")[1]["settled_version"] == 2)
        untouched = [it.item_id for it in catalog + more if it.item_id not in touched]
        assert untouched and all(item_version(url, i) == 1 for i in untouched)

    # the malformed update was dead-lettered with its reason
    consumer = make_consumer(s, None)
    parts = [TopicPartition(s.topics.deadletter, p) for p in consumer.partitions_for_topic(s.topics.deadletter)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    letters = []
    deadline = time.monotonic() + WAIT_S
    while not letters and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            letters += [headers_dict(m.headers) for m in batch]
    consumer.close()
    assert letters
    assert letters[0]["streamrecall.source.topic"] == s.topics.model_updates
    assert letters[0]["streamrecall.reason"] == "invalid"


# --------------------------------------------------------------- kill -9 and restart
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_indexer(s: Settings, config: Path, port: int, log: Path, admin_port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "streamrecall", "run", "indexer", "--config", str(config),
           "--bootstrap-servers", s.bootstrap_servers, "--topic-prefix", s.topic_prefix,
           "--group-prefix", s.group_prefix, "--state-dir", str(s.state_dir), "--http-port", str(port),
           "--admin-port", str(admin_port),
           "--flush-interval-ms", "100"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMRECALL_")}
    return subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def metric(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def stop(proc: subprocess.Popen, sig: int) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=60)


def test_kill_9_and_restart_resumes_from_the_snapshot(settings_factory, tmp_path):
    s = settings_factory()
    config = tmp_path / "streamrecall.toml"
    config.write_text("[model]\n" + "".join(f"{k} = {v}\n" for k, v in MODEL.items())
                      + "[indexer]\nsnapshot_interval_s = 0.5\nquality_interval_s = 5\n")
    catalog = items(30)
    by_id = {it.item_id: it for it in catalog}
    trainer = OnlineTrainer(ModelConfig(**MODEL))
    clicks = [Click(user_id=f"u{j}", item_id=f"i{j % 30}", ts=j) for j in range(32)]
    trainer.step(trainer.make_batch(clicks, by_id, [[] for _ in clicks]))
    produce_items(s, catalog)
    produce(s, s.topics.model_updates, [(None, trainer.export_update(full=True))])
    port, admin_port = free_port(), free_port()
    url, admin_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    root = s.role_state_dir("indexer")
    log = tmp_path / "indexer.log"

    first = start_indexer(s, config, port, log, admin_port)
    try:
        wait_for("first process serving 30 items at v1", lambda: _health(url).get("settled_version") == 1
                 and _health(url).get("items") == 30)
        assert all(item_version(url, f"i{i}") == 1 for i in range(30))

        def snapshot_covers_everything() -> bool:
            resume = indexer_snapshot.read_resume(root)
            offsets = resume["offsets"] if resume is not None else {}
            return (resume is not None and sum(offsets.get("items", {}).values()) == 30
                    and resume["settled_version"] == 1 and offsets.get("model-updates") == {"0": 1})

        wait_for("a snapshot covering every item at v1", snapshot_covers_everything)
    finally:
        first.kill()  # SIGKILL: no final snapshot, no final commit
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL

    produce_items(s, items(10, start=30) + items(1, start=0, deleted=True))
    second = start_indexer(s, config, port, log, admin_port)
    try:
        wait_for("restarted process ready with 39 items",
                 lambda: _health(url).get("ready") is True and _health(url).get("items") == 39, WAIT_S)
        health = _health(url)
        assert health["snapshot_loaded"] is True and health["model_version"] == 1
        assert get(url, "/items/i0")[0] == 404
        assert all(item_version(url, f"i{i}") == 1 for i in range(1, 40))
        samples = scrape(admin_url)  # /metrics is on the admin port
        # only the 11 item records after the snapshot were read; the update came from the replay
        assert metric(samples, "streamrecall_records_consumed_total", role="indexer", topic="items") == 11
        assert metric(samples, "streamrecall_records_consumed_total", role="indexer", topic="model-updates") == 0
        assert metric(samples, "streamrecall_index_upserts_total", cause="item") == 10
        assert metric(samples, "streamrecall_index_upserts_total", cause="rebuild") == 0
        assert metric(samples, "streamrecall_index_upserts_total", cause="reencode") == 0
        assert metric(samples, "streamrecall_model_version", role="indexer") == 1
    finally:
        code = stop(second, signal.SIGTERM)
    assert code == 0, log.read_text()[-3000:]
    resume = indexer_snapshot.read_resume(root)  # the shutdown snapshot covers everything read
    assert sum(resume["offsets"]["items"].values()) == 41 and resume["replica_version"] == 1


def _health(url: str) -> dict:
    try:
        return get(url, "/healthz")[1]
    except OSError:  # not listening yet
        return {}
