"""Model versions: stale share, bounded in-place re-encoding, rebuild-and-swap with writes during the build."""

from __future__ import annotations

import numpy as np
import pytest

from streamrecall.index import InvalidInputError, RebuildInProgressError

from .conftest import meta


def test_stale_share_and_ids(make_index, make_vectors):
    index = make_index()
    index.upsert(["a", "b", "c", "d"], make_vectors(4), [meta(1, ts=5), meta(1, ts=1), meta(2), meta(3)])
    assert index.stale_share(3) == pytest.approx(0.75)
    assert index.stale_share(1) == 0.0
    assert index.stale_ids(3, limit=2) == ["b", "a"]  # oldest version, then oldest encoding, first
    assert sorted(index.stale_ids(3, limit=10)) == ["a", "b", "c"]
    assert index.version_counts() == {1: 2, 2: 1, 3: 1}
    assert make_index().stale_share(5) == 0.0


def test_reencode_in_place_in_bounded_batches(make_index, make_vectors):
    index = make_index(300, version=1)
    index.upsert(["a", "b"], make_vectors(2), meta(1, ts=42, categories=("k",)))
    target = {}
    calls = []

    def encode(ids):
        calls.append(len(ids))
        vecs = make_vectors(len(ids))
        target.update(zip(ids, vecs))
        return vecs

    done = index.reencode(encode, current_version=2, batch_size=50, rebuild_threshold=2.0, max_items=120, clock=lambda: 7)
    assert done == 120 and calls == [50, 50, 20]
    assert index.stale_share(2) == pytest.approx((302 - 120) / 302)
    done = index.reencode(encode, current_version=2, batch_size=64, rebuild_threshold=2.0, clock=lambda: 7)
    assert done == 302 - 120 and max(calls) <= 64
    assert index.stale_share(2) == 0.0 and index.stale_ids(2, 10) == []
    a = index.get("a")
    assert a.meta.model_version == 2 and a.meta.encoded_at_ms == 7
    assert a.meta.event_ts_ms == 42 and a.meta.categories == ("k",)  # kept
    assert np.allclose(a.vector, target["a"])
    assert index.stats()["slots"] == 302  # updates reused the slots they vacated
    assert index.reencode(encode, current_version=2) == 0


def test_reencode_skips_items_deleted_or_refreshed_meanwhile(make_index, make_vectors):
    index = make_index(20, version=1)

    def encode(ids):
        index.delete(["i0"])  # deleted while its batch is being encoded
        index.upsert(["i1"], make_vectors(1), meta(5))  # re-encoded by someone else with a newer version
        return make_vectors(len(ids))

    index.reencode(encode, current_version=3, batch_size=100, rebuild_threshold=2.0)
    assert "i0" not in index
    assert index.get("i1").meta.model_version == 5
    assert index.stale_share(3) == 0.0


def test_reencode_by_rebuild_keeps_writes_made_during_the_build(make_index, make_vectors):
    index = make_index(400, version=1)
    index.upsert(["fresh"], make_vectors(1), meta(2))  # current already: copied, not re-encoded
    fresh_vec = index.get("fresh").vector
    late = make_vectors(1)
    encoded = []

    def encode(ids):
        if not encoded:  # writes that land while the fresh graph is being built
            index.upsert(["late"], late, meta(2))
            index.delete(["i3"])
            index.upsert(["i4"], late, meta(2, ts=9))
        encoded.extend(ids)
        return make_vectors(len(ids))

    old_store = index._s
    done = index.reencode(encode, current_version=2, batch_size=100, rebuild_threshold=0.5)
    assert index._s is not old_store  # swapped
    assert done == 400 and "fresh" not in encoded and max(map(len, [encoded])) == 400
    assert len(index) == 400 + 1 + 1 - 1
    assert "i3" not in index and "late" in index
    assert np.allclose(index.get("i4").vector, late[0]) and index.get("i4").meta.event_ts_ms == 9
    assert np.allclose(index.get("fresh").vector, fresh_vec)
    assert index.stale_share(2) == 0.0
    assert index.stats()["deleted_slots"] == 0  # a fresh graph: compact
    assert index.query(late[0], k=2)[0][0].item_id in {"late", "i4"}


def test_rebuild_replaces_content_and_refuses_a_second_one(make_index, make_vectors):
    index = make_index(100)
    vecs = make_vectors(50)

    ids = [f"r{j}" for j in range(50)]
    index.upsert(["gone"], make_vectors(1), meta())
    index.rebuild(ids, vecs, meta(4))
    assert sorted(index.ids()) == sorted(ids)
    assert index.query(vecs[3], k=1)[0][0].item_id == "r3"

    def nested(ids_):
        index.rebuild(["x"], make_vectors(1), meta())
        return make_vectors(len(ids_))

    with pytest.raises(RebuildInProgressError):
        index.reencode(nested, current_version=9)
    index.rebuild(["y"], make_vectors(1), meta())  # the journal was released
    assert index.ids() == ["y"]


def test_compact_drops_deleted_slots(make_index):
    index = make_index(200)
    index.delete([f"i{j}" for j in range(100)])
    before = {i: index.get(i) for i in index.ids()}
    index.compact()
    assert index.stats()["slots"] == 100 and index.deleted_share() == 0.0
    for i, e in before.items():
        got = index.get(i)
        assert np.allclose(got.vector, e.vector) and got.meta == e.meta


def test_encode_fn_returning_wrong_shape(make_index):
    index = make_index(10)
    with pytest.raises(InvalidInputError):
        index.reencode(lambda ids: np.zeros((len(ids) + 1, 16)), current_version=2, rebuild_threshold=2.0)
    with pytest.raises(InvalidInputError):
        index.reencode(lambda ids: np.zeros((len(ids), 16)), current_version=2, batch_size=0)
