"""The trainer's table of item content, with O(1) uniform sampling for mixed negatives."""

from __future__ import annotations

import random
from typing import Iterator, Mapping

from streamrecall.model.features import ItemLike


class ItemCatalog(Mapping[str, ItemLike]):
    """item_id → latest item. ``upsert`` and ``delete`` follow the ``items`` topic."""

    def __init__(self) -> None:
        self._items: dict[str, ItemLike] = {}
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

    def upsert(self, item: ItemLike) -> None:
        if item.item_id not in self._items:
            self._slot[item.item_id] = len(self._ids)
            self._ids.append(item.item_id)
        self._items[item.item_id] = item

    def delete(self, item_id: str) -> None:
        slot = self._slot.pop(item_id, None)
        if slot is None:
            return
        del self._items[item_id]
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
