"""The one offsets type: what the runtime and every role's state file say, the next offset to read."""

from __future__ import annotations

import pytest

from streamrecall.consumers.offsets import Offsets, OffsetsError
from streamrecall.consumers.roles.indexer.snapshot import Resume


def test_the_stored_form_round_trips_by_topic_and_partition() -> None:
    offsets = Offsets({("clicks", 1): 980, ("clicks", 0): 1200, ("items", 0): 7})
    stored = offsets.to_json()
    assert stored == {"clicks": {"0": 1200, "1": 980}, "items": {"0": 7}}
    assert Offsets.from_json(stored, "f") == offsets
    assert offsets.of("clicks") == {0: 1200, 1: 980} and offsets.only("items") == Offsets({("items", 0): 7})
    assert offsets.get("items", 3) is None and repr(offsets) == "Offsets(clicks[0]@1200, clicks[1]@980, items[0]@7)"


@pytest.mark.parametrize("stored, reason", [
    ([1, 2], "must be an object of topics"),
    ({"clicks": [1]}, "must be an object of partitions"),
    ({"clicks": {"zero": 1}}, "is not a number"),
    ({"clicks": {"0": -1}}, "non-negative integer"),
    ({"clicks": {"0": 1.5}}, "non-negative integer"),
    ({"clicks": {"0": True}}, "non-negative integer"),
])
def test_anything_else_is_refused_with_a_reason_naming_the_file(stored, reason) -> None:
    with pytest.raises(OffsetsError, match=reason) as caught:
        Offsets.from_json(stored, "state/trainer/checkpoint.safetensors")
    assert "state/trainer/checkpoint.safetensors" in str(caught.value)


def test_an_indexer_snapshot_of_either_format_resumes_at_the_same_offsets() -> None:
    old = Resume(format=1, items={"0": 7, "1": 5}, model_updates={"0": 3})
    new = Resume(offsets={"items": {"0": 7, "1": 5}, "model-updates": {"0": 3}})
    assert old.next_offsets() == new.next_offsets() == Offsets({("items", 0): 7, ("items", 1): 5,
                                                                ("model-updates", 0): 3})
