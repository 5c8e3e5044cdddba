"""One bounded map for every in-memory state that grows with users, items or records.

Each role keeps maps keyed by user, item or record coordinates (histories, the indexer's user
vectors, the trainer's item table, the dead-letter dedup set). Left alone they grow with the
stream; each is an :class:`LRUMap` with a capacity that is a setting, and its fill is exported as
``streamrecall_state_entries`` / ``streamrecall_state_capacity`` (docs/operations.md#bounded-memory).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRUMap(OrderedDict[K, V]):
    """An ordered dict of at most ``capacity`` entries, least recently written first.

    :meth:`put` makes a key the most recent and evicts the least recent one beyond the capacity.
    Reads (``get``, ``[]``) do not reorder: readers on other threads (the indexer's queries) never
    write, so the poll loop stays the one writer."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        self.capacity = capacity

    def put(self, key: K, value: V) -> K | None:
        """Store ``value`` as the most recent entry; returns the key evicted to make room, if any."""
        self[key] = value
        self.move_to_end(key)
        return self.trim()

    def touch(self, key: K) -> None:
        """Make ``key`` (held) the most recent entry."""
        self.move_to_end(key)

    def trim(self) -> K | None:
        """Evict least recent entries down to the capacity; returns the last key evicted."""
        evicted = None
        while len(self) > self.capacity:
            evicted, _ = self.popitem(last=False)
        return evicted
