"""Role child processes: started with the parent's settings, stopped with SIGTERM, restarted if they die."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from streamrecall.settings import Settings

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = 2.0


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

    def start(self) -> None:
        env = {**os.environ, **self.settings.to_env()}
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "streamrecall", "run", self.role, *self.args],
                                            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            # Ctrl-C reaches only the supervisor, which stops roles
                                            # (SIGTERM) before the broker they flush to.
                                            start_new_session=True)
        self.last_start = time.monotonic()
        self.stopped_on_purpose = False
        log.info("started %s (pid %d), log %s", self.role, self.process.pid, self.log_path)

    def check(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            if time.monotonic() - self.last_start < RESTART_BACKOFF_S:
                return
            log.warning("%s exited with status %s; restarting (see %s)", self.role, self.process.returncode,
                        self.log_path)
            self.restarts += 1
            self.start()

    def stop(self, timeout_s: float = 20.0) -> None:
        self.stopped_on_purpose = True
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # the role flushes, snapshots and commits
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
