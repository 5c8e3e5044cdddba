"""Poison model updates on the real broker: `streamrecall run indexer` and `run publisher` (real
processes) dead-letter each once, stay alive, and still apply the valid updates that follow,
also after a restart whose header scan reads the poison's headers."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from kafka import TopicPartition

from streamrecall.consumers.clients import make_consumer, make_producer
from streamrecall.consumers.deadletter import HEADER_OFFSET, HEADER_REASON, HEADER_ROLE, HEADER_TOPIC, headers_dict
from streamrecall.consumers.update_scan import Published, last_published
from streamrecall.consumers.update_codec import sign_update, update_headers
from streamrecall.devtools.harness import LocalSystem
from streamrecall.model import ModelConfig, OnlineTrainer
from streamrecall.model.safeio import META_KEY
from streamrecall.settings import Secret

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
    return system.metric("streamrecall_model_version", "publisher", role="publisher")


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


def send(system: LocalSystem, value: bytes, kind: str, version: int, headers: list[Any] | None = None) -> int:
    assert system.settings is not None
    future = system.produce_raw(system.settings.topics.model_updates, None, value,
                                headers if headers is not None else update_headers(kind, version))
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


KEY = Secret("integration-signing-key-0123456789")


def signed(data: bytes, kind: str, version: int, epoch: int, key: Secret = KEY) -> list[Any]:
    return update_headers(kind, version, epoch, sign_update(key, data))


def test_with_a_signing_key_forged_stale_and_jumping_updates_are_refused(broker: Any, tmp_path: Path) -> None:
    """Real indexer and publisher processes with model_signing_key: unsigned, badly signed and tampered
    updates (one claims version 10^18), an older trainer epoch's update and a version jump are each
    dead-lettered with their reason and counted, and the genuine chain keeps applying."""
    genuine, zombie, jumper = (OnlineTrainer(ModelConfig(**MODEL)) for _ in range(3))
    forger = OnlineTrainer(ModelConfig(**MODEL))
    with LocalSystem(tmp_path / "sys", bootstrap_servers=broker.bootstrap_servers, roles=("indexer", "publisher"),
                     model=MODEL, partitions=2, name="signed",
                     settings={"model_signing_key": KEY, "model_max_version_jump": 1000}) as system:
        assert system.wait_healthy(WAIT_S), "indexer never became healthy"
        wait_for("the publisher's /metrics", system, lambda: publisher_version(system) is not None)

        v1 = genuine.export_update(trainer_epoch=2)
        send(system, v1, "full", 1, signed(v1, "full", 1, 2))
        wait_for("v1 at both", system, lambda: indexer_version(system) == 1 and publisher_version(system) == 1.0)

        forger.advance_version(10**18 - 1)
        forged = forger.export_update(trainer_epoch=99)
        v2 = genuine.export_update(trainer_epoch=2)
        refused = {
            send(system, forged, "full", 10**18, update_headers("full", 10**18, 99)): "unsigned",
            send(system, forged, "full", 10**18, signed(forged, "full", 10**18, 99, Secret("x" * 32))): "bad-signature",
            send(system, v2[:-1] + bytes([v2[-1] ^ 1]), "delta", 2, signed(v2, "delta", 2, 2)): "bad-signature",
        }
        send(system, v2, "delta", 2, signed(v2, "delta", 2, 2))
        wait_for("v2 at both", system, lambda: indexer_version(system) == 2 and publisher_version(system) == 2.0)

        zombie.advance_version(2)  # the replaced trainer (epoch 1) goes on, past the new one's version
        stale = zombie.export_update(trainer_epoch=1)
        refused[send(system, stale, "full", 3, signed(stale, "full", 3, 1))] = "stale-epoch"
        jumper.advance_version(5000)
        jump = jumper.export_update(trainer_epoch=2)
        refused[send(system, jump, "full", 5001, signed(jump, "full", 5001, 2))] = "version-jump"
        v3 = genuine.export_update(trainer_epoch=2)
        send(system, v3, "delta", 3, signed(v3, "delta", 3, 2))
        wait_for("v3 at both", system, lambda: indexer_version(system) == 3 and publisher_version(system) == 3.0)

        topic = system.settings.topics.model_updates
        letters = [h for h in dead_letters(system) if h[HEADER_TOPIC] == topic]
        for role in ("indexer", "publisher"):
            got = {int(h[HEADER_OFFSET]): h[HEADER_REASON] for h in letters if h[HEADER_ROLE] == role}
            assert got == refused, (role, json.dumps(letters)[:2000])
            counted = {reason: system.metric("streamrecall_model_updates_refused_total", role, role=role,
                                             reason=reason)
                       for reason in ("unsigned", "bad-signature", "stale-epoch", "version-jump")}
            assert counted == {"unsigned": 1.0, "bad-signature": 2.0, "stale-epoch": 1.0, "version-jump": 1.0}, role
        system.check_alive()


def test_a_starting_trainer_takes_the_epoch_past_the_verified_records(settings_factory: Any) -> None:
    """last_published: with a key, an unsigned record claiming epoch 99 and version 10^18 neither
    raises the starting trainer's epoch nor the version it resumes past."""
    settings = settings_factory()
    producer = make_producer(settings)
    trainer = OnlineTrainer(ModelConfig(**MODEL))
    for epoch in (1, 3):
        data = trainer.export_update(trainer_epoch=epoch)
        producer.send(settings.topics.model_updates, value=data, partition=0,
                      headers=signed(data, "full" if trainer.version == 1 else "delta", trainer.version, epoch))
    forger = OnlineTrainer(ModelConfig(**MODEL))
    forger.advance_version(10**18 - 1)
    forged = forger.export_update(trainer_epoch=99)
    producer.send(settings.topics.model_updates, value=forged, partition=0,
                  headers=update_headers("full", 10**18, 99))
    producer.flush(timeout=30)
    producer.close()
    consumer = make_consumer(settings, None)
    try:
        assert last_published(consumer, settings.topics.model_updates, KEY) == Published(2, 3)
        assert last_published(consumer, settings.topics.model_updates) == Published(10**18, 99)  # no key: no defence
    finally:
        consumer.close()
