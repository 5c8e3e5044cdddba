"""The role processes' garbage-collector policy (streamrecall/gc_tuning.py): large answers must not
make the collector walk the whole long-lived state again and again."""

from __future__ import annotations

import gc
from typing import Iterator

import msgspec
import pytest

from streamrecall.gc_tuning import YOUNG_THRESHOLD, configure, freeze_state



@pytest.fixture
def collector() -> Iterator[list[int]]:
    """Full collections seen (a list of their count), with the process's policy restored after."""
    threshold = gc.get_threshold()
    full: list[int] = []

    def seen(phase: str, info: dict) -> None:
        if phase == "start" and info["generation"] == 2:
            full.append(1)

    gc.callbacks.append(seen)
    gc.collect()
    try:
        yield full
    finally:
        gc.callbacks.remove(seen)
        gc.set_threshold(*threshold)
        gc.unfreeze()


def _answer_batches(n: int) -> None:
    """What the router does for a ``/recall/batch`` of 64 queries, k=100, ``n`` times: each query's
    two shard replies decoded (a dict per row), the merged rows built as dicts, the answers
    encoded. The indexer no longer builds an object per row for a batch (index/json_rows.py);
    the router, the popular answers and a trainer round's batch still hold this many at once."""
    rows = [{"rank": j + 1, "item_id": f"i{j}", "score": 1.0 / (j + 1), "model_version": 3, "categories": ["c1"]}
            for j in range(100)]
    reply = msgspec.json.encode({"route": "vector", "version": 3, "user_encoded": None, "rows": rows})
    for _ in range(n):
        answers = []
        for _query in range(64):
            replies = [msgspec.json.decode(reply) for _shard in range(2)]
            merged = sorted((r for one in replies for r in one["rows"]), key=lambda r: -r["score"])[:100]
            answers.append({"route": "vector", "results": [
                {"rank": n + 1, "item_id": r["item_id"], "score": r["score"], "model_version": r["model_version"],
                 "categories": r["categories"]} for n, r in enumerate(merged)]})
        encoded = msgspec.json.encode({"results": answers})
    assert [len(a["results"]) for a in msgspec.json.decode(encoded)["results"]] == [100] * 64


def _long_lived_state() -> list[list[int]]:
    return [[j] for j in range(200_000)]  # 200,000 tracked objects, like a catalog's


def test_the_default_policy_walks_the_long_lived_state_again_and_again(collector: list[int]) -> None:
    """The measurement the policy rests on: with CPython's defaults, answers promoted while still
    alive fill the oldest generation, and full collections keep coming."""
    gc.set_threshold(700, 10, 10)
    state = _long_lived_state()
    collector.clear()
    _answer_batches(100)
    assert len(collector) >= 4, len(collector)
    assert state


def test_the_role_policy_lets_answers_die_young(collector: list[int]) -> None:
    configure()
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD
    state = _long_lived_state()
    collector.clear()
    _answer_batches(100)
    assert len(collector) <= 1, len(collector)
    assert state


def test_freezing_moves_the_state_out_of_the_collectors_view(collector: list[int]) -> None:
    state = _long_lived_state()
    freeze_state()
    assert gc.get_freeze_count() >= 200_000
    state.append({"after": [1]})  # still an ordinary, reference-counted object graph
    assert state[-1]["after"] == [1]
