"""The newest live items, kept as items come and go: the ``recent`` route without a catalog scan.

Users without a vector are answered from the trainer's trending items, else (no trending yet: a
fresh system, the whole first catalog load) from the newest items. Finding those by scanning the
catalog (``heapq.nlargest``) took the indexer's lock and the interpreter lock for a time that grows
with the catalog: at a million items, 20% of the indexer's samples (py-spy, ``streamrecall bench
scale`` while it indexed) were in that scan, while ingest waited.
"""

from __future__ import annotations

import bisect
import heapq
from typing import Mapping

from streamrecall.events import Item

Key = tuple[int, str]  # (created_at, item_id): newest last


def _key(item: Item) -> Key:
    return (item.created_at, item.item_id)


class NewestItems:
    """At least the ``keep`` newest live items of a catalog by (created_at, item_id) (fewer after
    deletes; fewer than ``2 * keep``), updated per write.

    Invariant: ``_keys`` (ascending) holds the ``len(_keys)`` newest live items, so every live item
    not in it is older than its first. A delete may leave fewer than ``keep``; a query for more
    than that, with more items in the catalog, rescans it once. Not thread-safe: the indexer calls
    it under its state lock, as it writes the catalog."""

    def __init__(self, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.keep = keep
        self._keys: list[Key] = []

    def upserted(self, new: Item, old: Item | None, live: int) -> None:
        """``new`` was written over ``old`` (None: a new id); ``live``: items in the catalog now."""
        if old is not None:
            self._discard(old)
        key = _key(new)
        outside = live - len(self._keys) - 1  # live items, besides new, that are not kept
        if outside == 0 or (self._keys and key > self._keys[0]):
            bisect.insort(self._keys, key)
            if len(self._keys) >= 2 * self.keep:  # trimmed in bulk: one item at a time moved the whole list
                del self._keys[:-self.keep]
        # else: older than every kept item, so it stays out and the invariant holds

    def deleted(self, item: Item) -> None:
        self._discard(item)

    def clear(self) -> None:
        """Forget everything (the catalog was replaced): the next query rescans it."""
        self._keys = []

    def newest(self, n: int, catalog: Mapping[str, Item]) -> list[Item]:
        """The ``n`` newest live items of ``catalog`` (the one this follows), newest first."""
        if n > self.keep:  # more than is ever kept: scan (not for the default limits, see IndexerState)
            return heapq.nlargest(n, catalog.values(), key=_key)
        if n > len(self._keys) and len(catalog) > len(self._keys):
            self._keys = sorted(heapq.nlargest(self.keep, map(_key, catalog.values())))
        return [catalog[item_id] for _, item_id in reversed(self._keys[-n:])] if n > 0 else []

    def _discard(self, item: Item) -> None:
        key = _key(item)
        at = bisect.bisect_left(self._keys, key)
        if at < len(self._keys) and self._keys[at] == key:
            del self._keys[at]
