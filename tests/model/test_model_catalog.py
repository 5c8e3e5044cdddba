import random

from streamrecall.events import Item
from streamrecall.model import ItemCatalog


def test_upsert_delete_and_uniform_sampling_stay_consistent():
    catalog = ItemCatalog()
    for i in range(5):
        catalog.upsert(Item(item_id=f"i{i}", created_at=0))
    catalog.upsert(Item(item_id="i1", created_at=0, tags=("new",)))
    catalog.delete("i0")
    catalog.delete("missing")
    assert len(catalog) == 4 and "i0" not in catalog and catalog["i1"].tags == ("new",)
    drawn = {item.item_id for item in catalog.sample(400, random.Random(0))}
    assert drawn == {"i1", "i2", "i3", "i4"}
    assert ItemCatalog().sample(3, random.Random(0)) == []
