"""The poll loop against a real broker: commit-after-flush, start positions, dead-lettering."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import msgspec
import pytest

from streamrecall.consumers.clients import make_consumer, make_producer
from streamrecall.settings import Settings

pytestmark = pytest.mark.integration
WORKER = Path(__file__).with_name("runtime_worker.py")


def produce_clicks(s: Settings, n: int, start: int = 0, ts0: int = 1_700_000_000_000) -> None:
    producer = make_producer(s)
    for i in range(start, start + n):
        value = msgspec.json.encode({"user_id": f"u{i}", "item_id": f"i{i % 7}", "ts": ts0 + i})
        producer.send(s.topics.clicks, key=f"u{i}".encode(), value=value, timestamp_ms=ts0 + i)
    producer.flush()
    producer.close()


def run_worker(s: Settings, out: Path, *args: str) -> int:
    cmd = [sys.executable, str(WORKER), "--bootstrap", s.bootstrap_servers, "--prefix", s.topic_prefix,
           "--group", s.group_prefix, "--out", str(out), *args]
    return subprocess.run(cmd, timeout=120).returncode


def handled(out: Path) -> list[tuple[int, int]]:
    return [(int(p), int(o)) for _, p, o, _ in (line.split() for line in out.read_text().splitlines())]


def end_offsets(s: Settings) -> dict[int, int]:
    """Per-partition high watermark, read from a fetch (Tansu's ListOffsets under-counts)."""
    from kafka import TopicPartition
    c = make_consumer(s, None)
    tps = [TopicPartition(s.topics.clicks, p) for p in c.partitions_for_topic(s.topics.clicks)]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(c.highwater(tp) is None for tp in tps):
        c.poll(timeout_ms=200)
    ends = {tp.partition: c.highwater(tp) for tp in tps}
    c.close()
    return ends


def test_kill_between_handle_and_commit_redelivers_and_skips_nothing(settings_factory, tmp_path):
    s = settings_factory()
    produce_clicks(s, 1000)
    out = tmp_path / "handled.txt"
    assert run_worker(s, out, "--kill-after", "300") == -9  # died by SIGKILL inside flush, before commit
    first = handled(out)
    assert len(first) >= 300
    assert run_worker(s, out) == 0
    seen = Counter(handled(out))
    ends = end_offsets(s)
    expected = {(p, o) for p, end in ends.items() for o in range(end)}
    assert sum(ends.values()) == 1000
    assert set(seen) == expected, "every record handled at least once"
    # The records handled before the kill but not committed were handled again.
    assert any(count > 1 for count in seen.values())


def test_start_positions_earliest_timestamp_offsets(settings_factory, tmp_path):
    s = settings_factory()
    ts0 = 1_700_000_000_000
    produce_clicks(s, 200, ts0=ts0)
    out = tmp_path / "a.txt"
    assert run_worker(s, out) == 0
    assert len(handled(out)) == 200
    # committed: nothing new to read
    out_b = tmp_path / "b.txt"
    out_b.touch()
    produce_clicks(s, 10, start=200, ts0=ts0)
    assert run_worker(s, out_b) == 0
    assert len(handled(out_b)) == 10
    # earliest: everything again, in the same group
    out_c = tmp_path / "c.txt"
    assert run_worker(s, out_c, "--from", "earliest") == 0
    assert len(handled(out_c)) == 210
    # timestamp: only clicks at or after ts0+150 (by record timestamp)
    out_d = tmp_path / "d.txt"
    assert run_worker(s, out_d, "--from", f"timestamp:{ts0 + 150}") == 0
    users = {line.split()[3] for line in out_d.read_text().splitlines()}
    assert users == {f"u{i}" for i in range(150, 210)}
    # explicit offsets: partition 0 from 5, partition 1 from its end
    ends = end_offsets(s)
    out_e = tmp_path / "e.txt"
    spec = f"offsets:{s.topics.clicks}:0=5,{s.topics.clicks}:1={ends[1]}"
    assert run_worker(s, out_e, "--from", spec) == 0
    assert sorted(handled(out_e)) == [(0, o) for o in range(5, ends[0])]
