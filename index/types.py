"""The small value types the index hands in and out."""

from __future__ import annotations

from typing import NamedTuple

import msgspec
import numpy as np


class EntryMeta(msgspec.Struct, frozen=True, gc=False):
    """When and by which model version an item's vector was encoded.

    ``event_ts_ms`` is the timestamp of the item event the vector was computed
    from; ``categories`` feed the max-per-category cap the indexer applies to
    results.
    """

    model_version: int
    encoded_at_ms: int
    event_ts_ms: int
    categories: tuple[str, ...] = ()


class Hit(NamedTuple):
    """One query result. ``score`` is a similarity: higher is better.

    For the ``ip`` and ``cosine`` spaces it is the inner product (cosine for
    L2-normalised vectors); for ``l2`` it is the negated squared distance.
    """

    item_id: str
    score: float
    model_version: int = 0
    categories: tuple[str, ...] = ()


class Entry(NamedTuple):
    """What :meth:`ItemIndex.get` returns: the stored vector (float32, shape ``(dim,)``) and its metadata."""

    item_id: str
    vector: np.ndarray
    meta: EntryMeta


class Block(NamedTuple):
    """Results of several queries as columns, each of shape (queries, k), best first:
    the ids, their JSON members (index/json_rows.py) and their scores."""

    ids: np.ndarray
    members: np.ndarray
    scores: np.ndarray
