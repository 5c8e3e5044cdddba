"""One clicks partition's users, as the publisher keeps them."""

from __future__ import annotations

from typing import Iterable

from streamrecall.bounded import LRUMap
from streamrecall.events import Click, UserVector
from streamrecall.model import RecentHistory


class PartitionState:
    """One clicks partition's users: recent items, newest click ts, last activity (LRU order)."""

    def __init__(self, history_len: int, max_users: int) -> None:
        self.max_users = max_users
        self.history = RecentHistory(history_len, max_users)
        self.users: LRUMap[str, list[float]] = LRUMap(max_users)  # user → [event_ts ms, last active (clock s)]
        self.replay_floor: dict[str, int] = {}  # user → event_ts of the vector the state was rebuilt from

    def click(self, click: Click, now: float) -> bool:
        """Record a click; False when it is a replay of one the rebuilt vector already covers."""
        floor = self.replay_floor.get(click.user_id)
        if floor is not None:
            if click.ts <= floor:
                return False
            del self.replay_floor[click.user_id]  # replay of this user is over
        self.history.add(click.user_id, click.item_id)  # evicts the same LRU user as below
        entry = self.users.get(click.user_id)
        if entry is None:
            self.users.put(click.user_id, [click.ts, now])
        else:
            entry[0] = max(entry[0], click.ts)
            entry[1] = now
            self.users.touch(click.user_id)
        return True

    def load(self, vectors: Iterable[UserVector], now: float, now_ms: int) -> None:
        """Rebuild from the latest vector per user (oldest first, so LRU order follows event time)."""
        for v in sorted(vectors, key=lambda v: v.event_ts):
            for item in v.recent_items[-self.history.max_len:]:
                self.history.add(v.user_id, item)
            # Activity is unknown after a move; event time stands in for it.
            evicted = self.users.put(v.user_id, [v.event_ts, now - max(0.0, (now_ms - v.event_ts) / 1000)])
            self.replay_floor[v.user_id] = v.event_ts
            if evicted is not None:  # forgotten: its replayed clicks count as new (bounded like users)
                self.replay_floor.pop(evicted, None)

    def active_since(self, since: float) -> list[str]:
        """Users active at or after ``since``, most recent first."""
        out = []
        for user_id in reversed(self.users):
            if self.users[user_id][1] < since:
                break
            out.append(user_id)
        return out
