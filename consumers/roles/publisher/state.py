"""One clicks partition's users, as the publisher keeps them."""

from __future__ import annotations

from collections import deque
from typing import Iterable, Mapping

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


class ActiveUsers:
    """The users of ``states`` active at or after ``since``, most recent first, partition by
    partition, read lazily: a partition's keys are copied when its turn comes (37 ms at 200,000
    users) and :meth:`take` checks each user as it comes to it. Filtering every user at the start
    held the loop 0.21 s at 220,000 users and 0.99 s at 800,000 (idle machine; 0.67-0.92 s under
    load at 220,000 in bench scale). A user who clicks after the copy is published for that click."""

    def __init__(self, states: Mapping[int, PartitionState], since: float) -> None:
        self.since = since
        # (partition, its state, its keys once copied, else how many it held at the start)
        self._parts: deque[tuple[int, PartitionState, list[str] | int]] = deque(
            (p, st, len(st.users)) for p, st in states.items())
        self._left = sum(len(st.users) for st in states.values())

    def __len__(self) -> int:
        """Users not checked yet (an upper bound on those still to come)."""
        return self._left

    def take(self, n: int) -> list[tuple[int, str]]:
        """Up to ``n`` more (partition, user) still held and active since ``since``."""
        out: list[tuple[int, str]] = []
        while self._parts and len(out) < n:
            p, state, keys = self._parts[0]
            if isinstance(keys, int):  # its turn: copy the keys now, in LRU order (pop() = the most recent)
                counted, keys = keys, list(state.users)
                self._left += len(keys) - counted
                self._parts[0] = (p, state, keys)
            while keys and len(out) < n:
                user = keys.pop()
                self._left -= 1
                entry = state.users.get(user)
                if entry is None:  # forgotten since
                    continue
                if entry[1] < self.since:  # the rest of this partition is older still
                    self._left -= len(keys)
                    keys.clear()
                    break
                out.append((p, user))
            if not keys:
                self._parts.popleft()
        return out
