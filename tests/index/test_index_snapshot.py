"""Snapshots: round trip, offsets, atomicity under injected failures and under SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from streamrecall.index import ItemIndex, SnapshotError
from streamrecall.index import snapshot as snapshot_mod

from .conftest import meta


def test_round_trip(make_index, make_vectors, tmp_path):
    index = make_index(300, ef=40)
    index.upsert(["c"], make_vectors(1), meta(7, ts=5, categories=("x", "y")))
    index.delete(["i1", "i2", "i3"])
    offsets = {"items": {"0": 123, "1": 45}, "model-updates": {"0": 2}}
    index.snapshot(tmp_path / "snap", offsets)
    loaded, got_offsets = ItemIndex.load(tmp_path / "snap")
    assert got_offsets == offsets
    assert len(loaded) == len(index) == 298 and sorted(loaded.ids()) == sorted(index.ids())
    assert loaded.ef == 40 and loaded._s.hnsw.ef == 40  # ef is not in hnswlib's file: restored from the manifest
    assert loaded.get("c").meta == index.get("c").meta
    assert np.allclose(loaded.get("c").vector, index.get("c").vector)
    assert loaded.deleted_share() == index.deleted_share()
    q = make_vectors(5)
    assert loaded.query(q, k=10) == index.query(q, k=10)
    # the loaded index keeps working: reuse of deleted slots, updates, no label collisions
    loaded.upsert(["new1", "new2", "i10"], make_vectors(3), meta(8))
    assert len(loaded) == 300 and loaded.stats()["slots"] == 301  # 3 deleted + 1 retired slots, 3 inserts
    assert loaded.stats()["deleted_slots"] == 1
    every = {h.item_id for h in loaded.query(make_vectors(1), k=1000)[0]}
    assert len(every) == 300 and {"new1", "i10"} <= every and "i1" not in every


def test_old_snapshots_are_replaced(make_index, tmp_path):
    index = make_index(10)
    for n in range(3):
        index.snapshot(tmp_path, {"n": n})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["CURRENT", "snap-000000000003"]
    assert ItemIndex.load(tmp_path)[1] == {"n": 2}


def test_empty_index_round_trip(make_index, tmp_path):
    make_index().snapshot(tmp_path, {})
    loaded, offsets = ItemIndex.load(tmp_path)
    assert len(loaded) == 0 and offsets == {}


@pytest.mark.parametrize("fail_at", ["save_index", "_write_file", "rename", "_publish"])
def test_failure_mid_write_keeps_previous_snapshot(make_index, make_vectors, tmp_path, monkeypatch, fail_at):
    index = make_index(50)
    index.snapshot(tmp_path, {"items": {"0": 50}})
    index.upsert([f"x{j}" for j in range(20)], make_vectors(20), meta())

    def boom(*a, **kw):
        raise OSError("disk full (simulated)")

    if fail_at == "save_index":
        original_copy = index._s.copy

        def copy_then_break():
            dup = original_copy()

            class Broken:
                def __getattr__(self, name):
                    return boom if name == "save_index" else getattr(dup.hnsw, name)

            dup.hnsw = Broken()
            return dup

        monkeypatch.setattr(index._s, "copy", copy_then_break)
    elif fail_at == "rename":
        monkeypatch.setattr(snapshot_mod.os, "rename", boom)
    else:
        monkeypatch.setattr(snapshot_mod, fail_at, boom)
    with pytest.raises(OSError):
        index.snapshot(tmp_path, {"items": {"0": 70}})
    monkeypatch.undo()
    loaded, offsets = ItemIndex.load(tmp_path)
    assert offsets == {"items": {"0": 50}} and len(loaded) == 50
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # cleaned up
    index.snapshot(tmp_path, {"items": {"0": 70}})  # and the next one works
    assert ItemIndex.load(tmp_path)[1] == {"items": {"0": 70}}


def test_kill_during_snapshots_leaves_a_loadable_consistent_one(tmp_path):
    """SIGKILL a process that snapshots in a loop, at several moments; what is on disk always loads."""
    worker = Path(__file__).with_name("snapshot_worker.py")
    snap = tmp_path / "snap"
    torn = 0
    for delay in (0.01, 0.05, 0.09, 0.13, 0.17):
        proc = subprocess.Popen([sys.executable, str(worker), str(snap)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        try:
            assert proc.stdout.readline().strip(), "worker produced no snapshot"
            time.sleep(delay)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        current = snapshot_mod.current(snap)
        torn += any(p.name.startswith(".tmp-") or (p.name.startswith("snap-") and p != current)
                    for p in snap.iterdir())
        loaded, offsets = ItemIndex.load(snap)
        n = offsets["items"]["0"]
        assert n >= 50 and len(loaded) == n
        assert sorted(loaded.ids()) == sorted(f"w{j}" for j in range(n))
    assert torn >= 1, "no kill landed in the middle of a write; the test proved nothing"


def test_load_errors(make_index, tmp_path):
    with pytest.raises(SnapshotError, match="no snapshot"):
        ItemIndex.load(tmp_path)
    make_index(20).snapshot(tmp_path, {"a": 1})
    current = snapshot_mod.current(tmp_path)
    data = (current / "index.hnsw").read_bytes()
    (current / "index.hnsw").write_bytes(data[: len(data) // 2])  # torn file
    with pytest.raises(SnapshotError, match="digest"):
        ItemIndex.load(tmp_path)
    (tmp_path / "CURRENT").write_text("../../etc\n")
    with pytest.raises(SnapshotError):
        ItemIndex.load(tmp_path)


def test_offsets_must_be_json(make_index, tmp_path):
    with pytest.raises(SnapshotError, match="JSON"):
        make_index(3).snapshot(tmp_path, {"bad": object()})
    assert snapshot_mod.current(tmp_path) is None


def test_categories_given_as_list_round_trip(make_index, make_vectors, tmp_path):
    index = make_index(5)
    index.upsert(["l"], make_vectors(1), meta(categories=["x", "y"]))  # type: ignore[arg-type]
    assert index.get("l").meta.categories == ("x", "y")
    index.snapshot(tmp_path, {})
    assert ItemIndex.load(tmp_path)[0].get("l").meta.categories == ("x", "y")
