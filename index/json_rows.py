"""Result rows as JSON bytes, without a Python object per row.

A recall answer's row is ``{"rank", "item_id", "categories", "score", "model_version"}``
(docs/api.md). Built as a dict per row and then encoded, 64 answers of 100 rows cost about
3 ms of Python, more than the hnswlib search that found them. Here the members that belong to
the item (its id and categories, JSON-escaped by msgspec) are encoded once, when the item is
written, and kept by the index as one more column (:func:`item_members`); an answer is those
pieces joined with a rank prefix, the scores (one msgspec encode for every score of a batch)
and a tail naming the model version (:func:`encode_rows`): about a third of the time.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import msgspec
import numpy as np

_encode = msgspec.json.encode

#: Decimal places of a score in an answer.
SCORE_DECIMALS = 6


def item_members(item_id: str, categories: Sequence[str]) -> bytes:
    """``"item_id":…,"categories":[…],"score":`` of one item: what its rows share in every answer."""
    return b'"item_id":' + _encode(item_id) + _categories_member(tuple(categories))


@lru_cache(maxsize=4096)
def _categories_member(categories: tuple[str, ...]) -> bytes:
    return b',"categories":' + _encode(categories) + b',"score":'


@lru_cache(maxsize=64)
def _prefixes(k: int) -> np.ndarray:
    """``{"rank":N,`` for ranks 1..k, the first opening the answer's array."""
    out = np.array([b'{"rank":%d,' % n for n in range(1, k + 1)], dtype=object)
    out[0] = b"[" + out[0]
    return out


def encode_rows(members: np.ndarray, scores: np.ndarray, version: int) -> list[msgspec.Raw]:
    """Each query's rows as one JSON array (msgspec.Raw, encoded as it is inside an answer).

    ``members`` (object) and ``scores`` (float) have shape (queries, k): row j of query q is
    item ``members[q, j]`` with ``scores[q, j]``, rank j + 1; ``version`` is the model version
    every score comes from.
    """
    n, k = members.shape
    if k == 0:
        return [msgspec.Raw(b"[]")] * n
    # Every score of the block in one encode: "[s1,s2,...]" split at the commas (numbers never hold one).
    text = _encode(np.round(scores.astype(np.float64, copy=False), SCORE_DECIMALS).ravel().tolist())
    pieces = np.empty((n, k, 4), dtype=object)
    pieces[:, :, 0] = _prefixes(k)
    pieces[:, :, 1] = members
    pieces[:, :, 2] = np.array(text[1:-1].split(b","), dtype=object).reshape(n, k)
    tail = b',"model_version":%d}' % version
    pieces[:, :, 3] = tail + b","
    pieces[:, -1, 3] = tail + b"]"
    return [msgspec.Raw(b"".join(query.ravel().tolist())) for query in pieces]
