"""The newest live items kept as items come and go (consumers/roles/indexer/newest.py) answer as a
scan of the catalog would, through random upserts (new ids, re-created ids), deletes and reloads."""

from __future__ import annotations

import heapq
import random

import pytest

from streamrecall.consumers.roles.indexer.newest import NewestItems
from streamrecall.events import Item


def scan(catalog: dict[str, Item], n: int) -> list[str]:
    return [it.item_id for it in heapq.nlargest(n, catalog.values(), key=lambda it: (it.created_at, it.item_id))]


@pytest.mark.parametrize("seed", range(5))
def test_the_kept_newest_items_match_a_scan_through_upserts_deletes_and_a_reload(seed: int) -> None:
    rng = random.Random(seed)
    keep = 16
    newest, catalog = NewestItems(keep), {}
    for step in range(3000):
        roll = rng.random()
        if roll < 0.6:  # an upsert: a new id or an old one, created at any time (ties too)
            item = Item(item_id=f"i{rng.randrange(200)}", created_at=rng.randrange(50))
            old = catalog.get(item.item_id)
            catalog[item.item_id] = item
            newest.upserted(item, old, len(catalog))
        elif roll < 0.95 and catalog:  # deletes, often of the newest (what leaves fewer than keep)
            victim = rng.choice(scan(catalog, 3) if rng.random() < 0.5 else list(catalog))
            newest.deleted(catalog.pop(victim))
        elif roll >= 0.999:
            catalog = dict(catalog)
            newest.clear()
        n = rng.choice([0, 1, 5, keep, keep + 4])
        got = [it.item_id for it in newest.newest(n, catalog)]
        assert got == scan(catalog, n), f"step {step}: n={n}"


def test_a_query_does_not_scan_the_catalog_while_enough_are_kept() -> None:
    class Counting(dict):
        values_calls = 0

        def values(self):  # type: ignore[override]
            Counting.values_calls += 1
            return super().values()

    newest, catalog = NewestItems(8), Counting()
    for i in range(1000):  # ingest in created_at order, as a first catalog load does
        item = Item(item_id=f"i{i}", created_at=i)
        catalog[item.item_id] = item
        newest.upserted(item, None, len(catalog))
    for _ in range(100):
        assert [it.item_id for it in newest.newest(8, catalog)] == [f"i{i}" for i in range(999, 991, -1)]
    assert Counting.values_calls == 0
