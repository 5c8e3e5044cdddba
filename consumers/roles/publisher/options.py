"""The publisher's knobs: the ``[publisher]`` table of the settings file (docs/operations.md)."""

from __future__ import annotations

from dataclasses import dataclass

from streamrecall.consumers.role_options import role_options
from streamrecall.errors import ConfigError
from streamrecall.settings import Settings

ROLE = "publisher"


#: Freshness bound: pending users are never held longer than this (ms).
MAX_FLUSH_MS = 200


@dataclass(frozen=True)
class PublisherOptions:
    """The ``[publisher]`` table of the settings file."""

    flush_ms: int = 0                  # 0: publish at the end of every polled batch; else at most this late
    flush_users: int = 1024            # publish as soon as this many users are pending
    history_users: int = 200_000       # users kept per clicks partition (least recently active forgotten)
    refresh_active_s: float = 3600.0   # after a model update, re-publish users active this recently
    refresh_per_tick: int = 256        # users checked and re-published per loop iteration while no clicks flow
    refresh_per_s: float = 200.0       # while clicks flow: at most this many users re-published per second
    refresh_interval_s: float = 10.0   # re-publication rounds start at most this often (updates come every flush)
    startup_timeout_s: float = 120.0   # bound on catching up with model-updates at start
    rebuild_timeout_s: float = 120.0   # bound on rebuilding one partition from user-vectors

    @classmethod
    def from_settings(cls, settings: Settings) -> "PublisherOptions":
        options = role_options(cls, settings, ROLE, may_be_zero=("flush_ms",))
        if options.flush_ms > MAX_FLUSH_MS:
            raise ConfigError(f"publisher.flush_ms: must be from 0 to {MAX_FLUSH_MS}, got {options.flush_ms}")
        return options
