"""Each user's recent clicked items: bounded per user, and bounded in users (LRU)."""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable, Protocol

from streamrecall.bounded import LRUMap
from streamrecall.model.errors import ModelError


class ClickLike(Protocol):
    user_id: str
    item_id: str


class RecentHistory:
    """The last ``max_len`` item ids per user, oldest first; the least recently active
    users are forgotten beyond ``max_users`` (a forgotten user's next click trains, or is
    encoded, with an empty history). Serialisable for checkpoints."""

    def __init__(self, max_len: int = 20, max_users: int = 1_000_000) -> None:
        if max_len <= 0 or max_users <= 0:
            raise ModelError(f"max_len and max_users must be positive, got {max_len}, {max_users}")
        self.max_len = max_len
        self.max_users = max_users
        self._users: LRUMap[str, deque[str]] = LRUMap(max_users)

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._users

    def add(self, user_id: str, item_id: str) -> None:
        items = self._users.get(user_id)
        if items is None:
            items = deque(maxlen=self.max_len)
            self._users.put(user_id, items)
        else:
            self._users.touch(user_id)
        items.append(item_id)

    def get(self, user_id: str) -> list[str]:
        """The user's recent item ids, oldest first (empty for an unknown user)."""
        items = self._users.get(user_id)
        return list(items) if items is not None else []

    def before_each(self, clicks: Iterable[ClickLike]) -> list[list[str]]:
        """Each click's history *before* it, recording the clicks in order as it goes."""
        out = []
        for click in clicks:
            out.append(self.get(click.user_id))
            self.add(click.user_id, click.item_id)
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict; users in least- to most-recently-active order."""
        return {"max_len": self.max_len, "max_users": self.max_users,
                "users": [[u, list(items)] for u, items in self._users.items()]}

    @classmethod
    def from_json(cls, data: Any, max_users: int | None = None) -> "RecentHistory":
        """The history ``to_json`` wrote; ``max_users`` (default: the one it was written with)
        bounds it anew, keeping the most recently active users."""
        try:
            history = cls(int(data["max_len"]), int(data["max_users"]) if max_users is None else max_users)
            for user_id, items in data["users"]:
                if not isinstance(user_id, str) or not all(isinstance(i, str) for i in items):
                    raise TypeError("user ids and item ids must be strings")
                history._users[user_id] = deque(items, maxlen=history.max_len)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"malformed history: {exc}") from None
        history._users.trim()
        return history
