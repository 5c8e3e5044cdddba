"""Trainer and publisher as real processes on a real broker: clicks → model updates → user vectors.

Roles run as `streamrecall run ROLE` subprocesses (SIGTERM stops them cleanly, SIGKILL is a
crash); every wait is bounded by a deadline and nothing asserts on timing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import msgspec
import pytest
from kafka import TopicPartition

from streamrecall.consumers.clients import make_consumer, make_producer
from streamrecall.consumers.deadletter import HEADER_REASON, HEADER_ROLE, HEADER_TOPIC, headers_dict
from streamrecall.consumers.update_codec import update_headers
from streamrecall.events import Click, Decoder, UserVector
from streamrecall.model import ModelConfig, OnlineTrainer, decode_update
from streamrecall.model.safeio import read_layout
from streamrecall.settings import Settings

pytestmark = pytest.mark.integration

MODEL = {"dim": 8, "hidden": 16, "id_buckets": 4096, "token_buckets": 4096, "estimator_buckets": 4096,
         "history_len": 5}
TS0 = 1_700_000_000_000
DEADLINE_S = 90


def config_file(tmp_path: Path, trainer: dict | None = None, publisher: dict | None = None) -> Path:
    def table(name: str, values: dict) -> str:
        return f"[{name}]\n" + "".join(f"{k} = {v!r}\n" for k, v in values.items())
    path = tmp_path / "streamrecall.toml"
    path.write_text(table("model", MODEL) + table("trainer", trainer or {}) + table("publisher", publisher or {}))
    return path


class Role:
    """One role process with its log file."""

    def __init__(self, s: Settings, role: str, config: Path, log: Path, start: str = "committed") -> None:
        env = {**os.environ, **s.to_env(), "STREAMRECALL_HTTP_PORT": "0", "STREAMRECALL_CONFIG": str(config),
               "STREAMRECALL_FROM": start}
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "streamrecall", "run", role], env=env,
                                     stdout=open(log, "ab"), stderr=subprocess.STDOUT)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"role exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")


def wait_for(what: str, predicate: Callable[[], bool], *roles: Role) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        for r in roles:
            r.check_alive()
        if predicate():
            return
        time.sleep(0.3)
    logs = "\n".join(r.log.read_text()[-3000:] for r in roles)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def produce_clicks(s: Settings, n: int, users: int = 12, items: int = 30, start: int = 0) -> list[dict]:
    producer = make_producer(s)
    out = []
    for i in range(start, start + n):
        c = {"user_id": f"u{i % users}", "item_id": f"i{(i * 7) % items}", "ts": TS0 + i}
        producer.send(s.topics.clicks, key=c["user_id"].encode(), value=msgspec.json.encode(c))
        out.append(c)
    producer.flush()
    producer.close()
    return out


def produce_items(s: Settings, n: int) -> None:
    producer = make_producer(s)
    for i in range(n):
        item = {"item_id": f"i{i}", "created_at": TS0, "categories": [f"c{i % 4}"], "title": f"item {i}"}
        producer.send(s.topics.items, key=item["item_id"].encode(), value=msgspec.json.encode(item))
    producer.send(s.topics.items, key=b"bad", value=b"{not json")
    producer.flush()
    producer.close()


def read_topic(s: Settings, topic: str) -> list:
    """Every record of ``topic``, read to the high watermark of each partition."""
    c = make_consumer(s, None)
    tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    out = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for messages in c.poll(timeout_ms=200).values():
            out.extend(messages)
        if all(c.highwater(tp) is not None and c.position(tp) >= c.highwater(tp) for tp in tps):
            break
    c.close()
    return sorted(out, key=lambda m: (m.partition, m.offset))


def updates(s: Settings) -> list:
    return [decode_update(m.value) for m in read_topic(s, s.topics.model_updates)]


def latest_vectors(s: Settings) -> dict[str, UserVector]:
    decode = Decoder(UserVector).decode
    return {m.key.decode(): decode(m.value) for m in read_topic(s, s.topics.user_vectors)}


def checkpoint_extra(path: Path) -> dict | None:
    if not path.exists():
        return None
    _, header = read_layout(path.read_bytes())
    return {**header["extra"], "steps": header["steps"], "version": header["version"]}


def expected_users(clicks: list[dict], history_len: int) -> dict[str, tuple[int, list[str]]]:
    by_user: dict[str, list[dict]] = defaultdict(list)
    for c in clicks:
        by_user[c["user_id"]].append(c)
    return {u: (max(c["ts"] for c in cs), [c["item_id"] for c in cs][-history_len:]) for u, cs in by_user.items()}


def test_clicks_train_the_model_and_users_get_vectors_of_its_latest_version(settings_factory, tmp_path):
    s = settings_factory()
    produce_items(s, 30)
    clicks = produce_clicks(s, 400)
    cfg = config_file(tmp_path, trainer={"batch_size": 64, "publish_every_steps": 2,
                                         "full_every_s": 1.0, "checkpoint_every_s": 1.0})
    ckpt = s.role_state_dir("trainer") / "checkpoint.safetensors"
    trainer = Role(s, "trainer", cfg, tmp_path / "trainer.log")
    try:
        wait_for("the trainer to checkpoint every click",
                 lambda: (checkpoint_extra(ckpt) or {}).get("clicks_trained") == 400, trainer)
    finally:
        assert trainer.stop() == 0
    got = updates(s)
    versions = [u.version for u in got]
    assert versions == list(range(1, len(got) + 1)) and len(got) >= 2
    assert got[0].kind == "full" and all(u.base_version == u.version - 1 for u in got)
    assert any(u.kind == "delta" for u in got)
    # Dense layers in every update by default; the FM (the default family) has none, so only its
    # full updates say dense_changed (consumers re-encode everything on those alone).
    has_dense = ModelConfig(**MODEL).tower == "two_tower"
    assert all(u.dense_changed == (has_dense or u.kind == "full") for u in got)
    assert [u.steps for u in got] == sorted(u.steps for u in got)
    final = checkpoint_extra(ckpt)
    assert final["version"] == versions[-1] and got[-1].steps == final["steps"]
    assert sum(final["offsets"]["clicks"].values()) == 400
    dead = [headers_dict(m.headers) for m in read_topic(s, s.topics.deadletter)]
    assert any(d[HEADER_ROLE] == "trainer" and d[HEADER_TOPIC] == s.topics.items for d in dead)

    publisher = Role(s, "publisher", cfg, tmp_path / "publisher.log")
    want = expected_users(clicks, MODEL["history_len"])
    try:
        wait_for("a vector of the last model version for every user",
                 lambda: {u: v.model_version for u, v in latest_vectors(s).items()}
                 == {u: versions[-1] for u in want}, publisher)
    finally:
        assert publisher.stop() == 0
    vectors = latest_vectors(s)
    for user, (event_ts, recent) in want.items():
        v = vectors[user]
        assert (v.event_ts, v.recent_items) == (event_ts, recent), user
        assert len(v.vector) == MODEL["dim"] and v.published_at >= v.event_ts

    # A publisher that replays every click (as a new owner of the partitions would) rebuilds its
    # state from user-vectors and skips the clicks its vectors already cover: nothing is re-published.
    published = len(read_topic(s, s.topics.user_vectors))
    other_group = s.replace(group_prefix=s.group_prefix + "-replay")
    replay = Role(other_group, "publisher", cfg, tmp_path / "publisher2.log", start="earliest")
    try:
        wait_for("the replaying publisher to commit every click",
                 lambda: committed(other_group, "publisher") == 400, replay)
    finally:
        assert replay.stop() == 0
    assert len(read_topic(s, s.topics.user_vectors)) == published
    assert "rebuilt" in (tmp_path / "publisher2.log").read_text()


def committed(s: Settings, role: str) -> int:
    """Sum of the offsets the role's group committed on clicks (read without joining the group)."""
    c = make_consumer(s, s.group_id(role))
    try:
        tps = [TopicPartition(s.topics.clicks, p) for p in c.partitions_for_topic(s.topics.clicks)]
        return sum(c.committed(tp) or 0 for tp in tps)
    finally:
        c.close(autocommit=False)


def test_a_killed_trainer_resumes_from_its_checkpoint(settings_factory, tmp_path):
    s = settings_factory()
    produce_items(s, 30)
    produce_clicks(s, 300)
    cfg = config_file(tmp_path, trainer={"batch_size": 16, "publish_every_steps": 1,
                                         "full_every_s": 1.0, "checkpoint_every_s": 3.0})
    ckpt = s.role_state_dir("trainer") / "checkpoint.safetensors"
    first = Role(s, "trainer", cfg, tmp_path / "trainer1.log")
    try:
        wait_for("a checkpoint", lambda: (checkpoint_extra(ckpt) or {}).get("clicks_trained", 0) > 0, first)
        produce_clicks(s, 200, start=300)
        at = checkpoint_extra(ckpt)
        wait_for("steps past the checkpoint", lambda: max((u.steps for u in updates(s)), default=-1) > at["steps"], first)
    finally:
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    at_kill = checkpoint_extra(ckpt)  # the last checkpoint written before the kill
    before = updates(s)

    produce_clicks(s, 100, start=500)
    second = Role(s, "trainer", cfg, tmp_path / "trainer2.log")
    try:
        wait_for("the restarted trainer to train every click",
                 lambda: sum((checkpoint_extra(ckpt) or {}).get("offsets", {}).get("clicks", {}).values()) == 600, second)
    finally:
        assert second.stop() == 0
    after = updates(s)[len(before):]
    final = checkpoint_extra(ckpt)
    # Versions only grow, across the crash too; the restart's first update is full, at the checkpoint's steps.
    assert [u.version for u in before + after] == sorted({u.version for u in before + after})
    assert after[0].kind == "full" and after[0].version == before[-1].version + 1
    assert after[0].steps == at_kill["steps"]
    assert all(u.steps >= at_kill["steps"] for u in after)
    # Exactly the clicks at and after the checkpoint's offsets were trained on after the restart.
    assert final["clicks_trained"] == at_kill["clicks_trained"] + 600 - sum(at_kill["offsets"]["clicks"].values())
    assert final["steps"] > at_kill["steps"]


def test_a_malformed_model_update_is_dead_lettered_and_later_ones_apply(settings_factory, tmp_path):
    s = settings_factory()
    clicks = produce_clicks(s, 60)
    trainer = OnlineTrainer(ModelConfig(**MODEL))
    other = OnlineTrainer(ModelConfig(**{**MODEL, "dim": 4}))
    producer = make_producer(s)

    def send(data: bytes, kind: str | None = None, version: int | None = None) -> None:
        headers = update_headers(kind, version) if kind else []
        producer.send(s.topics.model_updates, value=data, partition=0, headers=headers)
        producer.flush()

    def train_and_export() -> bytes:
        batch = [msgspec.convert(c, type=Click) for c in clicks[:32]]
        trainer.step(trainer.make_batch(batch, {}, [[] for _ in batch]))
        return trainer.export_update()

    send(trainer.export_update(), "full", 1)
    send(b"\x80\x04not-an-update")                      # undecodable bytes (a pickle would look like this)
    send(other.export_update(), "delta", 2)             # well-formed, but for another model: refused
    send(train_and_export(), "delta", 2)
    cfg = config_file(tmp_path)
    users = expected_users(clicks, MODEL["history_len"])
    publisher = Role(s, "publisher", cfg, tmp_path / "publisher.log")
    try:
        wait_for("vectors at v2", lambda: {v.model_version for v in latest_vectors(s).values()} == {2}
                 and set(latest_vectors(s)) == set(users), publisher)
        send(b"garbage while running")
        send(train_and_export(), "delta", 3)
        wait_for("vectors at v3", lambda: {v.model_version for v in latest_vectors(s).values()} == {3}, publisher)
    finally:
        assert publisher.stop() == 0
    dead = [headers_dict(m.headers) for m in read_topic(s, s.topics.deadletter)]
    from_updates = [d for d in dead if d[HEADER_TOPIC] == s.topics.model_updates]
    assert len(from_updates) == 3
    assert all(d[HEADER_ROLE] == "publisher" and d[HEADER_REASON] for d in from_updates)
    vectors = latest_vectors(s)
    assert {u: (v.event_ts, v.recent_items) for u, v in vectors.items()} == users
