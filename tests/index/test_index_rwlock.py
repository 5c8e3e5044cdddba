"""The reader-writer lock under the index: exclusion and fairness both ways."""

from __future__ import annotations

import threading
import time

from streamrecall.index._rwlock import RWLock


def test_readers_share_writers_exclude():
    lock = RWLock()
    state = {"readers": 0, "max_readers": 0, "writer": False, "bad": 0}
    guard = threading.Lock()

    def reader():
        for _ in range(200):
            with lock.read():
                with guard:
                    state["readers"] += 1
                    state["max_readers"] = max(state["max_readers"], state["readers"])
                    state["bad"] += state["writer"]
                time.sleep(0)
                with guard:
                    state["readers"] -= 1

    def writer():
        for _ in range(100):
            with lock.write():
                with guard:
                    state["bad"] += state["readers"] > 0 or state["writer"]
                    state["writer"] = True
                time.sleep(0)
                with guard:
                    state["writer"] = False

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads)
    assert state["bad"] == 0 and state["max_readers"] >= 2


def test_a_busy_writer_does_not_starve_a_reader():
    lock = RWLock()
    stop = threading.Event()
    writes = [0]

    def writer():
        while not stop.is_set():
            with lock.write():
                time.sleep(0.002)
                writes[0] += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(0.01)
        waits = []
        for _ in range(20):
            before = writes[0]
            with lock.read():
                waits.append(writes[0] - before)
    finally:
        stop.set()
        t.join(5)
    assert max(waits) <= 1  # in after at most the write in progress


def test_a_stream_of_readers_does_not_starve_a_writer():
    lock = RWLock()
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            with lock.read():
                time.sleep(0.001)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        started = time.perf_counter()
        for _ in range(10):
            with lock.write():
                pass
        assert time.perf_counter() - started < 2.0
    finally:
        stop.set()
        for t in readers:
            t.join(5)
