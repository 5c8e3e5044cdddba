"""The router's request to a shard (``POST /recall/shard``): validated like every recall request."""

from __future__ import annotations

import msgspec
import pytest

from streamrecall.consumers.recall_api.requests import Limits, shard_request
from streamrecall.consumers.recall_api.rules import ApiError

LIMITS = Limits(dim=3, max_k=10, max_batch=4)


def body(**fields) -> bytes:
    return msgspec.json.encode(fields)


def test_a_user_a_vector_or_neither():
    user = shard_request(body(k=5, exclude=["a"], user={"user_id": "u", "vector": [1, 2, 3], "model_version": 4,
                                                        "recent_items": ["a", "b"]}), LIMITS)
    assert (user.k, user.user_id, user.exclude) == (5, "u", ("a",))
    assert user.user.model_version == 4 and user.user.recent_items == ("a", "b") and user.vector is None
    assert user.user.vector.tolist() == [1.0, 2.0, 3.0]
    vector = shard_request(body(k=2, vector=[0.5, 0, 1]), LIMITS)
    assert vector.user is None and vector.vector.tolist() == [0.5, 0.0, 1.0]
    popular = shard_request(body(k=3), LIMITS)
    assert popular.user is None and popular.vector is None


def test_k_may_reach_a_capped_querys_overfetch_but_no_further():
    assert shard_request(body(k=4096), LIMITS).k == 4096  # max(4096, 64 × max_k)
    with pytest.raises(ApiError, match="k=4097 is above the limit of 4096"):
        shard_request(body(k=4097), LIMITS)


@pytest.mark.parametrize("fields, message", [
    ({"k": 1, "user": {"user_id": "u", "vector": [1, 2], "model_version": 0}}, "user.vector has 2 values"),
    ({"k": 1, "user": {"user_id": "u", "vector": [1, 2, 3], "model_version": -1}}, "model_version must be >= 0"),
    ({"k": 1, "user": {"user_id": "", "vector": [1, 2, 3], "model_version": 0}}, "user.user_id must be a non-empty"),
    ({"k": 1, "vector": [1, 2, 3], "user": {"user_id": "u", "vector": [1, 2, 3], "model_version": 0}},
     "at most one of user or vector"),
    ({"k": 1, "vector": [1, "x", 3]}, "Expected `float`"),
    ({"k": 1, "user": {"user_id": "u", "vector": [1, 2, 3], "model_version": 0, "extra": 1}}, "unknown field"),
    ({"vector": [1, 2, 3]}, "k is required"),
    ({"k": 1, "exclude": ["i"] * 1025}, "exclude lists 1025 ids"),
])
def test_a_bad_shard_request_is_a_400_naming_the_field(fields, message):
    with pytest.raises(ApiError, match=message) as refused:
        shard_request(body(**fields), LIMITS)
    assert refused.value.status == 400
