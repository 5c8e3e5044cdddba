"""Drift: how far each stored vector may have moved since it was written, and which to re-encode first."""

from __future__ import annotations

import numpy as np
import pytest

from streamrecall.index import InvalidInputError, ItemIndex

from .conftest import meta


def test_drift_is_relative_to_the_norm_and_a_write_resets_it(make_index, make_vectors):
    index = make_index()
    vecs = make_vectors(3)
    vecs[1] *= 4.0  # norm 4
    index.upsert(["a", "b", "c"], vecs, meta(1))
    index.add_drift(["a", "b", "gone"], np.array([0.2, 0.2, 9.0]))
    assert index.drift_stats(0.1) == pytest.approx(((0.2 + 0.05) / 3, 1 / 3))
    index.add_drift(["b"], np.array([0.4]))
    assert index.drifted(0.1, 10) == ["a", "b"] or index.drifted(0.1, 10) == ["b", "a"]
    index.upsert(["a"], make_vectors(1), meta(2))
    assert index.drifted(0.1, 10) == ["b"]
    index.delete(["b"])
    assert index.drift_stats(0.0) == (0.0, 0.0)
    with pytest.raises(InvalidInputError):
        index.add_drift(["a"], np.array([1.0, 2.0]))


def test_drifted_puts_the_most_retrieved_first_then_the_most_drifted(make_index, make_vectors):
    index = make_index()
    vecs = make_vectors(50)
    index.upsert([f"i{j}" for j in range(50)], vecs, meta(1))
    index.add_drift([f"i{j}" for j in range(50)], np.linspace(0.2, 0.7, 50))
    for _ in range(3):
        index.query(vecs[7][None, :], k=1)  # i7 is its own nearest: retrieved three times
    index.query(vecs[30][None, :], k=1)
    order = index.drifted(0.1, 50)
    assert order[:2] == ["i7", "i30"]
    rest = order[2:]
    assert rest == sorted(rest, key=lambda i: -int(i[1:]))  # then by drift, the largest first
    assert index.drifted(0.1, 2) == ["i7", "i30"]
    index.decay_retrieved(0.0)
    assert index.drifted(0.1, 1) == ["i49"]


def test_a_rebuild_keeps_retrievals_and_the_drift_of_the_vectors_it_copies(make_index, make_vectors):
    index = make_index()
    vecs = make_vectors(20)
    index.upsert([f"i{j}" for j in range(10)], vecs[:10], meta(1))
    index.upsert([f"i{j}" for j in range(10, 20)], vecs[10:], meta(2))
    index.add_drift([f"i{j}" for j in range(20)], np.full(20, 0.3))
    index.query(vecs[15][None, :], k=1)
    done = index.reencode(lambda ids: make_vectors(len(ids)), current_version=2, rebuild_threshold=0.0)
    assert done == 10  # the version-1 items: re-encoded, their drift gone; the copied ones keep theirs
    assert sorted(index.drifted(0.1, 100)) == sorted(f"i{j}" for j in range(10, 20))
    assert index.drifted(0.1, 1) == ["i15"]


def test_a_snapshot_keeps_norms_drift_and_retrievals(make_index, make_vectors, tmp_path):
    index = make_index()
    vecs = make_vectors(10) * 2.0
    index.upsert([f"i{j}" for j in range(10)], vecs, meta(1))
    index.add_drift(["i3", "i4"], np.array([1.0, 0.4]))
    index.query(vecs[4][None, :], k=1)
    index.snapshot(tmp_path, {})
    loaded, _ = ItemIndex.load(tmp_path)
    assert loaded.drifted(0.1, 10) == ["i4", "i3"]
    assert loaded.drift_stats(0.1) == pytest.approx(index.drift_stats(0.1))
    loaded.add_drift(["i0"], np.array([1.0]))  # the norm came back too: 1.0 over a norm of 2
    assert loaded.drift_stats(0.45)[1] == pytest.approx(2 / 10)


def test_drift_skips_vectors_already_encoded_by_the_version_that_moved(make_index, make_vectors):
    index = make_index()
    index.upsert(["old", "new"], make_vectors(2), [meta(3), meta(5)])
    index.add_drift(["old", "new"], np.array([1.0, 1.0]), below_version=5)
    assert index.drifted(0.5, 10) == ["old"]


@pytest.mark.parametrize("space", ["ip", "cosine"])
def test_measured_drift_replaces_the_estimate_and_leaves_the_vector(make_index, make_vectors, space):
    index = make_index(space=space)
    vecs = make_vectors(2) * 3.0  # norm 3 (make_vectors gives unit vectors)
    index.upsert(["a", "b"], vecs, meta(1))
    stored = index.get("a").vector.copy()
    index.add_drift(["a", "b"], np.array([9.0, 9.0]))  # the estimate: 3x the norm
    now = np.vstack([vecs, vecs[:1]])  # the last for "gone", not in the index
    now[1] = -vecs[1]  # "b" turned round; "a" did not move
    drift = index.measure_drift(["a", "b", "gone"], now)
    assert drift[0] == pytest.approx(0.0, abs=1e-6) and drift[1] == pytest.approx(2.0, rel=1e-5)
    assert np.isnan(drift[2])
    assert index.drifted(0.1, 10) == ["b"] and index.drift_stats(0.1) == pytest.approx((1.0, 0.5), rel=1e-5)
    assert np.array_equal(index.get("a").vector, stored)  # measuring writes nothing to the graph
    with pytest.raises(InvalidInputError):
        index.measure_drift(["a"], vecs)
