"""The trainer's table of item content, with O(1) uniform sampling for mixed negatives."""

from __future__ import annotations

import random
from typing import Iterator, Mapping

from streamrecall.bounded import LRUMap
from streamrecall.model.features import ItemLike

#: Items the trainer keeps by default (about 1 KB each with content: ~2 GB at the bound).
DEFAULT_MAX_ITEMS = 2_000_000


class ItemCatalog(Mapping[str, ItemLike]):
    """item_id → latest item. ``upsert`` and ``delete`` follow the ``items`` topic.

    At most ``max_items`` items: beyond it the item least recently upserted is forgotten (a
    click on it then trains on its id alone, like one on an item not yet seen, and it is no
    longer drawn as a negative)."""

    def __init__(self, max_items: int = DEFAULT_MAX_ITEMS) -> None:
        self._items: LRUMap[str, ItemLike] = LRUMap(max_items)
        self._ids: list[str] = []
        self._slot: dict[str, int] = {}

    def __getitem__(self, item_id: str) -> ItemLike:
        return self._items[item_id]

    def get(self, item_id: str, default: ItemLike | None = None) -> ItemLike | None:  # type: ignore[override]
        return self._items.get(item_id, default)  # skips Mapping.get's try/except: hot path

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def capacity(self) -> int:
        return self._items.capacity

    def upsert(self, item: ItemLike) -> None:
        if item.item_id not in self._items:
            self._slot[item.item_id] = len(self._ids)
            self._ids.append(item.item_id)
        evicted = self._items.put(item.item_id, item)
        if evicted is not None:
            self._free_slot(evicted)

    def delete(self, item_id: str) -> None:
        if self._items.pop(item_id, None) is not None:
            self._free_slot(item_id)

    def _free_slot(self, item_id: str) -> None:
        slot = self._slot.pop(item_id)
        last = self._ids.pop()
        if last != item_id:  # move the last id into the freed slot
            self._ids[slot] = last
            self._slot[last] = slot

    def sample(self, n: int, rng: random.Random) -> list[ItemLike]:
        """``n`` items drawn uniformly with replacement (empty if the catalog is)."""
        if not self._ids:
            return []
        ids = self._ids
        return [self._items[ids[rng.randrange(len(ids))]] for _ in range(n)]
