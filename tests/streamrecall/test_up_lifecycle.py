"""`streamrecall up` owns its children: killed for any reason, its broker and roles stop with it;
a child that keeps failing is restarted with a growing delay."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from streamrecall.devtools.harness import pid_running, start_up
from streamrecall.settings import Settings
from streamrecall.ops.supervisor import MAX_RESTART_BACKOFF_S, RoleProcess, restart_delay


@pytest.mark.integration
@pytest.mark.parametrize("how", ["sigkill", "sigterm-then-sigkill"])
def test_broker_and_roles_die_with_up(tmp_path: Path, how: str) -> None:
    up, pids = start_up(tmp_path / "state")
    try:
        time.sleep(1.0)  # the roles are importing and connecting: mid-start-up is the hardest case
        assert all(pid_running(p) for p in pids.values()), pids
        if how == "sigterm-then-sigkill":  # what service managers do: TERM, then KILL a few seconds later
            up.send_signal(signal.SIGTERM)
            time.sleep(2.0)
        up.kill()
        up.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(pid_running(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [name for name, p in pids.items() if pid_running(p)], f"orphans left: {pids}"
    finally:
        for pid in pids.values():  # only the processes this test started
            if pid_running(pid):
                os.kill(pid, signal.SIGKILL)
        if up.poll() is None:
            up.kill()


def test_restart_delay_grows_to_a_bound() -> None:
    delays = [restart_delay(n) for n in range(10)]
    assert delays[:4] == [2.0, 4.0, 8.0, 16.0]
    assert delays == sorted(delays) and delays[-1] == MAX_RESTART_BACKOFF_S


def test_a_failing_child_is_restarted_with_a_growing_delay(tmp_path: Path) -> None:
    now = [1000.0]
    # A role that does not exist: the child exits at once with an error, every time.
    child = RoleProcess("no-such-role", Settings(state_dir=tmp_path), tmp_path / "child.log", clock=lambda: now[0])
    child.start()
    started_at = [now[0]]
    for _ in range(3):
        assert child.process is not None
        child.process.wait(timeout=60)
        child.check()  # notices the exit: schedules the restart
        due = child.restart_at
        assert due is not None
        now[0] = due - 0.01
        child.check()
        assert child.process.poll() is not None, "restarted before its backoff passed"
        now[0] = due
        child.check()
        started_at.append(now[0])
    gaps = [b - a for a, b in zip(started_at, started_at[1:])]
    assert gaps == [restart_delay(1), restart_delay(2), restart_delay(3)], gaps
    assert child.restarts == 3
    child.stop()
