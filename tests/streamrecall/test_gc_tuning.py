"""The role processes' garbage-collector policy (streamrecall/gc_tuning.py): large answers must not
make the collector walk the whole long-lived state again and again."""

from __future__ import annotations

import gc
from typing import Iterator

import msgspec
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from streamrecall.consumers.recall_api import requests as req
from streamrecall.consumers.roles.indexer.http_api import RecallService
from streamrecall.consumers.roles.indexer.metrics import IndexerMetrics
from streamrecall.consumers.roles.indexer.options import IndexerOptions
from streamrecall.consumers.roles.indexer.state import IndexerState
from streamrecall.events import Item
from streamrecall.gc_tuning import YOUNG_THRESHOLD, configure, freeze_state
from streamrecall.index import QualityMonitor
from streamrecall.model import ModelConfig

MODEL = ModelConfig(dim=16, hidden=32, id_buckets=4096, token_buckets=4096, estimator_buckets=4096)


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
    """The indexer's ``/recall/batch`` of 64 vectors, k=100, ``n`` times: decode, search, encode."""
    state = IndexerState(IndexerOptions(max_k=100), MODEL, IndexerMetrics(CollectorRegistry()))
    state.upsert_items([Item(item_id=f"i{i}", created_at=i, categories=(f"c{i % 5}",), title=f"w{i % 7}")
                        for i in range(300)])
    service = RecallService(state, state.config, QualityMonitor(state.index), lambda: (True, {}))
    limits = req.Limits(dim=MODEL.dim, max_k=100, max_batch=64)
    rng = np.random.default_rng(0)
    body = msgspec.json.encode({"k": 100, "queries": [{"vector": v.tolist()} for v in
                                                      rng.standard_normal((64, MODEL.dim))]})
    for _ in range(n):
        answers = service.recall_together(req.batch_request(body, limits))
        assert all(a is not None and len(a["results"]) == 100 for a in answers)
        msgspec.json.encode({"results": answers})


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
