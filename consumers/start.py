"""Start positions: where a consumer begins reading (`--from`).

``committed`` (default) resumes from the role's own snapshot offsets, else the
group's committed offsets, else the earliest offset. The others override both,
once, at the first assignment of each partition in this process: this is how
replay works.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal

from streamrecall.errors import ConfigError

StartKind = Literal["committed", "earliest", "latest", "timestamp", "offsets"]


@dataclass(frozen=True)
class StartPosition:
    kind: StartKind = "committed"
    timestamp_ms: int | None = None
    #: explicit offsets, {(topic, partition): offset}; partitions not named use "committed"
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)

    def __str__(self) -> str:
        if self.kind == "timestamp":
            return f"timestamp:{self.timestamp_ms}"
        if self.kind == "offsets":
            return "offsets:" + ",".join(f"{t}:{p}={o}" for (t, p), o in sorted(self.offsets.items()))
        return self.kind


def parse_start(text: str) -> StartPosition:
    """Parse ``committed|earliest|latest|timestamp:ISO|offsets:TOPIC:P=O,...``.

    Timestamps are ISO 8601 (``2026-11-28T12:00:00Z``; no zone means UTC) or epoch ms.
    """
    kind, _, arg = text.partition(":")
    if kind in ("committed", "earliest", "latest") and not arg:
        return StartPosition(kind)  # type: ignore[arg-type]
    if kind == "timestamp" and arg:
        return StartPosition("timestamp", timestamp_ms=_parse_time(arg))
    if kind == "offsets" and arg:
        offsets: dict[tuple[str, int], int] = {}
        for part in arg.split(","):
            try:
                tp, _, off = part.partition("=")
                topic, _, partition = tp.rpartition(":")
                if not topic:
                    raise ValueError
                offsets[(topic, int(partition))] = int(off)
            except ValueError:
                raise ConfigError(f"from: {part!r} is not TOPIC:PARTITION=OFFSET") from None
            if offsets[(topic, int(partition))] < 0:
                raise ConfigError(f"from: offset in {part!r} must be >= 0")
        return StartPosition("offsets", offsets=offsets)
    raise ConfigError(f"from: {text!r} is not committed, earliest, latest, timestamp:ISO or offsets:TOPIC:P=O,...")


def _parse_time(arg: str) -> int:
    if arg.isascii() and arg.isdigit():  # str.isdigit() alone accepts '²', which int() refuses
        return int(arg)
    try:
        dt = datetime.fromisoformat(arg.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"from: timestamp {arg!r} is not ISO 8601 (e.g. 2026-11-28T12:00:00Z) or epoch ms") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)
