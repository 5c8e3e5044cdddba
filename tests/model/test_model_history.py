import json

import pytest

from streamrecall.model import ModelError, RecentHistory


class _Click:
    def __init__(self, user_id: str, item_id: str) -> None:
        self.user_id, self.item_id = user_id, item_id


def test_bounded_per_user_and_lru_over_users():
    h = RecentHistory(max_len=2, max_users=2)
    for item in "abc":
        h.add("u1", item)
    assert h.get("u1") == ["b", "c"]
    h.add("u2", "x")
    h.add("u1", "d")  # u1 becomes most recent
    h.add("u3", "y")  # evicts u2
    assert "u2" not in h and h.get("u2") == [] and len(h) == 2


def test_before_each_returns_history_before_the_click_and_records_it():
    h = RecentHistory(max_len=3)
    out = h.before_each([_Click("u", "a"), _Click("u", "b"), _Click("v", "c")])
    assert out == [[], ["a"], []]
    assert h.get("u") == ["a", "b"]


def test_json_round_trip_and_malformed_input():
    h = RecentHistory(max_len=3, max_users=10)
    h.add("u", "a")
    h.add("v", "b")
    back = RecentHistory.from_json(json.loads(json.dumps(h.to_json())))
    assert back.to_json() == h.to_json()
    with pytest.raises(ModelError, match="malformed"):
        RecentHistory.from_json({"max_len": 3, "max_users": 1, "users": [["u", [1]]]})
