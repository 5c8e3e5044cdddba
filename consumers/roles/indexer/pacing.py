"""When a recurring, costly background step may start again: rebuilds, recall measurements, snapshots.

Each of them holds a core (and partly the interpreter lock) for a time that grows with the index:
seconds to minutes at a million items. So none starts more often than its interval, nor sooner
than its last duration divided by the share of the time it may keep busy.
"""

from __future__ import annotations


def next_start(last_start: float, last_duration: float, interval_s: float, busy_share: float) -> float:
    """The earliest moment (same clock as ``last_start``) the step may start again."""
    return last_start + max(interval_s, last_duration / busy_share)
