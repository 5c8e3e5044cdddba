"""Answer rows encoded as JSON without a Python object per row (index/json_rows.py), and the
index's block search that feeds them (``ItemIndex.query_block``)."""

from __future__ import annotations

import json

import msgspec
import numpy as np

from streamrecall.index import EntryMeta, ItemIndex
from streamrecall.index.json_rows import encode_rows, item_members

ODD_IDS = ['plain', 'quo"te', 'back\\slash', 'comma,"x"', 'ünïcødé ☃', 'tab\tnew\nline', '\x00\x1f', '']


def _rows(ids: list[str], cats: list[tuple[str, ...]], scores: np.ndarray, version: int) -> list[list[dict]]:
    return [[{"rank": j + 1, "item_id": i, "categories": list(c), "score": round(float(s), 6), "model_version": version}
             for j, (i, c, s) in enumerate(zip(ids, cats, row))] for row in scores]


def test_encoded_rows_read_back_as_the_rows_they_stand_for():
    """Hostile ids and categories (quotes, commas, backslashes, control characters, non-ASCII) and
    negative, tiny and integral scores decode, with the standard library's parser too, to exactly
    the rows as dicts: rank from 1, the score rounded to 6 places, the answer's version."""
    cats = [(), ("a",), ('c"1', "c,2"), ("\\",), ("☃",), ("x",) * 3, ("",), ("z",)]
    scores = np.array([[0.5, -0.25, 1e-9, 3.0, -1234.5678915, 0.1234565, 2.0 / 3.0, 0.0],
                       [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]])
    members = np.empty((2, len(ODD_IDS)), dtype=object)
    for q in range(2):
        members[q, :] = [item_members(i, c) for i, c in zip(ODD_IDS, cats)]
    encoded = encode_rows(members, scores, version=17)
    expected = _rows(ODD_IDS, cats, scores, 17)
    assert [msgspec.json.decode(raw) for raw in encoded] == expected
    assert json.loads(msgspec.json.encode({"results": encoded})) == {"results": expected}


def test_no_rows_and_one_row():
    assert encode_rows(np.empty((3, 0), dtype=object), np.empty((3, 0)), 1) == [msgspec.Raw(b"[]")] * 3
    one = encode_rows(np.array([[item_members("i1", ("c",))]], dtype=object), np.array([[0.25]]), 4)
    assert msgspec.json.decode(one[0]) == [{"rank": 1, "item_id": "i1", "categories": ["c"], "score": 0.25,
                                            "model_version": 4}]


def test_a_block_is_what_query_returns_as_columns(make_index, make_vectors):
    """``query_block``: each query's first ``k`` of a search for ``explore`` candidates, as query()
    finds them; members name each item's id and categories, updated with the item."""
    index = make_index(500)
    index.upsert(["i3"], make_vectors(1), EntryMeta(2, 0, 0, ("new", "cats")))
    index.delete(["i4", "i5"])
    queries = make_vectors(16)
    block = index.query_block(queries, 20, explore=60, threads=2)
    hits = index.query(queries, k=20, explore=60)
    assert block is not None and block.ids.shape == block.members.shape == block.scores.shape == (16, 20)
    assert block.ids.tolist() == [[h.item_id for h in q] for q in hits]
    np.testing.assert_allclose(block.scores, [[h.score for h in q] for q in hits], atol=1e-6)
    assert block.members.tolist() == [[item_members(h.item_id, h.categories) for h in q] for q in hits]
    near = index.query_block(index.get("i3").vector, 1)
    assert near.members[0, 0] == item_members("i3", ("new", "cats"))
    small = make_index(5)
    assert small.query_block(queries, 20).ids.shape == (16, 5)  # fewer items than k: all of them


def test_a_restored_snapshot_keeps_the_members(make_index, make_vectors, tmp_path):
    """Members are derived from ids and categories, not stored: a loaded snapshot rebuilds them."""
    index = make_index(50)
    index.upsert(["i7"], make_vectors(1), EntryMeta(1, 0, 0, ("c7",)))
    index.snapshot(tmp_path / "snap", {})
    loaded = ItemIndex.load(tmp_path / "snap")[0]
    queries = make_vectors(4)
    assert loaded.query_block(queries, 10).members.tolist() == index.query_block(queries, 10).members.tolist()
    assert loaded.query_block(loaded.get("i7").vector, 1).members[0, 0] == item_members("i7", ("c7",))
