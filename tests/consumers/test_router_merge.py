"""The router's merge and fan-out logic over fake shards (fast; the real thing: tests/integration/test_shards.py).

A fake shard holds items with vectors and answers ``/recall/shard`` bodies with its exact
top-``k``, as a real shard does; the router's answer must then be the exact top-``k`` over all
items, with exclusions and category caps applied to the global ranking, scored by one version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import msgspec
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from streamrecall.consumers.recall_api.rules import MAX_OVERFETCH_FACTOR, MIN_OVERFETCH, ApiError, cap_per_category
from streamrecall.consumers.roles.router.fanout import Failure, Reply, parse_shard_urls
from streamrecall.consumers.roles.router.merge import ShardAnswer, merge, needs_wider, one_version
from streamrecall.consumers.roles.router.metrics import RouterMetrics
from streamrecall.consumers.roles.router.service import RouterService
from streamrecall.errors import ConfigError

DIM = 8


def _rows(ids, scores, cats=None):
    return [{"item_id": i, "score": float(s), "model_version": 3, "categories": (cats or {}).get(i, [])}
            for i, s in zip(ids, scores)]


def test_merge_of_each_shards_top_k_is_the_global_top_k():
    rng = np.random.default_rng(0)
    ids = [f"i{n}" for n in range(300)]
    scores = rng.normal(size=300)
    shard_of = rng.integers(0, 3, size=300)
    k = 25
    answers = []
    for s in range(3):
        mine = sorted((i for i in range(300) if shard_of[i] == s), key=lambda i: -scores[i])[:k]
        answers.append(ShardAnswer(s, "user-vector", 3, _rows([ids[i] for i in mine], scores[mine]), asked=k))
    merged = merge(answers, k)
    exact = [ids[i] for i in np.argsort(-scores)[:k]]
    assert [r["item_id"] for r in merged] == exact
    assert [r["rank"] for r in merged] == list(range(1, k + 1))


def test_category_caps_apply_to_the_merged_ranking_not_to_each_shard():
    # Capping each shard before the merge would be wrong: shard 0's "a" (x-tagged) uses up the x
    # quota there, but globally "a" is skipped (its category y is full from shard 1), so "b" fits.
    shard0 = _rows(["a", "b"], [0.9, 0.5], {"a": ["x", "y"], "b": ["x"]})
    shard1 = _rows(["c"], [0.95], {"c": ["y"]})
    answers = [ShardAnswer(0, "vector", 1, shard0, asked=10), ShardAnswer(1, "vector", 1, shard1, asked=10)]
    capped = merge(answers, 3, max_per_category=1,
                   cap=lambda rows, n, c: cap_per_category(rows, n, c, lambda r: r["categories"]))
    assert [r["item_id"] for r in capped] == ["c", "b"]
    per_shard_first = cap_per_category(shard0, 3, 1, lambda r: r["categories"])
    assert [r["item_id"] for r in per_shard_first] == ["a"]  # what capping on the shard would have kept


def test_exclusions_are_dropped_after_the_merge_and_ranks_renumbered():
    answers = [ShardAnswer(0, "vector", 1, _rows(["a", "b"], [0.9, 0.1]), asked=3),
               ShardAnswer(1, "vector", 1, _rows(["c"], [0.5]), asked=3)]
    merged = merge(answers, 3, exclude={"a"})
    assert [(r["rank"], r["item_id"]) for r in merged] == [(1, "c"), (2, "b")]


def test_recent_route_merges_newest_first_and_routes_never_mix():
    a = ShardAnswer(0, "recent", 0, [{"item_id": "old", "score": None, "model_version": 0, "categories": [],
                                      "event_ts": 1}], asked=2)
    b = ShardAnswer(1, "recent", 0, [{"item_id": "new", "score": None, "model_version": 0, "categories": [],
                                      "event_ts": 9}], asked=2)
    assert [r["item_id"] for r in merge([a, b], 2)] == ["new", "old"]
    with pytest.raises(ValueError, match="different routes"):
        merge([a, ShardAnswer(2, "trending", 0, [], asked=2)], 2)


def test_one_version_names_the_newest_and_who_is_behind():
    answers = [ShardAnswer(0, "vector", 7, [], 1), ShardAnswer(1, "vector", 6, [], 1), ShardAnswer(2, "vector", 7, [], 1)]
    assert one_version(answers) == (7, [1])
    assert one_version([]) == (None, [])


def test_needs_wider_only_while_a_shard_may_hold_more():
    full = ShardAnswer(0, "vector", 1, _rows(["a", "b"], [1, 0]), asked=2)
    short = ShardAnswer(1, "vector", 1, _rows(["c"], [1]), asked=2)
    assert needs_wider([full, short], kept=1, k=3, fetch=2, limit=8)
    assert not needs_wider([short], kept=1, k=3, fetch=2, limit=8)      # every shard gave all it has
    assert not needs_wider([full], kept=1, k=3, fetch=8, limit=8)       # at the limit
    assert not needs_wider([full], kept=3, k=3, fetch=2, limit=8)       # enough passed the cap


def test_shard_urls_parse_shards_and_replicas_and_refuse_nonsense():
    assert parse_shard_urls("http://a:1;http://b:2, http://b2:3/") == [["http://a:1"], ["http://b:2", "http://b2:3"]]
    for bad in ("http://a:1;;http://b:2", "https://a:1", "a:1", "http://a:1/recall", "http://a:x"):
        with pytest.raises(ConfigError, match="shard_urls"):
            parse_shard_urls(bad)


# ------------------------------------------------------------------ the service over fake shards
@dataclass
class FakeShard:
    """Items and vectors; answers a /recall/shard body like an indexer shard (exact top-k)."""

    ids: list[str]
    vectors: np.ndarray
    categories: dict[str, list[str]]
    version: int = 3
    fail: str | None = None  # "down" | "deadline": answers nothing
    asked: list[dict[str, Any]] = field(default_factory=list)

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        self.asked.append(body)
        if "user" in body:
            route, q = "user-vector", np.asarray(body["user"]["vector"], dtype=np.float32)
        else:
            route, q = "vector", np.asarray(body["vector"], dtype=np.float32)
        scores = self.vectors @ q
        order = [j for j in np.argsort(-scores, kind="stable") if self.ids[j] not in set(body["exclude"])]
        rows = [{"item_id": self.ids[j], "score": float(scores[j]), "model_version": self.version,
                 "categories": self.categories.get(self.ids[j], [])} for j in order[: body["k"]]]
        return {"route": route, "version": self.version, "user_encoded": "stored" if route == "user-vector" else None,
                "rows": rows}


class FakeClient:
    def __init__(self, shards: list[FakeShard]) -> None:
        self.shards = shards
        self.calls = 0

    def __len__(self) -> int:
        return len(self.shards)

    def ask(self, bodies, deadline_s):
        self.calls += 1
        out = {}
        for s, raw in bodies.items():
            shard = self.shards[s]
            if shard.fail:
                out[s] = Failure(s, shard.fail, "fake")
            else:
                out[s] = Reply(s, f"fake://{s}", shard.answer(msgspec.json.decode(raw)), 0.001)
        return out


def _service(shards, *, users=None, partial="answer", deadline_ms=200.0, behind_retry_ms=1.0):
    config = SimpleNamespace(deadline_ms=deadline_ms, behind_retry_ms=behind_retry_ms, partial=partial)
    client = FakeClient(shards)
    service = RouterService(client, users or {}, config, RouterMetrics(CollectorRegistry()), DIM,
                            cap_per_category, lambda: (True, {}), (MAX_OVERFETCH_FACTOR, MIN_OVERFETCH))
    return service, client


def _catalog(n=400, shards=2, seed=1):
    rng = np.random.default_rng(seed)
    ids = [f"i{j}" for j in range(n)]
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    cats = {i: [f"c{j % 5}"] for j, i in enumerate(ids)}
    parts = [FakeShard([ids[j] for j in range(n) if j % shards == s],
                       vectors[[j for j in range(n) if j % shards == s]], cats) for s in range(shards)]
    return ids, vectors, cats, parts


def test_router_answer_is_the_exact_global_top_k_with_caps_and_exclusions():
    ids, vectors, cats, parts = _catalog()
    service, _ = _service(parts)
    q = np.random.default_rng(5).normal(size=DIM).astype(np.float32)
    scores = vectors @ q
    ranked = [ids[j] for j in np.argsort(-scores, kind="stable")]

    plain = service.recall_for_vector(q, 30)
    assert [r["item_id"] for r in plain["results"]] == ranked[:30]
    assert plain["partial"] is False and plain["shards"]["answered"] == [0, 1]
    assert plain["model_versions"]["scored"] == 3

    excluded = ranked[:5]
    capped = service.recall_for_vector(q, 20, max_per_category=2, exclude=excluded)
    expected = cap_per_category([i for i in ranked if i not in excluded], 20, 2, lambda i: cats[i])
    assert [r["item_id"] for r in capped["results"]] == expected  # 5 categories × 2: 10 results, k not met
    assert len(expected) == 10


def test_a_cap_that_needs_more_candidates_widens_the_fetch():
    ids, vectors, cats, parts = _catalog()
    service, _ = _service(parts)
    q = np.ones(DIM, dtype=np.float32)
    service.recall_for_vector(q, 10, max_per_category=1)  # 5 categories: only 5 pass, so it widens to the end
    fetched = [b["k"] for b in parts[0].asked]
    assert fetched[0] == 20 and fetched[-1] > fetched[0]


def test_a_user_goes_to_every_shard_with_its_vector_version_and_recent_items():
    ids, vectors, cats, parts = _catalog()
    entry = SimpleNamespace(vector=np.ones(DIM, dtype=np.float32), model_version=2, recent_items=("i0", "i1"))
    service, _ = _service(parts, users={"u": entry})
    answer = service.recall_for_user("u", 5, exclude_seen=True)
    sent = parts[1].asked[-1]
    assert sent["user"] == {"user_id": "u", "vector": [1.0] * DIM, "model_version": 2, "recent_items": ["i0", "i1"]}
    assert sent["exclude"] == ["i0", "i1"]
    assert answer["route"] == "user-vector" and answer["compatible"] is True
    assert answer["model_versions"]["user_vector"] == 2 and answer["model_versions"]["scored"] == 3
    assert not {"i0", "i1"} & {r["item_id"] for r in answer["results"]}


def test_a_shard_behind_is_asked_again_and_joins_once_it_caught_up():
    _, _, _, parts = _catalog()
    parts[1].version = 2

    class CatchingUp(FakeClient):
        def ask(self, bodies, deadline_s):
            out = super().ask(bodies, deadline_s)
            parts[1].version = 3  # applied the update meanwhile
            return out

    service, _ = _service(parts)
    service.client = CatchingUp(parts)
    answer = service.recall_for_vector(np.ones(DIM, dtype=np.float32), 10)
    assert answer["partial"] is False and answer["model_versions"]["scored"] == 3
    assert len(parts[1].asked) == 2 and len(parts[0].asked) == 1


def test_a_shard_still_behind_at_the_deadline_is_left_out_never_mixed():
    _, _, _, parts = _catalog()
    parts[1].version = 2
    service, _ = _service(parts, deadline_ms=20.0, behind_retry_ms=5.0)
    answer = service.recall_for_vector(np.ones(DIM, dtype=np.float32), 10)
    assert answer["partial"] is True and answer["shards"]["answered"] == [0]
    assert "behind" in answer["shards"]["missing"]["1"]
    assert {r["model_version"] for r in answer["results"]} == {3}


def test_a_shard_down_gives_a_flagged_partial_answer_or_a_503_by_setting():
    ids, vectors, _, parts = _catalog()
    parts[0].fail = "down"
    service, _ = _service(parts)
    answer = service.recall_for_vector(np.ones(DIM, dtype=np.float32), 10)
    assert answer["partial"] is True and answer["shards"]["answered"] == [1]
    assert answer["shards"]["missing"]["0"].startswith("down")
    assert {r["item_id"] for r in answer["results"]} <= set(parts[1].ids)
    assert service.metrics.partial.labels("partial")._value.get() == 1

    refusing, _ = _service(parts, partial="refuse")
    with pytest.raises(ApiError) as refused:
        refusing.recall_for_vector(np.ones(DIM, dtype=np.float32), 10)
    assert refused.value.status == 503 and "shard 0" in str(refused.value)

    parts[1].fail = "deadline"
    with pytest.raises(ApiError, match="no shard answered") as none:
        service.recall_for_vector(np.ones(DIM, dtype=np.float32), 10)
    assert none.value.status == 503
