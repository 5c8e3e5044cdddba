"""The users' latest vectors, as every recall API holds them (read from the compacted ``user-vectors``).

One entry per user, the latest record wins, a tombstone removes the user; the table is an
:class:`~streamrecall.bounded.LRUMap` of ``max_user_vectors`` (the least recently written
forgotten: such a user is answered from trending until its next vector). The indexer holds it
when it serves users itself; in a sharded index the router does, and the shards hold none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from streamrecall.bounded import LRUMap
from streamrecall.events import UserVector


@dataclass(frozen=True, slots=True)
class UserEntry:
    """A user's latest vector, as read from ``user-vectors``."""

    vector: np.ndarray  # float32 (dim,)
    model_version: int
    event_ts: int
    recent_items: tuple[str, ...]

    @classmethod
    def of(cls, uv: UserVector) -> "UserEntry":
        return cls(np.asarray(uv.vector, dtype=np.float32), uv.model_version, uv.event_ts, tuple(uv.recent_items))


def apply_user_record(users: LRUMap[str, UserEntry], key: bytes | None, value: Any) -> None:
    """One decoded ``user-vectors`` record: ``value`` None is a tombstone (the key names the user)."""
    if value is None:
        if key is not None:
            users.pop(key.decode("utf-8", "replace"), None)
        return
    users.put(value.user_id, UserEntry.of(value))
