"""Clear errors at the edge: the real command line, run as a subprocess, answers an unreachable
broker, a bad settings file or a bad ``[model]`` key with one line on stderr, a non-zero exit
status, no traceback, and within seconds (kafka-python alone waits 30 s)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamrecall.devtools.broker import free_port


def streamrecall(*args: str, timeout_s: float = 60) -> tuple[int, str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMRECALL_")}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "streamrecall.ops.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout_s)
    return done.returncode, done.stderr, time.monotonic() - started


def assert_one_clear_line(rc: int, stderr: str, *expected: str) -> None:
    assert rc != 0
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.fixture(scope="module")
def nowhere() -> str:
    """host:port where nothing listens."""
    return f"127.0.0.1:{free_port()}"


@pytest.mark.parametrize("command", [["status"], ["topics", "create"], ["run", "trainer"]])
def test_an_unreachable_broker_is_one_line_within_seconds(command: list[str], nowhere: str):
    rc, stderr, elapsed = streamrecall(*command, "--bootstrap-servers", nowhere)
    assert_one_clear_line(rc, stderr, f"no Kafka broker answered at {nowhere} within 5s",
                          "check --bootstrap-servers (STREAMRECALL_BOOTSTRAP_SERVERS)")
    assert elapsed < 20, f"took {elapsed:.0f}s"  # 5 s bootstrap (+ torch's import for run)


def test_produce_to_an_unreachable_broker_honours_the_bootstrap_timeout(tmp_path: Path, nowhere: str):
    events = tmp_path / "clicks.jsonl"
    events.write_text('{"user_id": "u", "item_id": "i", "ts": 1}\n')
    rc, stderr, elapsed = streamrecall("produce", "clicks", str(events), "--bootstrap-servers", nowhere,
                                       "--bootstrap-timeout-ms", "1000")
    assert_one_clear_line(rc, stderr, "within 1s")
    assert elapsed < 10


@pytest.mark.parametrize("text,expected", [
    ("partitions = [\n", "is not valid TOML"),
    ('sasl-password = "hunter2"\n', "sasl_password: unknown setting (did you mean 'sasl_plain_password'?)"),
    ('partitions = "many"\n', "partitions: must be an integer, got str"),
    ('security_protocol = "SASL_SSL"\n', "sasl_mechanism: required when security_protocol is SASL_SSL"),
])
def test_a_bad_settings_file_is_one_line(tmp_path: Path, text: str, expected: str, nowhere: str):
    cfg = tmp_path / "streamrecall.toml"
    cfg.write_text(text)
    rc, stderr, _ = streamrecall("status", "--config", str(cfg), "--bootstrap-servers", nowhere)
    assert_one_clear_line(rc, stderr, expected)
    assert "hunter2" not in stderr


@pytest.mark.parametrize("table,expected", [
    ("[model]\ndimm = 8\n", "model.dimm: unknown setting"),
    ("[model]\ndim = -1\n", "model.dim: must be a positive int"),
    ("[trainer]\nbatch_sise = 8\n", "trainer.batch_sise: unknown setting"),
])
def test_a_bad_model_or_role_table_is_one_line_before_anything_is_logged(tmp_path: Path, table: str,
                                                                         expected: str, nowhere: str):
    cfg = tmp_path / "streamrecall.toml"
    cfg.write_text(table)
    rc, stderr, _ = streamrecall("run", "trainer", "--config", str(cfg), "--bootstrap-servers", nowhere)
    assert_one_clear_line(rc, stderr, expected)
