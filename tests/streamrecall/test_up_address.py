"""`up` records where it serves, so `status` and `query` beside it find the embedded broker."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from streamrecall.ops.cli import main
from streamrecall.settings import Settings
from streamrecall.ops.status import PartitionLag
from streamrecall.ops.up import clear_address, running_address, write_address


def test_a_running_up_is_found_and_a_dead_one_is_not(tmp_path):
    settings = Settings(bootstrap_servers="127.0.0.1:5555", state_dir=tmp_path)
    write_address(settings, {"indexer": 8470})
    found = running_address(tmp_path)
    assert found is not None and found["bootstrap_servers"] == "127.0.0.1:5555" and found["ports"] == {"indexer": 8470}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "up.json").write_text(json.dumps({**found, "pid": int(dead.stdout)}))
    assert running_address(tmp_path) is None, "the process that wrote it is gone"
    clear_address(settings)
    assert running_address(tmp_path) is None and not (tmp_path / "up.json").exists()


def test_commands_without_a_broker_use_the_one_up_recorded(tmp_path):
    write_address(Settings(bootstrap_servers="127.0.0.1:1", state_dir=tmp_path), {})
    from streamrecall.ops.cli import require_bootstrap

    assert require_bootstrap(Settings(state_dir=tmp_path)).bootstrap_servers == "127.0.0.1:1"
    clear_address(Settings(state_dir=tmp_path))
    out = CliRunner().invoke(main, ["status", "--state-dir", str(tmp_path)])
    assert out.exit_code != 0 and "no broker" in out.output and "up.json" in out.output


def test_lag_never_goes_negative_when_a_commit_passes_the_watermark_read():
    assert PartitionLag("g", "t", 0, committed=120, high=104).lag == 0
    assert PartitionLag("g", "t", 0, committed=100, high=104).lag == 4


def test_version_and_command_options_read_the_environment():
    out = CliRunner().invoke(main, ["--version"])
    assert out.exit_code == 0 and out.output.startswith("streamrecall ")
    out = CliRunner().invoke(main, ["evaluate"], env={"STREAMRECALL_EVALUATE_N_CHUNKS": "0"})
    assert out.exit_code != 0 and "--chunks >= 1" in out.output  # the env value was read, and refused
    out = CliRunner().invoke(main, ["evaluate", "--help"])
    assert "STREAMRECALL_EVALUATE_N_CHUNKS" in out.output and "STREAMRECALL_BOOTSTRAP_SERVERS" not in out.output
