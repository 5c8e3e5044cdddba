"""Liveness from poll-loop progress: ``GET /livez`` on every role's HTTP port.

A process that answers HTTP is not necessarily alive: a poll loop stuck in a call that never
returns still serves ``/metrics`` from its HTTP thread. The runtime beats a :class:`Heartbeat`
at the end of every step (also while it pauses on a failing flush: retrying is progress), and
``/livez`` answers 200 only while the last beat is at most ``stall_s`` old; 503 before the loop
first ran (start-up: snapshot load, replays, table reads, covered by the startupProbe) and once
it stalled. Kubernetes' livenessProbe restarts the pod on 503s; ``/healthz`` (readiness) is
separate and may say "not ready" while the loop is perfectly alive and catching up.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

#: A step is bounded by its waits: a 100 ms poll, the handler's flush (the trainer waits up to
#: 60 s for the broker's acknowledgement, then checkpoints) and 30 s for dead letters. Three
#: minutes without a completed step is a stuck loop, not a slow one.
LIVENESS_STALL_S = 180.0


class Heartbeat:
    """When the poll loop last completed a step, and whether that is recent enough."""

    def __init__(self, stall_s: float = LIVENESS_STALL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_s = stall_s
        self.clock = clock
        self.last: float | None = None  # None: the loop has not completed a step yet

    def beat(self) -> None:
        self.last = self.clock()

    def check(self) -> tuple[bool, dict[str, Any]]:
        """(alive, a JSON-able body saying why)."""
        if self.last is None:
            return False, {"live": False, "reason": "starting: the poll loop has not completed a step yet"}
        age = self.clock() - self.last
        if age > self.stall_s:
            return False, {"live": False, "last_step_age_s": round(age, 3),
                           "reason": f"the poll loop completed no step in {age:.0f}s (bound {self.stall_s:.0f}s)"}
        return True, {"live": True, "last_step_age_s": round(age, 3)}

    def answer(self) -> tuple[int, str, bytes]:
        """(status, content type, body) of ``GET /livez``."""
        alive, body = self.check()
        return (200 if alive else 503), "application/json", json.dumps(body).encode()
