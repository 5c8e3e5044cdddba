"""Factories for the index tests: small low-rank unit vectors and small indexes (one hnswlib thread)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

from streamrecall.index import EntryMeta, ItemIndex

DIM = 16


@pytest.fixture
def make_vectors() -> Callable[..., np.ndarray]:
    """Unit vectors of low intrinsic dimension (like a trained item tower's output)."""
    rng = np.random.default_rng(1234)
    basis = rng.standard_normal((6, DIM)).astype(np.float32)

    def make(n: int) -> np.ndarray:
        x = rng.standard_normal((n, 6)).astype(np.float32) @ basis
        x += 0.05 * rng.standard_normal(x.shape).astype(np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return make


@pytest.fixture
def make_index(make_vectors) -> Callable[..., ItemIndex]:
    """An ItemIndex, optionally filled with ``n`` items "i0".."i{n-1}" at model version ``version``."""

    def make(n: int = 0, version: int = 1, **kwargs) -> ItemIndex:
        kwargs.setdefault("num_threads", 1)
        kwargs.setdefault("initial_capacity", 64)
        index = ItemIndex(DIM, **kwargs)
        if n:
            index.upsert([f"i{j}" for j in range(n)], make_vectors(n), meta(version))
        return index

    return make


def meta(version: int = 1, ts: int = 0, categories: tuple[str, ...] = ()) -> EntryMeta:
    return EntryMeta(model_version=version, encoded_at_ms=ts, event_ts_ms=ts, categories=categories)
