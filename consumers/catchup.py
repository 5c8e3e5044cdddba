"""Progress lines while a role catches up on a backlog (the runtime logs them; quiet once caught up)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class CatchUpLog:
    """Progress lines while a role works through a backlog (a replay ``--from earliest``, a restart
    after downtime): how far behind, how fast the lag closes, about how long is left, and when it
    is done. Log lines rather than a progress bar: roles run as services, their output is a log.

    ``observe(lag, now)`` is called with the total lag over the assigned partitions about once a
    second; a backlog starts at ``backlog`` records and ends at lag 0.
    """

    def __init__(self, role: str, backlog: int = 10_000, every_s: float = 10.0) -> None:
        self.role = role
        self.backlog = backlog
        self.every_s = every_s
        self.active = False
        self._started = self._last_at = 0.0
        self._first = self._last_lag = 0

    def observe(self, lag: int, now: float) -> None:
        if not self.active:
            if lag >= self.backlog:
                self.active = True
                self._started = self._last_at = now
                self._first = self._last_lag = lag
                log.info("%s: %d records behind; catching up", self.role, lag)
            return
        if lag == 0:
            self.active = False
            took = now - self._started
            log.info("%s: caught up: a backlog of %d records in %.0f s", self.role, self._first, took)
            return
        if now - self._last_at < self.every_s:
            return
        closing = (self._last_lag - lag) / max(now - self._last_at, 1e-9)  # records/s the lag shrinks by
        eta = f"about {lag / closing:.0f} s to go" if closing > 0 else "not closing: records arrive as fast as read"
        log.info("%s: catching up: %d records behind (%.0f%% done), lag closing at %.0f records/s, %s",
                 self.role, lag, 100.0 * max(0, self._first - lag) / self._first, closing, eta)
        self._last_at, self._last_lag = now, lag
