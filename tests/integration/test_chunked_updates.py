"""Model updates above 1 MiB on the real broker: the trainer's sink cuts them into chunks, no record
on model-updates exceeds 1 MiB, and real indexer and publisher processes assemble and apply them;
a trainer process started afterwards scans past them. A kill -9 in the middle of a sequence loses
nothing: the snapshot points at the sequence's first record and the whole version is re-read.
The first test's update is above ``STAGE_MIN_BYTES``, so both replicas decode and stage it off
their loops (consumers/updates.py) before applying it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import pytest
from prometheus_client import CollectorRegistry

from streamrecall.consumers.roles.indexer import snapshot as indexer_snapshot
from streamrecall.consumers.clients import make_producer
from streamrecall.consumers.deadletter import HEADER_TOPIC, headers_dict
from streamrecall.consumers.roles.trainer.sink import KafkaUpdateSink
from streamrecall.consumers.update_chunks import MAX_RECORD_BYTES, split_update
from streamrecall.consumers.update_codec import sign_update
from streamrecall.consumers.updates import STAGE_MIN_BYTES
from streamrecall.events import Click
from streamrecall.devtools.harness import LocalSystem
from streamrecall.consumers.roles.trainer.metrics import TrainerMetrics
from streamrecall.model import ModelConfig, OnlineTrainer
from streamrecall.settings import Secret

pytestmark = pytest.mark.integration
# 520 B a row (dim 128): the ~6,000 rows trained below make a full update of about 3 MiB; the
# the 12,000 of the first test make one above STAGE_MIN_BYTES (4 MiB).
MODEL = {"dim": 128, "hidden": 32, "id_buckets": 16384, "token_buckets": 4096, "estimator_buckets": 4096}
KEY = Secret("chunked-updates-signing-key-0123456789")
WAIT_S = 120.0


def trained(users: int = 3000) -> OnlineTrainer:
    """A trainer whose full update carries `users` user rows and as many item rows."""
    trainer = OnlineTrainer(ModelConfig(**MODEL))
    clicks = [Click(user_id=f"u{i}", item_id=f"i{i}", ts=1_700_000_000_000 + i) for i in range(users)]
    for start in range(0, users, 1000):
        batch = clicks[start:start + 1000]
        trainer.step(trainer.make_batch(batch, {}, [[] for _ in batch]))
    return trainer


def wait_for(what: str, system: LocalSystem, condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        system.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def versions(system: LocalSystem) -> tuple[Any, Any]:
    try:
        _, body = system.get("/healthz")
    except OSError:
        body = None
    indexer = body.get("model_version") if isinstance(body, dict) else None
    return indexer, system.metric("streamrecall_model_version", "publisher", role="publisher")


def record_bytes(m: Any) -> int:
    """What a record weighs on the broker, less Kafka's few bytes of framing: key, value, headers."""
    return len(m.key or b"") + len(m.value or b"") + sum(len(k) + len(v or b"") for k, v in m.headers)


def model_update_letters(system: LocalSystem) -> list[dict[str, str]]:
    assert system.settings is not None
    topic = system.settings.topics.model_updates
    return [h for h in (headers_dict(m.headers) for m in system.read_topic(system.settings.topics.deadletter))
            if h.get(HEADER_TOPIC) == topic]


def publish(system: LocalSystem, trainer: OnlineTrainer, epoch: int = 1) -> int:
    """Export a full update and send it as the trainer role does (its sink, its producer settings)."""
    assert system.settings is not None
    producer = make_producer(system.settings, max_request_size=MAX_RECORD_BYTES, linger_ms=0)
    try:
        sink = KafkaUpdateSink(producer, system.settings.topics.model_updates, epoch, KEY,
                               TrainerMetrics(CollectorRegistry()))
        data = trainer.export_update(full=True, trainer_epoch=epoch)
        assert len(data) > MAX_RECORD_BYTES, "the test needs an update above 1 MiB"
        sink.send(data, "full", trainer.version)
        sink.flush()
        assert not sink.failed()
    finally:
        producer.close(10)
    return trainer.version


def test_a_full_update_above_one_mebibyte_travels_in_chunks_and_every_replica_applies_it(
        broker: Any, tmp_path: Path) -> None:
    with LocalSystem(tmp_path / "sys", bootstrap_servers=broker.bootstrap_servers, roles=("indexer", "publisher"),
                     model=MODEL, partitions=2, name="chunked", settings={"model_signing_key": KEY},
                     options={"trainer": {"batch_size": 16, "max_batch_wait_ms": 50}}) as system:
        assert system.settings is not None
        assert system.wait_healthy(WAIT_S), "indexer never became healthy"
        trainer = trained(6000)
        assert len(trainer.export_update(full=True)) >= STAGE_MIN_BYTES
        v = publish(system, trainer)
        wait_for(f"v{v} at the indexer and the publisher", system, lambda: versions(system) == (v, float(v)))
        for role in ("indexer", "publisher"):  # decoded and staged off the loop, then applied
            assert system.metric("streamrecall_model_update_apply_seconds_count", role, role=role,
                                 part="off_loop") == 1.0, role

        records = system.read_topic(system.settings.topics.model_updates)
        assert len(records) > 2, "a 3 MiB update is several chunks"
        assert max(record_bytes(m) for m in records) <= MAX_RECORD_BYTES

        # A trainer process started now scans the chunked update (signed) and publishes past it, as the
        # next epoch; both replicas apply its update.
        system.add_role("trainer")
        system.produce([("clicks", f"u{i}", {"user_id": f"u{i}", "item_id": f"i{i}", "ts": 1_700_000_100_000 + i})
                        for i in range(40)])
        wait_for("the trainer's update at both replicas", system,
                 lambda: all(x is not None and x > v for x in versions(system)))
        assert model_update_letters(system) == []


def test_a_kill_9_in_the_middle_of_a_chunk_sequence_re_reads_the_whole_version(broker: Any, tmp_path: Path) -> None:
    trainer = trained()
    with LocalSystem(tmp_path / "sys", bootstrap_servers=broker.bootstrap_servers, roles=("indexer", "publisher"),
                     model=MODEL, partitions=2, name="midseq", settings={"model_signing_key": KEY},
                     options={"indexer": {"snapshot_interval_s": 0.5}}) as system:
        assert system.settings is not None
        topic = system.settings.topics.model_updates
        assert system.wait_healthy(WAIT_S), "indexer never became healthy"
        v1 = publish(system, trainer)
        wait_for(f"v{v1} at both", system, lambda: versions(system) == (v1, float(v1)))

        # All of v2 but its commit (last chunk) on the topic, as a trainer killed mid-publish leaves it.
        data = trainer.export_update(full=True, trainer_epoch=1)
        chunks = split_update(data, "full", trainer.version, 1, 256 * 1024, sign_update(KEY, data))
        offsets = [system.produce_raw(topic, None, value, headers, partition=0) for value, headers in chunks[:-1]]
        system.flush()
        first = offsets[0].get(timeout=30).offset
        root = system.settings.role_state_dir("indexer")

        def snapshot_covers_the_open_sequence() -> bool:
            loaded = indexer_snapshot.load(root)
            _, health = system.get("/healthz")
            return (loaded is not None and health.get("lag_by_topic", {}).get("model-updates") == 0
                    and loaded.resume.next_offsets().get("model-updates", 0) == first)

        wait_for("a snapshot taken with v2's chunks read", system, snapshot_covers_the_open_sequence)
        indexer = system.processes.pop("indexer")
        assert indexer.process is not None
        indexer.process.kill()  # kill -9: no final snapshot
        indexer.process.wait(30)
        system.stop_role("publisher")

        final = system.produce_raw(topic, None, chunks[-1][0], chunks[-1][1], partition=0)
        system.flush()
        final.get(timeout=30)
        system.add_role("indexer")
        system.add_role("publisher")
        wait_for(f"v{trainer.version} at both after the restart", system,
                 lambda: versions(system) == (trainer.version, float(trainer.version)))
        assert model_update_letters(system) == [], "nothing was broken: the whole sequence was re-read"
