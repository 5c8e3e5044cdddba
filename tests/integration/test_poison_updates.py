"""Poison model updates on the real broker: `streamrecall run indexer` and `run publisher` (real
processes) dead-letter each once, stay alive, and still apply the valid updates that follow,
also after a restart whose header scan reads the poison's headers."""

from __future__ import annotations

import json
import struct
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
from kafka import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from streamrecall.consumers.clients import make_consumer
from streamrecall.consumers.deadletter import HEADER_OFFSET, HEADER_REASON, HEADER_ROLE, HEADER_TOPIC, headers_dict
from streamrecall.consumers.updates import update_headers
from streamrecall.harness import LocalSystem
from streamrecall.model import ModelConfig, OnlineTrainer
from streamrecall.model.safeio import META_KEY

pytestmark = pytest.mark.integration
MODEL = {"id_buckets": 4096, "token_buckets": 4096, "estimator_buckets": 4096}
WAIT_S = 90.0


def safetensors_header(table_json: str) -> bytes:
    """A model-update payload whose safetensors header JSON is ``table_json``."""
    raw = table_json.encode()
    return struct.pack("<Q", len(raw)) + raw


def poison() -> list[bytes]:
    return [
        safetensors_header('{"__metadata__":{"%s":"{}"},"x":%s}' % (META_KEY, "9" * 5000)),  # > 4,300 digits
        safetensors_header('{"__metadata__":' + "[" * 100_000 + "]" * 100_000 + "}"),      # 100k nesting
    ]


def wait_for(what: str, system: LocalSystem, condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        system.check_alive()  # a role that died fails the test at once, with its log
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def publisher_version(system: LocalSystem) -> float | None:
    """The publisher's model version, from its own /metrics (None until it serves them)."""
    try:
        with urllib.request.urlopen(system.api("publisher") + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "streamrecall_model_version" and sample.labels.get("role") == "publisher":
                return sample.value
    return None


def indexer_version(system: LocalSystem) -> int | None:
    try:
        status, body = system.get("/healthz")
    except OSError:
        return None
    return body.get("model_version") if isinstance(body, dict) else None


def dead_letters(system: LocalSystem) -> list[dict[str, str]]:
    assert system.settings is not None
    c = make_consumer(system.settings, None)
    try:
        topic = system.settings.topics.deadletter
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        out: list[dict[str, str]] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for messages in c.poll(timeout_ms=200).values():
                out.extend(headers_dict(m.headers) for m in messages)
            if all(c.highwater(tp) is not None and c.position(tp) >= c.highwater(tp) for tp in tps):
                return out
        raise AssertionError("could not read the dead-letter topic to its end")
    finally:
        c.close()


def send(system: LocalSystem, value: bytes, kind: str, version: int) -> int:
    assert system.settings is not None
    future = system.produce_raw(system.settings.topics.model_updates, None, value, update_headers(kind, version))
    system.flush()
    return future.get(timeout=30).offset


def test_poison_model_updates_are_dead_lettered_once_and_valid_ones_still_apply(broker: Any, tmp_path: Path) -> None:
    trainer = OnlineTrainer(ModelConfig(**MODEL))
    with LocalSystem(tmp_path / "sys", bootstrap_servers=broker.bootstrap_servers, roles=("indexer", "publisher"),
                     model=MODEL, partitions=2, name="poison") as system:
        assert system.wait_healthy(WAIT_S), "indexer never became healthy"
        wait_for("the publisher's /metrics", system, lambda: publisher_version(system) is not None)

        # Poison first (headers claiming a full v1, as a forged record would), then the real v1.
        bad = [send(system, value, "full", 1) for value in poison()]
        send(system, trainer.export_update(), "full", 1)
        wait_for("v1 at the indexer", system, lambda: indexer_version(system) == 1)
        wait_for("v1 at the publisher", system, lambda: publisher_version(system) == 1.0)

        # More poison after v1, with headers claiming a full v2: a restarted reader's backwards
        # header scan reads these headers and the poison behind them; then a valid delta v2.
        bad += [send(system, value, "full", 2) for value in poison()]
        send(system, trainer.export_update(), "delta", 2)
        wait_for("v2 at the indexer", system, lambda: indexer_version(system) == 2)
        wait_for("v2 at the publisher", system, lambda: publisher_version(system) == 2.0)

        system.stop_role("publisher")
        system.add_role("publisher")  # scans headers back to v1, then re-reads the poison after it
        wait_for("v2 at the restarted publisher", system, lambda: publisher_version(system) == 2.0)
        system.check_alive()

        topic = system.settings.topics.model_updates
        letters = [h for h in dead_letters(system) if h[HEADER_TOPIC] == topic]
        by_role: dict[str, list[int]] = {}
        for h in letters:
            assert h[HEADER_REASON] == "invalid", h
            by_role.setdefault(h[HEADER_ROLE], []).append(int(h[HEADER_OFFSET]))
        # Each poison record once per role: the restarted publisher did not send its own again.
        assert sorted(by_role.get("indexer", [])) == bad, json.dumps(letters)[:2000]
        assert sorted(by_role.get("publisher", [])) == bad, json.dumps(letters)[:2000]
