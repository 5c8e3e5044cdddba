"""Role child processes: started with the parent's settings, stopped with SIGTERM, restarted if they die.

Children die with their parent (:mod:`streamrecall.ops.lifeline`), so a killed `streamrecall up`
leaves no orphans. A child that keeps failing is restarted with an exponential backoff
(2 s, 4 s, 8 s ... at most 60 s); one that ran for ``STABLE_AFTER_S`` before exiting starts the
sequence again.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from streamrecall.ops.lifeline import die_with_parent
from streamrecall.settings import Settings

log = logging.getLogger(__name__)

#: SIGTERM → SIGKILL grace, the same the deploy manifests give a role (terminationGracePeriodSeconds,
#: stop_grace_period): the indexer's final snapshot of a million items took longer than 20 s.
STOP_GRACE_S = 60.0

RESTART_BACKOFF_S = 2.0
MAX_RESTART_BACKOFF_S = 60.0
#: A child that ran this long before exiting was healthy: its next restart waits the base delay.
STABLE_AFTER_S = 60.0


def restart_delay(failures: int) -> float:
    """Seconds to wait before restarting a child that failed ``failures`` times in a row (0: once)."""
    return min(MAX_RESTART_BACKOFF_S, RESTART_BACKOFF_S * 2 ** min(failures, 16))


@dataclass
class RoleProcess:
    """A role's child process, restarted with a backoff if it exits while we run."""

    role: str
    settings: Settings
    log_path: Path
    args: tuple[str, ...] = ()  # extra `streamrecall run ROLE` arguments, e.g. ("--from", "earliest")
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    last_start: float = field(default=0.0)
    stopped_on_purpose: bool = False  # killed or stopped by us: its exit is not a failure
    clock: Callable[[], float] = time.monotonic
    failures: int = 0  # exits in a row, each soon after its start
    restart_at: float | None = None  # when the exited child is due to start again

    def start(self) -> None:
        env = {**os.environ, **self.settings.to_env()}
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "streamrecall", "run", self.role, *self.args],
                                            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            # Ctrl-C reaches only the supervisor, which stops roles
                                            # (SIGTERM) before the broker they flush to.
                                            start_new_session=True, preexec_fn=die_with_parent())
        self.last_start = self.clock()
        self.stopped_on_purpose = False
        self.restart_at = None
        log.info("started %s (pid %d), log %s", self.role, self.process.pid, self.log_path)

    def check(self) -> None:
        """Restart the child if it exited, once its backoff has passed (call it periodically)."""
        if self.process is None or self.process.poll() is None:
            return
        now = self.clock()
        if self.restart_at is None:  # first look at this exit
            self.failures = 0 if now - self.last_start >= STABLE_AFTER_S else self.failures + 1
            self.restart_at = now + restart_delay(self.failures)
            log.warning("%s exited with status %s; restarting in %.0fs (see %s)", self.role,
                        self.process.returncode, self.restart_at - now, self.log_path)
        if now < self.restart_at:
            return
        self.restarts += 1
        self.start()

    def terminate(self) -> None:
        """SIGTERM: the role flushes, snapshots and commits, then exits (see :meth:`stop`)."""
        self.stopped_on_purpose = True
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = STOP_GRACE_S) -> None:
        """SIGTERM and wait for the exit; SIGKILL after ``timeout_s``."""
        self.terminate()
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing it", self.role, timeout_s)
            self.process.kill()
            self.process.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL: no flush, no snapshot (fault injection)."""
        self.stopped_on_purpose = True
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None
