"""`streamrecall up` owns its children: killed for any reason, its broker and roles stop with it;
a child that keeps failing is restarted with a growing delay."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from streamrecall.broker import free_port
from streamrecall.settings import Settings
from streamrecall.supervisor import MAX_RESTART_BACKOFF_S, RoleProcess, restart_delay

PID_LINE = re.compile(r"(?:started (\w+)|embedded broker \(Tansu\) listening on \S+,) \(?pid (\d+)\)?")


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an orphan's zombie may wait for its reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def start_up(tmp_path: Path) -> tuple[subprocess.Popen[str], dict[str, int]]:
    """`streamrecall up` as a subprocess; returns it and its children's pids (broker and roles) once started."""
    env = {**os.environ, "STREAMRECALL_STATE_DIR": str(tmp_path / "state"),
           "STREAMRECALL_HTTP_PORT": str(free_port())}
    env.pop("STREAMRECALL_BOOTSTRAP_SERVERS", None)
    up = subprocess.Popen([sys.executable, "-m", "streamrecall", "up", "--rate", "0"], env=env, text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pids: dict[str, int] = {}
    lines: list[str] = []

    def read() -> None:
        assert up.stderr is not None
        for line in up.stderr:
            lines.append(line)
            m = PID_LINE.search(line)
            if m:
                pids[m.group(1) or "broker"] = int(m.group(2))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 60
    while len(pids) < 4:
        if time.monotonic() > deadline or up.poll() is not None:
            up.kill()
            raise AssertionError("up did not start its broker and three roles:\n" + "".join(lines[-20:]))
        time.sleep(0.1)
    return up, pids


@pytest.mark.integration
@pytest.mark.parametrize("how", ["sigkill", "sigterm-then-sigkill"])
def test_broker_and_roles_die_with_up(tmp_path: Path, how: str) -> None:
    up, pids = start_up(tmp_path)
    try:
        time.sleep(1.0)  # the roles are importing and connecting: mid-start-up is the hardest case
        assert all(running(p) for p in pids.values()), pids
        if how == "sigterm-then-sigkill":  # what service managers do: TERM, then KILL a few seconds later
            up.send_signal(signal.SIGTERM)
            time.sleep(2.0)
        up.kill()
        up.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(running(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [name for name, p in pids.items() if running(p)], f"orphans left: {pids}"
    finally:
        for pid in pids.values():  # only the processes this test started
            if running(pid):
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
