"""Queries from several threads while another thread upserts, deletes, grows, re-encodes, rebuilds and snapshots."""

from __future__ import annotations

import threading
import time

import numpy as np

from streamrecall.index import ItemIndex

from .conftest import DIM, meta


def test_hammer_queries_during_writes(make_vectors, tmp_path):
    index = ItemIndex(DIM, num_threads=1, initial_capacity=32, write_batch=40)  # small: many resizes
    pool = make_vectors(4000)
    index.upsert([f"a{j}" for j in range(100)], pool[:100], meta())
    deleted: set[str] = set()  # ids whose delete() returned; never written again
    deleted_lock = threading.Lock()
    errors: list[BaseException] = []
    stop = threading.Event()
    queries_done = [0]

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                with deleted_lock:
                    gone = set(deleted)
                qs = pool[rng.integers(0, len(pool), size=int(rng.integers(1, 4)))]
                k = int(rng.integers(1, 60))
                for hits in index.query(qs, k=k):
                    ids = [h.item_id for h in hits]
                    assert not gone & set(ids), f"query returned deleted ids {gone & set(ids)}"
                    assert len(ids) == len(set(ids)), "an id came back twice"
                    assert len(ids) <= k
                queries_done[0] += 1
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            stop.set()

    def writer() -> None:
        rng = np.random.default_rng(7)
        try:
            live = [f"a{j}" for j in range(100)]
            n = 100
            for step in range(60):
                new = [f"a{j}" for j in range(n, n + 50)]
                index.upsert(new, pool[rng.integers(0, len(pool), 50)], meta(1 + step // 20))
                n += 50
                live += new
                upd = list(rng.choice(live, size=30, replace=False))
                index.upsert(upd, pool[rng.integers(0, len(pool), 30)], meta(1 + step // 20))
                victims = [str(v) for v in rng.choice(live, size=30, replace=False)]
                index.delete(victims)
                with deleted_lock:
                    deleted.update(victims)
                live = [i for i in live if i not in set(victims)]
                if step % 15 == 7:
                    index.snapshot(tmp_path / "snap", {"step": step})
                if step == 30:
                    index.reencode(lambda ids: pool[rng.integers(0, len(pool), len(ids))], 2, 64, max_items=200)
                if step == 45:
                    index.reencode(lambda ids: pool[rng.integers(0, len(pool), len(ids))], 9, 128)  # rebuild
                if stop.is_set():
                    return
        except BaseException as exc:
            errors.append(exc)
        finally:
            stop.set()

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "deadlock"
    if errors:
        raise errors[0]
    assert queries_done[0] > 50
    assert len(index) == 100 + 60 * 50 - len(deleted)
    assert ItemIndex.load(tmp_path / "snap")[1] == {"step": 52}


def test_snapshot_does_not_stop_queries(make_index, make_vectors, tmp_path, monkeypatch):
    """While a snapshot is being written to disk, queries keep being answered."""
    from streamrecall.index import snapshot as snapshot_mod

    index = make_index(500)
    in_write = threading.Event()
    release = threading.Event()
    real_write_file = snapshot_mod._write_file

    def slow_write_file(target, data):
        in_write.set()
        release.wait(10)
        real_write_file(target, data)

    monkeypatch.setattr(snapshot_mod, "_write_file", slow_write_file)
    t = threading.Thread(target=index.snapshot, args=(tmp_path, {"o": 1}))
    t.start()
    assert in_write.wait(10)
    started = time.perf_counter()
    for v in make_vectors(20):
        assert len(index.query(v, k=5)[0]) == 5
    index.upsert(["during"], make_vectors(1), meta())  # writers are not blocked by the disk write either
    elapsed = time.perf_counter() - started
    release.set()
    t.join(10)
    assert elapsed < 2.0
    loaded, _ = ItemIndex.load(tmp_path)
    assert "during" not in loaded and len(loaded) == 500  # the snapshot is the state at its start
