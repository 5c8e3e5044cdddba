"""Upsert, update, delete, slot reuse, growth and the shape of query results."""

from __future__ import annotations

import numpy as np
import pytest

from streamrecall.index import EntryMeta, Hit, InvalidInputError, ItemIndex

from .conftest import DIM, meta


def test_upsert_then_query_and_get(make_index, make_vectors):
    index = make_index()
    vecs = make_vectors(200)
    ids = [f"i{j}" for j in range(200)]
    index.upsert(ids, vecs, [meta(3, ts=j, categories=("c", str(j % 3))) for j in range(200)])
    assert len(index) == 200 and "i7" in index and "nope" not in index
    assert sorted(index.ids()) == sorted(ids)
    hits = index.query(vecs[7], k=5)
    assert len(hits) == 1 and len(hits[0]) == 5
    top = hits[0][0]
    assert isinstance(top, Hit) and top.item_id == "i7"
    assert top.score == pytest.approx(1.0, abs=1e-5)
    assert top.model_version == 3 and top.categories == ("c", "1")
    assert [h.score for h in hits[0]] == sorted((h.score for h in hits[0]), reverse=True)
    entry = index.get("i7")
    assert entry is not None and np.allclose(entry.vector, vecs[7])
    assert entry.meta == EntryMeta(3, 7, 7, ("c", "1"))
    assert index.get("nope") is None


def test_upsert_existing_replaces_vector_without_growing(make_index, make_vectors):
    index = make_index(100)
    new = make_vectors(1)
    index.upsert(["i5"], new, meta(2, ts=99))
    assert len(index) == 100
    assert np.allclose(index.get("i5").vector, new[0])
    assert index.get("i5").meta.model_version == 2
    assert index.query(new[0], k=1)[0][0].item_id == "i5"
    st = index.stats()
    assert st["slots"] == 100 and st["deleted_slots"] == 0  # the retired slot was reused at once
    for _ in range(5):  # churn on the same ids: the graph stays the same size
        index.upsert([f"i{j}" for j in range(50)], make_vectors(50), meta(3))
    assert index.stats()["slots"] == 100
    # every id exactly once among the results, nothing duplicated by the updates
    ids = [h.item_id for h in index.query(make_vectors(1), k=1000)[0]]
    assert sorted(ids) == sorted(f"i{j}" for j in range(100))


def test_duplicate_ids_in_one_call_last_wins(make_index, make_vectors):
    index = make_index()
    v = make_vectors(3)
    index.upsert(["a", "b", "a"], v, [meta(1), meta(1), meta(2)])
    assert len(index) == 2
    assert np.allclose(index.get("a").vector, v[2]) and index.get("a").meta.model_version == 2


def test_delete_and_slot_reuse(make_index, make_vectors):
    index = make_index(100)
    assert index.delete(["i1", "i2", "i2", "missing"]) == 2
    assert len(index) == 98 and "i1" not in index and index.get("i1") is None
    assert index.deleted_share() == pytest.approx(2 / 100)
    all_hits = index.query(make_vectors(1), k=100)[0]
    assert len(all_hits) == 98 and not {"i1", "i2"} & {h.item_id for h in all_hits}
    index.upsert(["n1", "n2", "n3"], make_vectors(3), meta())
    st = index.stats()
    assert st["slots"] == 101 and st["deleted_slots"] == 0  # two vacated slots reused, one appended
    # a deleted id may come back
    v = make_vectors(1)
    index.upsert(["i1"], v, meta())
    assert index.query(v[0], k=1)[0][0].item_id == "i1"
    assert index.delete([]) == 0


def test_churn_does_not_grow_the_graph(make_index, make_vectors):
    index = make_index(200)
    cap = index.capacity
    for round_ in range(10):
        index.delete([f"i{j}" for j in range(round_ * 20, round_ * 20 + 20)])
        index.upsert([f"r{round_}-{j}" for j in range(20)], make_vectors(20), meta())
    assert len(index) == 200 and index.stats()["slots"] == 200 and index.capacity == cap


def test_capacity_grows_automatically(make_index, make_vectors):
    index = make_index(initial_capacity=16, write_batch=50)
    index.upsert([f"i{j}" for j in range(300)], make_vectors(300), meta())
    assert len(index) == 300 and index.capacity >= 300
    assert index.query(index.get("i299").vector, k=1)[0][0].item_id == "i299"


def test_query_returns_fewer_than_k_when_few_items(make_index, make_vectors):
    index = make_index()
    assert index.query(make_vectors(2), k=10) == [[], []]
    index.upsert(["a", "b", "c"], make_vectors(3), meta())
    index.delete(["b"])
    res = index.query(make_vectors(2), k=10)
    assert [sorted(h.item_id for h in r) for r in res] == [["a", "c"], ["a", "c"]]
    assert index.query(make_vectors(1), k=0) == [[]]


def test_exclude_and_filter(make_index, make_vectors):
    index = make_index()
    vecs = make_vectors(300)
    index.upsert([f"i{j}" for j in range(300)], vecs, [meta(categories=(str(j % 10),)) for j in range(300)])
    plain = [h.item_id for h in index.query(vecs[0], k=10)[0]]
    excluded = index.query(vecs[0], k=10, exclude=set(plain[:5]) | {"unknown"})[0]
    assert len(excluded) == 10 and not set(plain[:5]) & {h.item_id for h in excluded}
    only7 = index.query(vecs[0], k=10, filter=lambda h: h.categories == ("7",))[0]
    assert len(only7) == 10 and all(h.categories == ("7",) for h in only7)
    none = index.query(vecs[0], k=10, filter=lambda h: False)[0]
    assert none == []


def test_l2_and_cosine_spaces(make_vectors):
    for space in ("l2", "cosine"):
        index = ItemIndex(DIM, space=space, num_threads=1)
        v = make_vectors(50) * 3.0
        index.upsert([str(j) for j in range(50)], v, meta())
        top = index.query(v[4], k=3)[0]
        assert top[0].item_id == "4"
        assert top[0].score >= top[1].score >= top[2].score
        assert top[0].score == pytest.approx(0.0 if space == "l2" else 1.0, abs=1e-4)


@pytest.mark.parametrize("bad", [
    lambda v: (["a", "b"], v[:1], meta()),            # count mismatch
    lambda v: (["a"], np.zeros((1, DIM + 1)), meta()),  # wrong dim
    lambda v: (["a"], np.full((1, DIM), np.nan), meta()),  # non-finite
    lambda v: ("ab", v[:2], meta()),                  # one string, not a list
    lambda v: ([1], v[:1], meta()),                   # non-str id
    lambda v: (["a"], v[:1], [meta(), meta()]),       # meta count mismatch
])
def test_invalid_input_is_refused_and_nothing_written(make_index, make_vectors, bad):
    index = make_index(10)
    with pytest.raises(InvalidInputError):
        index.upsert(*bad(make_vectors(2)))
    assert len(index) == 10 and index.stats()["slots"] == 10


@pytest.mark.parametrize("bad", [EntryMeta(1, 0, 2**63), EntryMeta(2**63, 0, 0), EntryMeta(1, -2**63 - 1, 0)])
def test_metadata_past_int64_is_refused_before_anything_is_written(make_index, make_vectors, bad):
    # The store keeps these in int64 columns. It used to write the nodes first and fail on the
    # column: the row stayed live with no metadata, and an update lost the id's old node.
    index = make_index(10)
    before = index.get("i3")
    with pytest.raises(InvalidInputError, match="64-bit"):
        index.upsert(["i3", "x"], make_vectors(2), [meta(), bad])
    assert "x" not in index and len(index) == 10
    after = index.get("i3")
    assert after is not None and after.meta == before.meta and np.array_equal(after.vector, before.vector)
    assert {h.item_id for h in index.query(before.vector, k=10)[0]} == {f"i{j}" for j in range(10)}


def test_invalid_query_and_constructor():
    index = ItemIndex(4, num_threads=1)
    with pytest.raises(InvalidInputError):
        index.query(np.zeros(5), k=1)
    with pytest.raises(InvalidInputError):
        index.query(np.zeros(4), k=-1)
    with pytest.raises(InvalidInputError):
        ItemIndex(4, space="dot")
    with pytest.raises(ValueError):  # InvalidInputError is also a ValueError
        ItemIndex(0)


def test_failed_insert_leaves_no_half_written_ids(make_index, make_vectors, monkeypatch):
    index = make_index(20)
    hnsw = index._s.hnsw

    class Boom:
        def __getattr__(self, name):
            return getattr(hnsw, name)

        def add_items(self, *a, **kw):
            hnsw.add_items(*a, **kw)  # the nodes get in, then the call "fails"
            raise MemoryError("simulated")

    index._s.hnsw = Boom()
    with pytest.raises(MemoryError):
        index.upsert(["i3", "x"], make_vectors(2), meta())
    index._s.hnsw = hnsw
    assert "i3" not in index and "x" not in index and len(index) == 19
    got = {h.item_id for h in index.query(make_vectors(1), k=100)[0]}
    assert got == {f"i{j}" for j in range(20)} - {"i3"}
    index.upsert(["i3"], make_vectors(1), meta())  # and the id can be written again
    assert "i3" in index


def test_ef_setter(make_index):
    index = make_index(10, ef=20)
    assert index.ef == 20
    index.ef = 50
    assert index.ef == 50 and index._s.hnsw.ef == 50


def test_query_after_mass_deletion_never_raises(make_index, make_vectors):
    index = make_index(400)
    index.delete([f"i{j}" for j in range(395)])
    res = index.query(make_vectors(3), k=10)
    assert all(sorted(h.item_id for h in r) == [f"i{j}" for j in range(395, 400)] for r in res)


def test_hnswlib_too_few_results_falls_back_to_smaller_k(make_index, make_vectors):
    index = make_index(50)
    hnsw = index._s.hnsw

    class Stingy:  # finds at most 3 live nodes, like a graph cut off by deletions
        def __getattr__(self, name):
            return getattr(hnsw, name)

        def knn_query(self, data, k=1, num_threads=-1, filter=None):
            if k > 3:
                raise RuntimeError("Cannot return the results in a contiguous 2D array. Probably ef or M is too small")
            return hnsw.knn_query(data, k=k, num_threads=num_threads)

    index._s.hnsw = Stingy()
    res = index.query(make_vectors(2), k=10)
    assert [len(r) for r in res] == [3, 3]


def test_all_at_version_follows_upserts_deletes_copies_and_snapshots(make_index, make_vectors, tmp_path):
    """The O(1) answer to "is every vector of version v" (the API skips re-scoring on it)."""
    index = make_index(0)
    assert index.all_at_version(1)  # empty
    vecs = make_vectors(20)
    index.upsert([f"i{j}" for j in range(20)], vecs, meta(1))
    assert index.all_at_version(1) and not index.all_at_version(2)
    index.upsert(["i3"], vecs[3:4], meta(2))  # one re-encoded by a newer version
    assert not index.all_at_version(1) and not index.all_at_version(2)
    index.delete(["i3"])
    assert index.all_at_version(1)
    index.upsert([f"i{j}" for j in range(20) if j != 3], np.delete(vecs, 3, axis=0), meta(2))
    assert index.all_at_version(2) and not index.all_at_version(1)
    index.upsert(["new"], vecs[:1], meta(1))
    assert not index.all_at_version(2)
    assert index._s.copy().at_version == index._s.at_version
    index.snapshot(tmp_path / "snap", {})
    loaded = ItemIndex.load(tmp_path / "snap")[0]
    assert loaded._s.at_version == index._s.at_version == {2: 19, 1: 1}


def test_explore_searches_wider_and_returns_the_best_k(make_index, make_vectors):
    """``explore`` widens hnswlib's search without returning (or building) more than ``k`` hits:
    the answer is the first ``k`` of a search for ``explore`` candidates."""
    index = make_index(2000)
    queries = make_vectors(20)
    for q in queries:
        wide = index.query(q, k=200)[0]
        explored = index.query(q, k=50, explore=200)[0]
        assert explored == wide[:50]
    narrow = index.query(queries, k=50)  # at ef=max(ef, k): a narrower search, so never better
    vecs = np.stack([index.get(f"i{j}").vector for j in range(2000)])
    truth = [set(np.argsort(-(vecs @ q))[:50].tolist()) for q in queries]
    found = [{int(h.item_id[1:]) for h in hits} for hits in index.query(queries, k=50, explore=200)]
    found_narrow = [{int(h.item_id[1:]) for h in hits} for hits in narrow]
    assert sum(len(t & f) for t, f in zip(truth, found)) >= sum(len(t & f) for t, f in zip(truth, found_narrow))


def test_a_block_of_queries_answers_as_each_query_alone(make_index, make_vectors):
    """Several query vectors are one hnswlib call whose hits are read for the whole block; with
    deleted, replaced and excluded items among the neighbours, every query's answer is the one it
    gets alone."""
    index = make_index(600)
    index.delete([f"i{j}" for j in range(0, 600, 7)])
    index.upsert([f"i{j}" for j in range(1, 600, 11)], make_vectors(len(range(1, 600, 11))), meta(2))
    queries = make_vectors(32)
    for exclude in (None, {f"i{j}" for j in range(2, 600, 5)}):
        together = index.query(queries, k=30, exclude=exclude, explore=60, threads=2)
        alone = [index.query(q, k=30, exclude=exclude, explore=60)[0] for q in queries]
        assert together == alone
        assert all(len(hits) == 30 for hits in together)
        if exclude:
            assert not exclude & {h.item_id for hits in together for h in hits}
    fresh = make_index(600)  # nothing deleted: the column-wise read for the whole block
    assert fresh.query(queries, k=30, threads=2) == [fresh.query(q, k=30)[0] for q in queries]
